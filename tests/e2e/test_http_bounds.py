"""Plain HTTP through the real daemon, bounded: [web] root files streamed to clients that do
not read, max_per_ip over downloads, a per-peer cap on unfinished request heads, and the admin
listener's request deadline."""

from __future__ import annotations

import pytest
import pytest_twisted
from e2e_support import EVENT_LIMIT, exchange, http_get, settled, until, within
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

#: The file the non-reading clients ask for: sparse, so it costs no disk.
LARGE = 96 * 1024 * 1024
CLIENTS = 6


class Stalled(Protocol):
    """Sends ``request``, reads until the answer's head is in, then reads nothing more
    (``resume`` reads on, to see the end)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.reading = False
        self.head: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.request:
            self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.head.called and b"\r\n\r\n" in self.received:
            if not self.reading:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            self.head.callback(self.received.partition(b"\r\n\r\n")[0])

    def resume(self) -> None:
        self.reading = True
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def connect(port: int, request: bytes, bind: str | None = None) -> defer.Deferred:
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, bindAddress=(bind, 0) if bind else None
    )
    return within(connectProtocol(endpoint, Stalled(request)))


@pytest.fixture
def web_root(tmp_path):
    root = tmp_path / "novnc"
    root.mkdir()
    (root / "vnc.html").write_text("<title>noVNC</title>")
    with open(root / "large.bin", "wb") as f:
        f.truncate(LARGE)
    return root


@pytest_twisted.inlineCallbacks
def test_clients_that_never_read_a_large_file_pin_no_memory(daemon_factory, web_root):
    """Clients that GET a large file and never read hold about a chunk each, not the file;
    they are dropped after send_timeout, and the daemon's descriptors and memory come back."""
    daemon = yield daemon_factory({"web": {"root": str(web_root), "send_timeout": 2}})
    page = yield exchange(daemon.port, get("/vnc.html"))  # warm up the file-serving path
    assert page.endswith(b"<title>noVNC</title>")
    fds = yield settled(daemon.fd_count)
    rss = yield settled(daemon.rss_kib)
    clients = []
    for _ in range(CLIENTS):
        client = yield connect(daemon.port, get("/large.bin"))
        head = yield within(client.head)
        assert head.startswith(b"HTTP/1.1 200 OK") and f"Content-Length: {LARGE}".encode() in head
        clients.append(client)
    during = yield settled(daemon.rss_kib)
    # Measured: about 110 KiB more (a chunk in flight and a socket each).  The whole file
    # once would be 96 MiB; all of them, 576 MiB.
    assert during - rss < 16 * 1024, (rss, during)
    assert daemon.fd_count() >= fds + 2 * CLIENTS  # a socket and the open file each
    yield within(daemon.when_logged(r"took no data of its download in 2s", times=CLIENTS))
    yield until(lambda: daemon.fd_count() == fds)
    for client in clients:
        client.resume()
        yield within(client.lost)
        assert len(client.received) < LARGE
    after = yield settled(daemon.rss_kib)
    assert after - rss < 16 * 1024, (rss, during, after)


@pytest_twisted.inlineCallbacks
def test_max_per_ip_counts_plain_http_downloads(daemon_factory, web_root):
    """One address holds at most max_per_ip downloads at once: the next gets 429, another
    address is served, and once one ends the first address is served again."""
    daemon = yield daemon_factory({"web": {"root": str(web_root)}}, max_per_ip=2)
    held = []
    for _ in range(2):
        client = yield connect(daemon.port, get("/large.bin"))
        assert (yield within(client.head)).startswith(b"HTTP/1.1 200 OK")
        held.append(client)
    refused = yield exchange(daemon.port, get("/vnc.html"))
    assert refused.startswith(b"HTTP/1.1 429 ")
    other = yield connect(daemon.port, get("/vnc.html"), bind="127.0.0.2")
    assert (yield within(other.head)).startswith(b"HTTP/1.1 200 OK")
    other.resume()
    yield within(other.lost)
    held[0].transport.abortConnection()
    yield within(held[0].lost)
    yield within(daemon.when_logged(r"http GET \S+ 200 from", times=2))
    served = yield exchange(daemon.port, get("/vnc.html"))
    assert served.startswith(b"HTTP/1.1 200 OK")
    held[1].transport.abortConnection()
    yield within(held[1].lost)


@pytest_twisted.inlineCallbacks
def test_one_address_cannot_fill_the_listener_with_unfinished_heads(daemon_factory, web_root):
    """Beyond max_per_ip connections that send no head, the address's next
    connection is closed at accept; another address still connects and is served."""
    daemon = yield daemon_factory({"web": {"root": str(web_root)}}, max_per_ip=4)
    silent = []
    for _ in range(4):
        silent.append((yield connect(daemon.port, b"")))
    # (The listener accepts in order: these four are in before the next.)
    refused = yield connect(daemon.port, get("/vnc.html"))
    yield within(refused.lost)
    assert refused.received == b""
    assert daemon.count(r"127\.0\.0\.1 has max_per_ip \(4\) connections still sending") == 1
    other = yield connect(daemon.port, get("/vnc.html"), bind="127.0.0.2")
    assert (yield within(other.head)).startswith(b"HTTP/1.1 200 OK")
    other.resume()
    yield within(other.lost)
    # A head sent frees its place: the address is served again.
    silent[0].transport.write(get("/vnc.html"))
    silent[0].resume()
    yield within(silent[0].lost)
    served = yield exchange(daemon.port, get("/vnc.html"))
    assert served.startswith(b"HTTP/1.1 200 OK")
    for client in silent[1:]:
        client.transport.abortConnection()
        yield within(client.lost)


@pytest_twisted.inlineCallbacks
def test_admin_listener_drops_a_request_that_never_ends(daemon_factory):
    """An admin client that sends half a request, a byte now and then, is dropped after
    request_timeout; a whole request is still answered."""
    daemon = yield daemon_factory(
        {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}, request_timeout=1
    )
    assert daemon.admin_port
    slow = yield connect(daemon.admin_port, b"GET /healthz HTTP/1.1\r\n")
    started = reactor.seconds()
    trickle = []

    def more() -> None:
        if slow.transport.connected:
            slow.transport.write(b"X")
            trickle.append(reactor.callLater(0.2, more))

    more()
    yield within(slow.lost, EVENT_LIMIT)
    for call in trickle:
        if call.active():
            call.cancel()
    assert slow.received == b"" and reactor.seconds() - started < 5
    status, _ = yield http_get(daemon.admin_port, "/healthz")
    assert status == 200
