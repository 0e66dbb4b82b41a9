"""Where the proxy may connect: ``[upstream] allowed_networks`` and ``allowed_ports``.

The session row says where a VM is, and whoever can write that row (or a bug in the backend)
could otherwise point the proxy at the database, a metadata service (169.254.169.254) or the
proxy host itself.  So the address must be an IP literal (a name is never resolved: DNS would
be a second, unchecked source of targets) inside one of the allowed networks, and the port one
of the allowed ports.

By default the networks are the private ranges VMs live in (10/8, 172.16/12, 192.168/16,
fc00::/7): not loopback, link-local or public addresses.  The ports default to all of them,
because the networks are the boundary that matters, the VNC port varies between deployments
(5900 + display, or a per-row ``port_column``) and a narrower default would refuse working
setups; list the real ones (e.g. ``5900-5999``) to keep the proxy off the VMs' other services.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Container

import attrs

from twisted_novnc.errors import Refusal, Refused

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]

#: The private ranges: RFC 1918 and IPv6 unique local addresses.
DEFAULT_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
#: Every TCP port (see the module's docstring for why this is the default).
ALL_PORTS: tuple[PortRange, ...] = ((1, 65535),)

#: ``ipaddress.ip_address``, cached: every connection asks about its VM's address, and a
#: parse takes microseconds (the objects are immutable; a bad text is never cached).
_ip_address = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_PORT = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


def parse_networks(text: str) -> tuple[Network, ...]:
    """Whitespace-separated CIDR networks (a bare address is a /32 or /128)."""
    networks: list[Network] = []
    for word in text.split():
        try:
            network = ipaddress.ip_network(word)
        except ValueError as e:
            hint = ""
            if "host bits set" in str(e):
                hint = f"; did you mean {ipaddress.ip_network(word, strict=False)}?"
            raise ValueError(f"bad network {word!r}: {e}{hint}") from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            raise ValueError(
                f"bad network {word!r}: IPv4-mapped addresses are judged as IPv4;"
                " write the IPv4 network instead"
            )
        if network in networks:
            raise ValueError(f"network {word!r} is listed twice")
        networks.append(network)
    if not networks:
        raise ValueError("needs at least one network; 0.0.0.0/0 ::/0 allows every address")
    return tuple(networks)


def format_networks(networks: tuple[Network, ...]) -> str:
    """Networks as an ini value."""
    return " ".join(str(n) for n in networks)


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """Whitespace-separated ports and inclusive ranges, e.g. ``5900-5999 6080``."""
    ranges: list[PortRange] = []
    for word in text.split():
        m = _PORT.fullmatch(word)
        if m is None:
            raise ValueError(
                f"bad port {word!r}: expected a port like 6080 or a range like 5900-5999"
            )
        low = int(m[1])
        high = low if m[2] is None else int(m[2])
        if not (1 <= low <= 65535 and 1 <= high <= 65535):
            raise ValueError(f"bad port {word!r}: ports are from 1 to 65535")
        if low > high:
            raise ValueError(f"bad port range {word!r}: the first port is above the last")
        ranges.append((low, high))
    if not ranges:
        raise ValueError("needs at least one port or range; 1-65535 allows every port")
    return tuple(ranges)


def format_ports(ports: tuple[PortRange, ...]) -> str:
    """Port ranges as an ini value."""
    return " ".join(str(low) if low == high else f"{low}-{high}" for low, high in ports)


@attrs.frozen
class TargetPolicy:
    """The networks and ports the proxy may connect to; the default refuses loopback.

    ``host`` holds the proxy host's own addresses (:class:`HostAddresses`), refused whatever the
    networks say; None (``allow_self = on``) lets a row reach the host itself.
    """

    networks: tuple[Network, ...] = DEFAULT_NETWORKS
    ports: tuple[PortRange, ...] = ALL_PORTS
    host: Container[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None

    @classmethod
    def from_config(
        cls, networks_text: str | None = None, ports_text: str | None = None
    ) -> TargetPolicy:
        """A policy from the two ini values; None takes the default, bad text a ValueError."""
        return cls(
            DEFAULT_NETWORKS if networks_text is None else parse_networks(networks_text),
            ALL_PORTS if ports_text is None else parse_ports(ports_text),
        )

    def allows(self, ip: str, port: int) -> bool:
        """Whether the proxy may connect to ``ip`` (an IP literal, never a name) at ``port``.

        An IPv4-mapped IPv6 address is judged as its IPv4 address, since that is where the
        connection goes; the unspecified address (``0.0.0.0``, ``::``) reaches the proxy host
        itself, so it is refused whatever the networks say, and so is every address in ``host``.
        """
        if isinstance(port, bool) or not isinstance(port, int):
            return False
        if not any(low <= port <= high for low, high in self.ports):
            return False
        if not isinstance(ip, str):
            return False
        try:
            address = _ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_unspecified:
            return False
        if not any(address in network for network in self.networks):
            return False
        return self.host is None or address not in self.host

    def check(self, ip: str, port: int) -> None:
        """Return if the proxy may connect to ``ip:port``; raise ``Refused(FORBIDDEN)`` if not."""
        if not self.allows(ip, port):
            raise Refused(
                Refusal.FORBIDDEN,
                f"target {ip!r} port {port!r} is outside allowed_networks / allowed_ports",
            )
