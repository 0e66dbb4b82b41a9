"""A live relay as it travels to a process of the new generation (processes/upgrade.py).

A moved relay is its two sockets, passed as descriptors (SCM_RIGHTS), and a
:class:`MovedRelay`: everything the new process needs to go on as if nothing happened (where
the browser's frame parser stands, the bytes read and not parsed, the bytes given to each
socket and not yet sent, the counters, the session and the client).

:class:`HandoffChannel` carries them over a UNIX stream socket between two processes, with
their descriptors (SCM_RIGHTS).
Each message is a frame of :mod:`twisted_novnc.processes.ipc` (``<length><kind><payload>``);
a message's descriptors are sent with its first bytes, so they are always received before the
message is complete, and a message takes them from the front of the queue.
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
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_novnc.front.fastpath import FramePosition
from twisted_novnc.processes.ipc import FrameError, Frames, frame

_log = Logger()

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
    #: When the old process stopped reading its sockets (its clock, the host's time): the new
    #: one says how long the relay stood still (``twisted_novnc_relay_move_seconds``).
    handed_at: float = 0.0
    #: The relay's recording as the old process left it (``[record]``: path, header,
    #: recorded bytes, stopped), or None.  A default, since an older generation sends none.
    recording: dict[str, Any] | None = None

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


#: Bytes read per ``recvmsg``, and reads per wake-up at most (then the reactor's other
#: descriptors get their turn).
READ_SIZE = 256 * 1024
READS_PER_WAKEUP = 64
#: Descriptors one ``recvmsg`` takes at most (a RELAY message carries two).
MAX_FDS = 64


@implementer(IReadDescriptor, IWriteDescriptor)
class HandoffChannel:
    """Messages with descriptors over a connected UNIX stream socket.

    ``received(kind, payload, fds)`` is called for each message, with the descriptors it
    carried (the receiver owns them: it closes them, or adopts them); ``lost()`` once the
    other process is gone.

    Not Twisted's UNIX transport: it sends one descriptor per ``sendmsg`` of one byte and reads
    once per reactor turn, so a relay's two descriptors took three turns of each busy process
    on the way (bench/RESULTS.md, history 12).  Here a message's descriptors go with its first
    bytes in one ``sendmsg`` (``socket.send_fds``), and a wake-up reads until the socket is
    empty, all with the reactor's public ``addReader`` and ``addWriter``.
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
        #: What is still to send: (bytes, the descriptors that go with their first byte).
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._socket: socket.socket | None = None
        self._reactor: Any = None
        self.gone = False

    def open(self, reactor: IReactorFDSet, sock: socket.socket) -> HandoffChannel:
        sock.setblocking(False)
        self._socket = sock
        self._reactor = reactor
        reactor.addReader(self)
        return self

    # -- sending -------------------------------------------------------------------------------

    def send(self, kind: bytes, payload: bytes, fds: Sequence[int] = ()) -> bool:
        """Queue one message and send what the socket takes now.  The descriptors are sent
        as they are when their bytes go: the caller keeps them open until the receiver
        answers.  False once the channel is gone."""
        if self.gone or self._socket is None:
            return False
        idle = not self._out
        self._out.append((memoryview(frame(kind, payload)), list(fds)))
        if idle:
            self._flush()
            if self._out and not self.gone:
                self._reactor.addWriter(self)
        return not self.gone

    def answered(self, kind: bytes, payload: bytes) -> None:
        """An answer about a relay, to the process that sent it (no descriptors)."""
        self.send(kind, payload)

    def _flush(self) -> None:
        sock = self._socket
        assert sock is not None
        while self._out:
            data, fds = self._out[0]
            try:
                sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
            except BlockingIOError:
                return
            except OSError:
                self._end()
                return
            if sent < len(data):
                self._out[0] = (data[sent:], [])
                if not sent:
                    return
            else:
                self._out.popleft()

    def doWrite(self) -> None:
        self._flush()
        if not self._out and not self.gone:
            self._reactor.removeWriter(self)
        return None

    # -- receiving -----------------------------------------------------------------------------

    def doRead(self) -> None:
        sock = self._socket
        if sock is None:
            return None
        for _ in range(READS_PER_WAKEUP):
            try:
                data, fds, _flags, _address = socket.recv_fds(sock, READ_SIZE, MAX_FDS)
            except BlockingIOError:
                return None
            except OSError:
                self._end()
                return None
            self._fds.extend(fds)
            if not data:
                self._end()
                return None
            if not self._take(data):
                return None
        return None

    def _take(self, data: bytes) -> bool:
        try:
            messages = self._frames.feed(data)
        except FrameError as e:
            _log.error("garbage on the relay hand-off channel ({error}): closing it",
                       event="handoff_garbage", error=e)
            self._end()
            return False
        for kind, payload in messages:
            wanted = self._fds_per_message(kind)
            if len(self._fds) < wanted:
                _log.error("a hand-off message came without its descriptors: closing the"
                           " channel", event="handoff_no_descriptors")
                self._end()
                return False
            fds = [self._fds.popleft() for _ in range(wanted)]
            self._received(kind, payload, fds)
            if self.gone:
                return False
        return True

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel from this side."""
        self._end()

    def _end(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self._socket is not None:
            self._reactor.removeReader(self)
            self._reactor.removeWriter(self)
            self._socket.close()
            self._socket = None
        while self._fds:
            _close(self._fds.popleft())
        self._out.clear()
        self._lost()

    # -- IReadDescriptor / IWriteDescriptor -------------------------------------------------

    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the socket (an error, or the reactor stopping)."""
        self._end()

    def logPrefix(self) -> str:
        return "relay hand-off channel"


def open_channel(reactor: IReactorFDSet, fd: int, channel: HandoffChannel) -> HandoffChannel:
    """Run ``channel`` on the connected UNIX socket ``fd``, which it takes over."""
    return channel.open(reactor, socket.socket(fileno=fd))


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
