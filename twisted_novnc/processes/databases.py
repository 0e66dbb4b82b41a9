"""The database's services in the tree: the session store's connections, the embedded
cluster's schema."""

from __future__ import annotations

import uuid

import attrs
from twisted.application.service import Service
from twisted.logger import Logger

from twisted_novnc.config import Settings
from twisted_novnc.database.embedded import EmbeddedPostgresService, apply_sql
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.database.schema import schema_sql
from twisted_novnc.database.store import PostgresSessionStore
from twisted_novnc.processes.hint import session_hint

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
        self.gate.close()
        self.store.stop()
        return Service.stopService(self)


class EmbeddedSchemaService(Service):
    """Applies the schema to the embedded cluster right after it starts."""

    def __init__(self, embedded: EmbeddedPostgresService, settings: Settings) -> None:
        self.embedded = embedded
        self.settings = settings

    def startService(self) -> None:
        Service.startService(self)
        apply_sql(self.embedded.dsn, schema_sql(self.settings.database))
        hint = session_hint(self.settings, str(uuid.uuid4()))
        _log.info("{hint}", event="database_hint", hint=hint.text(
            self.embedded.embedded.psql_command, self.settings))
