"""The operators' listener: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``, and
``/recordings/`` (the recordings of ``[record] dir`` and their player: recording/playback.py).

``/healthz`` answers while the process runs; ``/readyz`` answers 200 only while the database is
reachable and LISTEN is active, so a load balancer sends browsers only to an instance that
can see commits.

With ``[novnc] workers`` the listener is the supervisor's: it asks every worker over its pipe,
and ``/metrics`` shows each worker's metrics labelled ``worker="<index>"`` beside its own,
``/readyz`` is 200 only while every worker runs and is ready.  A worker that does not answer in
time is left out (``twisted_novnc_worker_scraped`` says so), never waited for.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, gzip_accepted
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from twisted_novnc.config import NovncSettings
from twisted_novnc.operations.metrics import (
    LiveState,
    Metrics,
    exposition,
    supervisor_families,
    worker_families,
)
from twisted_novnc.recording.playback import recordings_resource

_log = Logger()

#: Seconds a request may take to arrive whole: ``[novnc] request_timeout`` unless told.
REQUEST_TIMEOUT = NovncSettings().request_timeout

#: Seconds a kept-alive connection may wait, silent, for its next request (Twisted's default).
IDLE_TIMEOUT = 60.0


class AdminChannel(HTTPChannel):
    """Twisted's HTTP channel with a deadline on each request.

    The channel's own timeout (``Site(timeout=...)``) is an idle timeout that every byte
    restarts, so a client that trickles a byte now and then would hold its connection for
    ever; here the whole request must arrive within the site's ``request_timeout`` of its
    first byte (or of the connection).
    """

    factory: AdminSite

    _deadline: IDelayedCall | None = None
    _answering = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def dataReceived(self, data: bytes) -> None:
        if not self._answering:
            self._start_deadline()  # the first byte of a request on a kept-alive connection
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._answering = True
        self._cancel_deadline()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Before the channel reads what was pipelined behind it, which may start the next.
        self._answering = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        super().connectionLost(reason)

    def _start_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.callLater(self.factory.request_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        _log.info("admin: dropping {peer}: no whole request in {timeout:g}s",
                  event="admin_request_timeout",
                  peer=getattr(transport.getPeer(), "host", "-"),
                  timeout=self.factory.request_timeout)
        transport.abortConnection()


def readiness(live: LiveState) -> dict[str, Any]:
    """Whether this process can serve browsers now: the database answers and LISTEN is up."""
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
    return body


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
        body = readiness(self.metrics.live)
        return (200 if body["ready"] else 503), body


class AdminSite(Site):
    """A Site whose connections are :class:`AdminChannel`: each request has a deadline.

    Once the process shuts down (:attr:`shutting_down`, set by
    :class:`~twisted_novnc.processes.drain.ShutdownNotice`) ``/readyz`` answers 503 whatever the
    database or the workers say, so that a load balancer sends new browsers elsewhere while
    this process still serves them during ``[novnc] drain_delay``.
    """

    protocol = AdminChannel  # type: ignore[assignment]

    def __init__(
        self, root: IResource, reactor: IReactorTime, request_timeout: float,
        access_log: bool = False,
    ) -> None:
        super().__init__(root, reactor=reactor, timeout=IDLE_TIMEOUT)
        self.request_timeout = request_timeout
        self.access_log = access_log
        self.shutting_down = False

    def getResourceFor(self, request: Request) -> IResource:
        readyz = (request.postpath or [])[:1] == [b"readyz"]
        resource: IResource = super().getResourceFor(request)
        return ShuttingDown() if self.shutting_down and readyz else resource

    def log(self, request: http.Request) -> None:
        """One ``admin_request`` line per request with ``[log] admin_access = on``, else none:
        scrapes and health checks every few seconds would bury everything else."""
        if not self.access_log:
            return
        address = request.getClientAddress()
        _log.info(
            "admin {method} {path} {status} from {client}", event="admin_request",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=request.code,
            client=getattr(address, "host", "unix"),
        )


class ShuttingDown(Resource):
    """``/readyz`` once the process shuts down: 503, whatever else holds."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        body = {"ready": False, "shutting_down": True, "reason": "shutting down"}
        return json.dumps(body).encode() + b"\n"


