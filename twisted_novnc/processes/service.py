"""The service tree twistd runs.

With ``[novnc] workers = 1`` (the default): the embedded database (if any), the session store,
the listeners and the admin listener, in one process.  With more, that process is a supervisor
(the embedded database, the listening sockets, the admin listener and the workers,
:mod:`twisted_novnc.processes.workers`), and each worker runs the proxy itself on the shared sockets.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twisted_novnc.config import ConfigError, Settings
from twisted_novnc.database.embedded import EmbeddedPostgresService, apply_sql
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.database.schema import schema_sql
from twisted_novnc.database.store import PostgresSessionStore
from twisted_novnc.errors import Refusal
from twisted_novnc.front.auth import SecretFileError, read_secret
from twisted_novnc.front.protocol import NoVNCServerFactory
from twisted_novnc.operations.admin import admin_site, supervisor_site
from twisted_novnc.operations.fdlimit import (
    BASE_RESERVE,
    check_capacity,
    guard_accepts,
    raise_descriptor_limit,
)
from twisted_novnc.operations.logs import LogService
from twisted_novnc.operations.metrics import LiveState, Metrics
from twisted_novnc.processes.sharedports import AdoptingReactor, ListeningReactor, SharedSocket
from twisted_novnc.processes.workers import Launcher, Supervisor, WorkerHandles, worker_count
from twisted_novnc.relay.sending import RelayTransport
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.relay.upstream import connect_tcp, connect_websocket, tls_options, tls_trust
from twisted_novnc.session import Target

_log = Logger()


@attrs.define(eq=False)
class SessionDatabaseService(Service):
    """Owns the store's connections for the life of the process."""

    store: PostgresSessionStore
    gate: ReadinessGate

    def startService(self) -> None:
        Service.startService(self)
        self.store.start()

    def stopService(self) -> None:
        self.gate.fail_all(Refusal.SHUTTING_DOWN)
        self.store.stop()
        return Service.stopService(self)


@attrs.define(eq=False)
class DrainService(Service):
    """On shutdown: let live relays go on for ``timeout`` seconds, then close them with 1001.

    Listeners stop accepting and waiters are refused (4503) by their own services at the same
    moment; this one holds the reactor's shutdown until every browser connection is gone.  A
    second SIGTERM closes everything at once.
    """

    factory: NoVNCServerFactory
    timeout: float
    clock: Any
    grace: float = 3.0
    _timers: list[Any] = attrs.field(factory=list)
    _previous_handler: Any = None

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if not self.factory.connections:
            return None
        _log.info(
            "draining: {live} live relays may go on for {timeout:g}s ({total} connections open)",
            live=len(self.factory.live),
            timeout=self.timeout,
            total=len(self.factory.connections),
        )
        drained: Deferred[None] = Deferred()
        self.factory.drained = drained
        self._timers.append(self.clock.callLater(self.timeout, self.close_all))
        self._install_second_sigterm()
        drained.addBoth(self._done)
        return drained

    def close_all(self) -> None:
        """Close every live relay with 1001 now; abort whatever is left after a grace period."""
        live = list(self.factory.live)
        if live:
            _log.info("closing {n} live relays: shutting down", n=len(live))
        for protocol in live:
            protocol.end_relay(1001, "server shutting down", "shutdown")
        self._timers.append(self.clock.callLater(self.grace, self._abort_all))

    def _abort_all(self) -> None:
        for protocol in list(self.factory.connections):
            protocol.transport.abortConnection()  # type: ignore[union-attr]

    def _install_second_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        reactor = self.clock

        def again(signum: int, frame: Any) -> None:
            _log.info("second SIGTERM: closing everything now")
            reactor.callFromThread(self.close_all)

        self._previous_handler = signal.signal(signal.SIGTERM, again)

    def _done(self, result: object) -> object:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        _log.info("drained")
        return result


class ListenerService(StreamServerEndpointService):
    """A listening endpoint that says where it listens once it does.

    ``on_port`` sees the port once it listens (the descriptor-limit guard hooks in there).
    A ``relay`` listener accepts into :class:`RelayTransport` (the relay's buffer sizes).
    """

    def __init__(
        self,
        description: str,
        endpoint: Any,
        factory: Any,
        role: str = "",
        on_port: Callable[[Any], Any] | None = None,
        verb: str = "listening on",
        relay: bool = False,
    ) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.role = role
        self.on_port = on_port
        self.verb = verb
        self.relay = relay
        self._guard: Any = None
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        if port is None:
            return port
        host = port.getHost()
        _log.info(
            "{role}{verb} {host}:{port} ({description})",
            role=f"{self.role} " if self.role else "",
            verb=self.verb,
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            description=self.description,
        )
        # Only a port that accepts into tcp.Server (unix.Port is a tcp.Port subclass too).
        if self.relay and getattr(port, "transport", None) is tcp.Server:
            port.transport = RelayTransport  # accepted connections: the relay's buffer sizes
        if self.on_port is not None:
            self._guard = self.on_port(port)
        return port

    def stopService(self) -> Deferred[None] | None:
        if self._guard is not None:
            self._guard.stop()
        return super().stopService()  # type: ignore[no-any-return]


