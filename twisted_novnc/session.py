"""What the proxy knows about a session: the row it read, and where to connect."""

from __future__ import annotations

import functools
import ipaddress

import attrs


@attrs.frozen
class SessionRow:
    """One committed row of the sessions table, as the proxy reads it."""

    session_id: str
    vm_ip: str | None
    port: int | None = None
    status: str | None = None
    #: When the session expires, in seconds since the epoch (``expires_column``), if known.
    expires_at: float | None = None
    #: The SHA-256 hex digest of the session's token (``[auth] token_column``), if any.
    token_digest: str | None = None


@attrs.frozen
class Target:
    """A ready session's upstream: an IP literal (never a name) and a port."""

    session_id: str
    host: str
    port: int
    expires_at: float | None = None
    token_digest: str | None = None


@functools.lru_cache(maxsize=4096)
def parse_vm_ip(text: str) -> str | None:
    """An IP literal from a text or inet column (``10.0.0.5`` or ``10.0.0.5/32``); never a name.

    Cached: ``ipaddress`` takes microseconds a parse, and a burst of ready sessions is
    a thousand parses of a few hosts' addresses.
    """
    try:
        if "/" in text:
            return str(ipaddress.ip_interface(text.strip()).ip)
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None