#: Starts an upgrade: fires with its report, or fails with the reason it was refused.
UpgradeTrigger = Callable[[], "Deferred[dict[str, Any]]"]


class UpgradePage(Resource):
    """``POST /upgrade``: upgrade now and answer once it is complete (processes/upgrade.py).

    200 with the report; 409 with ``{"upgraded": false, "reason": ...}`` when it was refused
    (the running generation serves on).  ``python -m twisted_novnc upgrade`` posts here.
    """

    isLeaf = True

    def __init__(self, trigger: UpgradeTrigger) -> None:
        super().__init__()
        self.trigger = trigger

    def render_POST(self, request: Request) -> Any:
        def write(code: int, body: dict[str, Any]) -> None:
            if request.finished or request.channel is None:
                return
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(body).encode() + b"\n")
            request.finish()

        def refused(failure: Any) -> None:
            write(409, {"upgraded": False, "reason": failure.getErrorMessage()})

        self.trigger().addCallbacks(lambda body: write(200, body), refused)
        return NOT_DONE_YET


def _root(
    metrics: IResource, healthz: IResource, readyz: IResource, upgrade: UpgradeTrigger | None,
    recordings: IResource,
) -> Resource:
    root = Resource()
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", healthz)
    root.putChild(b"readyz", readyz)
    root.putChild(b"recordings", recordings)
    if upgrade is not None:
        root.putChild(b"upgrade", UpgradePage(upgrade))
    return root


def _site(
    metrics: IResource,
    healthz: IResource,
    readyz: IResource,
    reactor: IReactorTime,
    request_timeout: float,
    upgrade: UpgradeTrigger | None = None,
    access_log: bool = False,
    recordings_dir: str = "",
) -> AdminSite:
    """The admin listener's pages; no tracebacks, and access lines only if asked for."""
    root = _root(
        metrics, healthz, readyz, upgrade, recordings_resource(recordings_dir, reactor)
    )
    return _quiet(AdminSite(root, reactor, request_timeout, access_log))


def _quiet(site: AdminSite) -> AdminSite:
    site.noisy = False
    site.displayTracebacks = False
    return site


def unserved_site(
    reactor: IReactorTime, request_timeout: float = REQUEST_TIMEOUT, access_log: bool = False
) -> AdminSite:
    """An admin site with no pages yet (404): :func:`serve_workers` gives it its pages once
    what they show exists, so that its listener can be made first (and stop last)."""
    return _quiet(AdminSite(Resource(), reactor, request_timeout, access_log))


class MetricsPage(Resource):
    """``/metrics`` as prometheus_client's WSGI app serves it (the format the scraper accepts,
    gzip, ``name[]``), rendered in the reactor's thread as a worker's answer is.

    prometheus_client's own ``MetricsResource`` imports the global reactor when it is imported
    (installing it, whatever reactor twistd was asked for) and serves from its thread pool,
    reading the live collectors from another thread.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        encoder, content_type = choose_encoder(_header(request, b"accept"))
        asked: list[bytes] = request.args.get(b"name[]", []) if request.args else []
        names = [name.decode() for name in asked]
        output = encoder(self.registry.restricted_registry(names) if names else self.registry)
        request.setHeader(b"content-type", content_type.encode())
        if gzip_accepted(_header(request, b"accept-encoding")):
            output = gzip.compress(output)
            request.setHeader(b"content-encoding", b"gzip")
        return output


def _header(request: Request, name: bytes) -> str:
    value = request.getHeader(name)
    return value.decode("latin-1") if value else ""


def admin_site(
    metrics: Metrics, reactor: IReactorTime, request_timeout: float = REQUEST_TIMEOUT,
    upgrade: UpgradeTrigger | None = None, access_log: bool = False, recordings_dir: str = "",
) -> AdminSite:
    """The admin listener of a process that serves browsers itself; ``recordings_dir`` is
    ``[record] dir`` (empty: recording is off, ``/recordings/`` says so)."""
    return _site(
        MetricsPage(metrics.registry), Healthz(metrics), Readyz(metrics), reactor,
        request_timeout, upgrade, access_log, recordings_dir,
    )


class WorkerPool(Protocol):
    """What the supervisor's admin listener needs from the supervisor."""

    count: int
    restarts: int

    def alive(self) -> int: ...

    def pids(self) -> Mapping[int, int | None]: ...

    def ask_all(self, what: str) -> Deferred[dict[int, Any]]:
        """Each worker's answer (``None`` for a worker that is down or too slow)."""
        ...


