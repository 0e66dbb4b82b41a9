"""The descriptor limit: raised at start-up, and accepts paused (not spun on) when it is reached."""

from __future__ import annotations

import errno
import resource
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from twisted_novnc.operations.fdlimit import (
    AcceptGuard,
    DescriptorLimit,
    check_capacity,
    guard_accepts,
    raise_descriptor_limit,
    relay_capacity,
)
from twisted_novnc.operations.metrics import Metrics


def test_soft_limit_raised_to_hard(logged):
    """A soft limit below the hard one is raised to it, and the log gives both numbers."""
    calls = []
    limit = raise_descriptor_limit(
        getrlimit=lambda which: (1024, 20000), setrlimit=lambda which, v: calls.append(v)
    )
    assert calls == [(20000, 20000)]
    assert limit == DescriptorLimit(before=1024, soft=20000, hard=20000) and limit.raised
    assert any("raised from 1024 to 20000" in text for _, text in logged)


def test_limit_already_at_hard_is_left_alone(logged):
    """soft == hard: setrlimit is never called (a seccomp sandbox may forbid it)."""

    def forbidden(which, value):
        raise AssertionError("setrlimit called")

    limit = raise_descriptor_limit(getrlimit=lambda which: (65536, 65536), setrlimit=forbidden)
    assert limit == DescriptorLimit(65536, 65536, 65536) and not limit.raised
    assert any("65536 (the hard limit)" in text for _, text in logged)


def test_refused_raise_is_a_warning(logged):
    """If the system refuses the raise, start-up goes on at the old limit and says why."""

    def refuse(which, value):
        raise ValueError("not allowed")

    limit = raise_descriptor_limit(getrlimit=lambda which: (1024, 4096), setrlimit=refuse)
    assert limit.soft == 1024
    assert [level for level, text in logged if "cannot raise" in text] == ["warn"]


def test_real_limit_is_at_hard_after_raise():
    """On this machine the real call leaves soft == hard."""
    raise_descriptor_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard


def test_capacity_below_max_connections_warns(logged):
    """When the limit fits fewer relays than max_connections, a warning says the limit caps it."""
    capacity = check_capacity(DescriptorLimit(20000, 20000, 20000), 10000, reserve=40)
    assert capacity == relay_capacity(20000, 40) == 9980
    (warning,) = [text for level, text in logged if level == "warn"]
    assert "caps this process at about 9980 relays" in warning
    assert "max_connections = 10000" in warning and "not the proxy" in warning


def test_capacity_above_max_connections_is_info(logged):
    """Room enough: one info line, no warning."""
    check_capacity(DescriptorLimit(1024, 65536, 65536), 10000, reserve=40)
    assert [level for level, _ in logged] == ["info"]
    assert relay_capacity(10, 40) == 0


class FakeSocket:
    """accept() fails with each errno in ``failures`` first, then succeeds."""

    def __init__(self, failures: list[int]) -> None:
        self.failures = list(failures)
        self.accepted = 0

    def accept(self):
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, "failed")
        self.accepted += 1
        return object(), ("127.0.0.1", 1)

    def getsockname(self):
        return ("127.0.0.1", 6080)


class FakePort:
    connected = True
    disconnecting = False

    def __init__(self, sock: FakeSocket) -> None:
        self.socket = sock
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def guarded(failures: list[int]) -> tuple[FakePort, AcceptGuard, Clock, list[int]]:
    port = FakePort(FakeSocket(failures))
    clock = Clock()
    hits: list[int] = []
    guard = AcceptGuard(port, clock, lambda: hits.append(1), soft_limit=lambda: 64)
    guard.install()
    return port, guard, clock, hits


def test_emfile_pauses_the_port_and_looks_like_no_one_waiting(logged):
    """EMFILE: the accept loop sees EAGAIN (so Twisted closes no waiting client), the port stops
    reading for a moment, the hit is counted and the log names the limit."""
    port, guard, clock, hits = guarded([errno.EMFILE])
    with pytest.raises(BlockingIOError) as info:
        port.socket.accept()
    assert info.value.errno == errno.EAGAIN
    assert not port.reading and hits == [1] and guard.hits == 1
    (warning,) = [text for level, text in logged if level == "warn"]
    assert "descriptor limit (RLIMIT_NOFILE = 64) is refusing new connections, not the proxy" \
        in warning
    assert "EMFILE" in warning
    clock.advance(0.25)
    assert port.reading


