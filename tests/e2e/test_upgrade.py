"""Zero-downtime upgrades with the real daemon: live relays move to a new generation of
processes while they stream, and the browser sees nothing (issue 12)."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import pytest_twisted
from daemon_process import (
    LISTENING_FOR_CHANGES,
    DaemonProcess,
    start_daemon,
    stop_daemon,
    write_config,
)
from db_fixtures import insert_ready, insert_session
from e2e_support import (
    banner_echo_close,
    connect_session,
    http_get,
    metric_values,
    new_id,
    settled,
    until,
    within,
)
from test_tls import endpoint_arg, self_signed
from test_workers import worker_pids
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from upgrade_support import (
    Streams,
    open_browser,
    open_relays,
    port_of,
    record,
    require_ss,
    run_upgrade,
    socket_holders,
    streaming_vms,
    streaming_websockify,
)

from twisted_novnc.testing import recording_client_factory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ADMIN = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}
UPGRADED = re.compile(r"upgraded: generation (\d+) serves \((.*)\); (\d+) relays moved")
NEW_PID = re.compile(r"pid (\d+)")
RELAYS = 200


@pytest_twisted.inlineCallbacks
def start(daemon_factory, workers: int, **novnc):
    daemon = yield daemon_factory(ADMIN, workers=workers, max_per_ip=1000, **novnc)
    if workers > 1:
        yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=workers))
    return daemon


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_live_relays_move_while_they_stream(daemon_factory, pg, sessions_table, workers):
    """200 relays stream numbered records both ways while the daemon upgrades: none is
    closed, every record arrives once and in order, and afterwards every socket of every
    relay is held by a process the upgrade started (the kernel says so)."""
    ss = require_ss()
    vms, listening = yield streaming_vms()
    try:
        daemon = yield start(daemon_factory, workers)
        sessions = [new_id() for _ in range(RELAYS)]
        for session_id in sessions:
            insert_ready(pg, sessions_table, session_id, vms.port)
        browsers, vm_ends = yield open_relays(daemon.port, vms, sessions)
        streams = Streams(browsers, vm_ends)
        streams.start()
        yield within(until(lambda: streams.least_received() >= 5))

        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        upgraded = UPGRADED.search(output)
        assert upgraded is not None, output
        assert int(upgraded.group(3)) == RELAYS, output
        new_pids = {int(pid) for pid in NEW_PID.findall(upgraded.group(2))}
        assert len(new_pids) == workers

        # The relays go on streaming in the new generation.
        mark = streams.least_received()
        yield within(until(lambda: streams.least_received() >= mark + 5))
        streams.stop()
        yield within(until(streams.all_delivered))
        assert streams.errors() == []

        # Both sockets of every relay are the new generation's, and only its.
        browser_side = socket_holders(ss, lambda local, peer: port_of(local) == daemon.port)
        vm_side = socket_holders(ss, lambda local, peer: port_of(peer) == vms.port)
        assert len(browser_side) == RELAYS
        assert len(vm_side) == RELAYS
        for holders in browser_side + vm_side:
            assert holders and holders <= new_pids, (holders, new_pids)
    finally:
        for browser in locals().get("browsers", []):
            browser.transport.abortConnection()
        yield defer.maybeDeferred(listening.stopListening)


@pytest_twisted.inlineCallbacks
def streaming_relays(daemon, pg, sessions_table, vms, count: int):
    """``count`` relays open and streaming: their Streams."""
    sessions = [new_id() for _ in range(count)]
    for session_id in sessions:
        insert_ready(pg, sessions_table, session_id, vms.port)
    already = len(vms.connected)
    browsers = []
    for n, session_id in enumerate(sessions):
        browser = yield open_browser(daemon.port, session_id)
        yield within(browser.opened)
        yield within(vms.when_connected(already + n + 1))
        browsers.append(browser)
    streams = Streams(browsers, vms.connected[already:])
    streams.start()
    yield within(until(lambda: streams.least_received() >= 3))
    return streams, sessions


@pytest_twisted.inlineCallbacks
def all_delivered(streams: Streams):
    """Stream a few more records, stop, and see every one arrive once and in order."""
    mark = streams.least_received()
    yield within(until(lambda: streams.least_received() >= mark + 3))
    streams.stop()
    yield within(until(streams.all_delivered))
    assert streams.errors() == []
    streams.close()


def make_ready(pg, db, session_id: str, port: int) -> None:
    """Commit the VM of a session a browser waits for."""
    with pg.cursor() as cur:
        cur.execute(
            f'UPDATE "{db.table}" SET vm_ip = %s, "{db.port_column}" = %s, status = %s'
            " WHERE session_id = %s", ("127.0.0.1", port, "running", session_id),
        )


def moved_count(output: str) -> int:
    upgraded = UPGRADED.search(output)
    assert upgraded is not None, output
    return int(upgraded.group(3))


def new_pids(output: str) -> set[int]:
    upgraded = UPGRADED.search(output)
    assert upgraded is not None, output
    return {int(pid) for pid in NEW_PID.findall(upgraded.group(2))}


@pytest_twisted.inlineCallbacks
def test_websocket_upstream_relays_move(daemon_factory, pg, sessions_table):
    """Relays to a websockify on the VM ([upstream] mode = websocket) move too, with both
    WebSocket framings going on where they stopped."""
    vms, listening = yield streaming_websockify()
    try:
        daemon = yield daemon_factory(
            {**ADMIN, "upstream": {"mode": "websocket"}}, max_per_ip=1000
        )
        streams, _ = yield streaming_relays(daemon, pg, sessions_table, vms, 20)
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        assert moved_count(output) == 20
        yield all_delivered(streams)
    finally:
        yield defer.maybeDeferred(listening.stopListening)


@pytest_twisted.inlineCallbacks
def test_session_ended_during_the_move_is_closed_with_4410(
    daemon_factory, pg, sessions_table
):
    """A session ended while its relay moves (its NOTIFY reached only the old process, which
    had already let it go) is closed with 4410 by the new one within a second."""
    vms, listening = yield streaming_vms()
    try:
        daemon = yield daemon_factory(ADMIN, max_per_ip=1000)
        streams, sessions = yield streaming_relays(daemon, pg, sessions_table, vms, 3)
        ended = sessions[0]
        # The end is committed with no NOTIFY at all: only a new read of the row can see it,
        # which is what the process that takes the relay over must do.
        with pg.cursor() as cur:
            cur.execute(f'ALTER TABLE "{sessions_table.table}" DISABLE TRIGGER USER')
            cur.execute(f'UPDATE "{sessions_table.table}" SET status = %s'
                        " WHERE session_id = %s", ("ended", ended))
            cur.execute(f'ALTER TABLE "{sessions_table.table}" ENABLE TRIGGER USER')
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        closed = streams.browsers[0]
        yield within(until(lambda: closed.closed is not None), 1.0)
        assert closed.closed[1] == 4410
        streams.browsers.pop(0)
        streams.vms.pop(0)
        yield all_delivered(streams)
    finally:
        yield defer.maybeDeferred(listening.stopListening)


# -- what runs afterwards: the code installed now, the config as it reads now ----------------

def installed_package() -> Path:
    """The twisted_novnc the daemon runs (the venv's installed copy, not the checkout)."""
    import twisted_novnc

    return Path(twisted_novnc.__file__).parent


def install_over(shadow: Path, version: str = "", broken: bool = False) -> None:
    """"pip install" a new version where the daemon's next workers find it: a copy of the
    installed package in a directory on the daemon's PYTHONPATH (empty when it started),
    with another version, or with a worker that cannot start."""
    target = shadow / "twisted_novnc"
    shutil.copytree(installed_package(), target, ignore=shutil.ignore_patterns("__pycache__"))
    init = target / "__init__.py"
    if version:
        text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
        assert version in text
        init.write_text(text)
    if broken:
        worker = target / "processes" / "worker.py"
        worker.write_text('raise ImportError("this release is broken")\n' + worker.read_text())


@pytest_twisted.inlineCallbacks
def start_with_shadow(postgres_dsn, sessions_table, tmp_path, workers: int):
    """A daemon whose environment has a PYTHONPATH directory, empty for now."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    config = write_config(tmp_path / "daemon.ini", postgres_dsn, sessions_table, ADMIN,
                          workers=workers, max_per_ip=1000)
    daemon = DaemonProcess()
    yield start_daemon(config, tmp_path, daemon, env={"PYTHONPATH": str(shadow)})
    if workers > 1:
        yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=workers))
    return daemon, shadow, config


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_upgrade_runs_the_code_installed_now(postgres_dsn, pg, sessions_table, tmp_path, workers):
    """After a new version is installed, an upgrade runs it: the new workers' start-up line,
    the command's report and /metrics build info name it, and the relays move to it."""
    vms, listening = yield streaming_vms()
    daemon, shadow, _ = yield start_with_shadow(postgres_dsn, sessions_table, tmp_path, workers)
    try:
        streams, _ = yield streaming_relays(daemon, pg, sessions_table, vms, 5)
        install_over(shadow, version="0.1.0+next")
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        assert moved_count(output) == 5
        assert output.count("0.1.0+next") == workers, output
        assert daemon.count(r"running twisted_novnc 0\.1\.0\+next \(twisted") == workers
        status, body = yield http_get(daemon.admin_port, "/metrics")
        assert status == 200
        values = metric_values(body.decode())
        built = {labels for name, labels in values if name == "twisted_novnc_build_info"}
        new = {dict(labels)["worker"] for labels in built
               if dict(labels)["version"] == "0.1.0+next"}
        assert len(new) == workers, built
        # The main process supervises with the code it started with.
        assert values["twisted_novnc_supervisor_build_info", (("version", "0.1.0"),)] == 1
        yield all_delivered(streams)
    finally:
        yield stop_daemon(daemon)
        yield defer.maybeDeferred(listening.stopListening)


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_broken_install_or_config_refuses_and_everything_is_still_served(
    postgres_dsn, pg, sessions_table, tmp_path, workers
):
    """A config that does not validate, then a new install whose worker cannot start, each
    refuse the upgrade with the reason; the relays stream on untouched and new browsers are
    served; once both are mended, the upgrade goes through."""
    vms, listening = yield streaming_vms()
    daemon, shadow, config = yield start_with_shadow(
        postgres_dsn, sessions_table, tmp_path, workers
    )
    try:
        streams, _ = yield streaming_relays(daemon, pg, sessions_table, vms, 5)
        good = config.read_text()
        config.write_text(good + "max_per_ip = lots\n")
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 1, output
        assert "upgrade refused: the configuration does not validate" in output
        assert "max_per_ip" in output and str(config) in output
        config.write_text(good)

        install_over(shadow, broken=True)
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 1, output
        assert "before it was ready" in output, output
        assert daemon.count("upgrade refused") == 2

        more, _ = yield streaming_relays(daemon, pg, sessions_table, vms, 2)
        shutil.rmtree(shadow / "twisted_novnc")
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        assert moved_count(output) == 7
        yield all_delivered(streams)
        yield all_delivered(more)
    finally:
        yield stop_daemon(daemon)
        yield defer.maybeDeferred(listening.stopListening)


# -- what stays where it is ------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def tls_relay_and_waiting_browser(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path, workers: int, **novnc
):
    """A daemon with a tcp: and an ssl: listener, a relay open over TLS and a browser waiting
    for its session: (daemon, TLS port, TLS client, waiting client, the waiting session)."""
    key, cert = self_signed(tmp_path)
    tls = f"ssl:0:interface=127.0.0.1:privateKey={endpoint_arg(key)}:certKey={endpoint_arg(cert)}"
    daemon = yield daemon_factory(
        ADMIN, listen=f"tcp:0:interface=127.0.0.1 {tls}", workers=workers, **novnc
    )
    if workers > 1:
        yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=workers))
    tls_port = int(re.findall(r"listening on 127\.0\.0\.1:(\d+) \(ssl:", daemon.output)[0])
    tls_sid, waiting_sid = new_id(), new_id()
    insert_ready(pg, sessions_table, tls_sid, vnc_server.port)
    insert_session(pg, sessions_table, waiting_sid)  # no VM yet: the browser waits
    options = optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(cert.read_bytes()))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", tls_port))
    factory = recording_client_factory(f"wss://127.0.0.1:{tls_port}/websockify/{tls_sid}")
    secure = yield connectProtocol(endpoint, factory.buildProtocol(None))
    yield within(secure.opened)
    waiting = yield connect_session(daemon.port, waiting_sid)
    yield within(daemon.when_logged(f"request {waiting_sid} .*waiting for readiness"))
    return daemon, tls_port, secure, waiting, waiting_sid


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_tls_relay_and_waiting_browser_stay_and_finish(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path, workers
):
    """A relay on the ssl: listener and a browser still waiting for its session stay in the
    old generation through the upgrade, and each then works and ends normally; the plain
    relay beside them moves."""
    ss = require_ss()
    daemon, tls_port, secure, waiting, waiting_sid = yield tls_relay_and_waiting_browser(
        daemon_factory, pg, sessions_table, vnc_server, tmp_path, workers
    )
    old_pids = {daemon.pid} | set(worker_pids(daemon).values())

    plain_sid = new_id()
    insert_ready(pg, sessions_table, plain_sid, vnc_server.port)
    plain = yield connect_session(daemon.port, plain_sid)
    yield within(plain.opened)

    code, output = yield run_upgrade(daemon.admin_port)
    assert code == 0, output
    assert moved_count(output) == 1
    assert "1 stay in the old generation" in output
    moved_to = new_pids(output)
    tls_holders = socket_holders(ss, lambda local, peer: port_of(local) == tls_port)
    assert len(tls_holders) == 1 and tls_holders[0] <= old_pids, (tls_holders, old_pids)

    make_ready(pg, sessions_table, waiting_sid, vnc_server.port)
    yield within(waiting.opened)
    for client in (waiting, secure, plain):
        yield banner_echo_close(client, b"after the upgrade")
    assert not moved_to & old_pids


