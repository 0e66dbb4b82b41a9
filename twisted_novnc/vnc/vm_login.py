"""The proxy's login to the VM's VNC server: the client side of the RFB opening, sans-IO.

``VMLogin`` is fed the VM's bytes, cut anywhere, and answers with actions for its driver:
``Send`` bytes to the VM, ``StartTLS`` (then ``tls_started()`` once the TLS handshake is done),
and finally ``LoggedIn`` (ClientInit/ServerInit and the relay take over) or ``Failed``.  It
follows RFC 6143 and VeNCrypt as TigerVNC implements them (common/rfb/CConnection.cxx,
CSecurityVeNCrypt.cxx, CSecurityTLS.cxx, CSecurityVncAuth.cxx, CSecurityPlain.cxx):

- Version: the VM's ``RFB xxx.yyy\\n``; the answer is the lower of it and 3.8 (3.4-3.6 are 3.3,
  anything above 3.8 is 3.8, as TigerVNC and noVNC do).  Anything that is not such a line fails
  at its first wrong byte, so a short banner of another protocol is seen at once.
- Security type (3.7/3.8 choose from the VM's list, 3.3 is told): VeNCrypt (19) when offered
  and TLS is possible, or when nothing else offered is usable; then VncAuth (2) with a
  password; then None (1).  Choosing VeNCrypt is final: if its subtypes turn out unusable the
  login fails, it does not fall back to the VM's other types (RFB has no way back).
- VeNCrypt subtypes, first usable wins: X509Plain (262), X509Vnc (261), TLSPlain (259),
  TLSVnc (258), X509None (260), TLSNone (257), VncAuth (2), None (1), Plain (256).  Verified
  TLS before anonymous TLS, TLS before none, and Plain (the password in clear) last.  The
  Plain variants need a user name and a password, the Vnc variants a password; with
  ``tls_possible`` false (a WebSocket upstream) no TLS or X509 subtype is chosen.
- SecurityResult: with 3.8 always; with 3.3/3.7 after every type but None (noVNC's and
  TigerVNC's rule).  A failure carries a reason with 3.8 only: TigerVNC's and QEMU's servers
  send none before 3.8, VeNCrypt or not, so waiting for one there would hang.

An empty password or user name counts as none.  Every length the VM sends is bounded (a reason
of more than ``MAX_REASON`` bytes is not RFB), so a hostile VM cannot make the proxy buffer
without end.  The secrets never appear in a repr or in a ``Failed.detail`` (a VM's reason that
echoes them is redacted); they leave only inside ``Send`` bytes of the authentication itself.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Generator
from typing import Generic, TypeVar

import attrs

from twisted_novnc.errors import Refusal
from twisted_novnc.vnc.vncauth import CHALLENGE_SIZE, vnc_auth_response

#: The longest failure reason a VM may send: real servers send a sentence.
MAX_REASON = 4096

NONE = 1
VNC_AUTH = 2
VENCRYPT = 19
PLAIN = 256
TLS_NONE = 257
TLS_VNC = 258
TLS_PLAIN = 259
X509_NONE = 260
X509_VNC = 261
X509_PLAIN = 262

SECURITY_NAMES = {
    NONE: "None", VNC_AUTH: "VncAuth", VENCRYPT: "VeNCrypt", PLAIN: "Plain",
    TLS_NONE: "TLSNone", TLS_VNC: "TLSVnc", TLS_PLAIN: "TLSPlain",
    X509_NONE: "X509None", X509_VNC: "X509Vnc", X509_PLAIN: "X509Plain",
}

#: VeNCrypt subtypes in the order this client prefers them (see the module docstring).
SUBTYPE_PREFERENCE = (X509_PLAIN, X509_VNC, TLS_PLAIN, TLS_VNC, X509_NONE, TLS_NONE,
                      VNC_AUTH, NONE, PLAIN)
_X509 = frozenset({X509_NONE, X509_VNC, X509_PLAIN})
_TLS = frozenset({TLS_NONE, TLS_VNC, TLS_PLAIN}) | _X509
_NEEDS_PASSWORD = frozenset({VNC_AUTH, TLS_VNC, X509_VNC})
_NEEDS_USER_AND_PASSWORD = frozenset({PLAIN, TLS_PLAIN, X509_PLAIN})


@attrs.frozen
class Send:
    """Write these bytes to the peer.  Its repr gives their length only: the bytes of a Plain
    login hold the password, and a repr ends up in logs."""

    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class StartTLS:
    """Start TLS (client side) now, and call ``tls_started()`` once it is up; feed nothing
    before.  ``verify`` false: anonymous TLS (TLSNone/TLSVnc/TLSPlain); true: an X509 subtype,
    whose certificate the driver checks (against ``[upstream] ca_file`` when set)."""

    verify: bool


@attrs.frozen
class LoggedIn:
    """The VM accepted us.  ``leftover``: bytes received after the SecurityResult (normally
    none), the start of ServerInit."""

    version: str
    security: str
    leftover: bytes


@attrs.frozen
class Failed:
    """The handshake failed.  ``detail`` is for the log: it may hold the peer's reason, never
    a secret."""

    refusal: Refusal
    detail: str


Action = Send | StartTLS | LoggedIn | Failed


class _AwaitTLS:
    """What a handshake script yields to wait for ``tls_started()``."""


AWAIT_TLS = _AwaitTLS()

A = TypeVar("A")

#: A handshake written as a generator: it yields how many bytes it wants next (and receives
#: them), an action ``A`` to emit, or AWAIT_TLS; it returns what makes the final action from
#: the leftover bytes; it raises ``HandshakeFailed`` to fail.
Script = Generator[int | A | _AwaitTLS, bytes, Callable[[bytes], A]]


class HandshakeFailed(Exception):
    """Raised inside a script; becomes a ``Failed`` action."""

    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(refusal, detail)
        self.refusal = refusal
        self.detail = detail


@attrs.define
class ScriptRunner(Generic[A]):
    """Runs a handshake script over bytes that arrive cut anywhere: the script sees exactly the
    reads it asked for, so its actions do not depend on the cuts.  It holds only the bytes fed
    and not yet read, and every read a script asks for is bounded."""

    _script: Script[A] = attrs.field(repr=False)
    _buffer: bytearray = attrs.field(factory=bytearray, repr=False)
    _wanted: int | _AwaitTLS = attrs.field(default=0, repr=False)
    #: None while the handshake runs, then the action that ended it.
    outcome: A | Failed | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        self._step(None)

    @property
    def awaiting_tls(self) -> bool:
        return self.outcome is None and isinstance(self._wanted, _AwaitTLS)

    @property
    def buffered(self) -> int:
        """How many bytes were fed and not read yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[A | Failed]:
        """Take bytes from the peer; the actions they cause."""
        if self.outcome is not None:
            return []
        self._buffer += data
        return self._run([])

    def resume(self) -> list[A | Failed]:
        """Go on after AWAIT_TLS."""
        if not self.awaiting_tls:
            raise RuntimeError("tls_started() while no TLS was asked for")
        return self._run(self._step(b""))

    def fail(self, failure: HandshakeFailed) -> list[A | Failed]:
        """End the handshake with ``failure`` unless it has already ended."""
        if self.outcome is not None:
            return []
        self._script.close()
        return self._end(Failed(failure.refusal, failure.detail))

    def _run(self, actions: list[A | Failed]) -> list[A | Failed]:
        while self.outcome is None and not isinstance(self._wanted, _AwaitTLS):
            if len(self._buffer) < self._wanted:
                break
            chunk = bytes(self._buffer[: self._wanted])
            del self._buffer[: self._wanted]
            actions += self._step(chunk)
        return actions

    def _step(self, sent: bytes | None) -> list[A | Failed]:
        """Advance the script with ``sent`` up to its next read; the actions on the way."""
        actions: list[A | Failed] = []
        try:
            wanted = self._script.send(sent)  # type: ignore[arg-type]
            while not isinstance(wanted, int | _AwaitTLS):
                actions.append(wanted)
                wanted = self._script.send(b"")
        except StopIteration as done:
            actions += self._end(done.value(bytes(self._buffer)))
        except HandshakeFailed as failure:
            actions += self._end(Failed(failure.refusal, failure.detail))
        else:
            self._wanted = wanted
        return actions

    def _end(self, outcome: A | Failed) -> list[A | Failed]:
        self.outcome = outcome
        self._buffer.clear()
        return [outcome]


