"""Zero-downtime upgrades with the real daemon: live relays move to a new generation of
processes while they stream, and the browser sees nothing (issue 12)."""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from daemon_process import LISTENING_FOR_CHANGES
from db_fixtures import insert_ready
from e2e_support import new_id, until, within
from twisted.internet import defer
from upgrade_support import (
    Streams,
    open_relays,
    port_of,
    require_ss,
    run_upgrade,
    socket_holders,
    streaming_vms,
)

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
