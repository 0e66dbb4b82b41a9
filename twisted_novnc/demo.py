"""``python -m twisted_novnc.demo``: a desktop on screen a minute after cloning (``make demo``).

It starts what a newcomer lacks: a local desktop (TigerVNC's ``Xvnc`` on 127.0.0.1, no
password), the daemon (``twistd -n novnc`` on the given config, told to reach loopback and the
desktop's port), and a session pointing at the desktop, inserted in the daemon's database
(``dsn = embedded``: its private cluster) once the daemon listens.  Then it prints the viewer
URL, ``http://127.0.0.1:<port>/vnc/<session_id>``.  Ctrl-C or SIGTERM stops everything it
started: the daemon (which stops its embedded cluster) first, then the desktop.

The daemon writes JSON lines (``--log-format json``) so that the demo can read its events
(``listening``, ``database_cluster_ready``) by name; it prints each line's message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg2
from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from twisted_novnc.config import ConfigError, Settings, read_config
from twisted_novnc.database.schema import quote_ident
from twisted_novnc.processes.hint import VIEWER_PATH

#: What the demo's desktop looks like.
GEOMETRY = "1280x800"
BACKGROUND = "#2e5f8a"
#: How long a child has to exit after SIGTERM before it gets SIGKILL.
STOP_LIMIT = 30.0
#: How long the daemon has to listen and answer before the demo gives up.
START_LIMIT = 120.0
#: The daemon's settings the demo needs whatever the config says: loopback is where the
#: desktop is, and a stop should not keep the user waiting.
DAEMON_OVERRIDES = (
    "upstream.allowed_networks=127.0.0.1/32",
    "upstream.allow_self=on",
    "novnc.drain_delay=0",
    "novnc.drain_timeout=2",
)
INSTALL_XVNC = ("Xvnc not found: install TigerVNC"
                " (Debian: apt-get install tigervnc-standalone-server)")


class DemoError(Exception):
    """The demo cannot start: the message says what to do."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (Xvnc is told to take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_twistd() -> str:
    """The ``twistd`` of this Python's environment (the one this package is installed in)."""
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if found is None:
        raise DemoError("twistd not found: install the package (make run-venv)")
    return found


def viewer_url(host: str, port: int, session_id: str) -> str:
    """The viewer page's URL on the daemon's listener; a wildcard host is reached on loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}" + VIEWER_PATH.format(session_id=session_id)


def insert_session(dsn: str, settings: Settings, session_id: str, vm_port: int) -> None:
    """The demo's session row: the desktop at 127.0.0.1 (port in the row when it has one)."""
    db = settings.database
    columns = [db.id_column, db.ip_column] + ([db.port_column] if db.port_column else [])
    values: list[Any] = [session_id, "127.0.0.1"] + ([vm_port] if db.port_column else [])
    sql = (f"INSERT INTO {quote_ident(db.table)} ({', '.join(map(quote_ident, columns))})"
           f" VALUES ({', '.join(['%s'] * len(values))})")
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql, values)
    finally:
        conn.close()


class Child(protocol.ProcessProtocol):
    """A child process whose output lines go to ``on_line(fd, line)``; ``ended`` fires with
    its exit code (None for a signal) once it has exited."""

    def __init__(self, name: str, on_line: Callable[[int, str], None]) -> None:
        self.name = name
        self.on_line = on_line
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self._partial: dict[int, str] = {}
        self._stopping: defer.Deferred[Any] | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        text = self._partial.get(childFD, "") + data.decode("utf-8", "replace")
        *lines, self._partial[childFD] = text.split("\n")
        for line in lines:
            self.on_line(childFD, line)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    @property
    def pid(self) -> int | None:
        return None if self.transport is None else self.transport.pid

    def stop(self, clock: IReactorTime) -> defer.Deferred[int | None]:
        """SIGTERM, then SIGKILL after STOP_LIMIT; fires once the process has exited."""
        if self._stopping is None and not self.ended.called and self.transport is not None:
            self._stopping = self.ended
            with contextlib.suppress(error.ProcessExitedAlready, OSError):
                self.transport.signalProcess("TERM")
            timer = clock.callLater(STOP_LIMIT, self._kill)

            def exited(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result

            self.ended.addBoth(exited)
        return _wait(self.ended)

    def _kill(self) -> None:
        with contextlib.suppress(error.ProcessExitedAlready, OSError):
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]


