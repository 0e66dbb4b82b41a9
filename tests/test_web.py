"""[web] root: files under the root are served, nothing outside it ever is."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from test_front import RFB_BANNER, Harness, RawExchange, Wired, _until
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from twisted_novnc.front.web import answer, resolve


def response(root: str, target: str, method: str) -> bytes:
    """The whole answer as bytes: the head, then the file (closed after)."""
    found = answer(root, target, method)
    if found.file is None:
        return found.head
    with found.file as f:
        return found.head + f.read()


@pytest.fixture
def root(tmp_path):
    web = tmp_path / "novnc"
    (web / "core").mkdir(parents=True)
    (web / "vnc.html").write_text("<html>noVNC</html>")
    (web / "core" / "rfb.js").write_text("export default class RFB {}")
    (tmp_path / "secret.txt").write_text("do not serve")
    os.symlink(tmp_path / "secret.txt", web / "escape.txt")
    return str(web)


def test_files_under_root(root):
    """vnc.html with noVNC's ?path= query, and nested files, are served with their type."""
    answer = response(root, "/vnc.html?path=websockify/abc", "GET")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"<html>noVNC</html>")
    assert b"Content-Type: text/html" in answer
    assert b"Content-Type: text/javascript" in response(root, "/core/rfb.js", "GET")
    assert response(root, "/vnc.html", "HEAD").endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    "target",
    [
        "/../secret.txt", "/core/../../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt",
        "/core%2f..%2f..%2fsecret.txt", "/escape.txt", "/%00", "/core", "/nothing.html",
        "//etc/passwd", "/%2fetc%2fpasswd", "/..\\\\secret.txt", "/%ff",
    ],
)
def test_nothing_outside_root(root, target):
    """Traversals, encoded slashes, NUL, symlinks out, directories and missing files: 404."""
    assert response(root, target, "GET").startswith(b"HTTP/1.1 404 ")


@pytest.mark.parametrize(
    "target", ["/.env", "/.git/config", "/core/.hidden.js", "/%2eenv", "/.well-known/x"],
)
def test_dotfiles_are_never_served(root, target):
    """A file or folder whose name starts with a dot is not served, even when it exists."""
    os.makedirs(os.path.join(root, ".git"), exist_ok=True)
    for name in (".env", ".git/config", "core/.hidden.js", ".well-known"):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("secret")
    assert response(root, target, "GET").startswith(b"HTTP/1.1 404 ")


def test_only_get_and_head(root):
    """Other methods are refused."""
    assert response(root, "/vnc.html", "POST").startswith(b"HTTP/1.1 405 ")


@given(st.text(max_size=200))
def test_never_outside_root_for_any_path(tmp_path_factory, target):
    """Whatever the path, a served file lies under the root."""
    base = tmp_path_factory.getbasetemp()
    found = None
    with contextlib.suppress(UnicodeDecodeError):
        found = resolve(str(base), "/" + target)
    if found is not None:
        assert os.path.commonpath([os.path.realpath(base), found]) == os.path.realpath(base)


