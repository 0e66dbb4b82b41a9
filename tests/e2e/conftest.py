"""Fixtures that run the real daemon: ``python -m twisted -n novnc`` as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import pytest_twisted
from db_fixtures import pg_factory, sessions_table  # noqa: F401  (fixtures)
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ProcessProtocol

from twisted_novnc.testing import VNCEchoFactory

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
STARTUP_LIMIT = 30.0
#: The venv's own twistd script, as users run it.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class DaemonProcess(ProcessProtocol):
    """A running ``twistd -n novnc``; collects its output and fires on its log lines."""

    def __init__(self) -> None:
        self.output = ""
        self.listening: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self._watches: list[tuple[re.Pattern[str], defer.Deferred[re.Match[str]]]] = []
        self.port = 0

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        if not self.listening.called:
            m = LISTENING.search(self.output)
            if m:
                self.port = int(m.group(1))
                self.listening.callback(self.port)
        for item in list(self._watches):
            m = item[0].search(self.output)
            if m:
                self._watches.remove(item)
                item[1].callback(m)

    errReceived = outReceived

    def when_logged(self, pattern: str) -> defer.Deferred[re.Match[str]]:
        """Fire when the daemon's output matches ``pattern`` (already or later)."""
        regex = re.compile(pattern)
        m = regex.search(self.output)
        if m:
            return defer.succeed(m)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        self._watches.append((regex, d))
        return d

    def processEnded(self, reason) -> None:  # type: ignore[no-untyped-def]
        code = reason.value.exitCode
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"daemon exited ({code}):\n{self.output}"))
        self.ended.callback(code)

    @property
    def pid(self) -> int:
        return self.transport.pid  # type: ignore[no-any-return]

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def write_config(path: Path, dsn: str, db, **novnc: object) -> Path:  # type: ignore[no-untyped-def]
    options = {"listen": "tcp:0:interface=127.0.0.1", "readiness_timeout": 20, **novnc}
    lines = ["[novnc]"] + [f"{k} = {v}" for k, v in options.items()]
    lines += [
        "[database]",
        f"dsn = {dsn}",
        f"table = {db.table}",
        f"port_column = {db.port_column}",
        f"notify_channel = {db.notify_channel}",
        "pool_size = 2",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest_twisted.inlineCallbacks
def start_daemon(config: Path, cwd: Path, proto: DaemonProcess):
    """Start the daemon from a directory that is not the checkout, as a user would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    reactor.spawnProcess(
        proto,
        TWISTD,
        [TWISTD, "--pidfile=", "-n", "novnc", "--config", str(config)],
        env=env,
        path=str(cwd),
    )
    timer = reactor.callLater(STARTUP_LIMIT, proto.listening.cancel)
    try:
        yield proto.listening
    finally:
        if timer.active():
            timer.cancel()
    yield proto.when_logged("listening for session changes")
    return proto


@pytest_twisted.inlineCallbacks
def stop_daemon(proto: DaemonProcess):
    if not proto.ended.called:
        proto.transport.signalProcess(signal.SIGTERM)
        timer = reactor.callLater(15, lambda: proto.transport.signalProcess(signal.SIGKILL))
        yield proto.ended
        if timer.active():
            timer.cancel()


@pytest.fixture
def daemon_factory(postgres_dsn, sessions_table, tmp_path):  # noqa: F811
    """Start daemons on the test table; all of them are stopped after the test."""
    started: list[DaemonProcess] = []

    @pytest_twisted.inlineCallbacks
    def start(**novnc: object):
        n = len(started)
        config = write_config(
            tmp_path / f"daemon{n}.ini",
            postgres_dsn,
            sessions_table,
            **novnc,
        )
        proto = DaemonProcess()
        started.append(proto)
        yield start_daemon(config, tmp_path, proto)
        return proto

    yield start
    for proto in started:
        if proto.transport is not None:
            pytest_twisted.blockon(stop_daemon(proto))


@pytest.fixture
def vnc_server():
    """A test VNC server (banner, then echo) on a loopback port."""
    factory = VNCEchoFactory()
    port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    )
    factory.port = port.getHost().port
    yield factory
    for conn in list(factory.connections):
        conn.transport.abortConnection()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
