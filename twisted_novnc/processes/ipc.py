"""The pipes between the supervisor and each worker: frames, the first message, log events.

Between the supervisor and each worker there are two pipes, carrying frames of
``<length:4><kind:1><payload>``:

- supervisor -> worker, the worker's stdin: first its settings (``INIT``), later questions
  (``ASK``: its metrics or its readiness) and ``STOP`` (drain as on SIGTERM) or ``STOP_NOW``
  (close every relay now, as on a second SIGTERM), or ``UPGRADE`` (a new generation serves:
  hand the live relays on, drain the rest; :mod:`twisted_novnc.processes.upgrade`).  Its end
  of file means the supervisor is gone, whatever killed it: the worker then stops too, so no
  worker outlives it.
- worker -> supervisor, descriptor 3: its log events (``LOG``), which the supervisor logs as its
  own with a ``worker`` field, so they go wherever ``[log]`` sends the supervisor's; its
  answers (``ANSWER``); ``READY`` once it accepts, and ``HANDED`` once an upgrade's relays
  are handed on.

A third channel, a UNIX socket pair (the worker's end named in ``INIT``), carries live relays
with their descriptors during an upgrade (:mod:`twisted_novnc.relay.handoff`).

A worker may run newer code than its supervisor (an upgrade starts the code installed then):
a message or key a side does not know is ignored, never an error.

Both ends use this module and nothing of each other's.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
from typing import IO, Any

import attrs
from twisted.logger import eventAsJSON, eventFromJSON

from twisted_novnc.processes.sharedports import SharedSocket

INIT = b"I"
ASK = b"?"
STOP = b"S"
STOP_NOW = b"N"
LOG = b"L"
ANSWER = b"A"
#: supervisor -> worker: an upgrade: stop accepting, hand relays on, drain the rest
#: (``{"drain_timeout": seconds}``).
UPGRADE = b"U"
#: worker -> supervisor: started and accepting (``{"version": ..., "pid": ...}``).
READY = b"R"
#: worker -> supervisor: every movable relay handed on (``{"moved": n, "kept": m}``).
HANDED = b"H"

_HEADER = struct.Struct("!Ic")
#: A frame larger than this is a broken pipe, not a message.
MAX_FRAME = 64 * 1024 * 1024

#: The worker's descriptors: 0 = from the supervisor, 3 = to it, shared sockets from 4 on.
CONTROL_FD = 0
MESSAGES_FD = 3
FIRST_SOCKET_FD = 4


class FrameError(Exception):
    """The byte stream is not a sequence of frames."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload), kind) + payload


class Frames:
    """Splits a byte stream into ``(kind, payload)`` frames as the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            length, kind = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise FrameError(f"a frame of {length} bytes")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[_HEADER.size:end])))
            del self._buffer[:end]
        return frames


def read_frame(fd: int) -> tuple[bytes, bytes]:
    """One frame read from a blocking descriptor, byte-exact (nothing after it is consumed)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError("the supervisor closed the pipe")
            data += chunk
        return data

    length, kind = _HEADER.unpack(exactly(_HEADER.size))
    if length > MAX_FRAME:
        raise FrameError(f"a frame of {length} bytes")
    return kind, exactly(length)


@attrs.frozen
class WorkerInit:
    """Everything a worker is told at start: which one it is, its settings, its sockets."""

    index: int
    settings: str
    source: str
    secret: bytes
    sockets: tuple[SharedSocket, ...]
    #: The worker's end of its relay hand-off channel (None: it has none).
    handoff_fd: int | None = None

    def encode(self) -> bytes:
        return json.dumps({
            "handoff_fd": self.handoff_fd,
            "index": self.index,
            "settings": self.settings,
            "source": self.source,
            "secret": base64.b64encode(self.secret).decode(),
            "sockets": [[s.description, s.fd, s.family] for s in self.sockets],
        }).encode()

    @classmethod
    def decode(cls, payload: bytes) -> WorkerInit:
        data = json.loads(payload)
        return cls(
            data["index"], data["settings"], data["source"], base64.b64decode(data["secret"]),
            tuple(SharedSocket(d, fd, family) for d, fd, family in data["sockets"]),
            data.get("handoff_fd"),
        )


# -- log events --------------------------------------------------------------------------------

#: The key a worker's failure travels under, as its traceback's text.
_TRACEBACK = "worker_traceback"

#: Event keys that mean nothing in another process (objects, the legacy bridge's own).
_LOCAL_KEYS = ("log_logger", "log_source", "log_legacy", "log_io", "log_observer")


class RemoteFailure:
    """A worker's failure as the supervisor's log sees it: the traceback, already written.

    (A Failure sent as JSON would lose its exception's message on the way.)
    """

    def __init__(self, traceback: str) -> None:
        self.traceback = traceback

    def getTraceback(self, *args: object, **kwargs: object) -> str:
        return self.traceback

    def getErrorMessage(self) -> str:
        lines = self.traceback.strip().splitlines()
        return lines[-1] if lines else ""

    def printTraceback(self, file: IO[str] | None = None, *args: object, **kwargs: object) -> None:
        (file or sys.stderr).write(self.traceback)


def encode_event(event: dict[str, Any]) -> bytes:
    """A worker's log event as a ``LOG`` payload: JSON, flattened by eventAsJSON (so that it
    formats the same in the supervisor although its objects stay here), any failure as text."""
    event = dict(event)
    failure = event.pop("log_failure", None)
    if failure is not None:
        event[_TRACEBACK] = failure.getTraceback()
    return eventAsJSON(event).encode("utf-8")


def decode_event(payload: bytes) -> dict[str, Any]:
    """A ``LOG`` payload as an event the supervisor can log; ValueError if it is not one."""
    event: dict[str, Any] = eventFromJSON(payload.decode("utf-8"))
    for key in _LOCAL_KEYS:
        event.pop(key, None)
    traceback = event.pop(_TRACEBACK, None)
    if isinstance(traceback, str):
        event["log_failure"] = RemoteFailure(traceback)
    return event
