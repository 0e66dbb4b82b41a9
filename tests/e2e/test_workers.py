"""[novnc] workers with the real daemon: both workers serve, readiness works in each, a killed
worker is restarted, SIGTERM drains every worker and leaves no process, metrics are labelled,
every endpoint form is shared, logs keep their destination; and the descriptor limit, named
in the log when it (not the proxy) refuses connections."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from daemon_process import LISTENING_FOR_CHANGES, DaemonProcess, start_daemon, write_config
from db_fixtures import insert_ready
from e2e_support import RawUpgrade, connect_session, http_get, metric_values, new_id, until, within
from test_operations import _free_port
from test_tls import endpoint_arg, self_signed, wss_banner_and_echo
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from twisted_novnc.testing import RFB_BANNER, recording_client_factory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ADMIN = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}
WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def worker_pids(daemon: DaemonProcess) -> dict[int, int]:
    """Each worker's latest pid, as the supervisor logged it."""
    return {int(i): int(pid) for i, pid in WORKER_STARTED.findall(daemon.output)}


def served_by(daemon: DaemonProcess, index: int) -> int:
    """How many requests worker ``index`` logged."""
    return daemon.count(rf"\[worker {index}: [^\]]*\] request ")



@pytest_twisted.inlineCallbacks
def relays(port: int, ids: list[str]):
    """Open one client per session, all at once; fire once each has the VNC banner."""
    clients = yield defer.gatherResults(
        [connect_session(port, sid) for sid in ids]
    )
    yield within(defer.gatherResults([c.when_received(len(RFB_BANNER)) for c in clients]))
    return clients


@pytest_twisted.inlineCallbacks
def close_all(clients) -> None:
    for client in clients:
        client.sendClose(1000)
    yield within(defer.gatherResults([c.closed for c in clients]))


@pytest_twisted.inlineCallbacks
def two_workers(daemon_factory, sections: dict | None = None, **novnc):
    """A daemon with two workers, once both listen for session changes."""
    daemon = yield daemon_factory(sections, workers=2, **novnc)
    yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=2))
    assert set(worker_pids(daemon)) == {1, 2}
    return daemon


@pytest_twisted.inlineCallbacks
def test_both_workers_serve_and_metrics_say_which(daemon_factory, pg, sessions_table, vnc_server):
    """Many sessions at once are all served, by both worker processes; /metrics counts each
    worker's connections under its worker label and names each worker's pid."""
    daemon = yield two_workers(daemon_factory, ADMIN)
    pids = worker_pids(daemon)
    total = 0
    for _ in range(10):  # until both have served: the kernel picks who accepts
        ids = [new_id() for _ in range(20)]
        for sid in ids:
            insert_ready(pg, sessions_table, sid, vnc_server.port)
        clients = yield relays(daemon.port, ids)
        yield close_all(clients)
        total += len(ids)
        if served_by(daemon, 1) and served_by(daemon, 2):
            break
    assert served_by(daemon, 1) > 0 and served_by(daemon, 2) > 0, daemon.output[-3000:]
    yield within(daemon.when_logged(r"closed \S+ from 127\.0\.0\.1: 1000", times=total))
    status, body = yield http_get(daemon.admin_port, "/metrics")
    assert status == 200
    values = metric_values(body.decode())
    per_worker = {
        i: values.get(
            ("twisted_novnc_connections_total", (("outcome", "1000"), ("worker", str(i))))
        )
        for i in (1, 2)
    }
    assert per_worker[1] and per_worker[2] and per_worker[1] + per_worker[2] == total
    for i, pid in pids.items():
        assert values["twisted_novnc_worker_info", (("pid", str(pid)), ("worker", str(i)))] == 1
    assert values["twisted_novnc_workers", ()] == 2
    assert values["twisted_novnc_workers_alive", ()] == 2
    status, body = yield http_get(daemon.admin_port, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True


@pytest_twisted.inlineCallbacks
def test_session_committed_after_the_upgrade(daemon_factory, pg, sessions_table, vnc_server):
    """Browsers that arrive before their rows wait in whichever worker took them, and each is
    served when its row is committed: every worker has its own LISTEN and readiness gate."""
    daemon = yield two_workers(daemon_factory)
    ids = [new_id() for _ in range(10)]
    clients = yield defer.gatherResults(
        [connect_session(daemon.port, sid) for sid in ids]
    )
    for sid in ids:
        yield within(daemon.when_logged(f"request {sid} from"))
    for sid in ids:
        insert_ready(pg, sessions_table, sid, vnc_server.port)
    yield within(defer.gatherResults([c.when_received(len(RFB_BANNER)) for c in clients]))
    yield close_all(clients)


@pytest_twisted.inlineCallbacks
def test_killed_worker_is_restarted(daemon_factory, pg, sessions_table, vnc_server):
    """kill -9 of a worker: the log names it, the other worker goes on serving, and a new
    worker process takes its place and serves too."""
    daemon = yield two_workers(daemon_factory)
    victim = worker_pids(daemon)[1]
    os.kill(victim, signal.SIGKILL)
    yield within(daemon.when_logged(
        rf"worker 1 \(pid {victim}\) was killed by signal 9 \(SIGKILL\) after [\d.]+s;"
        r" restarting it in"
    ))
    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    clients = yield relays(daemon.port, [sid])
    yield close_all(clients)
    yield within(daemon.when_logged(r"worker 1 started \(pid \d+\)", times=2))
    assert worker_pids(daemon)[1] != victim
    yield until(lambda: not Path(f"/proc/{victim}").exists())
    yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=3))
    for _ in range(10):  # until the new worker has served too
        ids = [new_id() for _ in range(10)]
        for sid in ids:
            insert_ready(pg, sessions_table, sid, vnc_server.port)
        clients = yield relays(daemon.port, ids)
        yield close_all(clients)
        after_restart = daemon.output.split(f"worker 1 started (pid {worker_pids(daemon)[1]})")[1]
        if re.search(r"\[worker 1: [^\]]*\] request ", after_restart):
            break
    else:
        pytest.fail("the restarted worker never served")


