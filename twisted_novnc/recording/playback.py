"""``/recordings/`` on the admin listener: the list of recordings, the player, the raw files.

::

    /recordings/                      the list (HTML), newest first
    /recordings/?format=json          the same list as JSON
    /recordings/<name>.tnrec          the player page of one recording
    /recordings/<name>.tnrec/data     the recording file itself, streamed
    /recordings/player/<file>         the player's script and style (recording/player/)
    /recordings/novnc/<file>          the vendored noVNC 1.7.0 (viewer/static/novnc: one copy)

A name is served only if it is a regular ``*.tnrec`` file directly in ``[record] dir`` (not a
symlink, no path): anything else is 404, and with recording off every page says so with a 404.
The admin listener has no authentication of its own: whoever reaches it may watch every
recording, so it belongs on a network only operators reach (docs/playback.rst).

Nothing here blocks the reactor for long: the directory is listed, and each file's metadata
read, in a thread; a raw file is sent by a producer, a chunk at a time.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from twisted_novnc.front.viewer import CONTENT_SECURITY_POLICY, VIEWER_DIR
from twisted_novnc.recording.format import SUFFIX, RecordingInfo, list_recordings

_log = Logger()
T = TypeVar("T")

#: The player's page, script and style, as installed with the package.
PLAYER_DIR = Path(__file__).resolve().parent / "player"
#: noVNC, served from where the viewer page serves it: one copy in the package.
NOVNC_DIR = VIEWER_DIR / "static" / "novnc"
#: The list shows at most this many (the newest); the JSON form says how many were left out.
MAX_LISTED = 1000

#: What ``file_name`` writes (``%XX`` escapes included), and nothing that could leave the dir.
_NAME = re.compile(r"[A-Za-z0-9_%-][A-Za-z0-9._%-]*" + re.escape(SUFFIX))
_STATIC_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".html": b"text/html; charset=utf-8",
}
OFF = b"Recording is off: [record] dir is empty in this daemon's configuration.\n"

#: Runs a blocking call away from the reactor; fires with its result.
InThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


def in_threads(reactor: object) -> InThread:
    """The reactor's thread pool when it has one; inline otherwise (a test's fake reactor).

    Asked at the first call, not when the site is built: building the daemon changes nothing
    outside it (tests/test_side_effects.py), and zope caches what it learns on the class.
    """

    def run(call: Callable[[], Any]) -> Deferred[Any]:
        if IReactorThreads.providedBy(reactor):
            return deferToThreadPool(reactor, reactor.getThreadPool(), call)
        return maybeDeferred(call)

    return run


def is_recording_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def recording_path(directory: str, name: str) -> str | None:
    """The path of recording ``name`` if it is a regular file directly in ``directory``."""
    if not directory or not is_recording_name(name):
        return None
    path = os.path.join(directory, name)
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return path if stat.S_ISREG(mode) else None


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe(info: RecordingInfo) -> dict[str, Any]:
    """A recording's metadata as the JSON list (and ``recordings list --json``) gives it."""
    header, ending = info.header, info.ending
    return {
        "name": info.name,
        "session_id": header.session_id,
        "connection_id": header.connection_id,
        "client": header.client,
        "started_at": header.started_at,
        "start": _iso(header.started_at),
        "ended_at": info.ended_at,
        "end": _iso(info.ended_at),
        "duration": round(info.last_ms / 1000, 3),
        "size": info.size,
        "recorded_bytes": info.recorded_bytes,
        "up_bytes": ending.up_bytes if ending else None,
        "down_bytes": ending.down_bytes if ending else None,
        "outcome": ending.outcome if ending else None,
        "complete": info.complete,
        "stopped": info.stopped,
        "input": header.input,
        "version": header.version,
    }


def listing(directory: str, limit: int = MAX_LISTED) -> dict[str, Any]:
    """Every recording of ``directory``, newest first (blocking: call it in a thread)."""
    found = list_recordings(directory)
    rows: list[dict[str, Any]] = []
    for item in found[:limit]:
        if isinstance(item, RecordingInfo):
            rows.append(describe(item))
        else:
            path, why = item
            rows.append({"name": os.path.basename(path), "error": why})
    return {"directory": directory, "recordings": rows, "left_out": max(0, len(found) - limit)}