@pytest_twisted.inlineCallbacks
def test_two_upgrades_in_a_row_and_one_while_draining(daemon_factory, pg, sessions_table,
                                                      vnc_server):
    """Relays move twice in a row; the second upgrade comes while the first one's old
    generation still drains a waiting browser, which then still gets served there; each old
    generation's processes exit once they hold nothing."""
    vms, listening = yield streaming_vms()
    try:
        daemon = yield start(daemon_factory, 2)
        streams, _ = yield streaming_relays(daemon, pg, sessions_table, vms, 10)
        waiting_sid = new_id()
        insert_session(pg, sessions_table, waiting_sid)
        waiting = yield connect_session(daemon.port, waiting_sid)
        yield within(daemon.when_logged(f"request {waiting_sid} .*waiting for readiness"))

        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        assert moved_count(output) == 10
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        assert moved_count(output) == 10
        assert "generation 3 serves" in output
        # Generation 2 held only moved relays: its workers are gone; generation 1 drains on.
        yield within(daemon.when_logged(r"of generation 2 exited with status 0", times=2))
        assert daemon.count(r"of generation 1 exited") == 1  # the worker without the browser

        make_ready(pg, sessions_table, waiting_sid, vnc_server.port)
        yield within(waiting.opened)
        yield banner_echo_close(waiting, b"in generation 1")
        yield within(daemon.when_logged(r"of generation 1 exited with status 0", times=2))
        yield all_delivered(streams)
    finally:
        yield defer.maybeDeferred(listening.stopListening)


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_sigusr2_upgrades_and_connections_are_accepted_throughout(
    daemon_factory, pg, sessions_table, vnc_server, workers
):
    """SIGUSR2 to the main process upgrades (in every mode); browsers that keep opening
    connections meanwhile are each served, none refused or failed to connect."""
    daemon = yield start(daemon_factory, workers)
    sessions = [new_id() for _ in range(400)]
    for session_id in sessions:
        insert_ready(pg, sessions_table, session_id, vnc_server.port)
    served = []
    failures = []
    upgraded = daemon.when_logged("upgrade complete")

    @pytest_twisted.inlineCallbacks
    def keep_connecting():
        for session_id in sessions:
            if upgraded.called and len(served) >= 20:
                return
            try:
                client = yield connect_session(daemon.port, session_id)
                yield banner_echo_close(client, b"hello")
                served.append(session_id)
            except Exception as e:  # every failure is the finding
                failures.append(repr(e))

    connecting = keep_connecting()
    yield within(until(lambda: len(served) >= 3))
    os.kill(daemon.pid, signal.SIGUSR2)
    yield within(upgraded)
    yield within(connecting, 60)
    assert failures == []
    assert upgraded.called and len(served) >= 20
    assert daemon.count("received SIGUSR2: upgrading") == 1
    assert daemon.count("generation 2 serves") == 1


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_what_stays_is_closed_after_upgrade_drain_timeout(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path, workers
):
    """What stays in the old generation ends at upgrade_drain_timeout with a close code, never
    a bare drop: a TLS relay gets 1001, a browser still waiting gets 4503."""
    daemon, _, secure, waiting, _ = yield tls_relay_and_waiting_browser(
        daemon_factory, pg, sessions_table, vnc_server, tmp_path, workers,
        upgrade_drain_timeout=1,
    )

    code, output = yield run_upgrade(daemon.admin_port)
    assert code == 0, output
    assert (yield within(secure.closed))[0] == 1001
    assert (yield within(waiting.closed))[0] == 4503
    # (With workers the line crosses the worker's pipe: it may come after the close frames.)
    yield within(daemon.when_logged("upgrade_drain_timeout: closing what is left"))


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_relays_the_new_generation_declines_go_on_in_the_old(
    postgres_dsn, pg, sessions_table, tmp_path, workers
):
    """A new generation that cannot take every relay (here: its config lowers
    max_connections) declines the rest, and each goes on in the old generation as if nothing
    happened; the upgrade still completes."""
    vms, listening = yield streaming_vms()
    daemon, _, config = yield start_with_shadow(postgres_dsn, sessions_table, tmp_path, workers)
    try:
        streams, _ = yield streaming_relays(daemon, pg, sessions_table, vms, 6)
        config.write_text(config.read_text().replace(
            "[novnc]\n", "[novnc]\nmax_connections = 1\n"
        ))
        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        assert moved_count(output) == workers  # one per new worker
        assert f"{6 - workers} stay in the old generation" in output
        assert daemon.count("did not take .* at max_connections\\): it goes on here") == 6 - workers
        yield all_delivered(streams)
    finally:
        yield stop_daemon(daemon)
        yield defer.maybeDeferred(listening.stopListening)


