"""What a hostile VM can make the real daemon hold in ``[upstream] mode = websocket``, in both
``[novnc] fast_path`` modes: a "websockify" that answers the upgrade, then sends pings and never
reads the daemon's pongs.  Memory is the daemon's RSS (``/proc/<pid>/status``) before, during
and after; a browser is connected to the session throughout.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import pytest
import pytest_twisted
from db_fixtures import insert_ready
from e2e_support import BoundedPush, connect_session, new_id, settled, stands_still, within
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MIB = 1024 * 1024
BINARY, PING = 0x2, 0x9
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WEBSOCKET = {"upstream": {"mode": "websocket"}}


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked (server to client) frame of up to 125 bytes."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


class PingingWebsockify(BoundedPush, Protocol):
    """Answers the upgrade with a 101 and the VNC banner, then reads nothing more and sends
    pings (125-byte payloads) as fast as the daemon takes them, up to ``total`` bytes."""

    chunk = server_frame(PING, b"p" * 125) * 500

    def __init__(self, total: int) -> None:
        self.total = total
        self.head = b""
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.opened.called:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        match = re.search(rb"(?im)^Sec-WebSocket-Key:\s*(\S+)", self.head)
        assert match is not None, self.head
        accept = base64.b64encode(hashlib.sha1(match.group(1) + WS_GUID).digest())
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Protocol: binary\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            + server_frame(BINARY, RFB_BANNER)
        )
        transport.pauseProducing()  # no pong, no close frame is ever read
        transport.registerProducer(self, True)
        self.opened.callback(None)
        self.resumeProducing()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def pinging_websockify(*totals: int) -> Any:
    """A listening hostile websockify; ``port.vms`` are the connections it accepted, each
    sending the next of ``totals`` bytes of pings (the last one for all that follow)."""
    vms: list[PingingWebsockify] = []

    def build() -> PingingWebsockify:
        vms.append(PingingWebsockify(totals[min(len(vms), len(totals) - 1)]))
        return vms[-1]

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(build)
    )
    port.vms = vms
    return port


@pytest_twisted.inlineCallbacks
def browser_on(daemon: Any, pg: Any, table: Any, vm_port: int) -> Any:
    """A browser relaying to the VM at ``vm_port``, once the VM's banner has reached it."""
    sid = new_id()
    insert_ready(pg, table, sid, vm_port)
    client = yield within(connect_session(daemon.port, sid))
    assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER
    return sid, client


@pytest_twisted.inlineCallbacks
def test_a_vm_that_pings_and_reads_no_pong_keeps_the_daemon_small(
    daemon_factory, pg, sessions_table
):
    """A websockify that sends up to 200 MiB of pings and reads no pong, a browser connected:
    the daemon stops reading from the VM once its pongs back up, so it takes a few MiB at
    most, its RSS stays within 64 MiB of the baseline and comes back near it once the VM is
    gone (the browser then gets 4502), and it goes on relaying."""
    port = yield pinging_websockify(0, 200 * MIB)
    try:
        daemon = yield daemon_factory(WEBSOCKET)
        # Warm-up: one relay through the same code (no pings), its VM then lost.
        _, warm = yield browser_on(daemon, pg, sessions_table, port.getHost().port)
        port.vms[0].transport.abortConnection()
        assert (yield within(warm.closed)) == (4502, "VM connection lost")
        baseline = yield settled(daemon.rss_kib)
        sid, client = yield browser_on(daemon, pg, sessions_table, port.getHost().port)
        vm = port.vms[-1]
        peak = [baseline]
        sampler = task.LoopingCall(lambda: peak.append(daemon.rss_kib()))
        sampler.start(0.05)
        try:
            # The pings stop when the daemon stops reading (or, without a bound, once all of
            # them are sent): wait for them to stand still, 20 s at most.
            yield stands_still(lambda: vm.sent, 20)
        finally:
            sampler.stop()
        grown_mib = (max(peak) - baseline) / 1024
        facts = f"the daemon read {vm.sent / MIB:.0f} MiB of pings and grew by {grown_mib:.0f} MiB"
        # Measured with the bound: about 6 MiB read (kernel buffers), 0-2 MiB grown; without it
        # 75 MiB read in 20 s and 102 MiB grown.
        assert grown_mib < 64 and vm.sent < 32 * MIB, facts
        vm.transport.abortConnection()  # type: ignore[union-attr]
        assert (yield within(client.closed)) == (4502, "VM connection lost")
        yield within(daemon.when_logged(f"closed {sid} from "))
        after = yield settled(daemon.rss_kib)
        left_mib = (after - baseline) / 1024
        assert left_mib < 16, f"the daemon kept {left_mib:.0f} MiB after the flood"
        # Still relaying: a new session gets its VM's banner (and its VM is let go).
        _, again = yield browser_on(daemon, pg, sessions_table, port.getHost().port)
        port.vms[-1].transport.abortConnection()
        assert (yield within(again.closed))[0] == 4502
    finally:
        for vm in port.vms:
            if vm.transport is not None:
                vm.transport.abortConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_vm_that_takes_nothing_is_dropped_after_write_timeout(
    daemon_factory, pg, sessions_table
):
    """A websockify whose write buffer is full and that takes nothing of it for write_timeout
    (1 s here) is dropped: the line names the session and the VM, and the browser gets 4502."""
    port = yield pinging_websockify(200 * MIB)
    try:
        daemon = yield daemon_factory(WEBSOCKET, write_timeout=1)
        vm_port = port.getHost().port
        started = reactor.seconds()
        sid, client = yield browser_on(daemon, pg, sessions_table, vm_port)
        yield within(
            daemon.when_logged(rf"dropping the VM of {sid} at 127\.0\.0\.1:{vm_port}:"
                               r" took no byte in 1s"),
            20,
        )
        assert (yield within(client.closed)) == (4502, "VM connection lost")
        yield within(port.vms[0].lost)
        took = reactor.seconds() - started
        assert port.vms[0].sent < 200 * MIB
        assert took < 15, f"dropped only after {took:.1f}s"
    finally:
        for vm in port.vms:
            if vm.transport is not None:
                vm.transport.abortConnection()
        yield port.stopListening()
