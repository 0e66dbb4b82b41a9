"""The real daemon (a ``twistd -n novnc`` subprocess) against the real PostgreSQL cluster."""

from __future__ import annotations

import pytest
import pytest_twisted
from db_fixtures import insert_session
from e2e_support import Flood, connect_session, new_id, settled, within
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory

from twisted_novnc.testing import RFB_BANNER, recording_client_factory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]





@pytest_twisted.inlineCallbacks
def test_incident_upgrade_waits_for_commit(
    daemon_factory, vnc_server, pg, pg_factory, sessions_table
):
    """The incident: vm_ip set inside an open transaction; no 101 and no close before COMMIT."""
    db = sessions_table
    daemon = yield daemon_factory()
    sid, sentinel = new_id(), new_id()
    insert_session(pg, db, sid, status="booting")
    client = yield connect_session(daemon.port, sid)
    yield within(daemon.when_logged(f"request {sid} from"))

    backend = pg_factory(autocommit=False)  # the platform's backend, mid-transaction
    with backend.cursor() as cur:
        cur.execute(
            f'UPDATE "{db.table}" SET vm_ip = %s, "{db.port_column}" = %s, status = %s'
            " WHERE session_id = %s",
            ("127.0.0.1", vnc_server.port, "running", sid),
        )
        # Make the daemon read the row again while the transaction is open ...
        with pg.cursor() as other:
            other.execute("SELECT pg_notify(%s, %s)", (db.notify_channel, sid))
        # ... and prove it has by serving a session committed after that read was asked for.
        insert_session(pg, db, sentinel, "127.0.0.1", vnc_server.port, "running")
        witness = yield connect_session(daemon.port, sentinel)
        yield within(witness.opened)
        assert not client.handshake_over and not client.closed.called
        backend.commit()

    yield within(client.opened)
    data = yield within(client.when_received(len(RFB_BANNER)))
    assert data == RFB_BANNER
    client.sendMessage(b"\x01\x02\x03", isBinary=True)
    data = yield within(client.when_received(len(RFB_BANNER) + 3))
    assert data == RFB_BANNER + b"\x01\x02\x03"
    for c in (client, witness):
        c.sendClose(1000)
        yield within(c.closed)


@pytest_twisted.inlineCallbacks
def test_client_before_row_exists(daemon_factory, vnc_server, pg, sessions_table):
    """A browser that arrives before the row is inserted connects once it is committed."""
    sid = new_id()
    daemon = yield daemon_factory()
    client = yield connect_session(daemon.port, sid)
    yield within(daemon.when_logged(f"request {sid} from"))
    assert not client.handshake_over
    insert_session(pg, sessions_table, sid, "127.0.0.1", vnc_server.port, "running")
    yield within(client.opened)
    data = yield within(client.when_received(len(RFB_BANNER)))
    assert data == RFB_BANNER
    client.sendClose(1000)
    yield within(client.closed)


@pytest.fixture
def impatient(daemon_factory):
    """A daemon whose readiness deadline is one second."""
    return pytest_twisted.blockon(daemon_factory(readiness_timeout=1))


@pytest_twisted.inlineCallbacks
def test_refusal_codes_for_real(impatient, pg, sessions_table):
    """4404, 4504, 4410 and 4502 each reach the client as a close code and reason."""
    db = sessions_table
    absent, booting, ended, dead = new_id(), new_id(), new_id(), new_id()
    insert_session(pg, db, booting, status="booting")
    insert_session(pg, db, ended, "127.0.0.1", 1, "ended")
    # A port nothing listens on: bind one, note it, close it.
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    closed_port = port.getHost().port
    yield port.stopListening()
    insert_session(pg, db, dead, "127.0.0.1", closed_port, "running")

    clients = {}
    for sid in (absent, booting, ended, dead):
        clients[sid] = yield connect_session(impatient.port, sid)
    results = {}
    for sid, client in clients.items():
        results[sid] = yield within(client.closed)
        # A close code, so the opening handshake completed first (never a bare 1006).
        assert client.handshake_over and (yield client.opened) is None
    assert results[absent] == (4404, "no such session")
    assert results[booting] == (4504, "session not ready in time")
    assert results[ended] == (4410, "session ended")
    assert results[dead] == (4502, "VM unreachable")


@pytest_twisted.inlineCallbacks
def test_bad_path_is_4400(impatient):
    """A request for a path outside the template is closed with 4400."""
    url = f"ws://127.0.0.1:{impatient.port}/elsewhere"
    factory = recording_client_factory(url)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", impatient.port)
    client = yield connectProtocol(endpoint, factory.buildProtocol(None))
    code, reason = yield within(client.closed)
    assert (code, reason) == (4400, "bad path")


@pytest_twisted.inlineCallbacks
def test_two_daemons_serve_one_commit(daemon_factory, vnc_server, pg, sessions_table):
    """Clients spread over two daemon processes all connect after one commit."""
    daemons = [(yield daemon_factory()), (yield daemon_factory())]
    sid = new_id()
    clients = []
    for i in range(6):
        daemon = daemons[i % 2]
        clients.append((yield connect_session(daemon.port, sid)))
    for daemon in daemons:
        yield within(daemon.when_logged(f"request {sid} from", times=3))
    insert_session(pg, sessions_table, sid, "127.0.0.1", vnc_server.port, "running")
    for client in clients:
        data = yield within(client.when_received(len(RFB_BANNER)))
        assert data == RFB_BANNER
    assert len(vnc_server.connections) == 6
    for client in clients:
        client.sendClose(1000)
        yield within(client.closed)


class FloodingVNC(Flood):
    """A VM that pushes ``total`` bytes as fast as the proxy will take them; ``paused`` fires
    (with the bytes sent so far) the first time the proxy pushes back."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.paused: defer.Deferred[int] = defer.Deferred()

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if not self.paused.called:
            self.paused.callback(self.sent)


@pytest_twisted.inlineCallbacks
def test_slow_reader_keeps_memory_bounded(daemon_factory, pg, sessions_table):
    """A VM pushing 64 MiB to a browser that reads nothing is paused; the daemon stays small."""
    total = 64 * 1024 * 1024
    flood = FloodingVNC(total)
    factory = Factory.forProtocol(lambda: flood)
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        daemon = yield daemon_factory()
        baseline = daemon.rss_kib()
        sid = new_id()
        insert_session(pg, sessions_table, sid, "127.0.0.1", port.getHost().port, "running")
        client = yield connect_session(daemon.port, sid)
        yield within(client.opened)
        client.transport.pauseProducing()  # the browser stops reading
        yield within(flood.paused)
        # With back-pressure the VM's sends stall at a few MiB of kernel buffers; without it
        # the daemon would swallow all 64 MiB at loopback speed.  Wait for either.
        sent_when_paused = yield within(settled(lambda: flood.sent))
        grown = daemon.rss_kib() - baseline
        # Kernel socket buffers on four sockets hold a few MiB; the daemon holds about 64 KiB.
        assert sent_when_paused < 24 * 1024 * 1024, sent_when_paused
        assert grown < 24 * 1024, f"daemon grew by {grown} KiB"
        client.transport.resumeProducing()
        data = yield within(client.when_received(total), 120)
        assert len(data) == total
        assert flood.sent == total
        client.sendClose(1000)
        yield within(client.closed)
    finally:
        yield port.stopListening()
