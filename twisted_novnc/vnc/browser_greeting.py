"""The proxy's greeting to the browser: the server side of the RFB opening, sans-IO.

The browser (noVNC) was admitted by its session and token already, so the proxy offers it
security type None only and never asks it for a password; the VM's credentials stay on the
server (``vm_login``).  The exchange, per RFC 6143:

- the proxy sends ``RFB 003.008\\n`` (``start()``); the browser answers with its version:
  3.3 (and 3.4-3.6) is 3.3, 3.7 is 3.7, 3.8 and anything above (Apple's 3.889) is 3.8;
- 3.3: the proxy tells the type (u32 1) and the browser's next byte is ClientInit;
- 3.7/3.8: the proxy lists one type (u8 1, u8 1) and the browser chooses it (u8 1); with 3.8
  the proxy then sends SecurityResult OK (u32 0), with 3.7 nothing (no result after None).

``Greeted`` comes as soon as the browser's choice is accepted; its ``leftover`` (ClientInit and
whatever followed) goes to the VM as is.  Anything else is ``Failed(BAD_RFB)``; a 3.8 browser
choosing another type is first told why (SecurityResult failed, with a reason).  After
``Failed``, ``receive()`` ignores what it is given and returns ``[]``; after ``Greeted`` it raises
``RuntimeError``: the bytes belong to the relay, and dropping them would hang the session.
"""

from __future__ import annotations

import functools
import struct

import attrs

from twisted_novnc.errors import Refusal
from twisted_novnc.vnc.vm_login import (
    NONE,
    Failed,
    HandshakeFailed,
    Script,
    ScriptRunner,
    Send,
    negotiated_version,
    read_version,
)

VERSION = b"RFB 003.008\n"
NOT_OFFERED = b"security type not offered"


@attrs.frozen
class Greeted:
    """The browser chose security None.  ``leftover``: the bytes it sent after its choice
    (ClientInit first), for the VM."""

    version: str
    leftover: bytes


Action = Send | Greeted | Failed


@attrs.define
class BrowserGreeting:
    """The proxy's RFB server opening towards the browser, offering security None only."""

    _runner: ScriptRunner[Send | Greeted] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._runner = ScriptRunner(self._greet())

    def start(self) -> bytes:
        """The proxy's first words: its version."""
        return VERSION

    def receive(self, data: bytes) -> list[Action]:
        """Take bytes from the browser, cut anywhere."""
        if isinstance(self._runner.outcome, Greeted):
            raise RuntimeError("the greeting is over: the browser's bytes belong to the relay now")
        return self._runner.feed(data)

    def _greet(self) -> Script[Send | Greeted]:
        major, minor = yield from read_version(Refusal.BAD_RFB)
        version = negotiated_version(major, minor)
        if version is None:
            raise HandshakeFailed(Refusal.BAD_RFB, f"RFB version {major}.{minor} is too old")
        if version == "3.3":
            yield Send(struct.pack("!I", NONE))
        else:
            yield Send(bytes([1, NONE]))
            chosen = (yield 1)[0]
            if chosen != NONE:
                if version == "3.8":
                    yield Send(struct.pack("!II", 1, len(NOT_OFFERED)) + NOT_OFFERED)
                raise HandshakeFailed(Refusal.BAD_RFB,
                                      f"the browser chose security type {chosen}, not None")
            if version == "3.8":
                yield Send(struct.pack("!I", 0))
        return functools.partial(Greeted, version)
