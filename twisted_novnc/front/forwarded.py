"""The real client address behind trusted proxies (``X-Forwarded-For``, ``Forwarded``).

Only a connection from a trusted proxy may name another address, and the chain is read from
the right: the right-most address that is not itself a trusted proxy is the client, so a
client cannot spoof its address by sending the header itself.  (The PROXY protocol needs no
code here: Twisted's ``haproxy:`` endpoint prefix makes ``getPeer()`` return the real address.)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_FORWARDED_FOR = re.compile(r'(?i)(?:^|[;,\s])for=("?)([^;,"]+)\1')


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a header element: ``1.2.3.4``, ``1.2.3.4:5``, ``[::1]:5``, ``::1``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
             networks: tuple[Network, ...]) -> bool:
    return address is not None and any(address in n for n in networks)


def client_address(
    peer: str, headers: Mapping[str, str], trusted: tuple[Network, ...]
) -> str:
    """The client's address: the peer's, or, from a trusted proxy, the one its headers name."""
    if not trusted or not _trusted(_address(peer), trusted):
        return peer
    chain: list[str] = []
    forwarded = headers.get("forwarded")
    if forwarded:
        chain = [m.group(2) for m in _FORWARDED_FOR.finditer(forwarded)]
    else:
        xff = headers.get("x-forwarded-for")
        if xff:
            chain = [part for part in xff.split(",") if part.strip()]
    for element in reversed(chain):
        address = _address(element)
        if address is None:
            return peer  # a malformed chain proves nothing
        if not _trusted(address, trusted):
            return str(address)
    return str(_address(chain[0])) if chain else peer
