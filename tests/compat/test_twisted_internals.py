"""Canaries for the Twisted internals fenced in twisted_novnc/_compat/twisted.py: each checks
that an internal is still there and still means what the daemon relies on, on the installed
Twisted, and fails naming the internal, the version and the way out."""

from __future__ import annotations

import inspect
import io
import os
import socket
import stat
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from canary import broken
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import error, reactor, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from twisted_novnc._compat import twisted as compat
from twisted_novnc.relay.sending import RelayTransport

SEND_NOW = "twisted_novnc._compat.twisted.send_now and close_now"


class Accepted(Protocol):
    """The server side of a test connection: says when it is made and when it is lost."""

    def __init__(self, made: Deferred[Accepted]) -> None:
        self.made = made
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def accept_one() -> Generator[Any, Any, tuple[Accepted, socket.socket, Any]]:
    """A real loopback connection: (our side's protocol, the peer's socket, the port)."""
    made: Deferred[Accepted] = Deferred()
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: Accepted(made))
    )
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    peer.settimeout(5)
    server = yield made
    return server, peer, port


@pytest_twisted.inlineCallbacks
def close(server: Accepted, peer: socket.socket, port: Any) -> Generator[Any, Any, None]:
    peer.close()
    server.transport.abortConnection()  # type: ignore[union-attr]
    yield server.lost
    yield port.stopListening()


def queued(transport: Any) -> int:
    """What Twisted still holds to write, as send_now reads it."""
    return transport._tempDataLen + len(transport.dataBuffer) - transport.offset


@pytest_twisted.inlineCallbacks
def test_transport_has_the_buffer_internals() -> Generator[Any, Any, None]:
    """A connected tcp.Server has _tempDataLen, dataBuffer, offset, _writeDisconnected and a
    socket.socket, and an idle one has nothing queued."""
    server, peer, port = yield accept_one()
    try:
        transport = server.transport
        for name in compat.TRANSPORT_INTERNALS:
            assert hasattr(transport, name), broken(
                "twisted", f"tcp.Server no longer has {name}", SEND_NOW
            )
        assert isinstance(transport.socket, socket.socket), broken(
            "twisted", "tcp.Server.socket is no longer the socket.socket", SEND_NOW
        )
        assert queued(transport) == 0 and not transport._writeDisconnected, broken(
            "twisted", "an idle transport's _tempDataLen/dataBuffer/offset show bytes queued",
            SEND_NOW,
        )
    finally:
        yield close(server, peer, port)


@pytest_twisted.inlineCallbacks
def test_temp_data_len_counts_what_write_queues() -> Generator[Any, Any, None]:
    """write() queues its bytes and counts them in _tempDataLen until the reactor writes."""
    server, peer, port = yield accept_one()
    try:
        server.transport.write(b"x" * 1000)
        assert server.transport._tempDataLen == 1000, broken(
            "twisted", "_tempDataLen no longer counts the bytes write() queued", SEND_NOW
        )
    finally:
        yield close(server, peer, port)


@pytest_twisted.inlineCallbacks
def test_pending_bytes_reads_the_write_buffer() -> Generator[Any, Any, None]:
    """pending_bytes (the write timeout's measure of progress) counts what write() queued
    on a tcp.Server, and says None for a transport it cannot read."""
    server, peer, port = yield accept_one()
    try:
        assert compat.pending_bytes(server.transport) == 0
        server.transport.write(b"x" * 1000)
        assert compat.pending_bytes(server.transport) == 1000, broken(
            "twisted", "_tempDataLen/dataBuffer/offset no longer count queued bytes",
            "twisted_novnc._compat.twisted.pending_bytes",
        )
        assert compat.pending_bytes(object()) is None
    finally:
        yield close(server, peer, port)