class _Answering(Resource):
    """Answers once the workers have: (status, content type, body) from ``answer``."""

    isLeaf = True

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool

    def answer(self) -> Deferred[tuple[int, bytes, bytes]]:
        raise NotImplementedError

    def render_GET(self, request: Request) -> Any:
        gone: list[object] = []
        request.notifyFinish().addBoth(gone.append)
        d = self.answer()

        def write(result: tuple[int, bytes, bytes]) -> None:
            if gone:
                return
            code, content_type, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            _log.failure("admin {path} failed", failure,
                         event="admin_error", path=request.path.decode("latin-1"))
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallback(write).addErrback(failed)
        return NOT_DONE_YET


def _json(code: int, body: dict[str, Any]) -> tuple[int, bytes, bytes]:
    return code, b"application/json", json.dumps(body).encode() + b"\n"


class WorkersMetrics(_Answering):
    """Every worker's metrics, labelled by worker, and the supervisor's own."""

    def answer(self) -> Deferred[tuple[int, bytes, bytes]]:
        def render(answers: dict[int, Any]) -> tuple[int, bytes, bytes]:
            texts = {index: text for index, text in answers.items() if isinstance(text, str)}
            families = supervisor_families(
                self.pool.count, self.pool.alive(), self.pool.restarts, self.pool.pids(),
                {index: index in texts for index in answers},
            )
            body = exposition(families + worker_families(texts))
            return 200, CONTENT_TYPE_LATEST.encode(), body

        return self.pool.ask_all("metrics").addCallback(render)


class WorkersReadyz(_Answering):
    """200 only while every worker runs and is ready; else 503 naming the ones that are not."""

    def answer(self) -> Deferred[tuple[int, bytes, bytes]]:
        def render(answers: dict[int, Any]) -> tuple[int, bytes, bytes]:
            reasons = []
            for index, status in sorted(answers.items()):
                if status is None:
                    reasons.append(f"worker {index} is not running or did not answer")
                elif not status.get("ready"):
                    reasons.append(f"worker {index}: {status.get('reason', 'not ready')}")
            body: dict[str, Any] = {
                "ready": not reasons,
                "workers": {str(index): status for index, status in sorted(answers.items())},
            }
            if reasons:
                body["reason"] = "; ".join(reasons)
            return _json(503 if reasons else 200, body)

        return self.pool.ask_all("status").addCallback(render)


class WorkersHealthz(Resource):
    """The supervisor is alive (its workers are its business: it restarts them)."""

    isLeaf = True

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool

    def render_GET(self, request: Request) -> bytes:
        code, content_type, body = _json(
            200, {"alive": True, "workers": self.pool.count, "workers_alive": self.pool.alive()}
        )
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        return body


def serve_workers(
    site: Site, pool: WorkerPool, upgrade: UpgradeTrigger | None, recordings_dir: str = ""
) -> None:
    """Have a process's admin site show its workers from now on (``workers = 1`` after its
    first upgrade: the main process supervises, it no longer relays).  The recordings are
    files in ``recordings_dir``, which the supervisor reads itself."""
    site.resource = _root(WorkersMetrics(pool), WorkersHealthz(pool), WorkersReadyz(pool),
                          upgrade, recordings_resource(recordings_dir, site.reactor))
