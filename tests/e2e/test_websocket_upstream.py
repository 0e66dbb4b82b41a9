"""[upstream] mode = websocket: an Autobahn client to a websockify on the VM, for real."""

from __future__ import annotations

import os
import sys
import uuid

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from db_fixtures import insert_ready
from e2e_support import CollectingProcess, until, within
from e2e_support import connect_client as connect
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]



class FakeWebsockify(WebSocketServerProtocol):
    """A websockify stand-in that records what it was asked for, then speaks VNC-ish."""

    def onConnect(self, request):
        self.factory.requests.append(request)
        return "binary" if "binary" in request.protocols else None

    def onOpen(self):
        self.factory.opened.append(self)
        self.sendMessage(RFB_BANNER, isBinary=True)

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary=True)


@pytest.fixture
def fake_websockify():
    factory = WebSocketServerFactory()
    factory.protocol = FakeWebsockify
    # Autobahn schedules its close handshake timeout on txaio's batched timer, which rounds
    # the deadline down to a whole second: its default of 1 s may fire at once, aborting the
    # stand-in (and the close frame still in its buffer) before the daemon can answer.
    factory.setProtocolOptions(closeHandshakeTimeout=30)
    factory.requests = []
    factory.opened = []
    port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    )
    factory.port = port.getHost().port
    yield factory
    for proto in factory.opened:
        proto.transport.abortConnection()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.inlineCallbacks
def test_suffix_query_and_binary_reach_the_upstream(
    daemon_factory, pg, sessions_table, fake_websockify
):
    """The upstream gets ws://vm:port/<suffix>?<query minus token> offering binary, and the
    relay moves messages both ways; the upstream's normal close ends the browser with 1000."""
    daemon = yield daemon_factory({"upstream": {"mode": "websocket"}})
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, fake_websockify.port)
    client = yield connect(daemon.port, f"/websockify/{sid}/websockify?token=s3cret&x=1")
    yield within(client.when_received(len(RFB_BANNER)))
    (request,) = fake_websockify.requests
    assert request.path == "/websockify"
    assert request.params == {"x": ["1"]}
    assert request.protocols == ["binary"]
    client.sendMessage(b"ping", isBinary=True)
    assert (yield within(client.when_received(len(RFB_BANNER) + 4))) == RFB_BANNER + b"ping"
    fake_websockify.opened[0].sendClose(1000)
    code, _ = yield within(client.closed)
    assert code == 1000
    assert "s3cret" not in daemon.output


@pytest_twisted.inlineCallbacks
def test_refused_upstream_handshake_is_4502(daemon_factory, pg, sessions_table):
    """An upstream that answers the upgrade with an HTTP error gives the browser 4502."""

    class NotWebSocket(Protocol):
        def dataReceived(self, data):
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            self.transport.loseConnection()

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(NotWebSocket)
    )
    try:
        daemon = yield daemon_factory({"upstream": {"mode": "websocket"}})
        sid = str(uuid.uuid4())
        insert_ready(pg, sessions_table, sid, port.getHost().port)
        client = yield connect(daemon.port, f"/websockify/{sid}")
        assert (yield within(client.closed)) == (4502, "VM unreachable")
    finally:
        yield port.stopListening()




@pytest_twisted.inlineCallbacks
def test_real_websockify_in_front_of_a_vnc_server(daemon_factory, pg, sessions_table, vnc_server):
    """Through the real websockify (PyPI) to a test VNC server: banner and echo arrive."""
    free = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    ws_port = free.getHost().port
    yield free.stopListening()
    proc = CollectingProcess()
    reactor.spawnProcess(
        proc, sys.executable,
        [sys.executable, "-m", "websockify", f"127.0.0.1:{ws_port}",
         f"127.0.0.1:{vnc_server.port}"],
        env=dict(os.environ), path="/tmp",
    )
    try:
        yield within(until(lambda: "Listen on" in proc.output or "WebSocket server" in proc.output
                            or _listening(ws_port)))
        daemon = yield daemon_factory({"upstream": {"mode": "websocket", "port": ws_port}})
        sid = str(uuid.uuid4())
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        client = yield connect(daemon.port, f"/websockify/{sid}/websockify")
        assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER
        client.sendMessage(b"through websockify", isBinary=True)
        data = yield within(client.when_received(len(RFB_BANNER) + 18))
        assert data == RFB_BANNER + b"through websockify"
        client.sendClose(1000)
        yield within(client.closed)
    finally:
        proc.transport.signalProcess("KILL")
        yield within(proc.ended)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


