"""The real client address behind trusted proxies: one forwarding header, or the PROXY protocol.

Only a connection from a trusted proxy may name another address, and only in the ONE header
the operator says that proxy writes (``[novnc] forwarded_header``): the other header is
ignored, since a proxy that appends to one passes the client's copy of the other through.
The chain is read from the right: the right-most elements are the ones the trusted hops
appended; walking left past hops that are themselves trusted, the first untrusted address is
the client.  Anything left of it may be the client's own invention and is never read.

The PROXY protocol (``haproxy:`` listen endpoints) is Twisted's; which peers may send its
header is decided at accept (:func:`proxied_endpoint` names the endpoints concerned).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The headers ``[novnc] forwarded_header`` may name (as Autobahn lower-cases them).
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def _address(text: str) -> Address | None:
    """An address from a header element: ``1.2.3.4``, ``1.2.3.4:5``, ``[::1]:5``, ``::1``."""
    text = text.strip()
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        text = inside
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None  # a zone names an interface of the sender, not a client
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _forwarded_for(element: str) -> str:
    """The ``for=`` value of one RFC 7239 element (``for=1.2.3.4;proto=https``), or ""."""
    for pair in element.split(";"):
        name, equals, value = pair.strip().partition("=")
        if equals and name.strip().lower() == "for":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return ""


def _chain(value: str, header: str) -> list[str]:
    """The header's elements, left to right; empty list elements are skipped (RFC 9110 5.6.1).

    A plain split on commas: a trusted hop appends ``, <its element>``, so the right-most
    pieces are its own whatever the client put (unclosed quotes included) to their left.
    """
    parts = [part for part in value.split(",") if part.strip()]
    if header == "forwarded":
        return [_forwarded_for(part) for part in parts]
    return parts


def _trusted(address: Address | None, networks: tuple[Network, ...]) -> bool:
    return address is not None and any(address in n for n in networks)


def client_address(
    peer: str,
    headers: Mapping[str, str],
    trusted: tuple[Network, ...],
    header: str = "x-forwarded-for",
) -> str:
    """The client's address: the peer's, or, from a trusted proxy, the one ``header`` names.

    ``headers`` are Autobahn's: lower-case names, the lines of a repeated header joined in
    order with ``", "`` (so a client's own line comes before the one the proxy added).
    A malformed element where the reading stops proves nothing: the peer is the client then.
    """
    if not trusted or not _trusted(_address(peer), trusted):
        return peer
    value = headers.get(header)
    if not value:
        return peer
    chain = _chain(value, header)
    last: Address | None = None
    for element in reversed(chain):
        last = _address(element)
        if last is None:
            return peer
        if not _trusted(last, trusted):
            return str(last)
    # Every hop is a trusted proxy: the left-most is the nearest thing to a client.
    return str(last) if last is not None else peer


def proxied_endpoint(description: str) -> str | None:
    """The endpoint under a ``haproxy:`` listen string (``tcp:6080`` of ``haproxy:tcp:6080``),
    or None when the string does not read PROXY headers."""
    prefix, colon, rest = description.partition(":")
    if colon and prefix.lower() == "haproxy":
        return rest
    return None


def peer_allowed(host: str | None, networks: tuple[Network, ...]) -> bool:
    """Whether a peer (its ``host``; None for a unix socket) may send a PROXY header.

    A unix socket's peers are local processes, kept out by the socket file's mode.
    """
    if host is None:
        return True
    return _trusted(_address(host), networks)