@pytest_twisted.inlineCallbacks
def test_sigterm_drains_every_worker_and_leaves_no_process(
    daemon_factory, pg, sessions_table, vnc_server
):
    """SIGTERM to the supervisor: waiters get 4503, relays in every worker 1001 after the
    drain, and the supervisor exits only once no worker process is left."""
    daemon = yield two_workers(daemon_factory, drain_timeout=1)
    pids = [daemon.pid, *worker_pids(daemon).values()]
    ids = [new_id() for _ in range(6)]
    for sid in ids:
        insert_ready(pg, sessions_table, sid, vnc_server.port)
    clients = yield relays(daemon.port, ids)
    waiter = yield connect_session(daemon.port, new_id())
    yield within(daemon.when_logged("waiting for readiness", times=7))
    started = time.monotonic()
    daemon.transport.signalProcess(signal.SIGTERM)
    assert (yield within(waiter.closed, 10)) == (4503, "shutting down")
    results = yield within(defer.gatherResults([c.closed for c in clients]), 15)
    assert [code for code, _ in results] == [1001] * len(ids)
    assert time.monotonic() - started >= 0.9, "relays were closed before the drain ended"
    exit_code = yield within(daemon.ended, 20)
    assert exit_code in (0, None), daemon.output[-3000:]
    assert "all workers stopped" in daemon.output
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), pid
    refused = connect_session(daemon.port, new_id())
    with pytest.raises(Exception):  # noqa: B017  (ConnectionRefusedError, wrapped by Twisted)
        yield within(refused, 5)


@pytest_twisted.inlineCallbacks
def test_second_sigterm_closes_every_worker_at_once(
    daemon_factory, pg, sessions_table, vnc_server
):
    """A second SIGTERM to the supervisor during a long drain closes the relays at once."""
    daemon = yield two_workers(daemon_factory, drain_timeout=300)
    ids = [new_id() for _ in range(4)]
    for sid in ids:
        insert_ready(pg, sessions_table, sid, vnc_server.port)
    clients = yield relays(daemon.port, ids)
    daemon.transport.signalProcess(signal.SIGTERM)
    yield within(daemon.when_logged("draining: "))
    daemon.transport.signalProcess(signal.SIGTERM)
    results = yield within(defer.gatherResults([c.closed for c in clients]), 15)
    assert [code for code, _ in results] == [1001] * len(ids)
    yield within(daemon.ended, 20)


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for PID 1 to reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


