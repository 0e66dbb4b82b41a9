"""The service tree twistd runs: the embedded database (if any), the session store, listeners."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .config import Settings
from .embedded import EmbeddedPostgresService, apply_sql
from .errors import Refusal
from .front import NoVNCServerFactory
from .readiness import ReadinessGate
from .schema import schema_sql
from .session import Target
from .store import PostgresSessionStore
from .upstream import TCPUpstream, connect_tcp

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


class ListenerService(StreamServerEndpointService):
    """A listening endpoint that says where it listens once it does."""

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        if port is None:
            return port
        host = port.getHost()
        _log.info(
            "listening on {host}:{port} ({description})",
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
        _log.info(
            "embedded database ready; add a session with:\n  {command}",
            command=self.embedded.embedded.psql_command(
                f"INSERT INTO {table} (session_id, vm_ip) "
                "VALUES (gen_random_uuid(), '127.0.0.1') RETURNING session_id"
            ),
        )


def make_service(settings: Settings, reactor: Any) -> MultiService:
    """Build the whole daemon; nothing runs until the service starts."""
    top = MultiService()
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

    store = PostgresSessionStore(db, dsn, reactor)
    gate = ReadinessGate(
        source=store,
        clock=reactor,
        timeout=settings.novnc.readiness_timeout,
        ended_statuses=frozenset(db.ended_statuses),
        default_port=settings.novnc.target_port,
    )
    store.observer = gate
    SessionDatabaseService(store, gate).setServiceParent(top)

    def connect(target: Target, timeout: float) -> Deferred[TCPUpstream]:
        return connect_tcp(reactor, target, timeout)

    factory = NoVNCServerFactory(settings.novnc, gate, connect, reactor)
    for description in settings.novnc.listen:
        endpoint = serverFromString(reactor, description)
        ListenerService(description, endpoint, factory).setServiceParent(top)
    return top