def read_version(failure: Refusal) -> Generator[int, bytes, tuple[int, int]]:
    """Read an RFB ``RFB xxx.yyy\\n`` line byte by byte, failing with ``failure`` at its first
    byte that cannot belong to one (so whatever the cuts, the detail is the same)."""
    pattern = b"RFB 000.000\n"
    seen = b""
    for expected in pattern:
        byte = yield 1
        seen += byte
        if byte[0] != expected and not (expected == ord("0") and byte.isdigit()):
            raise HandshakeFailed(failure, f"not an RFB version line: {seen!r}")
    return int(seen[4:7]), int(seen[8:11])


def negotiated_version(major: int, minor: int) -> str | None:
    """The version both ends speak when the peer says ``major.minor``: 3.3, 3.7, 3.8, or
    None below 3.3."""
    if (major, minor) < (3, 3):
        return None
    if (major, minor) < (3, 7):
        return "3.3"
    if (major, minor) < (3, 8):
        return "3.7"
    return "3.8"


def printable(text: str) -> str:
    """A peer's text made safe for a one-line log: control characters escaped."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


def _u8(data: bytes) -> int:
    return data[0]


def _u32(data: bytes) -> int:
    value: int = struct.unpack("!I", data)[0]
    return value


@attrs.define
class VMLogin:
    """The proxy's RFB client login to a VM with the session's credentials.

    After ``Failed``, ``receive()`` ignores what it is given (a closing connection may still
    deliver bytes) and returns ``[]``.  After ``LoggedIn`` it raises ``RuntimeError``: the bytes
    belong to the relay, and dropping them would corrupt the stream without a word.
    """

    password: str | None = attrs.field(repr=False)
    username: str | None = attrs.field(repr=False)
    #: False when the transport cannot start TLS (a WebSocket upstream).
    tls_possible: bool = True
    _runner: ScriptRunner[Send | StartTLS | LoggedIn] = attrs.field(init=False, repr=False)
    #: Where the handshake stands, for the log: "version", "security types", ...
    stage: str = attrs.field(default="version", init=False)
    #: The refusal whose reason is being read (then a lost connection is that refusal).
    _failing: Refusal | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._runner = ScriptRunner(self._login())

    def receive(self, data: bytes) -> list[Action]:
        """Take bytes from the VM (decrypted, once TLS is up), cut anywhere."""
        if isinstance(self._runner.outcome, LoggedIn):
            raise RuntimeError("the login is over: the VM's bytes belong to the relay now")
        actions = self._runner.feed(data)
        if self._runner.awaiting_tls and self._runner.buffered:
            # With the go-ahead read, the VM's next bytes can only be TLS, through the driver.
            actions += self._runner.fail(HandshakeFailed(
                Refusal.VM_NOT_RFB, "the VM sent bytes in clear after its TLS go-ahead"))
        return actions

    def tls_started(self) -> list[Action]:
        """The driver finished the TLS handshake that ``StartTLS`` asked for."""
        return self._runner.resume()

    def connection_lost(self) -> list[Action]:
        """The VM closed before the handshake ended: the ``Failed`` that says so (the refusal
        whose reason was being read, else ``VM_LOST``), or ``[]`` once it has ended."""
        if isinstance(self._runner.outcome, LoggedIn):
            return []
        if self._failing is not None:
            failure = HandshakeFailed(self._failing, "the VM closed before its reason")
        else:
            failure = HandshakeFailed(Refusal.VM_LOST, f"the VM closed during {self.stage}")
        return self._runner.fail(failure)

    @property
    def _has_password(self) -> bool:
        return bool(self.password)

    @property
    def _has_user_and_password(self) -> bool:
        return bool(self.password) and bool(self.username)

    def _login(self) -> Script[Send | StartTLS | LoggedIn]:
        major, minor = yield from read_version(Refusal.VM_NOT_RFB)
        version = negotiated_version(major, minor)
        if version is None:
            raise HandshakeFailed(Refusal.VM_NOT_RFB, f"RFB version {major}.{minor} is too old")
        yield Send(f"RFB 003.00{version[-1]}\n".encode())
        self.stage = "security types"
        if version == "3.3":
            chosen = _u32((yield 4))
            if chosen == 0:
                yield from self._reason(Refusal.VM_REFUSED, "the VM refused the connection")
            if chosen not in (NONE, VNC_AUTH):
                raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE,
                                      f"RFB 3.3 security type {chosen} is not supported")
            if chosen == VNC_AUTH and not self._has_password:
                raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE,
                                      "the VM asks for VncAuth and no password is configured")
        else:
            count = _u8((yield 1))
            if count == 0:
                yield from self._reason(Refusal.VM_REFUSED, "the VM offers no security type")
            offered = list((yield count))
            chosen = self._choose_type(offered)
            yield Send(bytes([chosen]))
        security = SECURITY_NAMES[chosen]
        if chosen == VNC_AUTH:
            yield from self._vnc_auth()
        elif chosen == VENCRYPT:
            subtype = yield from self._vencrypt()
            security = f"VeNCrypt/{SECURITY_NAMES[subtype]}"
        if chosen != NONE or version == "3.8":
            self.stage = "security result"
            status = _u32((yield 4))
            if status != 0:
                detail = f"security result {status}"
                if version == "3.8":
                    yield from self._reason(Refusal.VM_CREDENTIALS_REFUSED, detail)
                raise HandshakeFailed(Refusal.VM_CREDENTIALS_REFUSED, detail)
        return functools.partial(LoggedIn, version, security)

    def _choose_type(self, offered: list[int]) -> int:
        usable = [NONE] if NONE in offered else []
        if VNC_AUTH in offered and self._has_password:
            usable.insert(0, VNC_AUTH)
        if VENCRYPT in offered and (self.tls_possible or not usable):
            usable.insert(0, VENCRYPT)
        if not usable:
            raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE, (
                f"offered: {offered}; usable here: {self._usable_with()}"))
        return usable[0]

    def _usable_with(self) -> str:
        """What this login can use, for the log: which credentials exist, not what they are."""
        credentials = ("user name and password" if self._has_user_and_password
                       else "password" if self._has_password else "no credentials")
        return f"{credentials}, {'TLS' if self.tls_possible else 'no TLS'}"

    def _usable_subtype(self, subtype: int) -> bool:
        if subtype in _TLS and not self.tls_possible:
            return False
        if subtype in _NEEDS_USER_AND_PASSWORD:
            return self._has_user_and_password
        if subtype in _NEEDS_PASSWORD:
            return self._has_password
        return subtype in SUBTYPE_PREFERENCE

    def _vnc_auth(self) -> Generator[int | Send, bytes, None]:
        assert self.password
        self.stage = "VncAuth challenge"
        challenge = yield CHALLENGE_SIZE
        yield Send(vnc_auth_response(self.password, challenge))

    def _vencrypt(self) -> Generator[int | Send | StartTLS | _AwaitTLS, bytes, int]:
        """VeNCrypt 0.2 up to the end of the chosen subtype's own step; the subtype."""
        self.stage = "VeNCrypt version"
        major, minor = _u8((yield 1)), _u8((yield 1))
        if (major, minor) < (0, 2):
            raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE,
                                  f"VeNCrypt version {major}.{minor} is not supported")
        yield Send(b"\x00\x02")
        status = _u8((yield 1))
        if status != 0:
            raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE,
                                  f"the VM refused VeNCrypt 0.2 (status {status})")
        self.stage = "VeNCrypt subtypes"
        count = _u8((yield 1))
        if count == 0:
            raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE, "the VM offers no VeNCrypt subtype")
        listed = yield 4 * count
        offered = [_u32(listed[i:i + 4]) for i in range(0, len(listed), 4)]
        usable = [subtype for subtype in SUBTYPE_PREFERENCE
                  if subtype in offered and self._usable_subtype(subtype)]
        if not usable:
            names = [f"{SECURITY_NAMES.get(subtype, '?')}({subtype})" for subtype in offered]
            raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE, (
                f"VeNCrypt subtypes offered: {', '.join(names)}; "
                f"usable here: {self._usable_with()}"))
        subtype = usable[0]
        yield Send(struct.pack("!I", subtype))
        if subtype in _TLS:
            self.stage = "TLS go-ahead"
            if _u8((yield 1)) == 0:
                # The VM offered a subtype it cannot set up (TigerVNC: no certificate or key).
                raise HandshakeFailed(Refusal.VM_NO_SECURITY_TYPE,
                                      f"the VM could not start TLS for {SECURITY_NAMES[subtype]}")
            yield StartTLS(verify=subtype in _X509)
            self.stage = "TLS"
            yield AWAIT_TLS
        if subtype in _NEEDS_USER_AND_PASSWORD:
            assert self.username and self.password
            user, password = self.username.encode(), self.password.encode()
            yield Send(struct.pack("!II", len(user), len(password)) + user + password)
        elif subtype in _NEEDS_PASSWORD:
            yield from self._vnc_auth()
        return subtype

    def _reason(self, refusal: Refusal, detail: str) -> Generator[int, bytes, None]:
        """Read a failure's reason (u32 length, text) and fail with it."""
        self._failing = refusal
        self.stage = "failure reason"
        length = _u32((yield 4))
        if length > MAX_REASON:
            raise HandshakeFailed(Refusal.VM_NOT_RFB,
                                  f"{detail}: a reason of {length} bytes is not RFB")
        raw = (yield length) if length else b""
        try:
            reason = raw.decode("utf-8")
        except UnicodeDecodeError:
            reason = raw.decode("latin-1")
        for secret in (self.password, self.username):
            if secret:
                reason = reason.replace(secret, "***")
        raise HandshakeFailed(refusal, f"{detail}: {printable(reason)}" if reason else detail)
