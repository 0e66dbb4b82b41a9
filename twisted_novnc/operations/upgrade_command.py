"""``python -m twisted_novnc upgrade``: upgrade a running daemon and wait for the outcome.

It posts to the daemon's admin listener (``POST /upgrade``), found in the config's ``[admin]
listen`` (a ``tcp:``, ``tcp6:`` or ``unix:`` endpoint) or given with ``--url``, and waits for
the answer: exit 0 once the upgrade is complete (every movable relay moved), 1 with the reason
when it was refused or failed, 2 when the daemon cannot be asked.  A plain ``SIGUSR2`` to the
daemon's main process does the same without waiting (the log says how it went).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

#: Seconds to wait for the answer: starting a generation and moving every relay.
DEFAULT_TIMEOUT = 300.0


class NoAdminEndpoint(Exception):
    """The config names no admin listener this command can reach."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket (``unix:/path`` admin listeners)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def endpoint_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """An endpoint string's positional and keyword fields (``\\:`` escapes a colon)."""
    parts: list[str] = []
    current = ""
    escaped = False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    positional = [p for p in parts if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts if "=" in p)
    return positional, keywords


def admin_address(listen: tuple[str, ...]) -> tuple[str, Any]:
    """Where to reach the first reachable ``[admin] listen`` endpoint: ``("tcp", (host,
    port))`` or ``("unix", path)``.  A wildcard interface is reached on loopback."""
    for description in listen:
        positional, keywords = endpoint_fields(description)
        kind = positional[0].lower() if positional else ""
        if kind in ("tcp", "tcp6") and (len(positional) > 1 or "port" in keywords):
            port = int(keywords["port"] if "port" in keywords else positional[1])
            interface = keywords.get("interface", "")
            if interface in ("", "0.0.0.0"):
                interface = "127.0.0.1" if kind == "tcp" else "::1"
            elif interface == "::":
                interface = "::1"
            return "tcp", (interface, port)
        if kind == "unix" and (len(positional) > 1 or "address" in keywords):
            return "unix", keywords["address"] if "address" in keywords else positional[1]
    raise NoAdminEndpoint(
        "no [admin] listen endpoint of the form tcp:, tcp6: or unix: in the config: give --url,"
        " or send SIGUSR2 to the daemon's main process (kill -USR2 $(cat twistd.pid))"
    )


def post_upgrade(kind: str, where: Any, timeout: float) -> tuple[int, dict[str, Any]]:
    """POST /upgrade and read the JSON answer."""
    connection: http.client.HTTPConnection
    if kind == "unix":
        connection = _UnixConnection(where, timeout)
    else:
        host, port = where
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", "/upgrade", body=b"", headers={"Content-Length": "0"})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"reason": raw.decode("utf-8", "replace").strip() or f"HTTP {response.status}"}
    return response.status, body


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the daemon's ini file (its [admin] listen is asked)")
    parser.add_argument("--url", help="the admin listener instead, e.g. http://127.0.0.1:9090")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the outcome (default {DEFAULT_TIMEOUT:g})")


def run(args: argparse.Namespace, listen: tuple[str, ...]) -> int:
    """The command: 0 upgraded, 1 refused or failed, 2 the daemon could not be asked."""
    try:
        if args.url:
            url = urlsplit(args.url)
            kind, where = "tcp", (url.hostname or "127.0.0.1", url.port or 80)
        else:
            kind, where = admin_address(listen)
        status, body = post_upgrade(kind, where, args.timeout)
    except NoAdminEndpoint as e:
        print(f"twisted_novnc: {e}", file=sys.stderr)
        return 2
    except (OSError, http.client.HTTPException) as e:
        print(f"twisted_novnc: cannot ask the daemon to upgrade: {e}", file=sys.stderr)
        return 2
    if status == 200 and body.get("upgraded"):
        workers = ", ".join(
            f"worker {w.get('worker')} (pid {w.get('pid')}, {w.get('version')})"
            for w in body.get("workers", [])
        )
        print(f"upgraded: generation {body.get('generation')} serves ({workers});"
              f" {body.get('moved', 0)} relays moved, {body.get('kept', 0)} stay in the old"
              f" generation until they end; {body.get('seconds')}s")
        return 0
    print(f"twisted_novnc: upgrade refused: {body.get('reason', f'HTTP {status}')}",
          file=sys.stderr)
    return 1
