"""The service tree twistd runs: the embedded database (if any), the session store, listeners."""

from __future__ import annotations

import signal
import threading
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .admin import admin_site
from .auth import SecretFileError, read_secret
from .config import ConfigError, Settings
from .embedded import EmbeddedPostgresService, apply_sql
from .errors import Refusal
from .front import NoVNCServerFactory
from .logs import LogService
from .metrics import LiveState, Metrics
from .readiness import ReadinessGate
from .schema import schema_sql
from .session import Target
from .store import PostgresSessionStore
from .targets import TargetPolicy
from .upstream import connect_tcp, connect_websocket, tls_options, tls_trust

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
    """A listening endpoint that says where it listens once it does."""

    def __init__(self, description: str, endpoint: Any, factory: Any, role: str = "") -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.role = role
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        if port is None:
            return port
        host = port.getHost()
        _log.info(
            "{role}listening on {host}:{port} ({description})",
            role=f"{self.role} " if self.role else "",
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            description=self.description,
        )
        return port


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
    top = MultiService()
    log_nvx()
    if settings.auth.mode == "none":
        _log.warn("[auth] mode = none: the session id is the only capability; anyone who"
                  " learns one can connect to its VM")
    if not settings.novnc.allowed_origins.patterns:
        _log.warn("[novnc] allowed_origins is empty: pages of any origin may connect")
    LogService(settings.log, reactor).setServiceParent(top)
    db = settings.database
    if db.dsn == "embedded":
        embedded = EmbeddedPostgresService(db.embedded_dir)
        embedded.setServiceParent(top)
        EmbeddedSchemaService(embedded, settings).setServiceParent(top)

        def dsn() -> str:
            return embedded.dsn
    else:

        def dsn() -> str:
            return db.dsn

    store = PostgresSessionStore(db, dsn, reactor, token_column=settings.auth.token_column)
    gate = ReadinessGate(
        source=store,
        clock=reactor,
        timeout=settings.novnc.readiness_timeout,
        ended_statuses=frozenset(db.ended_statuses),
        default_port=settings.novnc.target_port,
    )
    store.observer = gate
    SessionDatabaseService(store, gate).setServiceParent(top)

    upstream = settings.upstream
    trust = tls_trust(upstream.tls, upstream.ca_file)

    def connect(target: Target, timeout: float, suffix: str, query: str) -> Deferred[Any]:
        if upstream.port:
            target = attrs.evolve(target, port=upstream.port)
        tls = tls_options(upstream.tls, trust, target.host)
        if upstream.mode == "websocket":
            return connect_websocket(
                reactor, target, timeout, suffix, query, retry=upstream.connect_retry,
                max_message_size=settings.novnc.max_message_size, tls=tls,
            )
        return connect_tcp(reactor, target, timeout, retry=upstream.connect_retry, tls=tls)

    metrics = Metrics()
    targets = TargetPolicy(settings.upstream.allowed_networks, settings.upstream.allowed_ports)
    factory = NoVNCServerFactory(
        settings.novnc, gate, connect, reactor, metrics, settings.auth, secret, targets,
        web_root=settings.web.root,
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
    DrainService(factory, settings.novnc.drain_timeout, reactor).setServiceParent(top)
    site = admin_site(metrics)
    for description in settings.admin.listen:
        endpoint = serverFromString(reactor, description)
        ListenerService(description, endpoint, site, "admin").setServiceParent(top)
    for description in settings.novnc.listen:
        endpoint = serverFromString(reactor, description)
        ListenerService(description, endpoint, factory).setServiceParent(top)
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
