"""The service tree twistd runs.

With ``[novnc] workers = 1`` (the default): the embedded database (if any), the session store,
the listeners and the admin listener, in one process.  It stops in order: ``/readyz`` turns
503 while everything serves on for ``[novnc] drain_delay``, what serves drains, then the
database stops, and the admin listener last.  With more, that process is a supervisor
(the embedded database, the listening sockets, the admin listener and the workers,
:mod:`twisted_novnc.processes.supervisor`), and each worker runs the proxy itself on the shared
sockets (:mod:`twisted_novnc.processes.worker`, which builds its tree here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twisted_novnc.config import ConfigError, Settings
from twisted_novnc.database.embedded import EmbeddedPostgresService
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.database.store import PostgresSessionStore
from twisted_novnc.front.auth import SecretFileError, read_secret
from twisted_novnc.front.forwarded import parse_networks
from twisted_novnc.front.protocol import NoVNCServerFactory
from twisted_novnc.front.viewer import Viewer
from twisted_novnc.operations.admin import AdminSite, admin_site, serve_workers, unserved_site
from twisted_novnc.operations.fdlimit import AcceptGuard, guard_accepts
from twisted_novnc.operations.logs import LogService
from twisted_novnc.operations.memory import MemoryTrimmer
from twisted_novnc.operations.metrics import LiveState, Metrics
from twisted_novnc.privatefile import PrivateFileError
from twisted_novnc.processes.databases import EmbeddedSchemaService, SessionDatabaseService
from twisted_novnc.processes.drain import DrainService, ShutdownNotice
from twisted_novnc.processes.generations import LocalGeneration, Upgrader
from twisted_novnc.processes.launcher import Launcher, worker_count
from twisted_novnc.processes.listeners import ListenerService, listen_endpoint
from twisted_novnc.processes.sharedports import AdoptingReactor, ListeningReactor, SharedSocket
from twisted_novnc.processes.startup import ProcessSetupService, StartupDoneService
from twisted_novnc.processes.supervisor import SequentialMultiService, Supervisor
from twisted_novnc.processes.upgrade import Router
from twisted_novnc.reactors import IDaemonReactor
from twisted_novnc.recording.recorder import (
    Recorder,
    RecorderService,
    ThreadWriter,
    prepare_directory,
)
from twisted_novnc.relay.hostaddresses import HostAddresses
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.relay.upstream import tls_trust, upstream_connector
from twisted_novnc.session import VNCCredentials
from twisted_novnc.vnc.login import vencrypt_tls, with_login
from twisted_novnc.vnc.password_file import read_vnc_password

_log = Logger()


class DaemonTree(SequentialMultiService):
    """The top of the tree twistd runs, its log service first.

    As twistd adds it to its application, it offers the application the log's observer
    (:meth:`LogService.offer_to`): twistd then starts logging to it, so that with ``[log]
    format = json`` its very first line is JSON already.
    """

    def __init__(self, log: LogService) -> None:
        super().__init__()
        self.log = log
        log.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        self.log.offer_to(parent)


def make_service(
    settings: Settings,
    reactor: IDaemonReactor,
    secret: bytes = b"",
    overrides: Mapping[tuple[str, str], str] | None = None,
) -> MultiService:
    """Build the whole daemon; nothing runs, and nothing in the process changes, until the
    service starts (:mod:`twisted_novnc.processes.startup`).

    ``secret`` is the HMAC key read from ``[auth] secret_file`` (see :func:`load_secret`);
    ``overrides`` the command line's, applied again when an upgrade rereads the config.
    """
    overrides = dict(overrides or {})
    workers = worker_count(settings.novnc.workers)
    if settings.novnc.workers is None:
        _log.info("[novnc] workers = auto: {n} (one per core)", event="workers_auto", n=workers)
    if workers > 1:
        return make_supervisor_service(settings, reactor, secret, workers, overrides)
    top = DaemonTree(LogService(settings.log, reactor))
    ProcessSetupService(settings).setServiceParent(top)
    upgrader: Upgrader | None = None

    def upgrade() -> Deferred[dict[str, Any]]:
        assert upgrader is not None
        return upgrader.upgrade()

    metrics = Metrics()
    site = admin_site(
        metrics, reactor, settings.novnc.request_timeout, upgrade,
        access_log=settings.log.admin_access, recordings_dir=settings.record.dir,
    )
    # The admin listener stops last: /readyz says 503 (not "connection refused") until the end.
    admin = _admin_listeners(settings, reactor, site, top)
    dsn, listen_dsn = _database(settings, top)
    # What serves stops (drains) before the embedded database, which it needs, and as one:
    # after an upgrade the workers' drain runs beside this process's own (both in here).
    serving = MultiService()
    serving.setServiceParent(top)
    core = _proxy(settings, reactor, secret, dsn, listen_dsn, serving, metrics)
    proxy_from = parse_networks(settings.novnc.proxy_protocol_from)
    listeners = []
    for description in settings.novnc.listen:
        endpoint = listen_endpoint(reactor, description, proxy_from, reactor)
        listener = ListenerService(
            description, endpoint, core.factory, on_port=core.guard,
            relay=settings.novnc.fast_path,
        )
        listener.setServiceParent(serving)
        listeners.append(listener)
    local = LocalGeneration(core.factory, listeners, core.drain.close_generation)
    router = Router()

    def launcher(new: Settings, new_secret: bytes) -> Launcher:
        return Launcher(
            reactor, sockets=local.sockets,
            settings=lambda: _with_dsn(new, dsn(), listen_dsn()),
            secret=new_secret, router=router,
        )

    upgrader = Upgrader(
        settings, overrides, reactor, launcher, load_secret, serving, local=local,
        supervising=lambda pool: serve_workers(site, pool, upgrade, settings.record.dir),
    )
    upgrader.setServiceParent(serving)
    _notice(settings, reactor, site, admin, top)
    StartupDoneService().setServiceParent(top)
    return top


def _admin_listeners(
    settings: Settings, reactor: IDaemonReactor, site: AdminSite, parent: MultiService
) -> list[ListenerService]:
    """The ``[admin] listen`` endpoints serving ``site``."""
    listeners = []
    for description in settings.admin.listen:
        endpoint = serverFromString(reactor, description)
        listener = ListenerService(description, endpoint, site, "admin")
        listener.setServiceParent(parent)
        listeners.append(listener)
    return listeners


def _notice(
    settings: Settings, reactor: IDaemonReactor, site: AdminSite,
    admin: list[ListenerService], top: MultiService,
) -> None:
    """The last child before StartupDoneService (which stops at once), so the first to stop:
    /readyz turns 503, and the rest waits ``[novnc] drain_delay`` (when an admin listener
    exists to tell a load balancer)."""
    notice = ShutdownNotice([site] if admin else [], settings.novnc.drain_delay, reactor)
    notice.setServiceParent(top)


def _with_dsn(settings: Settings, dsn: str, listen_dsn: str) -> Settings:
    """Settings for a worker: the database's DSNs as known now (the embedded cluster's)."""
    database = attrs.evolve(settings.database, dsn=dsn, listen_dsn=listen_dsn)
    return attrs.evolve(settings, database=database)


def _database(
    settings: Settings, parent: MultiService
) -> tuple[Callable[[], str], Callable[[], str]]:
    """The DSNs of the queries and of LISTEN, as callables: the embedded cluster's is known
    once it runs.  LISTEN's is ``[database] listen_dsn`` (a direct connection beside a
    pooler), else the same as the queries'."""
    db = settings.database
    if db.dsn != "embedded":
        return (lambda: db.dsn), (lambda: db.listen_dsn or db.dsn)
    embedded = EmbeddedPostgresService(db.embedded_dir)
    embedded.setServiceParent(parent)
    EmbeddedSchemaService(embedded, settings).setServiceParent(parent)
    return (lambda: embedded.dsn), (lambda: embedded.dsn)


