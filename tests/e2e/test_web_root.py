"""[web] root through the real daemon: noVNC's page beside the WebSocket, nothing else."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


class Get(Protocol):
    def __init__(self, target: str) -> None:
        self.target = target
        self.answer = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(f"GET {self.target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        self.answer += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.answer)


@pytest_twisted.inlineCallbacks
def get(port: int, target: str):
    proto = Get(target)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return (yield proto.done.addTimeout(30, reactor))


@pytest_twisted.inlineCallbacks
def test_vnc_html_served_and_nothing_outside(daemon_factory, tmp_path):
    """GET /vnc.html?path=websockify/<id> serves the page; traversals never leave the root."""
    root = tmp_path / "novnc"
    root.mkdir()
    (root / "vnc.html").write_text("<title>noVNC</title>")
    (tmp_path / "private.ini").write_text("password=never-served")
    daemon = yield daemon_factory({"web": {"root": str(root)}})
    page = yield get(daemon.port, "/vnc.html?path=websockify/3f1c6a52")
    assert page.startswith(b"HTTP/1.1 200 OK") and page.endswith(b"<title>noVNC</title>")
    for target in ["/../private.ini", "/%2e%2e/private.ini", "/..%2fprivate.ini"]:
        answer = yield get(daemon.port, target)
        assert answer.startswith(b"HTTP/1.1 404 ") and b"never-served" not in answer, target
