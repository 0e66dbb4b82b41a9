"""The operators' listener: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``.

``/healthz`` answers while the process runs; ``/readyz`` answers 200 only while the database is
reachable and LISTEN is active, so a load balancer sends browsers only to an instance that
can see commits.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .metrics import Metrics


class _JSONResource(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def status(self) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def render_GET(self, request: Request) -> bytes:
        code, body = self.status()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"


class Healthz(_JSONResource):
    """The process is alive and its reactor turns."""

    def status(self) -> tuple[int, dict[str, Any]]:
        return 200, {"alive": True}


class Readyz(_JSONResource):
    """200 while the database answers and LISTEN is active, else 503 with the reason."""

    def status(self) -> tuple[int, dict[str, Any]]:
        live = self.metrics.live
        database, listening = live.database_reachable(), live.listen_connected()
        reasons = []
        if not database:
            reasons.append("database unreachable")
        if not listening:
            reasons.append("not listening for session changes")
        body: dict[str, Any] = {
            "ready": not reasons,
            "database_reachable": database,
            "listen_connected": listening,
        }
        if reasons:
            body["reason"] = "; ".join(reasons)
        return (503 if reasons else 200), body


def admin_site(metrics: Metrics) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    root.putChild(b"healthz", Healthz(metrics))
    root.putChild(b"readyz", Readyz(metrics))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site
