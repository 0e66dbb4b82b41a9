"""``[web] viewer``: the viewer page shipped with the package, on the WebSocket listener.

``GET /vnc/<session_id>?token=...`` answers the page (``twisted_novnc/viewer/page.html``)
and ``GET /viewer/<file>`` a file of ``twisted_novnc/viewer/static/``: the page's script and
style, and the vendored noVNC 1.7.0 (``static/novnc/``; where it came from and how to update
it: ``README.vendored`` there).  The page holds
no session id and no token: its script reads both from its own URL and opens the WebSocket
URL of ``[novnc] path``, which is the one thing the server writes into the page.

The answers go through :mod:`twisted_novnc.front.web` (the same path checks, ``send_timeout``,
``max_per_ip`` and ``http_request`` lines as the files of ``[web] root``); the page carries a
Content-Security-Policy that allows scripts from this origin only (no inline script) and a
``Referrer-Policy`` that keeps the token in its URL from leaving in a Referer.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import attrs

from twisted_novnc.front import web
from twisted_novnc.front.auth import TOKEN_PARAMETER
from twisted_novnc.front.paths import SESSION_ID_PATTERN

#: The page (a template), and under ``static/`` its files, as installed with the package.
VIEWER_DIR = Path(__file__).resolve().parent.parent / "viewer"
#: ``/vnc/<session_id>``: the page of one session (with its token in the query, if any).
PAGE_PREFIX = "/vnc/"
#: ``/viewer/<file>``: the page's script and noVNC's modules, the same for every session.
FILES_PREFIX = "/viewer/"

#: Scripts from this origin only, no inline script or eval; WebSockets to this origin only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'"
)
PAGE_HEADERS = (
    f"Content-Security-Policy: {CONTENT_SECURITY_POLICY}\r\n"
    "Referrer-Policy: no-referrer\r\n"
)


def _is_session_id(segment: str) -> bool:
    return re.fullmatch(SESSION_ID_PATTERN, segment) is not None and segment not in (".", "..")


@attrs.frozen
class Viewer:
    """The viewer's answers, for a listener whose WebSocket path template is ``websocket_path``."""

    websocket_path: str
    directory: Path = VIEWER_DIR
    page: bytes = attrs.field(init=False)

    @page.default
    def _render(self) -> bytes:
        text = (self.directory / "page.html").read_text(encoding="utf-8")
        return (
            text.replace("{websocket_path}", html.escape(self.websocket_path, quote=True))
            .replace("{token_parameter}", html.escape(TOKEN_PARAMETER, quote=True))
            .encode()
        )

    def claims(self, target: str) -> bool:
        """Whether the request-target ``target`` is the viewer's (and no other file's)."""
        path = target.split("?", 1)[0].split("#", 1)[0]
        return path.startswith(FILES_PREFIX) or (
            path.startswith(PAGE_PREFIX) and _is_session_id(path[len(PAGE_PREFIX):])
        )

    def answer(self, target: str, method: str) -> web.Answer:
        """The answer to a request the viewer :meth:`claims`."""
        path = target.split("?", 1)[0].split("#", 1)[0]
        if path.startswith(PAGE_PREFIX):
            return web.content(self.page, "text/html; charset=utf-8", method, PAGE_HEADERS)
        try:
            return web.answer(str(self.directory / "static"), path[len(FILES_PREFIX) - 1:], method)
        except UnicodeDecodeError:
            return web.not_found()