@pytest_twisted.inlineCallbacks
def test_data_buffer_and_offset_hold_what_the_kernel_did_not_take() -> Generator[Any, Any, None]:
    """Bytes doWrite could not send stay in dataBuffer past offset, and nothing is queued
    once the peer has read everything: send_now's "nothing queued" test."""
    server, peer, port = yield accept_one()
    transport = server.transport
    try:
        total = 16 * 1024 * 1024  # more than loopback's socket buffers take at once
        transport.write(os.urandom(total))
        received = 0
        while received < total:
            transport.doWrite()
            assert 0 <= queued(transport) <= total - received, broken(
                "twisted", "dataBuffer/offset no longer hold the unsent bytes", SEND_NOW
            )
            received += len(peer.recv(1 << 20))
        assert queued(transport) == 0, broken(
            "twisted", "_tempDataLen/dataBuffer/offset still show bytes once all were sent",
            SEND_NOW,
        )
    finally:
        yield close(server, peer, port)


@pytest_twisted.inlineCallbacks
def test_write_drops_bytes_once_write_disconnected() -> Generator[Any, Any, None]:
    """write() drops its bytes when _writeDisconnected is set (close_now sets it after
    shutting the write side), and a half-close by Twisted itself ends in that flag."""
    server, peer, port = yield accept_one()
    transport = server.transport
    try:
        transport._writeDisconnected = True
        transport.write(b"after the FIN")
        assert queued(transport) == 0, broken(
            "twisted", "write() no longer honours _writeDisconnected", SEND_NOW
        )
        transport._writeDisconnected = False
        transport.loseWriteConnection()
        transport.doWrite()
        assert transport._writeDisconnected is True, broken(
            "twisted", "loseWriteConnection no longer ends in _writeDisconnected", SEND_NOW
        )
        assert peer.recv(10) == b""
    finally:
        yield close(server, peer, port)


def test_check_transport_internals_finds_them_all() -> None:
    """The start-up check finds every internal send_now reads on the installed Twisted."""
    assert compat.check_transport_internals() == [], broken(
        "twisted", "a FileDescriptor lacks a buffer internal", SEND_NOW
    )


def test_a_missing_internal_turns_direct_writes_off(
    monkeypatch: pytest.MonkeyPatch, logged: list[tuple[str, str]]
) -> None:
    """Should a release drop one, the start-up check turns direct writes off (every
    transport gets write()) and logs a warning naming it."""
    from twisted.internet.testing import StringTransport

    monkeypatch.setattr(compat, "TRANSPORT_INTERNALS", (*compat.TRANSPORT_INTERNALS, "_gone"))
    monkeypatch.setattr(compat, "_DIRECT", set(compat._DIRECT))
    assert compat.check_transport_internals() == ["_gone"]
    assert not compat._writes_through(object.__new__(RelayTransport))
    assert any(level == "warn" and "has no _gone" in text for level, text in logged), logged
    transport = StringTransport()
    compat.send_now(transport, b"h", b"p")
    assert transport.value() == b"hp"


@pytest_twisted.inlineCallbacks
def test_tcp_server_is_built_from_a_connected_socket() -> Generator[Any, Any, None]:
    """tcp.Server(sock, protocol, peer, None, sessionno, reactor), as adoptStreamConnection
    builds it, is a working transport (adopt_connected_socket builds the VM side so)."""
    names = list(inspect.signature(tcp.Server.__init__).parameters)
    assert names == ["self", "sock", "protocol", "client", "server", "sessionno", "reactor"], (
        broken("twisted", f"tcp.Server's constructor is now {names}",
               "twisted_novnc._compat.twisted.adopt_connected_socket (SocketConnector)")
    )
    listening = socket.create_server(("127.0.0.1", 0))
    try:
        sock = socket.create_connection(listening.getsockname())
        sock.setblocking(False)
        peer, _ = listening.accept()
        peer.settimeout(5)
        protocol = Accepted(Deferred())
        host, port = listening.getsockname()
        transport = compat.adopt_connected_socket(
            RelayTransport, sock, protocol, host, port, reactor
        )
        protocol.makeConnection(transport)
        assert transport.getPeer().port == port
        assert repr(transport) == f"<Accepted to 127.0.0.1:{port}>"
        compat.send_now(transport, b"adopted", b"")
        compat.send_now(transport, b"", b" and written")
        got = b""
        while len(got) < len(b"adopted and written"):
            got += peer.recv(100)
        assert got == b"adopted and written"
        transport.loseConnection()
        yield protocol.lost
        peer.close()
    finally:
        listening.close()