def _outcome(row: dict[str, Any]) -> str:
    if row["complete"]:
        return str(row["outcome"])
    return "cut (its process ended first)"


def render_index(body: dict[str, Any]) -> bytes:
    """The list as an HTML table (no script: every value escaped)."""
    esc = html.escape
    lines = []
    for row in body["recordings"]:
        if "error" in row:
            lines.append(
                f"<tr class=\"unreadable\"><td colspan=\"9\">{esc(row['name'])}:"
                f" not readable ({esc(row['error'])})</td></tr>"
            )
            continue
        stopped = f"stopped early: {row['stopped']}" if row["stopped"] else ""
        href = esc(quote(row["name"]), quote=True)
        lines.append(
            "<tr>"
            f"<td><a href=\"{href}\">{esc(row['session_id'])}</a></td>"
            f"<td>{esc(row['client'])}</td>"
            f"<td>{esc(row['start'])}</td>"
            f"<td>{esc(row['end'])}</td>"
            f"<td class=\"number\">{row['duration']:.1f} s</td>"
            f"<td class=\"number\">{row['recorded_bytes']}</td>"
            f"<td>{esc(_outcome(row))}</td>"
            f"<td>{'complete' if row['complete'] else 'cut'}</td>"
            f"<td>{esc(stopped)}</td>"
            "</tr>"
        )
    more = (
        f"<p>{body['left_out']} older recordings are not shown.</p>" if body["left_out"] else ""
    )
    rows = "\n".join(lines) or '<tr><td colspan="9">No recordings yet.</td></tr>'
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Recordings</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="player/player.css">
</head>
<body>
<h1>Recordings</h1>
<p>In {esc(body['directory'])}, newest first (<a href="?format=json">JSON</a>).</p>
<table id="recordings">
<thead><tr><th>Session</th><th>Client</th><th>Start (UTC)</th><th>End (UTC)</th>
<th>Duration</th><th>Bytes</th><th>Close code / outcome</th><th>File</th><th>Stopped</th></tr>
</thead>
<tbody>
{rows}
</tbody>
</table>
{more}
</body>
</html>
"""
    return page.encode()


def _headers(request: Request, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")


def _page_headers(request: Request) -> None:
    _headers(request, _TYPES[".html"])
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
    request.setHeader(b"referrer-policy", b"no-referrer")


class _Text(Resource):
    """A plain-text answer (404s, with why)."""

    isLeaf = True

    def __init__(self, code: int, text: bytes) -> None:
        super().__init__()
        self.code, self.text = code, text

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        _headers(request, b"text/plain; charset=utf-8")
        return self.text


def not_found(text: bytes = b"No such recording.\n") -> Resource:
    return _Text(404, text)


#: Bytes read from a file per write.
CHUNK = 64 * 1024


@implementer(IPushProducer)
class _FileStream:
    """Writes a file to a request a chunk at a time while the transport takes them: it
    pauses when the transport's buffer is full and goes on when it drains."""

    def __init__(self, request: Request, f: IO[bytes]) -> None:
        self.request, self.f = request, f
        self.paused = False
        self.done = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.done:
            chunk = self.f.read(CHUNK)
            if not chunk:
                self._end(finish=True)
                return
            self.request.write(chunk)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self._end(finish=False)

    def _end(self, finish: bool) -> None:
        if self.done:
            return
        self.done = True
        self.f.close()
        if self.request.channel is not None:
            self.request.unregisterProducer()
            if finish and not self.request.finished:
                self.request.finish()


def _send_file(request: Request, f: IO[bytes], size: int, content_type: bytes) -> Any:
    """Stream ``f`` to the request, never all of it in memory."""
    _headers(request, content_type)
    request.setHeader(b"content-length", str(size).encode())
    if request.method == b"HEAD":
        f.close()
        return b""
    _FileStream(request, f).start()
    return NOT_DONE_YET


