"""``[web] root``: the noVNC client's files, served over plain HTTP on the WebSocket listener,
like websockify's ``--web``, so that ``http://host:6080/vnc.html?path=websockify/<id>`` works.

Only GET of regular files under the root; the path is decoded once and checked segment by
segment, then the resolved file must still lie under the resolved root, so ``..``, encoded
slashes, NUL bytes and symlinks out of the root can never reach a file outside it.

A file is sent in chunks under the socket's back-pressure (Twisted's ``FileSender``, a pull
producer), so a client that does not read holds one chunk of memory, not the file; one that
takes nothing for ``[web] send_timeout`` is dropped, and the file is closed on every way out.
"""

from __future__ import annotations

import io
import mimetypes
import os
from typing import IO, Any
from urllib.parse import unquote

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

_log = Logger()


def resolve(root: str, target: str) -> str | None:
    """The file under ``root`` that request-target ``target`` names, or None."""
    # An origin-form target is a path and perhaps a query; urlsplit would take "//x/..." for
    # a host (and raise on "//[").
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None
    segments = []
    for raw in path.split("/")[1:]:
        segment = unquote(raw, errors="strict") if "%" in raw else raw
        if segment in ("", "."):
            continue
        if segment.startswith(".") or "/" in segment or "\\" in segment or "\0" in segment:
            return None  # ".." and every dotfile (.git, .env, .htpasswd): never served
        segments.append(segment)
    if not segments:
        segments = ["index.html"]
    real_root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(real_root, *segments))
    if os.path.commonpath([real_root, candidate]) != real_root:
        return None
    return candidate if os.path.isfile(candidate) else None


@attrs.frozen
class Answer:
    """What to send for one request: the head, then (for a GET of a file) the open file."""

    status: int
    head: bytes
    #: The file to send after the head (the caller owns it: :class:`Download` closes it).
    file: IO[bytes] | None = None
    size: int = 0


def answer(root: str, target: str, method: str, headers: str = "") -> Answer:
    """The answer to a plain HTTP request (the connection closes after it); ``headers``
    (lines ending in CRLF) are added to a 200."""
    if method not in ("GET", "HEAD"):
        return not_allowed()
    try:
        path = resolve(root, target)
    except UnicodeDecodeError:
        path = None
    if path is None:
        return _status(404, "Not Found")
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed by Download, or just below)
    except OSError:
        return _status(404, "Not Found")
    try:
        size = os.fstat(f.fileno()).st_size
    except OSError:
        f.close()
        return _status(404, "Not Found")
    if method == "HEAD":
        f.close()
    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if path.endswith((".js", ".mjs")):
        kind = "text/javascript"
    return Answer(200, _ok_head(kind, size, headers), None if method == "HEAD" else f, size)


def content(body: bytes, kind: str, method: str, headers: str = "") -> Answer:
    """A body made in memory (the viewer's page), answered and sent as a file would be."""
    if method not in ("GET", "HEAD"):
        return not_allowed()
    file = None if method == "HEAD" else io.BytesIO(body)
    return Answer(200, _ok_head(kind, len(body), headers), file, len(body))


def not_allowed() -> Answer:
    return _status(405, "Method Not Allowed", extra="Allow: GET, HEAD\r\n")


def not_found() -> Answer:
    return _status(404, "Not Found")


def _ok_head(kind: str, size: int, headers: str) -> bytes:
    return (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Type: {kind}\r\n"
        f"Content-Length: {size}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Cache-Control: no-cache\r\n"
        f"{headers}"
        "Connection: close\r\n\r\n"
    ).encode()


def refusal(status: int, reason: str) -> Answer:
    """A plain-text refusal (e.g. 429 over ``max_per_ip``)."""
    return _status(status, reason)


def _status(code: int, reason: str, extra: str = "") -> Answer:
    body = f"{code} {reason}\n".encode()
    return Answer(code, (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body)


class _Bounded:
    """At most ``size`` bytes of ``file``: what Content-Length promised, even if it grows."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file = file
        self.left = size

    def read(self, n: int) -> bytes:
        chunk = self.file.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(chunk)
        return chunk


@attrs.define(eq=False)
class Download:
    """One answer on its way out: the head, then the file chunk by chunk as the socket takes
    them, then the connection closed.

    ``transport`` is the connection's (``write``, ``registerProducer``, ``loseConnection``,
    ``abortConnection``).  Every chunk the socket takes restarts the ``timeout``; when it runs
    out, the connection is aborted.  :meth:`stop` (the connection is gone) closes the file.
    """

    answer: Answer
    transport: Any
    clock: IReactorTime
    timeout: float
    peer: str = "-"
    _timer: IDelayedCall | None = None
    done: bool = False

    def start(self) -> None:
        self.transport.write(self.answer.head)
        self._timer = self.clock.callLater(self.timeout, self._too_slow)
        file = self.answer.file
        if file is None:
            self.transport.loseConnection()
            return
        sent = FileSender().beginFileTransfer(
            _Bounded(file, self.answer.size), self.transport, self._progress
        )
        sent.addCallbacks(self._sent, self._stopped)

    def _progress(self, chunk: bytes) -> bytes:
        """The socket took the last chunk (the producer is asked for the next one)."""
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        return chunk

    def _sent(self, _: object) -> None:
        self._close_file()
        # The last chunk may still wait in the transport's buffer: the timer stays armed.
        self.transport.loseConnection()

    def _stopped(self, _: Failure) -> None:
        """The transport stopped the producer: the connection is gone or going."""
        self._close_file()

    def _too_slow(self) -> None:
        self._timer = None
        _log.info("dropping {peer}: took no data of its download in {timeout:g}s",
                  event="download_timeout",
                  peer=self.peer, timeout=self.timeout)
        self._close_file()
        self.transport.abortConnection()

    def stop(self) -> None:
        """The connection is gone: nothing more to send or time."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._close_file()

    def _close_file(self) -> None:
        if self.answer.file is not None and not self.done:
            self.done = True
            self.answer.file.close()