@pytest_twisted.inlineCallbacks
def test_port_accepts_into_its_transport_class() -> Generator[Any, Any, None]:
    """A listening tcp.Port builds each accepted connection as its `transport` class
    attribute says (accept_into: the relay listeners' RelayTransport)."""
    made: Deferred[Accepted] = Deferred()
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: Accepted(made))
    )
    try:
        assert port.transport is tcp.Server, broken(
            "twisted", "tcp.Port.transport is no longer tcp.Server",
            "twisted_novnc._compat.twisted.accept_into (relay listeners)",
            "connections are tuned one by one instead (slightly more memory)",
        )
        assert compat.accept_into(port, RelayTransport)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        server = yield made
        assert type(server.transport) is RelayTransport, broken(
            "twisted", "tcp.Port no longer accepts into its `transport` class",
            "twisted_novnc._compat.twisted.accept_into (relay listeners)",
        )
        peer.close()
        yield server.lost
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_endpoint_service_keeps_its_listen_deferred() -> Generator[Any, Any, None]:
    """StreamServerEndpointService._waitingForPort is the Deferred of the port it listens on
    (when_listening: ListenerService logs the address and guards accepts there)."""
    service = StreamServerEndpointService(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1"), Factory.forProtocol(Protocol)
    )
    service.privilegedStartService()
    waiting = compat.when_listening(service)
    assert isinstance(waiting, Deferred), broken(
        "twisted", "StreamServerEndpointService has no _waitingForPort Deferred",
        "twisted_novnc._compat.twisted.when_listening (ListenerService)", "no way around it",
    )
    port = yield waiting.addCallback(lambda port: port)
    assert isinstance(port, tcp.Port), broken(
        "twisted", "_waitingForPort no longer fires with the port",
        "twisted_novnc._compat.twisted.when_listening (ListenerService)", "no way around it",
    )
    yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_raise_synchronously_makes_a_listen_failure_raise() -> Generator[Any, Any, None]:
    """With _raiseSynchronously, privilegedStartService raises when the port cannot listen,
    so twistd stops at start-up instead of running without the listener."""
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        service = StreamServerEndpointService(
            serverFromString(reactor, description), Factory.forProtocol(Protocol)
        )
        compat.raise_listen_errors(service)
        try:
            service.privilegedStartService()
        except error.CannotListenError:
            pass
        else:
            yield service.stopService()
            pytest.fail(broken(
                "twisted", "_raiseSynchronously no longer makes a listen failure raise",
                "twisted_novnc._compat.twisted.raise_listen_errors (ListenerService)",
                "a listener that cannot listen is only logged: check the start-up log",
            ))
    finally:
        taken.close()


