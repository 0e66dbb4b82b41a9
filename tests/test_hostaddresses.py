"""The proxy host's own addresses ([upstream] allow_self): read, refreshed, failing closed."""

from __future__ import annotations

import ipaddress

import psutil
from twisted.internet.task import Clock

from twisted_novnc.relay.hostaddresses import (
    REFRESH_SECONDS,
    HostAddresses,
    read_interface_addresses,
)
from twisted_novnc.relay.targets import TargetPolicy

ip = ipaddress.ip_address


def test_reads_every_interface_address_of_this_host() -> None:
    """Every address psutil lists for any interface is in the set, zones stripped."""
    addresses = read_interface_addresses()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            text = entry.address.split("%", 1)[0]
            try:
                expected = ip(text)
            except ValueError:
                continue  # a link-layer (MAC) address
            assert expected in addresses
    assert ip("127.0.0.1") in addresses


def test_loopback_and_unspecified_are_always_self() -> None:
    """All of 127/8, ::1 and the unspecified addresses are the host, whatever the list says."""
    host = HostAddresses(Clock(), read=frozenset)
    for text in ("127.0.0.1", "127.3.2.1", "::1", "0.0.0.0", "::"):
        assert ip(text) in host
    assert ip("10.0.0.5") not in host


def test_list_is_read_again_after_the_refresh_interval() -> None:
    """A new interface address is refused within REFRESH_SECONDS; the list is not read per
    check in between."""
    clock = Clock()
    lists = [frozenset({ip("10.0.1.11")}), frozenset({ip("10.0.1.11"), ip("10.0.1.12")})]
    reads: list[int] = []

    def read() -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        reads.append(1)
        return lists[min(len(reads), len(lists)) - 1]

    host = HostAddresses(clock, read=read)
    assert ip("10.0.1.11") in host
    assert ip("10.0.1.12") not in host
    assert len(reads) == 1
    clock.advance(REFRESH_SECONDS)
    assert ip("10.0.1.12") in host
    assert len(reads) == 2


def test_unreadable_interfaces_fail_closed() -> None:
    """If the addresses were never read, every address counts as the host's (refused); a later
    failure keeps the last list."""
    clock = Clock()
    answers: list[object] = [OSError("no getifaddrs"), frozenset({ip("10.0.1.11")}), OSError()]

    def read() -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer  # type: ignore[return-value]

    host = HostAddresses(clock, read=read)
    assert ip("10.9.9.9") in host
    clock.advance(REFRESH_SECONDS)
    assert ip("10.9.9.9") not in host
    assert ip("10.0.1.11") in host
    clock.advance(REFRESH_SECONDS)
    assert ip("10.0.1.11") in host
    assert ip("10.9.9.9") not in host


def test_policy_refuses_host_addresses_inside_allowed_networks() -> None:
    """A vm_ip inside allowed_networks is still refused when it is the host's, in any spelling;
    with host=None (allow_self = on) it is allowed."""
    host = HostAddresses(Clock(), read=lambda: frozenset({ip("10.0.1.11"), ip("fd00::11")}))
    guarded = TargetPolicy.from_config("0.0.0.0/0 ::/0", None)
    guarded = TargetPolicy(guarded.networks, guarded.ports, host=host)
    spellings = (
        "10.0.1.11", "::ffff:10.0.1.11", "fd00::11", "127.0.0.1", "::1", "::ffff:127.0.0.2"
    )
    for text in spellings:
        assert not guarded.allows(text, 5900), text
    assert guarded.allows("10.0.1.12", 5900)
    open_policy = TargetPolicy(guarded.networks, guarded.ports, host=None)
    assert open_policy.allows("10.0.1.11", 5900)
    assert open_policy.allows("127.0.0.1", 5900)
