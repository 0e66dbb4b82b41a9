"""Moves bytes between the browser and the VM, with back-pressure both ways.

The relay knows two peers through a small interface, not their transports: each peer can send
bytes, be closed with a reason, and offers the producer/consumer pair that Twisted uses for flow
control.  Wiring each side's producer to the other side's consumer is what keeps memory bounded:
a browser that stops reading fills its socket, its transport pauses the VM's transport, and the
kernel pushes back on the VM.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.interfaces import IConsumer, IPushProducer

from twisted_novnc.errors import Refusal
from twisted_novnc.vnc.browser_greeting import BrowserGreeting, Greeted
from twisted_novnc.vnc.vm_login import Failed, Send

if TYPE_CHECKING:
    from twisted_novnc.recording.recorder import Recording

#: Bytes a VM may send during the browser's RFB opening (it should send none).
VM_HELD_LIMIT = 64 * 1024


class Peer(TypingProtocol):
    """One end of a relay."""

    @property
    def producer(self) -> IPushProducer:
        """What to pause when the other end cannot take more."""

    @property
    def consumer(self) -> IConsumer:
        """Where the other end's producer registers."""

    def send(self, data: bytes) -> None:
        """Deliver bytes that came from the other end."""

    def close(self, code: int, reason: str) -> None:
        """End this side; ``code`` is a WebSocket close code where the side speaks WebSocket."""


class TransportPeer:
    """A peer whose own transport is both what to pause and where the other end registers."""

    transport: Any

    @property
    def producer(self) -> IPushProducer:
        return self.transport

    @property
    def consumer(self) -> IConsumer:
        return self.transport


class RelayEnd:
    """Who ended a relay, for the log and the close code."""

    BROWSER = "browser"
    VM = "vm"
    #: Handed to a process of the new generation (processes/upgrade.py): neither side closed.
    MOVED = "moved"


@attrs.define(eq=False)
class Relay:
    """The bytes between one browser and one VM."""

    session_id: str
    browser: Peer
    vm: Peer
    up_bytes: int = 0
    down_bytes: int = 0
    ended_by: str | None = None
    #: Counts relayed messages; the idle check compares it between two looks.
    activity: int = 0
    #: The proxy's own RFB opening with the browser, when it logged in to the VM itself
    #: (twisted_novnc.vnc): until it is done nothing passes either way.
    greeting: BrowserGreeting | None = None
    #: Where what the browser saw (and sent) is recorded (``[record]``), or None: then the
    #: relay's path costs one ``is None`` per chunk.
    recording: Recording | None = None
    _vm_held: list[bytes] = attrs.field(factory=list)

    def start(self) -> None:
        """Wire flow control both ways; the VM's first bytes were held until now."""
        self.browser.consumer.registerProducer(self.vm.producer, True)
        self.vm.consumer.registerProducer(self.browser.producer, True)
        if self.greeting is not None:
            self._to_browser(self.greeting.start())

    def from_browser(self, data: bytes) -> None:
        if self.ended_by is None:
            if self.recording is not None:
                self.recording.up(data)
            if self.greeting is not None:
                self._greet(bytes(data))
                return
            self.up_bytes += len(data)
            self.activity += 1
            self.vm.send(data)

    def _to_vm(self, data: bytes) -> None:
        """The browser's bytes after its greeting (already recorded)."""
        self.up_bytes += len(data)
        self.activity += 1
        self.vm.send(data)

    def from_vm(self, data: bytes) -> None:
        if self.ended_by is None:
            if self.greeting is not None:
                self._hold_vm(bytes(data))
                return
            self.down_bytes += len(data)
            self.activity += 1
            if self.recording is not None:
                self.recording.down(data)
            self.browser.send(data)

    def _to_browser(self, data: bytes) -> None:
        """The proxy's own bytes to the browser (its RFB opening): recorded, not counted."""
        if self.recording is not None:
            self.recording.down(data)
        self.browser.send(data)

    def _greet(self, data: bytes) -> None:
        assert self.greeting is not None
        for action in self.greeting.receive(data):
            if isinstance(action, Send):
                self._to_browser(action.data)
            elif isinstance(action, Greeted):
                # The browser's ClientInit (and anything after it) is the VM's from here on.
                self.greeting = None
                held, self._vm_held = self._vm_held, []
                if action.leftover:
                    self._to_vm(action.leftover)
                for chunk in held:
                    self.from_vm(chunk)
            elif isinstance(action, Failed):
                self.end(RelayEnd.BROWSER, action.refusal.close_code, action.refusal.reason)
            if self.ended_by is not None:
                return

    def _hold_vm(self, data: bytes) -> None:
        """The VM speaks before the browser's ClientInit, which RFB does not allow: hold a
        little, end a VM that floods."""
        self._vm_held.append(data)
        if sum(map(len, self._vm_held)) > VM_HELD_LIMIT:
            refusal = Refusal.VM_NOT_RFB
            self.end(RelayEnd.VM, refusal.close_code, refusal.reason)

    def browser_gone(self) -> None:
        """The browser closed or vanished: let the VM's socket go too."""
        if self.ended_by is not None:
            return
        self._end(RelayEnd.BROWSER)
        self.vm.close(1000, "browser closed")

    def vm_gone(self, clean: bool) -> None:
        """The VM closed (FIN: 1000) or died (reset or timeout: 4502)."""
        if self.ended_by is not None:
            return
        self._end(RelayEnd.VM)
        if clean:
            self.browser.close(1000, "VM closed the connection")
        else:
            self.browser.close(4502, "VM connection lost")

    def end(self, by: str, code: int, reason: str) -> None:
        """End the relay from outside (revoked, shutting down): close both sides."""
        if self.ended_by is not None:
            return
        self._end(by)
        self.browser.close(code, reason)
        self.vm.close(code, reason)

    def moved(self) -> None:
        """The relay goes on in another process: stop relaying here, close nothing."""
        if self.ended_by is None:
            self._end(RelayEnd.MOVED)

    def _end(self, by: str) -> None:
        self.ended_by = by
        for peer in (self.browser, self.vm):
            # An already disconnected transport may refuse; there is nothing left to undo.
            with contextlib.suppress(Exception):
                peer.consumer.unregisterProducer()