def _wait(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A Deferred of its own that fires with ``d``'s result, leaving ``d``'s chain alone."""
    mine: defer.Deferred[Any] = defer.Deferred()

    def both(result: Any) -> Any:
        mine.callback(None if isinstance(result, Failure) else result)
        return result

    d.addBoth(both)
    return mine


@attrs.define(eq=False)
class Demo:
    """The desktop, the daemon and the session, started in that order and stopped in reverse."""

    reactor: Any
    config: str
    settings: Settings
    daemon_args: Sequence[str] = ()
    out: Callable[[str], None] = attrs.field(default=lambda line: print(line, flush=True))
    rfb_port: int = attrs.field(factory=free_port)
    session_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))
    url: str | None = None
    xvnc: Child | None = None
    daemon: Child | None = None
    _display: defer.Deferred[str] = attrs.field(factory=defer.Deferred)
    _xvnc_listening: defer.Deferred[None] = attrs.field(factory=defer.Deferred)
    _listening: defer.Deferred[tuple[str, int]] = attrs.field(factory=defer.Deferred)
    _database: defer.Deferred[str] = attrs.field(factory=defer.Deferred)
    _dsn: str | None = None

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Start everything; fire with the viewer URL once the session is in the database."""
        xvnc = shutil.which("Xvnc")
        if xvnc is None:
            raise DemoError(INSTALL_XVNC)
        yield self._start_xvnc(xvnc)
        self.out(f"demo: a desktop (Xvnc {self._display.result}, pid {self.xvnc.pid})"  # type: ignore[union-attr]
                 f" on 127.0.0.1:{self.rfb_port}, no password")
        self._start_daemon()
        host, port = yield self._within(self._listening, "the daemon did not start listening")
        dsn = yield self._within(self._database, "the daemon's database did not get ready")
        insert_session(dsn, self.settings, self.session_id, self.rfb_port)  # milliseconds
        self.url = viewer_url(host, port, self.session_id)
        self.out(f"demo: session {self.session_id} points at the desktop; open\n\n"
                 f"    {self.url}\n\n"
                 "demo: Ctrl-C stops the daemon, its database and the desktop.")
        return self.url

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop the daemon (and so its embedded cluster), then the desktop; fire when both
        have exited."""
        if self.daemon is not None:
            yield self.daemon.stop(self.reactor)
        if self.xvnc is not None:
            yield self.xvnc.stop(self.reactor)

    def ended(self) -> defer.Deferred[Any]:
        """Fires when the daemon or the desktop exits on its own (or is stopped)."""
        children = [c.ended for c in (self.daemon, self.xvnc) if c is not None]
        return defer.DeferredList([_wait(d) for d in children], fireOnOneCallback=True)

    # -- the desktop ------------------------------------------------------------------------

    def _start_xvnc(self, executable: str) -> defer.Deferred[Any]:
        self.xvnc = Child("Xvnc", self._xvnc_line)
        argv = [
            executable, "-displayfd", "3", "-geometry", GEOMETRY, "-depth", "24",
            "-desktop", "twisted_novnc demo", "-rfbport", str(self.rfb_port),
            "-interface", "127.0.0.1", "-localhost", "-nolisten", "tcp",
            "-SecurityTypes", "None", "-noreset",
        ]
        self.reactor.spawnProcess(self.xvnc, executable, argv, env=dict(os.environ),
                                  childFDs={0: "w", 1: "r", 2: "r", 3: "r"})
        self.xvnc.ended.addBoth(self._xvnc_ended)
        waits: list[defer.Deferred[Any]] = [self._display, self._xvnc_listening]
        ready: defer.Deferred[Any] = defer.gatherResults(waits, consumeErrors=True)
        ready.addCallback(lambda _: self._paint_background())
        return self._within(ready, "Xvnc did not start")

    def _xvnc_line(self, fd: int, line: str) -> None:
        if fd == 3 and line.strip().isdigit() and not self._display.called:
            self._display.callback(":" + line.strip())
        elif "Listening for VNC connections" in line and not self._xvnc_listening.called:
            self._xvnc_listening.callback(None)

    def _xvnc_ended(self, code: Any) -> Any:
        for d in (self._display, self._xvnc_listening):
            if not d.called:
                d.errback(DemoError(f"Xvnc exited ({code}) before it served"))
        return code

    def _paint_background(self) -> defer.Deferred[Any] | None:
        """A coloured root window, so the viewer shows that it is a desktop (not a black
        screen); skipped without xsetroot."""
        xsetroot = shutil.which("xsetroot")
        if xsetroot is None:
            return None
        painter = Child("xsetroot", lambda fd, line: None)
        env = dict(os.environ, DISPLAY=self._display.result)
        self.reactor.spawnProcess(painter, xsetroot, [xsetroot, "-solid", BACKGROUND], env=env)
        return _wait(painter.ended)

    # -- the daemon -------------------------------------------------------------------------

    def _start_daemon(self) -> None:
        twistd = find_twistd()
        argv = [twistd, "--pidfile=", "-n", "novnc", "--config", self.config,
                "--log-format", "json", "--log-file", ""]
        for override in (*DAEMON_OVERRIDES, f"novnc.target_port={self.rfb_port}"):
            argv += ["--set", override]
        argv += list(self.daemon_args)
        self.daemon = Child("twistd", self._daemon_line)
        self.reactor.spawnProcess(self.daemon, twistd, argv, env=dict(os.environ),
                                  childFDs={0: "w", 1: "r", 2: "r"})
        self.daemon.ended.addBoth(self._daemon_ended)

    def _daemon_line(self, fd: int, line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if line.strip():
                self.out(line)
            return
        event = record.get("event")
        if event != "database_hint":  # the demo's own URL replaces the hint
            self.out(f"daemon: {record.get('message', line)}")
        if event == "listening" and not record.get("role") and not self._listening.called:
            self._listening.callback((str(record["host"]), int(record["port"])))
        elif event == "database_cluster_ready":
            self._dsn = str(record["dsn"])
        elif event in ("database_hint", "listening_for_changes") and not self._database.called:
            if self._dsn is None and self.settings.database.dsn != "embedded":
                self._dsn = self.settings.database.dsn
            if self._dsn is not None:
                self._database.callback(self._dsn)

    def _daemon_ended(self, code: Any) -> Any:
        for d in (self._listening, self._database):
            if not d.called:
                d.errback(DemoError(f"the daemon exited ({code}) before it served; its"
                                    " messages are above"))
        return code

    def _within(self, d: defer.Deferred[Any], what: str) -> defer.Deferred[Any]:
        """``d``, failed with DemoError(what) unless it fires within START_LIMIT."""
        def late(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise DemoError(f"{what} within {START_LIMIT:g}s")
            return failure

        return d.addTimeout(START_LIMIT, self.reactor).addErrback(late)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m twisted_novnc.demo",
        description="Start a local desktop (Xvnc), the daemon and a session pointing at it,"
        " and print the URL that shows it.  Other arguments go to twistd novnc"
        " (--set SECTION.KEY=VALUE, ...).",
    )
    parser.add_argument("--config", default="etc/twisted-novnc.ini", help="the daemon's config")
    return parser.parse_known_args(argv)


@defer.inlineCallbacks
def main(reactor: Any, argv: Sequence[str]) -> Any:
    """Run the demo until Ctrl-C, SIGTERM, or one of its processes ends."""
    options, daemon_args = parse_args(argv)
    try:
        settings = read_config(options.config)
    except ConfigError as e:
        raise DemoError(str(e)) from None
    if settings.auth.mode != "none":
        raise DemoError(f"{options.config}: [auth] mode = {settings.auth.mode}; the demo's"
                        " URL carries no token: use a config with mode = none")
    demo = Demo(reactor, options.config, settings, daemon_args)
    stopping = reactor.addSystemEventTrigger("before", "shutdown", demo.stop)
    try:
        yield demo.start()
        yield demo.ended()
    finally:
        reactor.removeSystemEventTrigger(stopping)
        yield demo.stop()


def run(argv: Sequence[str] | None = None) -> None:
    """The command line: exit 0 after a stop, 1 with a message when the demo cannot run."""
    def guarded(reactor: Any) -> defer.Deferred[Any]:
        d = main(reactor, sys.argv[1:] if argv is None else argv)

        def failed(failure: Failure) -> None:
            if failure.check(DemoError):
                print(f"demo: {failure.value}", file=sys.stderr)
                raise SystemExit(1)
            failure.raiseException()

        return d.addErrback(failed)

    task.react(guarded)  # its reactor stops on SIGINT and SIGTERM, which runs demo.stop


if __name__ == "__main__":
    run()
