"""Running the real daemon, ``twistd -n novnc``, as a subprocess, and watching its log."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol

LISTENING = re.compile(r"(?<!admin )listening on 127\.0\.0\.1:(\d+)")
LISTENING_FOR_CHANGES = "listening for session changes on channel"
ADMIN_LISTENING = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")
STARTUP_LIMIT = 30.0
#: The venv's own twistd script, as users run it.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: ``[novnc] fast_path`` for every daemon started (the ``fast_path`` fixture sets it).
FAST_PATH = "on"


class DaemonProcess(ProcessProtocol):
    """A running ``twistd -n novnc``; collects its output and fires on its log lines."""

    def __init__(self) -> None:
        self.output = ""
        self.listening: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self._watches: list[tuple[str, int, defer.Deferred[int]]] = []
        self.port = 0
        self.admin_port: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        if not self.listening.called:
            m = LISTENING.search(self.output)
            if m:
                self.port = int(m.group(1))
                admin = ADMIN_LISTENING.search(self.output)
                self.admin_port = int(admin.group(1)) if admin else None
                self.listening.callback(self.port)
        for item in list(self._watches):
            if self.count(item[0]) >= item[1]:
                self._watches.remove(item)
                item[2].callback(item[1])

    errReceived = outReceived

    def count(self, pattern: str) -> int:
        """How many times the output so far matches ``pattern``."""
        return len(re.findall(pattern, self.output))

    def when_logged(self, pattern: str, times: int = 1) -> defer.Deferred[int]:
        """Fire once the output has matched ``pattern`` at least ``times`` times."""
        if self.count(pattern) >= times:
            return defer.succeed(times)
        d: defer.Deferred[int] = defer.Deferred()
        self._watches.append((pattern, times, d))
        return d

    def processEnded(self, reason) -> None:  # type: ignore[no-untyped-def]
        code = reason.value.exitCode
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"daemon exited ({code}):\n{self.output}"))
        self.ended.callback(code)

    @property
    def pid(self) -> int:
        return self.transport.pid  # type: ignore[no-any-return]

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def write_config(  # type: ignore[no-untyped-def]
    path: Path, dsn: str, db, sections: dict | None = None, **novnc: object
) -> Path:
    """A config for the test's table; ``sections`` adds keys, e.g. {"upstream": {...}}."""
    sections = dict(sections or {})
    # The tests' VNC servers live on loopback, on this very host, which the defaults refuse.
    upstream = dict(sections.pop("upstream", {}))
    upstream.setdefault("allowed_networks", "127.0.0.0/8")
    upstream.setdefault("allow_self", "on")
    sections["upstream"] = upstream
    # No [novnc] drain_delay unless a test asks: a stop waits for no load balancer here.
    options = {
        "listen": "tcp:0:interface=127.0.0.1", "readiness_timeout": 20, "drain_delay": 0,
        **novnc,
    }
    lines = ["[novnc]"] + [f"{k} = {v}" for k, v in options.items()]
    extra_db = sections.pop("database", {})
    lines += [
        "[database]",
        f"dsn = {dsn}",
        f"table = {db.table}",
        f"port_column = {db.port_column}",
        f"notify_channel = {db.notify_channel}",
        "pool_size = 2",
    ] + [f"{k} = {v}" for k, v in extra_db.items()]
    for section, keys in sections.items():
        lines += [f"[{section}]"] + [f"{k} = {v}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest_twisted.inlineCallbacks
def start_daemon(
    config: Path,
    cwd: Path,
    proto: DaemonProcess,
    args: tuple[str, ...] = (),
    wait_for_database: bool = True,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
):
    """Start the daemon from a directory that is not the checkout, as a user would; fire once
    it listens (and, unless told otherwise, once it listens for session changes too).

    The daemon relays in the mode the ``fast_path`` fixture says (``--set novnc.fast_path``).
    ``prefix`` is a command that runs the daemon (``prefix + [twistd, ...]``), e.g. one that
    lowers its descriptor limit first; ``env`` adds to its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | (env or {})
    command = [
        *prefix, TWISTD, "--pidfile=", "-n", "novnc", "--config", str(config),
        "--set", f"novnc.fast_path={FAST_PATH}", *args,
    ]
    reactor.spawnProcess(proto, command[0], command, env=env, path=str(cwd))
    timer = reactor.callLater(STARTUP_LIMIT, proto.listening.cancel)
    try:
        yield proto.listening
    finally:
        if timer.active():
            timer.cancel()
    if wait_for_database:
        yield proto.when_logged(LISTENING_FOR_CHANGES)
    return proto


@pytest_twisted.inlineCallbacks
def stop_daemon(proto: DaemonProcess):
    if not proto.ended.called:
        proto.transport.signalProcess(signal.SIGTERM)
        timer = reactor.callLater(15, lambda: proto.transport.signalProcess(signal.SIGKILL))
        yield proto.ended
        if timer.active():
            timer.cancel()