@pytest_twisted.inlineCallbacks
def test_same_listener_serves_files_and_websockets(root):
    """One listener: a plain GET gets the file, an upgrade still gets the relay."""
    h = Harness()
    h.factory.web_root = root
    yield h.start()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", h.proxy_port)
        get = yield connectProtocol(endpoint, RawExchange(
            b"GET /vnc.html?path=websockify/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        ))
        assert (yield get.done).endswith(b"<html>noVNC</html>")
        bad = yield connectProtocol(endpoint, RawExchange(
            b"GET /../secret.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        ))
        answer = yield bad.done
        assert answer.startswith(b"HTTP/1.1 404 ") and b"do not serve" not in answer
        h.ready()
        client = yield h.connect()
        yield client.when_received(len(RFB_BANNER))
        client.sendClose(1000)
        yield client.closed
    finally:
        yield h.stop()


@pytest.mark.parametrize("target", ["//[", "//[::1", "//host/vnc.html", "/a?b#c", "//"])
def test_targets_that_look_like_hosts_are_paths(root, target):
    """A request-target is a path: "//x" is not a host (urlsplit would say so, or raise)."""
    found = resolve(root, target)
    assert found is None or os.path.commonpath([os.path.realpath(root), found]) == \
        os.path.realpath(root)


# -- a file on its way: chunks under back-pressure, a send timeout, every fd closed -----------

BIG = 1024 * 1024

@pytest.fixture(params=[True, False], ids=["fast_path=on", "fast_path=off"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Each test on the fast path, then on the stock path."""
    return bool(request.param)


@pytest.fixture
def big_root(tmp_path):
    web = tmp_path / "novnc"
    web.mkdir()
    (web / "big.bin").write_bytes(bytes(range(256)) * (BIG // 256))
    (web / "vnc.html").write_text("<html>noVNC</html>")
    return str(web)


def _get(target: str, method: str = "GET", headers: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode()


def _another(w: Wired, peer: str = "192.0.2.7"):
    """A second connection to the same factory, from ``peer``."""
    protocol = w.factory.buildProtocol(IPv4Address("TCP", peer, 40001))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40001))
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_file_is_sent_chunk_by_chunk_as_the_socket_takes_it(fast_path, big_root):
    """The head first, then one chunk each time the socket asks for more; then it closes."""
    with Wired(fast_path) as w:
        w.factory.web_root = big_root
        w.send(_get("/big.bin"))
        head = w.transport.value()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert f"Content-Length: {BIG}\r\n".encode() in head
        download = w.protocol._download
        assert w.transport.producer is not None and not w.transport.streaming
        for n in range(1, 4):
            w.transport.producer.resumeProducing()
            assert len(w.transport.value()) == len(head) + n * FileSender.CHUNK_SIZE
        while w.transport.producer is not None:
            w.transport.producer.resumeProducing()
        assert w.transport.value()[len(head):] == bytes(range(256)) * (BIG // 256)
        assert w.transport.disconnecting and download.answer.file.closed
        w.leave()
        assert not w.clock.getDelayedCalls()


def test_head_sends_the_headers_only(fast_path, big_root):
    """HEAD gets the file's headers and its length, no body, and no file stays open."""
    with Wired(fast_path) as w:
        w.factory.web_root = big_root
        w.send(_get("/big.bin", "HEAD"))
        answer = w.transport.value()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n")
        assert f"Content-Length: {BIG}\r\n".encode() in answer
        assert w.transport.producer is None and w.transport.disconnecting
        assert w.protocol._download.answer.file is None


def test_a_client_that_takes_nothing_is_dropped_after_send_timeout(fast_path, big_root):
    """Each chunk taken restarts send_timeout; a client that takes none for that long is
    aborted and the file closed."""
    with Wired(fast_path) as w:
        w.factory.web_root = big_root
        w.factory.web_send_timeout = 30
        w.send(_get("/big.bin"))
        file = w.protocol._download.answer.file
        w.clock.advance(29)
        w.transport.producer.resumeProducing()  # the client read: progress
        w.clock.advance(29)
        assert not w.transport.disconnecting
        w.clock.advance(1)
        assert w.transport.disconnected and w.transport.disconnecting and file.closed
        assert w.transport.producer is not None  # FileSender: stopped by connectionLost
        w.leave()
        assert not w.clock.getDelayedCalls() and not w.factory.limits.per_ip


def test_the_connection_gone_mid_file_closes_it(fast_path, big_root):
    """A client that leaves mid-download leaves no file open, no timer, no count."""
    with Wired(fast_path) as w:
        w.factory.web_root = big_root
        w.send(_get("/big.bin"))
        file = w.protocol._download.answer.file
        w.transport.producer.resumeProducing()
        assert w.factory.limits.per_ip == {"192.0.2.7": 1}
        w.transport.producer.stopProducing()  # what the transport does when it is lost
        w.leave()
        assert file.closed and not w.clock.getDelayedCalls() and not w.factory.limits.per_ip


def test_max_per_ip_counts_downloads_with_websockets(fast_path, big_root):
    """A download counts under its client's address until its connection is gone; beyond
    max_per_ip the next plain request gets 429, and a WebSocket 4429."""
    with Wired(fast_path, max_per_ip=1) as w:
        w.factory.web_root = big_root
        w.send(_get("/big.bin"))
        second, transport = _another(w)
        second.dataReceived(_get("/vnc.html"))
        assert transport.value().startswith(b"HTTP/1.1 429 ")
        assert transport.producer is None and transport.disconnecting
        second.connectionLost(Failure(ConnectionDone()))
        other, elsewhere = _another(w, "198.51.100.1")
        other.dataReceived(_get("/vnc.html"))
        assert elsewhere.value().startswith(b"HTTP/1.1 200 OK")
        w.leave()
        third, transport = _another(w)
        third.dataReceived(_get("/vnc.html"))
        assert transport.value().startswith(b"HTTP/1.1 200 OK")
        for protocol in (other, third):
            protocol.connectionLost(Failure(ConnectionDone()))


def test_downloads_behind_a_trusted_proxy_count_under_the_client(fast_path, big_root):
    """Behind a trusted proxy a download counts under the address the proxy's header names."""
    with Wired(fast_path, trusted_proxies=("192.0.2.0/24",)) as w:
        w.factory.web_root = big_root
        w.send(_get("/big.bin", headers="X-Forwarded-For: 203.0.113.9\r\n"))
        assert w.factory.limits.per_ip == {"203.0.113.9": 1}
        w.leave()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.inlineCallbacks
def test_clients_that_never_read_are_dropped_and_every_fd_closed(fast_path, tmp_path):
    """Real sockets: clients that GET a large file and never read hold at most a socket
    buffer each, are dropped after send_timeout, and every descriptor is closed."""
    web = tmp_path / "web"
    web.mkdir()
    with open(web / "large.bin", "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: no disk, the same reads
    h = Harness(fast_path=fast_path)
    h.factory.web_root = str(web)
    h.factory.web_send_timeout = 0.5
    yield h.start()
    clients = []
    try:
        baseline = _open_fds()
        for _ in range(4):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", h.proxy_port))
            client.sendall(_get("/large.bin"))
            clients.append(client)
        yield _until(lambda: len(h.factory.limits.per_ip) == 1)
        yield _until(lambda: h.factory.limits.per_ip["127.0.0.1"] == 4)
        assert _open_fds() >= baseline + 4 + 4 + 4  # clients, server sides, open files
        h.factory.drained = drained = Deferred()
        yield drained  # every server side dropped by send_timeout
        for client in clients:
            client.close()
        clients.clear()
        assert _open_fds() == baseline
        assert not h.factory.limits.per_ip and not h.factory.unfinished
    finally:
        for client in clients:
            client.close()
        yield h.stop()
