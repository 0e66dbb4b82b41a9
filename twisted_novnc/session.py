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
    #: The VM's VNC password and user name (``[vnc] password_column``, ``username_column``).
    credentials: VNCCredentials | None = None
    #: ``[record] record_column``: whether to record this session's relays; None when the
    #: column is not configured (or NULL).
    record: bool | None = None


@attrs.frozen
class VNCCredentials:
    """What the proxy answers the VM's VNC server with (:mod:`twisted_novnc.vnc`).

    Secrets: never in a repr, so never in a log line, an error or a metric.
    """

    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = attrs.field(default=None, repr=False)

    def or_else(self, fallback: VNCCredentials | None) -> VNCCredentials:
        """These, each missing part taken from ``fallback`` (``[vnc] password_file``)."""
        if fallback is None:
            return self
        return VNCCredentials(
            self.password if self.password is not None else fallback.password,
            self.username if self.username is not None else fallback.username,
        )


@attrs.frozen
class Target:
    """A ready session's upstream: an IP literal (never a name) and a port."""

    session_id: str
    host: str
    port: int
    expires_at: float | None = None
    token_digest: str | None = None
    credentials: VNCCredentials | None = None
    #: The row's ``[record] record_column``, None when not configured.
    record: bool | None = None
    #: When the read that found the row was sent, in the readiness gate's count of events;
    #: None when the target did not come from a read (a relay moved from another process).
    read_at: int | None = attrs.field(default=None, eq=False)


@functools.lru_cache(maxsize=4096)
def parse_vm_ip(text: str) -> str | None:
    """An IP literal from a text or inet column (``10.0.0.5`` or ``10.0.0.5/32``); never a name.

    An IPv6 address with a zone (``fe80::1%eth0``) is refused too: the allowlist cannot judge
    which interface it names, and the connect would fail on it.

    Cached: ``ipaddress`` takes microseconds a parse, and a burst of ready sessions is
    a thousand parses of a few hosts' addresses.
    """
    text = text.strip()
    try:
        if "/" in text:
            interface = ipaddress.ip_interface(text)
            # (The interface's .ip drops the zone: ask the interface.)
            zone, address = getattr(interface, "scope_id", None), interface.ip
        else:
            address = ipaddress.ip_address(text)
            zone = getattr(address, "scope_id", None)
    except ValueError:
        return None
    return None if zone else str(address)
