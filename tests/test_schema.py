"""The schema SQL: etc/schema.sql is the rendering for the defaults, and names are quoted."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted  # noqa: F401

from twisted_novnc.__main__ import main
from twisted_novnc.config import parse_config
from twisted_novnc.database.schema import quote_ident, schema_sql

ROOT = Path(__file__).resolve().parent.parent


def test_etc_schema_is_the_default_rendering():
    """etc/schema.sql is exactly what the code renders for the default settings."""
    defaults = parse_config("", "<defaults>").database
    assert (ROOT / "etc" / "schema.sql").read_text() == schema_sql(defaults)


def test_quote_ident_quotes_each_part():
    """Schema-qualified names are quoted part by part."""
    assert quote_ident("app.Sessions") == '"app"."Sessions"'
    assert quote_ident('a"b') == '"a""b"'


def test_schema_command_prints_configured_names(tmp_path, capsys):
    """`python -m twisted_novnc schema --config` renders the configured table and channel."""
    config = tmp_path / "c.ini"
    config.write_text("[database]\ntable = vm_sessions\nnotify_channel = vms\n")
    assert main(["schema", "--config", str(config), "--no-table"]) == 0
    out = capsys.readouterr().out
    assert 'ON "vm_sessions"' in out and "'vms'" in out
    assert "CREATE TABLE" not in out


@pytest.mark.integration
def test_schema_is_idempotent_and_notifies(pg):
    """Applying the schema twice works, and each kind of change NOTIFYs with the session id."""
    settings = parse_config(
        "[database]\ntable = schema_probe\nnotify_channel = schema_probe\n", "<test>"
    ).database
    with pg.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS schema_probe")
        cur.execute(schema_sql(settings))
        cur.execute(schema_sql(settings))
        cur.execute("LISTEN schema_probe")
        sid = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"
        cur.execute("INSERT INTO schema_probe (session_id) VALUES (%s)", (sid,))
        cur.execute("UPDATE schema_probe SET vm_ip = '10.0.0.1' WHERE session_id = %s", (sid,))
        cur.execute("DELETE FROM schema_probe WHERE session_id = %s", (sid,))
        pg.poll()
        payloads = [n.payload for n in pg.notifies]
        cur.execute("DROP TABLE schema_probe")
    assert payloads == [sid, sid, sid]


@pytest.mark.integration
def test_install_schema_on_existing_table(postgres_dsn, pg, tmp_path):
    """install-schema puts the trigger on an existing table named by a config file."""
    with pg.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS desktops")
        cur.execute("CREATE TABLE desktops (id text PRIMARY KEY, addr inet, state text)")
    config = tmp_path / "c.ini"
    config.write_text(
        "[database]\ntable = desktops\nid_column = id\nip_column = addr\n"
        "status_column = state\nnotify_channel = desktops\n"
    )
    assert main(["install-schema", "--config", str(config), "--dsn", postgres_dsn]) == 0
    with pg.cursor() as cur:
        cur.execute("LISTEN desktops")
        cur.execute("INSERT INTO desktops VALUES ('d-1', '10.0.0.2', 'up')")
        pg.poll()
        payloads = [n.payload for n in pg.notifies]
        cur.execute("DROP TABLE desktops")
    assert payloads == ["d-1"]


def test_schema_renders_the_shard_count(tmp_path, capsys):
    """The trigger gets [database] notify_shards as its third argument (0 by default), and
    reads a missing one as 0, so a trigger installed by an older version keeps working."""
    config = tmp_path / "c.ini"
    config.write_text("[database]\nnotify_channel = vms\nnotify_shards = 64\n")
    assert main(["schema", "--config", str(config), "--no-table"]) == 0
    out = capsys.readouterr().out
    assert "('vms', 'session_id', '64')" in out
    assert "COALESCE(TG_ARGV[2], '0')::int" in out
    defaults = parse_config("", "<defaults>").database
    assert "('twisted_novnc', 'session_id', '0')" in schema_sql(defaults)