def unsent(transport) -> int:
    """Bytes a test peer's own transport still holds to write (Twisted's buffer)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_bytes_in_flight_move_with_the_relay(daemon_factory, pg, sessions_table, fast_path,
                                             workers):
    """Both ends stop reading while megabytes are sent each way, so that the daemon holds
    bytes written and not sent, in both directions, and on the fast path a browser frame half
    read; after the upgrade both ends read again and every byte arrives once and in order."""
    vms, listening = yield streaming_vms()
    try:
        daemon = yield start(daemon_factory, workers)
        streams, _ = yield streaming_relays(daemon, pg, sessions_table, vms, 1)
        streams.stop()
        yield within(until(streams.all_delivered))
        (browser,), (vm,) = streams.browsers, streams.vms
        browser.transport.pauseProducing()
        vm.transport.pauseProducing()
        # Each end sends until its own buffer stops draining: every buffer on the way, the
        # daemon's included, is full then (a few MB each way on loopback; at most 64 MB).
        for _ in range(16):
            for _ in range(64):  # up: 4 MB, as messages of 1,000 records (64,000 bytes)
                first = browser.sent
                browser.sendMessage(b"".join(record(first + i) for i in range(1000)),
                                    isBinary=True)
                browser.sent += 1000
            yield settled(lambda: unsent(browser.transport), checks=5)
            if unsent(browser.transport):
                break
        for _ in range(16):
            for _ in range(64_000):  # down: 4 MB of records
                vm.send_next()
            yield settled(lambda: unsent(vm.transport), checks=5)
            if unsent(vm.transport):
                break
        assert unsent(browser.transport) > 0 and unsent(vm.transport) > 0

        code, output = yield run_upgrade(daemon.admin_port)
        assert code == 0, output
        if fast_path == "on":
            assert moved_count(output) == 1, output
        browser.transport.resumeProducing()
        vm.transport.resumeProducing()
        yield within(until(streams.all_delivered))
        assert streams.errors() == []
        streams.close()
    finally:
        yield defer.maybeDeferred(listening.stopListening)
