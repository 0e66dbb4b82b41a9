"""``make demo``'s start path for real: Xvnc, the daemon on its embedded cluster, the session,
and the printed URL's session served through the daemon; then SIGTERM stops everything."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile

import daemon_process
import pytest
import pytest_twisted
from e2e_support import EVENT_LIMIT, CollectingProcess, connect_session, holds_within, within
from required_tools import require
from twisted.internet import reactor

from twisted_novnc.database.embedded import read_postmaster_pid

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

#: The viewer URL exactly as the demo prints it.
URL = re.compile(r"^    http://127\.0\.0\.1:(\d+)/vnc/([0-9a-f-]{36})$", re.MULTILINE)
#: The demo has a minute to show a desktop (initdb included).
START_LIMIT = 60.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.fixture
def demo_dir():
    """A directory outside the checkout the cluster's user can enter (it runs as postgres
    under root), holding the demo's config: the sample's defaults but a free port."""
    path = tempfile.mkdtemp(prefix="tnovnc-demo-")
    os.chmod(path, 0o711)
    with open(os.path.join(path, "demo.ini"), "w", encoding="utf-8") as f:
        f.write(f"[novnc]\nlisten = tcp:0:interface=127.0.0.1\n"
                f"[database]\nembedded_dir = {path}/var/postgres\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.inlineCallbacks
def test_demo_prints_a_url_whose_session_is_served(demo_dir: str) -> None:
    """The demo prints http://127.0.0.1:<port>/vnc/<session_id>; that session, through the
    daemon's WebSocket path, reaches the demo's Xvnc (its RFB banner arrives); SIGTERM then
    stops the daemon, its cluster and Xvnc, and the demo exits 0."""
    # Skipped only on a machine without Xvnc; under CI (.ci/run installs it) a failure.
    require([] if shutil.which("Xvnc") else ["Xvnc (apt-get install tigervnc-standalone-server)"],
            "the demo")
    demo = CollectingProcess()
    argv = [sys.executable, "-m", "twisted_novnc.demo", "--config", "demo.ini",
            "--set", f"novnc.fast_path={daemon_process.FAST_PATH}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    reactor.spawnProcess(demo, sys.executable, argv, env=env, path=demo_dir)
    exited = []
    demo.ended.addCallback(exited.append)
    try:
        yield holds_within(lambda: URL.search(demo.output) or exited, START_LIMIT)
        match = URL.search(demo.output)
        assert match, demo.output
        port, session_id = int(match[1]), match[2]
        xvnc_pid = int(re.search(r"Xvnc :\d+, pid (\d+)", demo.output)[1])
        postmaster = read_postmaster_pid(os.path.join(demo_dir, "var", "postgres"))
        assert postmaster is not None and _alive(postmaster.pid)

        client = yield within(connect_session(port, session_id))
        banner = yield within(client.when_received(12))
        assert banner.startswith(b"RFB 003.00"), banner
        client.sendClose(1000)
        yield within(client.closed)
    finally:
        if not exited:
            demo.transport.signalProcess(signal.SIGTERM)
        yield within(demo.ended, EVENT_LIMIT + 30)
    assert demo.transport.status == 0, demo.output
    assert not _alive(xvnc_pid)
    assert not _alive(postmaster.pid)
    assert "stopped the PostgreSQL cluster" in demo.output
