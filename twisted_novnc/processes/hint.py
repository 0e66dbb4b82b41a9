"""The start-up hint of ``dsn = embedded``: how to add a session and open it, in the words of
the effective config.

A hint copied from a fixed template (a VM at 10.0.0.5, loopback refused) fails when pasted, so
every part of it is read from the settings: the address a session may point at
(``allowed_networks``, ``allow_self``), the port (``target_port`` or ``port_column``), the
table and its columns, the URL the listener answers on, and what ``[auth]`` asks for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import attrs

from twisted_novnc.config import Settings
from twisted_novnc.database.schema import quote_ident, quote_literal
from twisted_novnc.operations.upgrade_command import endpoint_fields

#: The viewer page's path on the WebSocket listener.
VIEWER_PATH = "/vnc/{session_id}"
#: What the hint writes where the listener's port is not known before it listens (``tcp:0``).
UNKNOWN_PORT = "<port>"


@attrs.frozen
class SessionHint:
    """What a newcomer runs to get a session, and where to open it."""

    session_id: str
    vm_ip: str
    vm_port: int
    on_this_host: bool
    insert_sql: str
    viewer_url: str | None
    websocket_url: str | None

    def text(self, psql: Callable[[str], str], settings: Settings) -> str:
        """The log line: the psql command (``psql(sql)``), the URLs, and what to change."""
        where = "this host's" if self.on_this_host else "a"
        lines = [
            f"embedded database ready; add a session for {where} VNC server at "
            f"{_host_port(self.vm_ip, self.vm_port)} with:",
            "  " + psql(self.insert_sql),
        ]
        token = _token_note(settings, self.session_id)
        if self.viewer_url is not None:
            lines.append(f"then open {self.viewer_url}{token}")
            query = "?token=..." if token else ""
            lines.append(f"  (noVNC elsewhere: {self.websocket_url}{query})")
            if UNKNOWN_PORT in self.viewer_url:
                lines.append(f"  ({UNKNOWN_PORT}: the port of the 'listening on' line)")
        else:
            path = settings.novnc.path.replace("{session_id}", self.session_id)
            lines.append(f"then point noVNC at {path}{token} on the listener"
                         f" {settings.novnc.listen[0]!r}")
        db = settings.database
        port_how = (f"set {db.port_column} in the row" if db.port_column
                    else "start with --set novnc.target_port=N")
        lines.append(f"Another VNC port: {port_how}.")
        if not any(low <= self.vm_port <= high for low, high in settings.upstream.allowed_ports):
            lines.append(f"Port {self.vm_port} is outside [upstream] allowed_ports: the session"
                         " would be refused (4403) until it is allowed.")
        if not self.on_this_host:
            networks = " ".join(str(n) for n in settings.upstream.allowed_networks)
            lines.append(
                f"The session's {db.ip_column} must be in [upstream] allowed_networks"
                f" ({networks}); a VNC server on this host is on loopback, outside them: run"
                " make demo (in a checkout), or start with --set"
                " upstream.allowed_networks=127.0.0.1/32 --set upstream.allow_self=on"
                f" (make run ARGS=...) and give the session {db.ip_column} 127.0.0.1."
            )
        return "\n".join(lines)


def example_address(settings: Settings) -> tuple[str, bool]:
    """A ``vm_ip`` the policy admits, and whether it is this host's loopback.

    Loopback when ``allowed_networks`` holds it (the config check demands ``allow_self`` then),
    else an address inside the first allowed IPv4 network (10.0.0.5 with the defaults).
    """
    networks = settings.upstream.allowed_networks
    loopback = ipaddress.ip_address("127.0.0.1")
    if settings.upstream.allow_self and any(loopback in n for n in networks):
        return str(loopback), True
    ordered = sorted(networks, key=lambda n: n.version)
    if not ordered:
        return "10.0.0.5", False
    network = ordered[0]
    address = network.network_address + min(5, network.num_addresses - 1)
    return str(address), address.is_loopback


def listener_base(settings: Settings) -> tuple[str, str] | None:
    """``("http://127.0.0.1:6080", "ws://127.0.0.1:6080")`` for the first TCP or TLS listener
    a browser on this host can open directly; None when there is none (``unix:``,
    ``haproxy:`` or ``systemd:`` only).  A wildcard interface is reached on loopback."""
    for description in settings.novnc.listen:
        positional, keywords = endpoint_fields(description)
        kind = positional[0].lower() if positional else ""
        if kind not in ("tcp", "tcp6", "ssl") or not (len(positional) > 1 or "port" in keywords):
            continue
        port = keywords["port"] if "port" in keywords else positional[1]
        if port == "0":
            port = UNKNOWN_PORT
        interface = keywords.get("interface", "")
        if interface in ("", "0.0.0.0"):
            interface = "::1" if kind == "tcp6" else "127.0.0.1"
        elif interface == "::":
            interface = "::1"
        host = f"[{interface}]" if ":" in interface else interface
        secure = "s" if kind == "ssl" else ""
        return f"http{secure}://{host}:{port}", f"ws{secure}://{host}:{port}"
    return None


def session_hint(settings: Settings, session_id: str) -> SessionHint:
    """The hint for a new session ``session_id`` under ``settings``."""
    db = settings.database
    vm_ip, on_this_host = example_address(settings)
    vm_port = settings.novnc.target_port
    allowed = settings.upstream.allowed_ports
    if db.port_column and not any(low <= vm_port <= high for low, high in allowed):
        vm_port = allowed[0][0]  # the row names the port: name one the policy admits
    columns = [db.id_column, db.ip_column]
    values = [quote_literal(session_id), quote_literal(vm_ip)]
    if db.port_column:
        columns.append(db.port_column)
        values.append(str(vm_port))
    insert = (f"INSERT INTO {_name(db.table)} ({', '.join(map(_name, columns))})"
              f" VALUES ({', '.join(values)})")
    base = listener_base(settings)
    viewer = websocket = None
    if base is not None:
        viewer = base[0] + VIEWER_PATH.format(session_id=session_id)
        websocket = base[1] + settings.novnc.path.replace("{session_id}", session_id)
    return SessionHint(session_id, vm_ip, vm_port, on_this_host, insert, viewer, websocket)


def _name(name: str) -> str:
    """A configured SQL name as psql must spell it: quoted only when case makes it differ."""
    return name if name == name.lower() else quote_ident(name)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _token_note(settings: Settings, session_id: str) -> str:
    """What ``[auth]`` adds to the URL; tokens themselves are never logged."""
    auth = settings.auth
    if auth.mode == "hmac":
        return (f"?token=<python -m twisted_novnc mint-token --secret-file {auth.secret_file}"
                f" --session {session_id} --ttl 300>")
    if auth.mode == "column":
        return (f"?token=<a token whose SHA-256 hex digest the row holds in"
                f" {auth.token_column}>")
    return ""
