"""The database's services in the tree: the session store's connections, the embedded
cluster's schema."""

from __future__ import annotations

import attrs
from twisted.application.service import Service
from twisted.logger import Logger

from twisted_novnc.config import Settings
from twisted_novnc.database.embedded import EmbeddedPostgresService, apply_sql
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.database.schema import schema_sql
from twisted_novnc.database.store import PostgresSessionStore
from twisted_novnc.errors import Refusal

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
            " --set upstream.allowed_networks=127.0.0.1/32 --set upstream.allow_self=on"
            " (make run ARGS=...) to reach it.", event="database_hint",
            port=self.settings.novnc.target_port,
            path=self.settings.novnc.path.replace("{session_id}", "<session_id>"),
            command=self.embedded.embedded.psql_command(
                f"INSERT INTO {table} ({db.id_column}, {db.ip_column}) "
                "VALUES (gen_random_uuid(), '10.0.0.5') RETURNING session_id"
            ),
        )
