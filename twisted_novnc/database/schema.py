"""The SQL that makes a sessions table announce its changes, rendered for the configured names.

``etc/schema.sql`` is this module's output for the default settings (a test keeps the two equal),
and ``python -m twisted_novnc install-schema`` applies it for any configured table.
"""

from __future__ import annotations

from twisted_novnc.config import DatabaseSettings

TRIGGER_NAME = "twisted_novnc_notify"


def quote_ident(name: str) -> str:
    """Quote a (possibly schema-qualified) identifier; config already allows only plain names."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_sql(db: DatabaseSettings) -> str:
    """The reference system's sessions table, created only if it is missing."""
    extra = f",\n    {quote_ident(db.port_column)} integer" if db.port_column else ""
    status = quote_ident(db.status_column or "status")
    return f"""\
CREATE TABLE IF NOT EXISTS {quote_ident(db.table)} (
    {quote_ident(db.id_column)} uuid PRIMARY KEY,
    user_id uuid,
    provider text,
    {status} text NOT NULL DEFAULT 'pending',
    browser_vm_id text,
    {quote_ident(db.ip_column)} text,
    vnc_url text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(){extra}
);
"""


def trigger_sql(db: DatabaseSettings) -> str:
    """A row trigger that NOTIFYs the channel with the session id on every change.

    NOTIFY is delivered only when the writing transaction commits, which is exactly the moment a
    waiting browser may proceed.  An UPDATE that changes the id announces both ids.

    The trigger's third argument is ``[database] notify_shards``: above 0, each id goes to the
    channel ``<channel>_<shard>``, the shard computed exactly as
    :func:`twisted_novnc.database.channels.shard_of` does (a trigger installed with two
    arguments, by an older version, notifies the one channel).
    """
    table = quote_ident(db.table)
    function = quote_ident(TRIGGER_NAME)
    args = f"{quote_literal(db.notify_channel)}, {quote_literal(db.id_column)}"
    args += f", {quote_literal(str(db.notify_shards))}"
    return f"""\
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    shards int := COALESCE(TG_ARGV[2], '0')::int;
    new_id text;
    old_id text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        new_id := to_jsonb(NEW) ->> TG_ARGV[1];
        PERFORM pg_notify(CASE WHEN shards > 0 THEN TG_ARGV[0] || '_'
            || ((('x' || substr(md5(COALESCE(new_id, '')), 1, 7))::bit(28)::int) % shards)
            ELSE TG_ARGV[0] END, new_id);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_id := to_jsonb(OLD) ->> TG_ARGV[1];
        IF old_id IS DISTINCT FROM new_id THEN
            PERFORM pg_notify(CASE WHEN shards > 0 THEN TG_ARGV[0] || '_'
                || ((('x' || substr(md5(COALESCE(old_id, '')), 1, 7))::bit(28)::int) % shards)
                ELSE TG_ARGV[0] END, old_id);
        END IF;
    END IF;
    RETURN NULL;
END
$body$;

DROP TRIGGER IF EXISTS {function} ON {table};
CREATE TRIGGER {function}
    AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}({args});
"""


def schema_sql(db: DatabaseSettings, create_table: bool = True) -> str:
    """The whole idempotent script, in one transaction."""
    header = "-- twisted_novnc schema: idempotent, safe to apply again.\n"
    body = (table_sql(db) + "\n" if create_table else "") + trigger_sql(db)
    return f"{header}BEGIN;\n\n{body}\nCOMMIT;\n"
