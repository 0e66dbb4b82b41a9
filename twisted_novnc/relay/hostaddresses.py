"""The proxy host's own addresses, which a session row may not point at (``[upstream] allow_self``).

``allowed_networks`` is written for the VMs' networks, and the proxy host usually has an address
in one of them (10.0.1.11 in 10/8): a row naming that address would reach the host's own
services (the admin listener, a local database, an agent), which no VM is.  So every address the
host has, on every interface, and the whole of loopback, is refused unless ``allow_self = on``.

Addresses come from ``psutil.net_if_addrs()`` (getifaddrs), read again at most every
:data:`REFRESH_SECONDS`, because interfaces come and go (DHCP, a new bridge) while the daemon runs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import attrs
import psutil
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: How stale the list may be: a new interface address is refused at most this many seconds late.
REFRESH_SECONDS = 5.0

_log = Logger()


def _parse(text: str) -> Address | None:
    """An interface address as psutil prints it (``fe80::1%eth0`` has a zone); None if not IP."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def read_interface_addresses() -> frozenset[Address]:
    """Every IPv4 and IPv6 address of every interface of this host, now."""
    addresses: set[Address] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            address = _parse(entry.address)
            if address is not None:
                addresses.add(address)
    return frozenset(addresses)


@attrs.define
class HostAddresses:
    """Answers "is this address the proxy host itself?", from a list read now and then."""

    clock: IReactorTime
    read: Callable[[], frozenset[Address]] = read_interface_addresses
    _addresses: frozenset[Address] | None = attrs.field(init=False, default=None)
    _read_at: float | None = attrs.field(init=False, default=None)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        if address.is_loopback or address.is_unspecified:
            return True
        now = self.clock.seconds()
        if self._read_at is None or now - self._read_at >= REFRESH_SECONDS:
            self._refresh(now)
        # Never read: every address might be the host's, so each is refused (fail closed).
        return self._addresses is None or address in self._addresses

    def _refresh(self, now: float) -> None:
        self._read_at = now
        try:
            self._addresses = self.read()
        except OSError:
            _log.failure(
                "Could not read this host's interface addresses; keeping the last list"
                " (refusing every address until one is read)", event="host_addresses_unreadable"
            )
