"""``[web] root``: the noVNC client's files, served over plain HTTP on the WebSocket listener,
like websockify's ``--web``, so that ``http://host:6080/vnc.html?path=websockify/<id>`` works.

Only GET of regular files under the root; the path is decoded once and checked segment by
segment, then the resolved file must still lie under the resolved root, so ``..``, encoded
slashes, NUL bytes and symlinks out of the root can never reach a file outside it.
"""

from __future__ import annotations

import mimetypes
import os
from urllib.parse import unquote

#: The largest file served (noVNC's biggest is well under a megabyte).
MAX_FILE = 32 * 1024 * 1024


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


def response(root: str, target: str, method: str) -> bytes:
    """The whole HTTP/1.1 response (the connection closes after it)."""
    if method not in ("GET", "HEAD"):
        return _status(405, "Method Not Allowed", extra="Allow: GET, HEAD\r\n")
    try:
        path = resolve(root, target)
    except UnicodeDecodeError:
        path = None
    if path is None:
        return _status(404, "Not Found")
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE:
            return _status(404, "Not Found")
        with open(path, "rb") as f:
            body = f.read()
    except OSError:
        return _status(404, "Not Found")
    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if path.endswith((".js", ".mjs")):
        kind = "text/javascript"
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Cache-Control: no-cache\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + (b"" if method == "HEAD" else body)


def _status(code: int, reason: str, extra: str = "") -> bytes:
    body = f"{code} {reason}\n".encode()
    return (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body
