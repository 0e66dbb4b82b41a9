"""The relay between two peers, over StringTransports."""

from __future__ import annotations

from twisted_novnc.relay.relay import VM_HELD_LIMIT, Relay
from twisted_novnc.testing import MemoryPeer
from twisted_novnc.vnc.browser_greeting import BrowserGreeting


def make_relay():
    browser, vm = MemoryPeer(), MemoryPeer()
    relay = Relay("s1", browser=browser, vm=vm)
    relay.start()
    return relay, browser, vm


def test_bytes_flow_both_ways_and_are_counted():
    """Bytes from each side reach the other, and each direction is counted."""
    relay, browser, vm = make_relay()
    relay.from_vm(b"RFB 003.008\n")
    relay.from_browser(b"RFB 003.008\n\x01")
    assert browser.transport.value() == b"RFB 003.008\n"
    assert vm.transport.value() == b"RFB 003.008\n\x01"
    assert (relay.up_bytes, relay.down_bytes) == (13, 12)


def test_each_side_produces_for_the_other():
    """Flow control is wired crosswise: a full browser pauses the VM, and the reverse."""
    relay, browser, vm = make_relay()
    assert browser.transport.producer is vm.transport
    assert vm.transport.producer is browser.transport
    assert browser.transport.streaming and vm.transport.streaming


def test_vm_eof_closes_browser_with_1000():
    """A VM that closes normally ends the browser side with 1000."""
    relay, browser, vm = make_relay()
    relay.vm_gone(clean=True)
    assert browser.closed == [(1000, "VM closed the connection")]
    assert browser.transport.producer is None and vm.transport.producer is None


def test_vm_reset_closes_browser_with_4502():
    """A VM connection that dies (reset, timeout) ends the browser side with 4502."""
    relay, browser, vm = make_relay()
    relay.vm_gone(clean=False)
    assert browser.closed == [(4502, "VM connection lost")]


def test_browser_gone_closes_vm_once():
    """The browser leaving closes the VM side once, and later events are ignored."""
    relay, browser, vm = make_relay()
    relay.browser_gone()
    relay.vm_gone(clean=True)
    relay.from_vm(b"late")
    assert vm.closed == [(1000, "browser closed")]
    assert browser.closed == []
    assert browser.transport.value() == b""
    assert relay.ended_by == "browser"


# -- the browser's RFB opening, when the proxy logged in to the VM itself (twisted_novnc.vnc) --


def greeting_relay():
    browser, vm = MemoryPeer(), MemoryPeer()
    relay = Relay("s1", browser=browser, vm=vm, greeting=BrowserGreeting())
    relay.start()
    return relay, browser, vm


def test_greeting_offers_security_none_and_passes_client_init_on():
    """The browser is offered RFB 3.8 with security None; its ClientInit and all after it
    go to the VM, and the VM's bytes from then on to the browser."""
    relay, browser, vm = greeting_relay()
    assert browser.transport.value() == b"RFB 003.008\n"
    relay.from_browser(bytearray(b"RFB 003.008\n"))
    assert browser.transport.value() == b"RFB 003.008\n\x01\x01"
    relay.from_browser(b"\x01")
    assert browser.transport.value() == b"RFB 003.008\n\x01\x01\x00\x00\x00\x00"
    assert vm.transport.value() == b""
    relay.from_browser(b"\x01")  # ClientInit: shared
    assert vm.transport.value() == b"\x01"
    relay.from_vm(b"ServerInit")
    assert browser.transport.value().endswith(b"ServerInit")
    assert relay.greeting is None


def test_vm_bytes_during_the_greeting_wait_for_its_end():
    """What the VM sends before the browser's ClientInit reaches the browser after the
    opening, in order, never in the middle of it."""
    relay, browser, vm = greeting_relay()
    relay.from_vm(b"early")
    assert browser.transport.value() == b"RFB 003.008\n"
    relay.from_browser(b"RFB 003.003\n\x01")  # 3.3: no security choice, ClientInit at once
    assert vm.transport.value() == b"\x01"
    assert browser.transport.value() == b"RFB 003.008\n\x00\x00\x00\x01early"


def test_a_browser_that_breaks_the_opening_gets_4400():
    """Not RFB from the browser: both sides end, the browser with 4400 bad RFB handshake."""
    relay, browser, vm = greeting_relay()
    relay.from_browser(b"GET / HTTP/1.1\r\n")
    assert browser.closed == [(4400, "bad RFB handshake")]
    assert vm.closed and vm.transport.value() == b""


def test_a_vm_that_floods_during_the_greeting_is_ended():
    """A VM that sends more than VM_HELD_LIMIT before the ClientInit is not speaking RFB."""
    relay, browser, vm = greeting_relay()
    for _ in range(VM_HELD_LIMIT // 4096 + 1):
        relay.from_vm(b"x" * 4096)
    assert browser.closed == [(4522, "VM does not speak RFB")]