@attrs.define(eq=False)
class WorkerHandles:
    """What the worker's control pipe acts on: its metrics, readiness and drain, and for an
    upgrade its browser-facing factory and listeners."""

    metrics: Metrics
    drain: DrainService
    factory: NoVNCServerFactory | None = None
    listeners: list[ListenerService] = attrs.field(factory=list)
    upgrade_drain_timeout: float = 86400.0

    def stop_accepting(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()


@attrs.define(eq=False)
class _Proxy:
    """The browser-serving parts of one process, for the listeners and the control pipe."""

    factory: NoVNCServerFactory
    metrics: Metrics
    drain: DrainService
    reactor: IReactorTime

    def guard(self, port: IListeningPort) -> AcceptGuard | None:
        return guard_accepts(port, self.reactor, self.metrics.descriptor_limit_hits.inc)


def _proxy(
    settings: Settings,
    reactor: IDaemonReactor,
    secret: bytes,
    dsn: Callable[[], str],
    listen_dsn: Callable[[], str],
    parent: MultiService,
    metrics: Metrics | None = None,
) -> _Proxy:
    """The store, the readiness gate, the upstream connector and the browser-facing factory."""
    db = settings.database
    metrics = metrics or Metrics()
    store = PostgresSessionStore(
        db, dsn, reactor, token_column=settings.auth.token_column, listen_dsn=listen_dsn,
        password_column=settings.vnc.password_column,
        username_column=settings.vnc.username_column,
        record_column=(
            settings.record.record_column
            if settings.record.enabled and settings.record.mode == "column" else ""
        ),
    )
    gate = ReadinessGate(
        source=store,
        clock=reactor,
        timeout=settings.novnc.readiness_timeout,
        ended_statuses=frozenset(db.ended_statuses),
        default_port=settings.novnc.target_port,
        counts=metrics.readiness,
    )
    metrics.readiness.watched = lambda: gate.watched
    metrics.readiness.delayed_calls = lambda: len(reactor.getDelayedCalls())
    store.observer = gate
    SessionDatabaseService(store, gate).setServiceParent(parent)

    fast = settings.novnc.fast_path
    connect = upstream_connector(
        settings.upstream, reactor, settings.novnc.max_message_size, fast=fast,
        write_timeout=settings.novnc.write_timeout,
    )
    vnc = settings.vnc
    if vnc.enabled:
        connect = with_login(
            connect, reactor, vnc.handshake_timeout, shared_credentials(settings),
            vencrypt_tls(settings.upstream.ca_file),
            lambda result: metrics.vm_logins.labels(result).inc(),
        )

    upstream = settings.upstream
    targets = TargetPolicy(
        upstream.allowed_networks, upstream.allowed_ports,
        host=None if upstream.allow_self else HostAddresses(reactor),
    )
    recorder = (
        Recorder(settings.record, reactor, ThreadWriter(reactor), metrics)
        if settings.record.enabled else None
    )
    factory = NoVNCServerFactory(
        settings.novnc, gate, connect, reactor, metrics, settings.auth, secret, targets,
        web_root=settings.web.root, tokens=store, fast_path=fast,
        web_send_timeout=settings.web.send_timeout,
        viewer=Viewer(settings.novnc.path) if settings.web.viewer else None,
        recorder=recorder,
    )
    metrics.live = LiveState(
        connections_open=lambda: len(factory.connections),
        relays_open=lambda: len(factory.live),
        waiting=lambda: gate.waiting,
        live_bytes=factory.live_bytes,
        listen_connected=lambda: store.is_listening,
        listened_channels=lambda: store.listened_channels,
        database_reachable=lambda: store.database_reachable,
        database_prepared=lambda: store.prepared,
    )
    store.on_reconnect(metrics.database_reconnects.inc)
    MemoryTrimmer(
        settings.novnc.memory_trim_interval, lambda: len(factory.connections), reactor,
        on_trim=metrics.memory_trims.inc,
    ).setServiceParent(parent)
    drain = DrainService(factory, settings.novnc.drain_timeout, reactor)
    if recorder is not None:
        # Before the drain: a MultiService stops its children last first, so the drain has
        # begun when the recorder's stop waits for it to end.
        RecorderService(recorder, drain.when_drained).setServiceParent(parent)
    drain.setServiceParent(parent)
    return _Proxy(factory, metrics, drain, reactor)


def make_worker_service(
    settings: Settings, reactor: IDaemonReactor, secret: bytes, sockets: Sequence[SharedSocket]
) -> tuple[MultiService, WorkerHandles]:
    """One worker of ``[novnc] workers``: the proxy on the supervisor's sockets.

    No embedded database (the supervisor runs it; ``settings`` name its DSN), no admin
    listener and no log files (the supervisor has them).
    """
    top = MultiService()
    ProcessSetupService(settings, warn=False).setServiceParent(top)
    db = settings.database
    core = _proxy(settings, reactor, secret, lambda: db.dsn, lambda: db.listen_dsn or db.dsn, top)
    proxy_from = parse_networks(settings.novnc.proxy_protocol_from)
    listeners = []
    for shared in sockets:
        adopting = AdoptingReactor(reactor, shared)
        endpoint = listen_endpoint(adopting, shared.description, proxy_from, reactor)
        listener = ListenerService(
            shared.description, endpoint, core.factory, on_port=core.guard,
            verb="accepting (shared with the other workers) on",
            relay=settings.novnc.fast_path,
        )
        listener.setServiceParent(top)
        listeners.append(listener)
    StartupDoneService().setServiceParent(top)
    return top, WorkerHandles(
        core.metrics, core.drain, core.factory, listeners, settings.novnc.upgrade_drain_timeout
    )


def make_supervisor_service(
    settings: Settings, reactor: IDaemonReactor, secret: bytes, workers: int,
    overrides: Mapping[tuple[str, str], str] | None = None,
) -> MultiService:
    """The supervisor of ``workers`` processes: the embedded database, the listening sockets
    (made here, accepted on only by the workers), the admin listener, and the workers.

    It stops in order: ``/readyz`` turns 503 while the workers serve on for ``[novnc]
    drain_delay``, its sockets close (the workers' copies stay until each stops accepting),
    the workers drain, only then does the embedded database stop, and the admin listener last.
    """
    top = DaemonTree(LogService(settings.log, reactor))
    ProcessSetupService(settings, relays=False).setServiceParent(top)
    upgrader: Upgrader | None = None

    def upgrade() -> Deferred[dict[str, Any]]:
        assert upgrader is not None
        return upgrader.upgrade()

    # Its pages: below, once the supervisor exists.
    site = unserved_site(reactor, settings.novnc.request_timeout, settings.log.admin_access)
    # The admin listener stops last: /readyz says 503 (not "connection refused") until the end.
    admin = _admin_listeners(settings, reactor, site, top)
    dsn, listen_dsn = _database(settings, top)
    listeners = [(description, ListeningReactor(reactor)) for description in settings.novnc.listen]

    launcher = Launcher(
        reactor,
        sockets=lambda: [sharing.shared(description) for description, sharing in listeners],
        settings=lambda: _with_dsn(settings, dsn(), listen_dsn()),
        secret=secret,
    )
    supervisor = Supervisor(workers, launcher.spawn, reactor, settings.novnc.drain_timeout)
    supervisor.setServiceParent(top)

    def new_launcher(new: Settings, new_secret: bytes) -> Launcher:
        return attrs.evolve(
            launcher, settings=lambda: _with_dsn(new, dsn(), listen_dsn()), secret=new_secret
        )

    upgrader = Upgrader(
        settings, dict(overrides or {}), reactor, new_launcher, load_secret, top,
        supervisor=supervisor,
    )
    upgrader.setServiceParent(top)
    serve_workers(site, supervisor, upgrade, settings.record.dir)
    never_accepts = Factory.forProtocol(Protocol)
    never_accepts.noisy = False
    for description, sharing in listeners:
        endpoint = serverFromString(sharing, description)
        ListenerService(description, endpoint, never_accepts).setServiceParent(top)
    _notice(settings, reactor, site, admin, top)
    StartupDoneService().setServiceParent(top)
    return top


def shared_credentials(settings: Settings) -> VNCCredentials | None:
    """The password of ``[vnc] password_file``, if set; a bad file is a ConfigError naming the
    key (and the file), never quoting its content."""
    path = settings.vnc.password_file
    if not path:
        return None
    try:
        return VNCCredentials(password=read_vnc_password(path))
    except PrivateFileError as e:
        raise ConfigError(settings.source, "vnc", "password_file", str(e)) from None


def load_secret(settings: Settings) -> bytes:
    """The HMAC key for ``[auth] mode = hmac``; a bad file is a ConfigError naming the key.

    Also reads ``[upstream] ca_file`` and ``[vnc] password_file`` once, so that a bad one stops
    start-up (or an upgrade) the same way.
    """
    try:
        tls_trust(settings.upstream.tls, settings.upstream.ca_file)
        if settings.vnc.enabled and settings.upstream.ca_file:
            tls_trust("verify", settings.upstream.ca_file)
    except ValueError as e:
        raise ConfigError(settings.source, "upstream", "ca_file", str(e)) from None
    shared_credentials(settings)
    prepare_directory(settings.record, settings.source)
    if settings.auth.mode != "hmac":
        return b""
    try:
        return read_secret(settings.auth.secret_file)
    except SecretFileError as e:
        raise ConfigError(settings.source, "auth", "secret_file", str(e)) from None