@pytest_twisted.inlineCallbacks
def test_workers_stop_when_the_supervisor_is_killed(daemon_factory):
    """kill -9 of the supervisor: each worker sees its pipe close and exits; none is orphaned.
    (The workers hold the supervisor's stdout, so the daemon only counts as ended once they
    have exited too.)"""
    daemon = yield two_workers(daemon_factory)
    pids = list(worker_pids(daemon).values())
    os.kill(daemon.pid, signal.SIGKILL)
    yield within(daemon.ended)
    yield until(lambda: all(gone(pid) for pid in pids))
    assert daemon.count("the supervisor is gone") == 2


@pytest_twisted.inlineCallbacks
def test_auto_is_one_worker_per_core(daemon_factory):
    """workers = auto starts one worker per core this machine gives the daemon."""
    cores = len(os.sched_getaffinity(0))
    daemon = yield daemon_factory(workers="auto")
    assert f"[novnc] workers = auto: {cores} (one per core)" in daemon.output
    if cores > 1:
        yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=cores))
        assert set(worker_pids(daemon)) == set(range(1, cores + 1))
    else:
        assert not worker_pids(daemon)


@pytest_twisted.inlineCallbacks
def test_set_override_starts_workers(postgres_dsn, sessions_table, tmp_path):
    """--set novnc.workers=2 works like the ini key."""
    config = write_config(tmp_path / "c.ini", postgres_dsn, sessions_table)
    daemon = DaemonProcess()
    yield start_daemon(config, tmp_path, daemon, args=("--set", "novnc.workers=2"))
    try:
        yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=2))
        assert set(worker_pids(daemon)) == {1, 2}
    finally:
        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.ended, 20)


@pytest_twisted.inlineCallbacks
def test_every_endpoint_form_is_shared(daemon_factory, pg, sessions_table, vnc_server, tmp_path):
    """ssl:, haproxy:tcp: and unix: listeners made by the supervisor are served by the
    workers: TLS is ended there, the PROXY header read there, the socket file's mode kept."""
    key, cert = self_signed(tmp_path)
    sock = tmp_path / "novnc.sock"
    listen = (
        "tcp:0:interface=127.0.0.1"
        f" ssl:0:interface=127.0.0.1:privateKey={endpoint_arg(key)}:certKey={endpoint_arg(cert)}"
        " haproxy:tcp:0:interface=127.0.0.1"
        f" unix:{sock}:mode=600"
    )
    daemon = yield two_workers(daemon_factory, listen=listen, proxy_protocol_from="127.0.0.1")

    def port_of(prefix: str) -> int:
        m = re.search(rf"(?<!admin )listening on 127\.0\.0\.1:(\d+) \({prefix}", daemon.output)
        assert m, daemon.output
        return int(m.group(1))

    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    yield wss_banner_and_echo(port_of("ssl:"), cert, sid)

    proxied = new_id()
    preamble = b"PROXY TCP4 203.0.113.7 127.0.0.1 4711 6080\r\n"
    raw = RawUpgrade(f"/websockify/{proxied}", {}, preamble)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port_of("haproxy:"))
    yield connectProtocol(endpoint, raw)
    yield within(
        daemon.when_logged(rf"\[worker \d: [^\]]*\] request {proxied} from 203\.0\.113\.7")
    )
    raw.transport.loseConnection()
    yield within(raw.done)

    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    factory = recording_client_factory(f"ws://localhost/websockify/{sid}")
    client = yield connectProtocol(
        UNIXClientEndpoint(reactor, str(sock)), factory.buildProtocol(None)
    )
    yield within(client.when_received(len(RFB_BANNER)))
    yield close_all([client])


def _file_contains(path: Path, text: str, times: int = 1) -> defer.Deferred:
    return until(lambda: path.exists() and path.read_text().count(text) >= times)