def _open_regular(path: str) -> tuple[IO[bytes], int] | None:
    """The file at ``path`` if it is a regular file; a symlink is not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb"), info.st_size


class RawRecording(Resource):
    """``/recordings/<name>/data``: the file as written (the player parses it)."""

    isLeaf = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request: Request) -> Any:
        opened = _open_regular(self.path)
        if opened is None:
            return not_found().render(request)
        f, size = opened
        request.setHeader(
            b"content-disposition",
            f'attachment; filename="{os.path.basename(self.path)}"'.encode(),
        )
        return _send_file(request, f, size, b"application/octet-stream")

    render_HEAD = render_GET


class PlayerPage(Resource):
    """``/recordings/<name>``: the player (its script reads the name from the URL)."""

    isLeaf = True

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self.page = page

    def render_GET(self, request: Request) -> bytes:
        _page_headers(request)
        return self.page


class StaticFiles(Resource):
    """Files under ``root`` by plain names only (no dot files, no ``..``), never a listing."""

    def __init__(self, root: Path, segments: tuple[bytes, ...] = ()) -> None:
        super().__init__()
        self.root, self.segments = root, segments

    def getChild(self, path: bytes, request: Request) -> IResource:
        try:
            name = path.decode("ascii")
        except UnicodeDecodeError:
            return not_found(b"Not found.\n")
        if _STATIC_SEGMENT.fullmatch(name) is None:
            return not_found(b"Not found.\n")
        return StaticFiles(self.root, (*self.segments, path))

    def render_GET(self, request: Request) -> Any:
        relative = Path(*(s.decode("ascii") for s in self.segments)) if self.segments else None
        content_type = _TYPES.get(relative.suffix) if relative else None
        if relative is None or content_type is None:
            return not_found(b"Not found.\n").render(request)
        opened = _open_regular(str(self.root / relative))
        if opened is None:
            return not_found(b"Not found.\n").render(request)
        f, size = opened
        return _send_file(request, f, size, content_type)

    render_HEAD = render_GET


class RecordingEntry(Resource):
    """``/recordings/<name>`` and below it ``data``."""

    def __init__(self, path: str, page: bytes) -> None:
        super().__init__()
        self.path, self.page = path, page

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"data" and not request.postpath:
            return RawRecording(self.path)
        if path == b"" and not request.postpath:
            return PlayerPage(self.page)
        return not_found()

    def render_GET(self, request: Request) -> bytes:
        return PlayerPage(self.page).render_GET(request)


class Recordings(Resource):
    """``/recordings``: everything under it (the module's docstring)."""

    def __init__(self, directory: str, in_thread: InThread) -> None:
        super().__init__()
        self.directory = directory
        self.in_thread = in_thread
        self.page = (PLAYER_DIR / "page.html").read_bytes()
        self.player = StaticFiles(PLAYER_DIR)
        self.novnc = StaticFiles(NOVNC_DIR)

    def getChild(self, path: bytes, request: Request) -> IResource:
        if not self.directory:
            return _Text(404, OFF)
        if path == b"":
            return self if not request.postpath else not_found()
        if path == b"player":
            return self.player
        if path == b"novnc":
            return self.novnc
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return not_found()
        found = recording_path(self.directory, name)
        return not_found() if found is None else RecordingEntry(found, self.page)

    def render_GET(self, request: Request) -> Any:
        if not self.directory:
            return _Text(404, OFF).render(request)
        if not request.path.endswith(b"/"):
            request.redirect(request.path + b"/")
            return b""
        args: dict[bytes, list[bytes]] = request.args or {}
        as_json = args.get(b"format") == [b"json"]
        gone: list[object] = []
        request.notifyFinish().addBoth(gone.append)

        def write(body: dict[str, Any]) -> None:
            if gone:
                return
            if as_json:
                _headers(request, b"application/json")
                request.write(json.dumps(body, indent=1).encode() + b"\n")
            else:
                _page_headers(request)
                request.write(render_index(body))
            request.finish()

        def failed(failure: Any) -> None:
            _log.failure("admin /recordings/ failed", failure, event="admin_error",
                         path=request.path.decode("latin-1"))
            if not gone:
                request.setResponseCode(500)
                _headers(request, b"text/plain; charset=utf-8")
                request.write(f"Cannot list {self.directory}: {failure.value}\n".encode())
                request.finish()

        directory = self.directory
        self.in_thread(lambda: listing(directory)).addCallback(write).addErrback(failed)
        return NOT_DONE_YET


def recordings_resource(directory: str, reactor: IReactorTime | object) -> Recordings:
    """``/recordings`` of an admin listener: ``directory`` is ``[record] dir`` ("" = off)."""
    return Recordings(directory, in_threads(reactor))

