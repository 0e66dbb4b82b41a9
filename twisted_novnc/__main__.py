"""``python -m twisted_novnc`` (or ``twisted-novnc``): helper commands beside the daemon.

  install-schema --config FILE [--create-table] [--print]
      install the NOTIFY trigger on the configured (existing) sessions table
  schema [--config FILE]
      print the schema SQL for the configured names
  check-config FILE
      validate a config file and print the effective settings, secrets masked
  mint-token --secret-file FILE --session ID [--ttl SECONDS] [--config FILE]
      print a token that opens one session in [auth] mode = hmac (a --ttl beyond the
      config's [auth] max_token_age is refused)
  upgrade [--config FILE | --url URL] [--timeout SECONDS]
      upgrade the running daemon (its admin listener's POST /upgrade) and wait: exit 0 once
      complete, 1 with the reason when refused or failed, 2 when the daemon cannot be asked
  recordings list [--config FILE | --dir DIR] [--json]
      one line per recording of [record] dir, newest first: name, session, client, start,
      duration, bytes, outcome, complete or cut
  recordings export FILE [-o OUT] [--format novnc|json]
      write a recording as noVNC's playback file (VNC_frame_data, websockify --record's
      format) or as JSON (metadata and records, payloads in base64); 2 when FILE is not one
  worker --index N
      (internal) one of the [novnc] workers processes, started by the daemon itself
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    # A new worker (an upgrade starts them while the old ones relay): its imports first, at
    # the lowest CPU priority (processes/quietstart.py).
    from twisted_novnc.processes.quietstart import import_quietly

    import_quietly("twisted_novnc.processes.worker")

from twisted_novnc.config import ConfigError, Settings, effective_items, parse_config, read_config
from twisted_novnc.database.schema import schema_sql
from twisted_novnc.front.auth import add_mint_token_arguments, run_mint_token
from twisted_novnc.operations.upgrade_command import add_arguments as add_upgrade_arguments
from twisted_novnc.operations.upgrade_command import run as run_upgrade
from twisted_novnc.recording.cli import add_arguments as add_recordings_arguments
from twisted_novnc.recording.cli import run as run_recordings
from twisted_novnc.versions import describe


def _settings(path: str | None) -> Settings:
    return read_config(path) if path else parse_config("", "<defaults>")


def main(argv: list[str] | None = None, prog: str = "python -m twisted_novnc") -> int:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--version", action="version", version=describe())
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser(
        "install-schema", help="install the NOTIFY trigger on the configured sessions table"
    )
    install.add_argument("--config", required=True, help="the daemon's ini file")
    install.add_argument(
        "--create-table", action="store_true", help="also create the table if it is missing"
    )
    install.add_argument("--dsn", help="the database to change (default: the config's dsn)")
    check = commands.add_parser(
        "check-config", help="validate a config file and print the effective settings"
    )
    check.add_argument("config", help="the daemon's ini file")
    show = commands.add_parser("schema", help="print the schema SQL for the configured names")
    show.add_argument("--config", help="the daemon's ini file (default: built-in defaults)")
    show.add_argument("--no-table", action="store_true", help="only the trigger")
    mint = commands.add_parser(
        "mint-token", help="print a token that opens one session in [auth] mode = hmac"
    )
    add_mint_token_arguments(mint)
    mint.add_argument(
        "--config", help="the daemon's ini file: a --ttl beyond its [auth] max_token_age is refused"
    )
    upgrade = commands.add_parser(
        "upgrade", help="upgrade the running daemon without downtime, and wait for the outcome"
    )
    add_upgrade_arguments(upgrade)
    recordings = commands.add_parser(
        "recordings", help="list the recordings of [record] dir, or export one"
    )
    add_recordings_arguments(recordings)
    worker = commands.add_parser(
        "worker", help="(internal) one of the [novnc] workers, started by the daemon itself"
    )
    worker.add_argument("--index", type=int, required=True, help="which worker (from 1)")
    args = parser.parse_args(argv)

    if args.command == "mint-token":
        if args.config is None:
            return run_mint_token(args)
        try:
            max_token_age = _settings(args.config).auth.max_token_age
        except ConfigError as e:
            print(f"twisted_novnc: configuration error: {e}", file=sys.stderr)
            return 2
        return run_mint_token(args, max_token_age=max_token_age)
    if args.command == "upgrade":
        listen: tuple[str, ...] = ()
        if args.url is None:
            try:
                listen = _settings(args.config).admin.listen
            except ConfigError as e:
                print(f"twisted_novnc: configuration error: {e}", file=sys.stderr)
                return 2
        return run_upgrade(args, listen)
    if args.command == "recordings":
        return run_recordings(args)
    if args.command == "worker":
        from twisted_novnc.processes.worker import run_worker

        code = run_worker(args.index)
        # Everything is closed and every log line written (synchronously, up the pipe): the
        # interpreter's own teardown of a large heap would only burn CPU the new generation's
        # relays need (an old generation exits while they stream).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    try:
        settings = _settings(args.config)
    except ConfigError as e:
        print(f"twisted_novnc: configuration error: {e}", file=sys.stderr)
        return 2

    if args.command == "check-config":
        print(f"# {args.config}: valid; effective settings (secrets masked)")
        section = None
        for name, key, value in effective_items(settings):
            if name != section:
                print(f"\n[{name}]" if section is not None else f"[{name}]")
                section = name
            print(f"{key} = {value}".rstrip())
        return 0

    if args.command == "schema":
        sys.stdout.write(schema_sql(settings.database, create_table=not args.no_table))
        return 0

    from twisted_novnc.database.embedded import apply_sql

    dsn = args.dsn or settings.database.dsn
    if dsn == "embedded":
        print(
            "twisted_novnc: the embedded database gets its schema when the daemon starts;"
            " give --dsn to change another database",
            file=sys.stderr,
        )
        return 2
    try:
        apply_sql(dsn, schema_sql(settings.database, create_table=args.create_table))
    except Exception as e:  # psycopg2 errors carry the server's message
        print(f"twisted_novnc: install-schema failed: {e}".rstrip(), file=sys.stderr)
        return 1
    db = settings.database
    print(f"installed trigger {db.table} -> NOTIFY {db.notify_channel}")
    return 0


def console() -> int:
    """The ``twisted-novnc`` command: the same commands as ``python -m twisted_novnc``."""
    return main(prog="twisted-novnc")


if __name__ == "__main__":
    raise SystemExit(main())
