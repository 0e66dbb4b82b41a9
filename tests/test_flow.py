"""The browser's flow control on its own: reading paused while any reason holds, the VM paused
while the browser's output is full, and the write timeout, over a StringTransport on a Clock."""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twisted_novnc.relay.flow import PEER_FULL, ConnectionFlow

TIMEOUT = 60


@attrs.define
class Producer:
    """A push producer that records what it was told."""

    calls: list[str] = attrs.field(factory=list)

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


@attrs.define
class Wired:
    """A flow on a StringTransport; ``pending`` is what the transport says it still holds."""

    clock: Clock = attrs.field(factory=Clock)
    # The owner's part: what write_stalled was told.
    transport: StringTransport = attrs.field(factory=StringTransport)
    stalled: list[int | None] = attrs.field(factory=list)
    pending: int | None = 1000
    timeout: int = TIMEOUT
    flow: ConnectionFlow = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.flow = ConnectionFlow(
            self.transport, self.clock, self.timeout, self, pending=lambda transport: self.pending
        )
        self.flow.start()

    def write_stalled(self, pending: int | None) -> None:
        self.stalled.append(pending)

    @property
    def reading(self) -> bool:
        return self.transport.producerState == "producing"


def test_the_flow_is_the_transports_producer_from_the_start():
    """start() registers the flow as the browser transport's streaming producer."""
    w = Wired()
    assert w.transport.producer is w.flow and w.transport.streaming


def test_reading_resumes_only_when_both_reasons_are_gone():
    """The VM full and the browser's output full each pause reading; it resumes only when
    neither holds any more, whatever the order."""
    w = Wired()
    w.flow.pause_reading(PEER_FULL)
    assert not w.reading
    w.flow.pauseProducing()
    w.flow.resume_reading(PEER_FULL)
    assert not w.reading, "resumed while the browser's output is still full"
    w.flow.resumeProducing()
    assert w.reading
    w.flow.pauseProducing()
    w.flow.pause_reading(PEER_FULL)
    w.flow.resumeProducing()
    assert not w.reading, "resumed while the VM is still full"
    w.flow.resume_reading(PEER_FULL)
    assert w.reading


def test_a_full_output_pauses_the_vm_and_an_empty_one_resumes_it():
    """The relay's VM producer is paused while the browser's output is full, at once when it
    is attached during a pause, and resumed when the output drains."""
    w = Wired()
    vm = Producer()
    w.flow.registerProducer(vm, True)
    w.flow.pauseProducing()
    w.flow.resumeProducing()
    assert vm.calls == ["pause", "resume"]
    w.flow.unregisterProducer()
    w.flow.pauseProducing()
    late = Producer()
    w.flow.registerProducer(late, True)
    assert late.calls == ["pause"] and vm.calls == ["pause", "resume"]


def test_no_progress_for_write_timeout_is_a_stall():
    """A full output whose pending bytes do not go down for write_timeout is reported once."""
    w = Wired()
    w.flow.pauseProducing()
    w.clock.advance(TIMEOUT - 1)
    assert w.stalled == []
    w.clock.advance(1)
    assert w.stalled == [1000]
    w.clock.advance(10 * TIMEOUT)
    assert w.stalled == [1000]


def test_progress_keeps_a_slow_browser():
    """A browser that takes some bytes every write_timeout is kept; once it stops, it is not."""
    w = Wired()
    w.flow.pauseProducing()
    for pending in (900, 500, 10):
        w.pending = pending
        w.clock.advance(TIMEOUT)
        assert w.stalled == []
    w.clock.advance(TIMEOUT)
    assert w.stalled == [10]


def test_a_drained_output_cancels_the_timer():
    """The buffer emptied (the transport resumes its producer): no timer is left."""
    w = Wired()
    w.flow.pauseProducing()
    w.flow.resumeProducing()
    assert w.clock.getDelayedCalls() == []
    w.clock.advance(2 * TIMEOUT)
    assert w.stalled == []


def test_unknown_progress_is_no_progress():
    """A transport that cannot say what it holds (TLS) is stalled if still full at the end."""
    w = Wired(pending=None)
    w.flow.pauseProducing()
    w.clock.advance(TIMEOUT)
    assert w.stalled == [None]


def test_write_timeout_zero_never_arms():
    """write_timeout = 0: no timer, ever."""
    w = Wired(timeout=0)
    w.flow.pauseProducing()
    w.flow.closing()
    assert w.clock.getDelayedCalls() == []


def test_closing_detaches_and_watches_the_flush():
    """Closing unregisters the flow (a transport with a producer would not close) and the last
    bytes must still be taken within write_timeout; twice is once."""
    w = Wired()
    w.flow.closing()
    w.flow.closing()
    assert w.transport.producer is None
    assert len(w.clock.getDelayedCalls()) == 1
    w.clock.advance(TIMEOUT)
    assert w.stalled == [1000]


def test_a_flushed_close_is_not_a_stall():
    """Closing with nothing left to write arms no timer; with bytes left that the browser
    then takes, the timer finds nothing pending."""
    w = Wired(pending=0)
    w.flow.closing()
    assert w.clock.getDelayedCalls() == []
    w = Wired(pending=10)
    w.flow.closing()
    w.pending = 0
    w.clock.advance(TIMEOUT)
    assert w.stalled == []


def test_connection_lost_cancels_everything():
    """Once the connection is lost no timer is left and the VM's producer is let go."""
    w = Wired()
    vm = Producer()
    w.flow.registerProducer(vm, True)
    w.flow.pauseProducing()
    w.flow.connection_lost()
    assert w.clock.getDelayedCalls() == []
    w.flow.resumeProducing()
    assert vm.calls == ["pause"]


def test_a_lost_browser_stops_the_vm_and_a_lost_vm_the_browser():
    """stopProducing passes on as the transports' own did: the browser's socket lost stops the
    VM's producer; the VM's lost stops the browser's transport (after detaching)."""
    w = Wired()
    vm = Producer()
    w.flow.registerProducer(vm, True)
    w.flow.stopProducing()
    assert vm.calls == ["stop"]
    w2 = Wired()
    w2.flow.peer_stopped()
    assert w2.transport.producer is None and w2.transport.producerState == "stopped"
