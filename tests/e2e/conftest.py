"""Fixtures that run the real daemon: ``twistd -n novnc`` as a subprocess."""

from __future__ import annotations

import pytest
import pytest_twisted
from daemon_process import DaemonProcess, start_daemon, stop_daemon, write_config
from db_fixtures import pg_factory, sessions_table  # noqa: F401  (fixtures)
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint

from twisted_novnc.testing import VNCEchoFactory


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