@pytest_twisted.inlineCallbacks
def test_should_shutdown_false_leaves_other_copies_accepting() -> Generator[Any, Any, None]:
    """A port with _shouldShutdown = False closes its descriptor without shutting the socket
    down: another process's copy still accepts (the supervisor's ports, in workers mode)."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    address = ("127.0.0.1", port.getHost().port)
    copy = socket.socket(fileno=os.dup(port.fileno()))
    try:
        assert port._shouldShutdown is True, broken(
            "twisted", "tcp.Port no longer has _shouldShutdown",
            "twisted_novnc._compat.twisted.keep_socket_open_on_close (workers)",
            "run with [novnc] workers = 1",
        )
        port.stopReading()
        compat.keep_socket_open_on_close(port)
        yield port.stopListening()
        client = socket.create_connection(address, timeout=5)
        copy.settimeout(5)
        accepted, _ = copy.accept()  # EINVAL here if the socket had been shut down
        accepted.close()
        client.close()
    finally:
        copy.close()


def shared_tcp_socket() -> socket.socket:
    listening = socket.create_server(("127.0.0.1", 0), backlog=8)
    listening.setblocking(False)
    return listening


@pytest_twisted.inlineCallbacks
def test_adopted_port_is_a_plain_tcp_port_with_an_accept_loop() -> Generator[Any, Any, None]:
    """adoptStreamPort gives exactly a tcp.Port, whose doRead accepts numberAccepts
    connections per wake-up: the shared port's class swap and its fair share rely on both."""
    listening = shared_tcp_socket()
    built: list[Accepted] = []

    def build() -> Accepted:
        built.append(Accepted(Deferred()))
        return built[-1]

    real: Any = reactor
    plain = real.adoptStreamPort(os.dup(listening.fileno()), socket.AF_INET, Factory())
    assert type(plain) is tcp.Port, broken(
        "twisted", f"adoptStreamPort now gives a {type(plain).__name__}",
        "twisted_novnc._compat.twisted.adopt_shared_port (workers' fair accepts)",
        "run with [novnc] workers = 1",
    )
    yield plain.stopListening()
    port = compat.adopt_shared_port(
        reactor, os.dup(listening.fileno()), socket.AF_INET, Factory.forProtocol(build)
    )
    clients = [socket.create_connection(listening.getsockname()) for _ in range(3)]
    try:
        port.stopReading()  # only the doRead below accepts
        port.doRead()
        assert len(built) == compat.FAIR_ACCEPTS == 1, broken(
            "twisted", "tcp.Port.doRead no longer accepts numberAccepts connections a turn",
            "twisted_novnc._compat.twisted.adopt_shared_port (workers' fair accepts)",
            "run with [novnc] workers = 1",
        )
    finally:
        for client in clients:
            client.close()
        for protocol in built:
            protocol.transport.abortConnection()  # type: ignore[union-attr]
            yield protocol.lost
        yield port.stopListening()
        listening.close()


@pytest_twisted.inlineCallbacks
def test_adopted_unix_port_knows_its_path_and_leaves_it(
    tmp_path: Path,
) -> Generator[Any, Any, None]:
    """unix.Port._fromListeningDescriptor adopts a listening UNIX socket, with _bindPath
    naming its file; the shared port keeps that file and its mode when it stops."""
    path = tmp_path / "shared.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    listening.listen(8)
    os.chmod(path, 0o600)
    assert callable(getattr(unix.Port, "_fromListeningDescriptor", None)), broken(
        "twisted", "unix.Port has no _fromListeningDescriptor",
        "twisted_novnc._compat.twisted.adopt_shared_port (workers on unix: sockets)",
        "run with [novnc] workers = 1",
    )
    port = compat.adopt_shared_port(
        reactor, os.dup(listening.fileno()), socket.AF_UNIX, Factory.forProtocol(Protocol)
    )
    try:
        assert os.fsdecode(port._bindPath) == str(path), broken(
            "twisted", "an adopted unix.Port's _bindPath no longer names its file",
            "twisted_novnc._compat.twisted.adopt_shared_port (workers on unix: sockets)",
            "run with [novnc] workers = 1",
        )
    finally:
        yield port.stopListening()
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    listening.close()


def test_log_publisher_lists_its_observers() -> None:
    """LogPublisher._observers lists the observers added to it (log_observers: how the
    daemon finds twistd's own)."""
    publisher = LogPublisher()

    def observer(event: dict[str, Any]) -> None:
        pass

    publisher.addObserver(cast(ILogObserver, observer))
    assert compat.log_observers(publisher) == [observer], broken(
        "twisted", "LogPublisher no longer keeps its observers in _observers",
        "twisted_novnc._compat.twisted.log_observers ([log])",
        "[log] format = json or a file is written besides twistd's own log",
    )


