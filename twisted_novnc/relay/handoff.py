"""A live relay as it travels to a process of the new generation (processes/upgrade.py).

A moved relay is its two sockets, passed as descriptors (SCM_RIGHTS), and a
:class:`MovedRelay`: everything the new process needs to go on as if nothing happened (where
the browser's frame parser stands, the bytes read and not parsed, the bytes given to each
socket and not yet sent, the counters, the session and the client).

:class:`HandoffChannel` carries them over a UNIX stream socket between two processes, with
Twisted's own descriptor passing (``sendFileDescriptor`` and ``fileDescriptorReceived``).
Each message is a frame of :mod:`twisted_novnc.processes.ipc` (``<length><kind><payload>``);
a message's descriptors are sent with the bytes that precede or begin it, so they are always
received before the message is complete, and a message takes them from the front of the queue.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_novnc.front.fastpath import FramePosition
from twisted_novnc.processes.ipc import FrameError, Frames, frame

_log = Logger()

_GONE = Failure(ConnectionDone())

#: A relay, with its two descriptors (browser, VM).
RELAY = b"R"
#: The receiver took a relay over (``{"id": n}``): its sender closes its copies.
ADOPTED = b"T"
#: The receiver could not take a relay (``{"id": n, "why": ...}``): its sender goes on with it.
DECLINED = b"D"

_BLOBS = ("browser_unread", "browser_unsent", "vm_unread", "vm_unsent", "frame_mask",
          "frame_held")


@attrs.frozen
class MovedRelay:
    """One live relay's state, as its old process leaves it and its new one takes it up."""

    ident: int
    #: The session as the readiness gate keys it, and the VM's address as the row gave it.
    session_id: str
    host: str
    port: int
    expires_at: float | None
    client: str
    #: The VM side's kind: ``tcp`` or ``websocket`` (relay/upstream.py, ``kind``).
    upstream: str
    subprotocol: str | None
    fast_path: bool
    up_bytes: int
    down_bytes: int
    activity: int
    #: Seconds the browser waited for readiness, and seconds relayed so far.
    wait_seconds: float
    relay_seconds: float
    #: The browser's bytes read and not parsed yet, and the frame being relayed.
    browser_unread: bytes = b""
    frame: FramePosition = attrs.field(factory=FramePosition)
    #: What the browser was sent and the kernel did not take yet; the same for the VM.
    browser_unsent: bytes = b""
    vm_unsent: bytes = b""
    #: The VM's WebSocket bytes read and not parsed yet (``[upstream] mode = websocket``).
    vm_unread: bytes = b""
    #: Whether the relay was counted under its session (max_per_session).
    session_counted: bool = True

    def encode(self) -> bytes:
        data = attrs.asdict(self, recurse=False)
        position = data.pop("frame")
        data.update(
            frame_left=position.frame_left, frame_fin=position.fin,
            frame_in_message=position.in_message, frame_message_size=position.message_size,
            frame_mask=position.mask, frame_held=position.held,
        )
        for name in _BLOBS:
            data[name] = base64.b64encode(data[name]).decode("ascii")
        return json.dumps(data).encode("utf-8")

    @classmethod
    def decode(cls, payload: bytes) -> MovedRelay:
        """The relay a RELAY message carries; ValueError (or KeyError, TypeError) if it is none."""
        data = json.loads(payload)
        for name in _BLOBS:
            data[name] = base64.b64decode(data[name])
        position = FramePosition(
            data.pop("frame_left"), data.pop("frame_mask"), data.pop("frame_fin"),
            data.pop("frame_in_message"), data.pop("frame_message_size"), data.pop("frame_held"),
        )
        return cls(frame=position, **data)


@implementer(IFileDescriptorReceiver)
class HandoffChannel(Protocol):
    """Messages with descriptors over a connected UNIX socket.

    ``received(kind, payload, fds)`` is called for each message, with the descriptors it
    carried (the receiver owns them: it closes them, or adopts them); ``lost()`` once the
    other process is gone.
    """

    def __init__(
        self,
        received: Callable[[bytes, bytes, list[int]], None],
        lost: Callable[[], None] = lambda: None,
        fds_per_message: Callable[[bytes], int] = lambda kind: 2 if kind == RELAY else 0,
    ) -> None:
        self._received = received
        self._lost = lost
        self._fds_per_message = fds_per_message
        self._frames = Frames()
        self._fds: deque[int] = deque()
        self.gone = False

    def send(self, kind: bytes, payload: bytes, fds: Sequence[int] = ()) -> bool:
        """Send one message; the descriptors are sent as they are at this moment (Twisted
        sends them with the next bytes it writes: the caller keeps them open until the
        receiver answers)."""
        if self.gone or self.transport is None:
            return False
        for fd in fds:
            self.transport.sendFileDescriptor(fd)  # type: ignore[attr-defined]
        self.transport.write(frame(kind, payload))
        return True

    def answered(self, kind: bytes, payload: bytes) -> None:
        """An answer about a relay, to the process that sent it (no descriptors)."""
        self.send(kind, payload)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._frames.feed(data)
        except FrameError as e:
            _log.error("garbage on the relay hand-off channel ({error}): closing it", error=e)
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        for kind, payload in messages:
            wanted = self._fds_per_message(kind)
            if len(self._fds) < wanted:
                _log.error("a hand-off message came without its descriptors: closing the"
                           " channel")
                assert self.transport is not None
                self.transport.abortConnection()  # type: ignore[attr-defined]
                return
            fds = [self._fds.popleft() for _ in range(wanted)]
            self._received(kind, payload, fds)

    def connectionLost(self, reason: Failure = _GONE) -> None:
        self.gone = True
        while self._fds:
            _close(self._fds.popleft())
        self._lost()


class _ChannelFactory(Factory):
    def __init__(self, channel: HandoffChannel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> HandoffChannel:
        return self.channel


def open_channel(reactor: Any, fd: int, channel: HandoffChannel) -> HandoffChannel:
    """Run ``channel`` on the connected UNIX socket ``fd`` (which is closed: the reactor
    keeps its own duplicate), with the reactor's public ``adoptStreamConnection``."""
    try:
        reactor.adoptStreamConnection(fd, socket.AF_UNIX, _ChannelFactory(channel))
    finally:
        os.close(fd)
    return channel


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def close_all(fds: Sequence[int]) -> None:
    """Close descriptors that were received and will not be used."""
    for fd in fds:
        _close(fd)


def answer(ident: int, why: str | None = None) -> tuple[bytes, bytes]:
    """The receiver's answer to relay ``ident``: ADOPTED, or DECLINED with the reason."""
    if why is None:
        return ADOPTED, json.dumps({"id": ident}).encode()
    return DECLINED, json.dumps({"id": ident, "why": why}).encode()


def read_answer(payload: bytes) -> tuple[int, str | None]:
    data: Any = json.loads(payload)
    return int(data["id"]), data.get("why")