@pytest_twisted.inlineCallbacks
def test_worker_logs_follow_the_log_settings(postgres_dsn, sessions_table, tmp_path):
    """With [log] format = json and a file, the workers' lines are in that file as JSON with
    their worker number, and SIGHUP to the supervisor moves them to the reopened file."""
    log = tmp_path / "novnc.log"
    port = yield _free_port()
    config = write_config(
        tmp_path / "log.ini", postgres_dsn, sessions_table,
        {"log": {"format": "json", "file": str(log)}},
        listen=f"tcp:{port}:interface=127.0.0.1", workers=2,
    )
    daemon = DaemonProcess()
    start = start_daemon(config, tmp_path, daemon)
    try:
        yield within(_file_contains(log, LISTENING_FOR_CHANGES, times=2))
        workers = {
            json.loads(line).get("worker")
            for line in log.read_text().splitlines()
            if LISTENING_FOR_CHANGES in line
        }
        assert workers == {1, 2}
        os.rename(log, tmp_path / "novnc.log.1")
        daemon.transport.signalProcess(signal.SIGHUP)
        yield within(until(log.exists))
        sid = new_id()
        client = yield connect_session(port, sid)
        yield within(_file_contains(log, f"request {sid}"))
        client.transport.loseConnection()
        (line,) = [json.loads(x) for x in log.read_text().splitlines() if f"request {sid}" in x]
        assert line["worker"] in (1, 2) and line["session_id"] == sid
        assert f"request {sid}" not in (tmp_path / "novnc.log.1").read_text()
    finally:
        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.ended, 20)
        start.cancel()
        start.addErrback(lambda _: None)


#: Runs the daemon with RLIMIT_NOFILE lowered to soft 48, hard 64.
LOW_LIMIT = (
    sys.executable, "-c",
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (48, 64));"
    " os.execv(sys.argv[1], sys.argv[1:])",
)


class Held(Protocol):
    """A client connection that sends nothing and waits to be closed by us."""

    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_descriptor_limit_is_named_and_survived(
    postgres_dsn, sessions_table, pg, vnc_server, tmp_path
):
    """Started with a low descriptor limit, the daemon raises the soft limit, warns that the
    limit caps it below max_connections, says plainly when the limit refuses connections
    (and counts it), and serves again once descriptors are free."""
    config = write_config(
        tmp_path / "limit.ini", postgres_dsn, sessions_table, ADMIN, request_timeout=120
    )
    daemon = DaemonProcess()
    yield start_daemon(config, tmp_path, daemon, prefix=LOW_LIMIT)
    try:
        assert "soft limit raised from 48 to 64" in daemon.output
        assert re.search(
            r"the descriptor limit \(64\) caps this process at about \d+ relays .* below"
            r" \[novnc\] max_connections = 10000", daemon.output,
        )
        held = []
        for _ in range(70):  # more than 64 descriptors; the rest wait in the backlog
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port)
            held.append((yield connectProtocol(endpoint, Held())))
        yield within(daemon.when_logged(
            r"this process's descriptor limit \(RLIMIT_NOFILE = 64\) is refusing new"
            r" connections, not the proxy"
        ))
        for conn in held:
            conn.transport.loseConnection()
        yield within(defer.gatherResults([conn.lost for conn in held]))
        sid = new_id()
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        clients = yield relays(daemon.port, [sid])
        yield close_all(clients)
        yield within(daemon.when_logged("descriptors are free again"))
        status, body = yield http_get(daemon.admin_port, "/metrics")
        values = metric_values(body.decode())
        assert values["twisted_novnc_descriptor_limit_hits_total", ()] >= 1
        assert values["process_max_fds", ()] == 64
    finally:
        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.ended, 20)


@pytest_twisted.inlineCallbacks
def test_no_descriptor_for_the_vm_is_4503_proxy_at_capacity(
    postgres_dsn, sessions_table, pg, vnc_server, tmp_path
):
    """When the descriptor limit leaves none for the VM's socket, the browser waiting for it
    gets 4503 "proxy at capacity" (not 4502, which would blame the VM), and the log says the
    limit refused it."""
    config = write_config(
        tmp_path / "capacity.ini", postgres_dsn, sessions_table, ADMIN, request_timeout=120,
        max_waiting_per_ip=1000,
    )
    daemon = DaemonProcess()
    yield start_daemon(config, tmp_path, daemon, prefix=LOW_LIMIT)
    clients = []
    try:
        sids = [new_id() for _ in range(70)]
        for sid in sids:  # more browsers than descriptors; the accepted ones wait for a row
            clients.append((yield connect_session(daemon.port, sid)))
        yield within(daemon.when_logged(r"is refusing new connections, not the proxy"))
        waiting = [sid for sid in sids if f"request {sid} " in daemon.output]
        assert waiting, daemon.output[-2000:]
        sid = waiting[0]
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        code, reason = yield within(clients[sids.index(sid)].closed)
        assert (code, reason) == (4503, "proxy at capacity")
        assert "descriptor limit, not the VM, refused the connection" in daemon.output
    finally:
        for client in clients:
            client.leave()
        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.ended, 20)
