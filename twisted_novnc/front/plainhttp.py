"""Plain HTTP requests on the WebSocket listener, logged and counted as what they are.

A connection whose request is not a WebSocket upgrade (a file of ``[web] root``, Autobahn's
426 without one), whose head breaks the grammar (400, 431), or that never sends a whole head
(a port scan, a timeout: status ``none``) is one HTTP request: one ``http_request`` line with
its client, method, path (without the query, which may hold a token), status and duration,
and ``twisted_novnc_http_requests_total{status}`` with a duration histogram.  Only WebSocket
upgrades end as ``closed`` lines in ``twisted_novnc_connections_total``.
"""

from __future__ import annotations

import re

import attrs
from twisted.logger import Logger

from twisted_novnc.operations.metrics import Metrics

_log = Logger()

#: The longest path written to the log; longer ones are cut and marked with "...".
MAX_LOGGED_PATH = 200
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


@attrs.define
class PlainRequest:
    """One plain HTTP request: who sent it, what it asked, and the status it was answered."""

    client: str
    method: str = "-"
    path: str = "-"
    #: The status answered; None while there is none (or never was: no whole head).
    status: int | None = None


def request_line(head: bytes) -> tuple[str, str]:
    """The method and path (no query) of a request head, printable, for the log; ``-`` for
    what cannot be read."""
    first = head.split(b"\r\n", 1)[0].decode("iso-8859-1")
    parts = first.split(" ")
    method = _printable(parts[0], 16) if parts[0] else "-"
    path = parts[1].split("?", 1)[0].split("#", 1)[0] if len(parts) > 1 else ""
    return method, _printable(path, MAX_LOGGED_PATH) if path else "-"


def _printable(text: str, limit: int) -> str:
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "..."


def request_ended(request: PlainRequest, seconds: float, metrics: Metrics) -> None:
    """The request's connection is gone: its one log line, and its count."""
    metrics.http_request(request.status, seconds)
    _log.info(
        "http {method} {path} {status} from {client} in {duration_seconds:.3f}s",
        event="http_request",
        method=request.method,
        path=request.path,
        status="none" if request.status is None else request.status,
        client=request.client,
        duration_seconds=seconds,
    )
