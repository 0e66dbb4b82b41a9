"""Fixtures that run the real daemon: ``twistd -n novnc`` as a subprocess."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import daemon_process
import pytest
import pytest_twisted
from daemon_process import DaemonProcess, start_daemon, stop_daemon, write_config
from db_fixtures import pg_factory, sessions_table  # noqa: F401  (fixtures)
from e2e_support import until
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint

from twisted_novnc.config import parse_config
from twisted_novnc.database.embedded import EmbeddedPostgres, apply_sql, read_postmaster_pid
from twisted_novnc.database.schema import schema_sql
from twisted_novnc.testing import VNCEchoFactory


@pytest.fixture(
    scope="session", params=["on", "off"], ids=lambda mode: f"fast_path={mode}", autouse=True
)
def fast_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every daemon a test starts relays on the fast path, then, in a second run of the same
    test, on the stock path (``--set novnc.fast_path=off``): the test ids say which."""
    daemon_process.FAST_PATH = request.param
    yield request.param
    daemon_process.FAST_PATH = "on"


@pytest.fixture
def daemon_factory(postgres_dsn, sessions_table, tmp_path):  # noqa: F811
    """Start daemons on the test table; all of them are stopped after the test."""
    started: list[DaemonProcess] = []

    @pytest_twisted.inlineCallbacks
    def start(sections: dict | None = None, **novnc: object):
        n = len(started)
        config = write_config(
            tmp_path / f"daemon{n}.ini",
            postgres_dsn,
            sessions_table,
            sections,
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
    relayed_as_told(started)


def relayed_as_told(started: list[DaemonProcess]) -> None:
    """Each daemon that listened said it relayed on the path the test id names."""
    for proto in started:
        if proto.listening.called and proto.port:
            assert f"[novnc] fast_path = {daemon_process.FAST_PATH})" in proto.output, (
                f"the daemon did not relay with fast_path = {daemon_process.FAST_PATH}"
            )


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


class PrivateCluster:
    """A cluster of the test's own, which it may kill, stop and restart under a live daemon."""

    def __init__(self, root: str) -> None:
        self.data_dir = os.path.join(root, "pgdata")
        self.socket_dir = os.path.join(root, "sock")
        os.mkdir(self.socket_dir)
        self.cluster = self._new()
        self.dsn = self.cluster.start()
        self.db = parse_config(
            "[database]\ntable = auth_sessions\nport_column = vnc_port\n", "<test>"
        ).database
        apply_sql(self.dsn, schema_sql(self.db))

    def _new(self) -> EmbeddedPostgres:
        return EmbeddedPostgres(self.data_dir, durable=False, socket_dir_fixed=self.socket_dir)

    @pytest_twisted.inlineCallbacks
    def kill(self):
        """SIGKILL the postmaster, as a crash or the OOM killer would; fire once it is gone.

        PostgreSQL refuses to start while the old postmaster's pid exists, and an orphan stays
        a zombie until PID 1 reaps it (about 2 s on this kind of machine).
        """
        pid = read_postmaster_pid(self.data_dir).pid
        os.kill(pid, signal.SIGKILL)
        yield until(lambda: not os.path.exists(f"/proc/{pid}"))
        return pid

    def restart(self) -> None:
        self.cluster = self._new()
        self.cluster.start()

    def stop(self) -> None:
        self.cluster.stop()


@pytest.fixture
def private_cluster(scratch_dir):
    cluster = PrivateCluster(scratch_dir)
    yield cluster
    cluster.cluster = cluster._new()
    if read_postmaster_pid(cluster.data_dir) is not None:
        cluster.cluster.start()
    cluster.stop()


@pytest.fixture
def private_daemon(private_cluster, tmp_path):
    """Start daemons on the private cluster; stopped after the test."""
    started: list[DaemonProcess] = []

    @pytest_twisted.inlineCallbacks
    def start(sections: dict | None = None, wait_for_database: bool = True, **novnc: object):
        config = write_config(
            tmp_path / f"private{len(started)}.ini",
            private_cluster.dsn,
            private_cluster.db,
            sections,
            **novnc,
        )
        proto = DaemonProcess()
        started.append(proto)
        yield start_daemon(config, tmp_path, proto, wait_for_database=wait_for_database)
        return proto

    yield start
    for proto in started:
        if proto.transport is not None:
            pytest_twisted.blockon(stop_daemon(proto))
    relayed_as_told(started)


