"""The relay between two peers, over StringTransports."""

from __future__ import annotations

from twisted_novnc.relay.relay import Relay
from twisted_novnc.testing import MemoryPeer


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