def test_twistd_logs_through_a_text_file_observer() -> None:
    """twistd's log observer is textFileLogObserver's, recognised by its formatEvent closure
    (qualified name, one time-format cell), which FileLogObserver calls per event."""
    from twisted.scripts._twistd_unix import UnixAppLogger

    options = {"logfile": "-", "nodaemon": True, "syslog": False, "prefix": "twisted"}
    observer = UnixAppLogger(options)._getLogObserver()
    message = broken(
        "twisted", "twistd's observer no longer looks like textFileLogObserver's",
        "twisted_novnc._compat.twisted.is_twistd_text_observer ([log] at its defaults)",
        "the log stays twistd's own, only slower",
    )
    assert compat.is_twistd_text_observer(observer), message
    assert not compat.is_twistd_text_observer(textFileLogObserver(io.StringIO(), "%H:%M"))
    out = io.StringIO()
    swapped = textFileLogObserver(out)
    swapped.formatEvent = lambda event: "swapped\n"
    swapped({"log_format": "original"})
    assert out.getvalue() == "swapped\n", message


def test_parsed_endpoint_knows_its_port() -> None:
    """A parsed tcp: endpoint keeps its port number in _port (config's early range check)."""
    for description in ("tcp:70000", "tcp6:6080:interface=\\:\\:1"):
        expected = int(description.split(":")[1])
        assert compat.endpoint_port(serverFromString(MemoryReactor(), description)) == expected, (
            broken("twisted", f"{description!r} parsed has no _port",
                   "twisted_novnc._compat.twisted.endpoint_port (check-config)",
                   "a port out of range is reported when listening instead")
        )


@pytest_twisted.inlineCallbacks
def test_process_reader_reads_an_inherited_pipe() -> Generator[Any, Any, None]:
    """process.ProcessReader(reactor, protocol, name, fd) feeds a pipe to childDataReceived
    and ends with childConnectionLost (read_pipe: a worker's control pipe)."""
    r, w = os.pipe()
    lost: Deferred[str] = Deferred()
    received: list[tuple[str, bytes]] = []

    class Reader:
        def childDataReceived(self, name: str, data: bytes) -> None:
            received.append((name, data))

        def childConnectionLost(self, name: str, reason: Failure) -> None:
            lost.callback(name)

    compat.read_pipe(reactor, Reader(), "control", r)
    os.write(w, b"stop")
    os.close(w)
    name = yield lost
    assert (name, b"".join(d for _, d in received)) == ("control", b"stop"), broken(
        "twisted", "ProcessReader no longer reads a pipe for a process protocol",
        "twisted_novnc._compat.twisted.read_pipe (workers)", "run with [novnc] workers = 1",
    )


UPGRADES = "moving relays in an upgrade (twisted_novnc._compat.twisted.take_unsent)"
MOVES_OFF = "relays then stay in the old generation and drain instead of moving"


@pytest_twisted.inlineCallbacks
def test_take_unsent_empties_the_write_buffer_in_order() -> Generator[Any, Any, None]:
    """take_unsent returns what was written and not sent, in order (both dataBuffer past
    offset and _tempDataBuffer), and leaves the transport with nothing to write."""
    server, peer, port = yield accept_one()
    try:
        transport = server.transport
        assert compat.is_plain_tcp(transport), broken(
            "twisted", "an accepted tcp.Server is not recognised as plain TCP", UPGRADES,
            MOVES_OFF,
        )
        transport.dataBuffer, transport.offset = b"0123456789", 4
        transport.write(b"abc")
        transport.write(b"def")
        assert compat.take_unsent(transport) == b"456789abcdef", broken(
            "twisted", "dataBuffer/offset/_tempDataBuffer no longer hold the unsent bytes",
            UPGRADES, MOVES_OFF,
        )
        assert queued(transport) == 0 and transport._tempDataBuffer == []
        assert not compat.is_plain_tcp(object())
    finally:
        yield close(server, peer, port)