class SequentialMultiService(MultiService):
    """Stops its children one at a time, last first, each once the one before has stopped.

    The supervisor's tree needs it: the embedded database must outlive the workers' drain.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        d: Deferred[Any] = succeed(None)
        for service in reversed(list(self)):
            d.addCallback(_stop_next, service)
            d.addErrback(lambda f: _log.failure("while stopping a service", f))
        return d


def _stop_next(_: object, service: Any) -> Deferred[Any]:
    return maybeDeferred(service.stopService)


class EmbeddedSchemaService(Service):
    """Applies the schema to the embedded cluster right after it starts."""

    def __init__(self, embedded: EmbeddedPostgresService, settings: Settings) -> None:
        self.embedded = embedded
        self.settings = settings

    def startService(self) -> None:
        Service.startService(self)
        apply_sql(self.embedded.dsn, schema_sql(self.settings.database))
        table = self.settings.database.table
        db = self.settings.database
        _log.info(
            "embedded database ready; add a session (its VM at 10.0.0.5:{port}) with:\n"
            "  {command}\nthen open ws://<listen address>{path}.  A VNC server on this host"
            " is on loopback, outside the default [upstream] allowed_networks: start with"
            " --set upstream.allowed_networks=127.0.0.1/32 (make run ARGS=...) to reach it.",
            port=self.settings.novnc.target_port,
            path=self.settings.novnc.path.replace("{session_id}", "<session_id>"),
            command=self.embedded.embedded.psql_command(
                f"INSERT INTO {table} ({db.id_column}, {db.ip_column}) "
                "VALUES (gen_random_uuid(), '10.0.0.5') RETURNING session_id"
            ),
        )


def make_service(settings: Settings, reactor: Any, secret: bytes = b"") -> MultiService:
    """Build the whole daemon; nothing runs until the service starts.

    ``secret`` is the HMAC key read from ``[auth] secret_file`` (see :func:`load_secret`).
    """
    workers = worker_count(settings.novnc.workers)
    if settings.novnc.workers is None:
        _log.info("[novnc] workers = auto: {n} (one per core)", n=workers)
    if workers > 1:
        return make_supervisor_service(settings, reactor, secret, workers)
    top = MultiService()
    log_nvx()
    warn_about(settings)
    LogService(settings.log, reactor).setServiceParent(top)
    dsn = _database(settings, top)
    core = _proxy(settings, reactor, secret, dsn, top)
    site = admin_site(core.metrics)
    for description in settings.admin.listen:
        endpoint = serverFromString(reactor, description)
        ListenerService(description, endpoint, site, "admin").setServiceParent(top)
    for description in settings.novnc.listen:
        endpoint = serverFromString(reactor, description)
        ListenerService(
            description, endpoint, core.factory, on_port=core.guard,
            relay=settings.novnc.fast_path,
        ).setServiceParent(top)
    return top


def warn_about(settings: Settings) -> None:
    """Start-up warnings about settings that are allowed but rarely what anyone wants."""
    if settings.auth.mode == "none":
        _log.warn("[auth] mode = none: the session id is the only capability; anyone who"
                  " learns one can connect to its VM")
    if not settings.novnc.allowed_origins.patterns:
        _log.warn("[novnc] allowed_origins is empty: pages of any origin may connect")


def _database(settings: Settings, parent: MultiService) -> Callable[[], str]:
    """The database's DSN, as a callable: the embedded cluster's is known once it runs."""
    db = settings.database
    if db.dsn != "embedded":
        return lambda: db.dsn
    embedded = EmbeddedPostgresService(db.embedded_dir)
    embedded.setServiceParent(parent)
    EmbeddedSchemaService(embedded, settings).setServiceParent(parent)
    return lambda: embedded.dsn


@attrs.define(eq=False)
class _Proxy:
    """The browser-serving parts of one process, for the listeners and the control pipe."""

    factory: NoVNCServerFactory
    metrics: Metrics
    drain: DrainService
    reactor: Any

    def guard(self, port: Any) -> Any:
        return guard_accepts(port, self.reactor, self.metrics.descriptor_limit_hits.inc)


def _proxy(
    settings: Settings, reactor: Any, secret: bytes, dsn: Callable[[], str], parent: MultiService
) -> _Proxy:
    """The store, the readiness gate, the upstream connector and the browser-facing factory."""
    db = settings.database
    limit = raise_descriptor_limit()
    reserve = BASE_RESERVE + db.pool_size + 1 + len(settings.novnc.listen)
    check_capacity(limit, settings.novnc.max_connections, reserve)
    store = PostgresSessionStore(db, dsn, reactor, token_column=settings.auth.token_column)
    gate = ReadinessGate(
        source=store,
        clock=reactor,
        timeout=settings.novnc.readiness_timeout,
        ended_statuses=frozenset(db.ended_statuses),
        default_port=settings.novnc.target_port,
    )
    store.observer = gate
    SessionDatabaseService(store, gate).setServiceParent(parent)

    upstream = settings.upstream
    trust = tls_trust(upstream.tls, upstream.ca_file)
    fast = settings.novnc.fast_path

    def connect(target: Target, timeout: float, suffix: str, query: str) -> Deferred[Any]:
        if upstream.port:
            target = attrs.evolve(target, port=upstream.port)
        tls = tls_options(upstream.tls, trust, target.host)
        if upstream.mode == "websocket":
            return connect_websocket(
                reactor, target, timeout, suffix, query, retry=upstream.connect_retry,
                max_message_size=settings.novnc.max_message_size, tls=tls, fast=fast,
            )
        return connect_tcp(
            reactor, target, timeout, retry=upstream.connect_retry, tls=tls, fast=fast
        )

    metrics = Metrics()
    targets = TargetPolicy(settings.upstream.allowed_networks, settings.upstream.allowed_ports)
    factory = NoVNCServerFactory(
        settings.novnc, gate, connect, reactor, metrics, settings.auth, secret, targets,
        web_root=settings.web.root, fast_path=fast,
    )
    metrics.live = LiveState(
        connections_open=lambda: len(factory.connections),
        relays_open=lambda: len(factory.live),
        waiting=lambda: gate.waiting,
        live_bytes=factory.live_bytes,
        listen_connected=lambda: store.is_listening,
        database_reachable=lambda: store.database_reachable,
    )
    store.on_reconnect(metrics.database_reconnects.inc)
    drain = DrainService(factory, settings.novnc.drain_timeout, reactor)
    drain.setServiceParent(parent)
    return _Proxy(factory, metrics, drain, reactor)


def make_worker_service(
    settings: Settings, reactor: Any, secret: bytes, sockets: Sequence[SharedSocket]
) -> tuple[MultiService, WorkerHandles]:
    """One worker of ``[novnc] workers``: the proxy on the supervisor's sockets.

    No embedded database (the supervisor runs it; ``settings`` name its DSN), no admin
    listener and no log files (the supervisor has them).
    """
    top = MultiService()
    log_nvx()
    core = _proxy(settings, reactor, secret, lambda: settings.database.dsn, top)
    for shared in sockets:
        endpoint = serverFromString(AdoptingReactor(reactor, shared), shared.description)
        ListenerService(
            shared.description, endpoint, core.factory, on_port=core.guard,
            verb="accepting (shared with the other workers) on",
            relay=settings.novnc.fast_path,
        ).setServiceParent(top)
    return top, WorkerHandles(core.metrics, core.drain)


def make_supervisor_service(
    settings: Settings, reactor: Any, secret: bytes, workers: int
) -> MultiService:
    """The supervisor of ``workers`` processes: the embedded database, the listening sockets
    (made here, accepted on only by the workers), the admin listener, and the workers.

    It stops in order: its sockets close (the workers' copies stay until each stops
    accepting), the workers drain, and only then does the embedded database stop.
    """
    top = SequentialMultiService()
    warn_about(settings)
    LogService(settings.log, reactor).setServiceParent(top)
    dsn = _database(settings, top)
    listeners = [(description, ListeningReactor(reactor)) for description in settings.novnc.listen]

    def worker_settings() -> Settings:
        return attrs.evolve(settings, database=attrs.evolve(settings.database, dsn=dsn()))

    launcher = Launcher(
        reactor,
        sockets=lambda: [sharing.shared(description) for description, sharing in listeners],
        settings=worker_settings,
        secret=secret,
    )
    supervisor = Supervisor(workers, launcher.spawn, reactor, settings.novnc.drain_timeout)
    supervisor.setServiceParent(top)
    site = supervisor_site(supervisor)
    for description in settings.admin.listen:
        endpoint = serverFromString(reactor, description)
        ListenerService(description, endpoint, site, "admin").setServiceParent(top)
    never_accepts = Factory.forProtocol(Protocol)
    never_accepts.noisy = False
    for description, sharing in listeners:
        endpoint = serverFromString(sharing, description)
        ListenerService(description, endpoint, never_accepts).setServiceParent(top)
    return top


def load_secret(settings: Settings) -> bytes:
    """The HMAC key for ``[auth] mode = hmac``; a bad file is a ConfigError naming the key.

    Also reads ``[upstream] ca_file`` once, so that a bad one stops start-up the same way.
    """
    try:
        tls_trust(settings.upstream.tls, settings.upstream.ca_file)
    except ValueError as e:
        raise ConfigError(settings.source, "upstream", "ca_file", str(e)) from None
    if settings.auth.mode != "hmac":
        return b""
    try:
        return read_secret(settings.auth.secret_file)
    except SecretFileError as e:
        raise ConfigError(settings.source, "auth", "secret_file", str(e)) from None


def log_nvx() -> bool:
    """Say whether Autobahn's native masking (NVX) is in use: without it, unmasking what
    browsers send runs in pure Python, about 70 times slower."""
    from autobahn.websocket import USES_NVX

    if USES_NVX:
        _log.info("Autobahn NVX native masking: in use")
    else:
        _log.warn("Autobahn NVX native masking: NOT in use (pure-Python unmasking is about 70x"
                  " slower); install autobahn with its native extension, unset AUTOBAHN_USE_NVX=0")
    return bool(USES_NVX)