def test_recovery_is_logged_once(logged):
    """The first accept after the limit was hit says accepting works again."""
    port, guard, clock, hits = guarded([errno.EMFILE])
    with pytest.raises(BlockingIOError):
        port.socket.accept()
    clock.advance(1)
    port.socket.accept()
    port.socket.accept()
    again = [text for _, text in logged if "free again" in text]
    assert len(again) == 1 and "1.0s after" in again[0]


def test_warnings_are_rate_limited(logged):
    """Many hits in a burst make one line; the next line, after the interval, counts them."""
    port, guard, clock, hits = guarded([errno.EMFILE] * 5)
    for _ in range(4):
        with pytest.raises(BlockingIOError):
            port.socket.accept()
        clock.advance(1)
    assert len([1 for level, _ in logged if level == "warn"]) == 1
    clock.advance(10)
    with pytest.raises(BlockingIOError):
        port.socket.accept()
    warnings = [text for level, text in logged if level == "warn"]
    assert len(warnings) == 2 and "4 time(s)" in warnings[1]
    assert len(hits) == 5


def test_enfile_names_the_system_limit(logged):
    """ENFILE is the system-wide table, and the log says so."""
    port, guard, clock, hits = guarded([errno.ENFILE])
    with pytest.raises(BlockingIOError):
        port.socket.accept()
    assert any("fs.file-max" in text for level, text in logged if level == "warn")


def test_other_accept_errors_pass_through():
    """Only descriptor exhaustion is taken over; anything else reaches Twisted as before."""
    port, guard, clock, hits = guarded([errno.ECONNABORTED])
    with pytest.raises(OSError) as info:
        port.socket.accept()
    assert info.value.errno == errno.ECONNABORTED and port.reading and not hits


def test_no_resume_after_the_port_stopped():
    """A pause ending after the port stopped listening does not start reading it again."""
    port, guard, clock, hits = guarded([errno.EMFILE])
    with pytest.raises(BlockingIOError):
        port.socket.accept()
    port.disconnecting = True
    clock.advance(1)
    assert not port.reading
    guard.stop()


def test_guard_skips_ports_without_a_socket():
    """A port that is not socket-based (a test's fake) is left unguarded."""
    assert guard_accepts(object(), Clock(), lambda: None) is None


class _FailOnce:
    """Wraps a real listening socket: the first accept fails with EMFILE."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failed = False

    def accept(self):
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


@pytest_twisted.inlineCallbacks
def test_real_port_keeps_the_client_waiting_then_serves_it():
    """With a real Twisted port, EMFILE leaves the client in the backlog (Twisted's own recovery
    would have accepted and closed it), and once the pause ends the client is served."""
    served: defer.Deferred[None] = defer.Deferred()
    server_lost: defer.Deferred[None] = defer.Deferred()

    class Server(Protocol):
        def connectionMade(self) -> None:
            served.callback(None)

        def connectionLost(self, reason=None) -> None:
            server_lost.callback(None)

    metrics = Metrics()
    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    guard = guard_accepts(port, reactor, metrics.descriptor_limit_hits.inc)
    assert guard is not None
    port.socket._socket = _FailOnce(port.socket._socket)
    lost: defer.Deferred[None] = defer.Deferred()

    class Client(Protocol):
        def connectionLost(self, reason=None) -> None:
            lost.callback(None)

    client = yield connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Client()
    )
    yield served.addTimeout(10, reactor)
    assert guard.hits == 1 and not lost.called
    assert metrics.registry.get_sample_value("twisted_novnc_descriptor_limit_hits_total") == 1
    client.transport.loseConnection()
    yield lost
    yield server_lost
    guard.stop()
    yield port.stopListening()


def test_guard_skips_a_port_not_listening_yet():
    """A port-like object whose socket is not there (not listening) is left unguarded."""
    port = FakePort(FakeSocket([]))
    port.socket = None
    assert guard_accepts(port, Clock(), lambda: None) is None
