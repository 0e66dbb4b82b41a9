"""Importing any module of the package and building the daemon's service tree change nothing
outside them; starting the tree is what raises the descriptor limit, freezes the start-up heap
and patches the libraries.

Each whole-process check runs in a fresh interpreter (tests/side_effects_probe.py), which
compares what a library user would notice before and after the step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock

import twisted_novnc
from twisted_novnc.config import parse_config
from twisted_novnc.operations.fdlimit import DescriptorLimit
from twisted_novnc.processes.listeners import ListenerService
from twisted_novnc.processes.service import make_service, make_worker_service
from twisted_novnc.processes.sharedports import SharedSocket
from twisted_novnc.processes.startup import ProcessSetupService, StartupDoneService

PROBE = Path(__file__).with_name("side_effects_probe.py")


def probe(*args: str) -> dict[str, Any]:
    """The probe's findings, on the same twisted_novnc this test imported."""
    source = str(Path(twisted_novnc.__file__).parent.parent)
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=path),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def write_config(tmp_path: Path, workers: int = 1) -> str:
    config = tmp_path / "daemon.ini"
    config.write_text(
        "[database]\ndsn = host=/nonexistent dbname=sessions\n"
        f"[novnc]\nlisten = tcp:0:interface=127.0.0.1\nworkers = {workers}\n"
        "[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
    )
    return str(config)


@pytest.fixture(scope="module")
def imported() -> dict[str, Any]:
    return probe("import")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return probe("start", write_config(tmp_path_factory.mktemp("one")))


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return probe("build", write_config(tmp_path_factory.mktemp("two"), workers=2))


def test_importing_every_module_changes_nothing_outside_it(imported):
    """Every module of twisted_novnc imported: no library global replaced, no reactor
    installed, descriptor limit, collector, signals, threads and log observers as they were."""
    assert {"twisted_novnc.processes.worker", "twisted_novnc.front.protocol",
            "twisted_novnc.__main__"} <= set(imported["modules"])
    assert imported["import"]["changes"] == []


def test_the_probe_sees_a_library_patch(imported):
    """The probe is not blind: install_patches, run alone, shows as Autobahn's globals
    replaced (the ones importing the front used to replace)."""
    changes = "\n".join(imported["patch"]["changes"])
    for name in ("autobahn.websocket.protocol.hltype", "autobahn.websocket.protocol.hlval",
                 "autobahn.twisted.websocket.hltype", "autobahn.twisted.websocket.hlval"):
        assert f"{name} was replaced by" in changes


def test_building_the_daemon_changes_nothing(daemon):
    """makeService (one process, a real DSN) builds the tree and changes nothing: the
    descriptor limit, the collector, Autobahn and Prometheus stay as they were."""
    assert daemon["build"]["changes"] == []
    logged = "\n".join(daemon["build"]["logged"])
    assert "descriptor limit" not in logged and "NVX" not in logged


def test_starting_the_daemon_makes_start_ups_changes(daemon):
    """Starting the tree raises the soft descriptor limit to the hard one, freezes the
    start-up heap, patches Autobahn and Prometheus, and says so in the log."""
    start = daemon["start"]
    (soft, hard), after = start["RLIMIT_NOFILE"]
    assert soft < hard and after == [hard, hard]
    assert start["frozen"][0] == 0 and start["frozen"][1] > 0
    changes = "\n".join(start["changes"])
    assert "autobahn.websocket.protocol.hltype was replaced" in changes
    assert "prometheus_client.metrics._use_created was replaced by False" in changes
    logged = "\n".join(daemon["start"]["logged"])
    assert "soft limit raised from" in logged and "Autobahn NVX native masking" in logged


def test_building_the_supervisor_changes_nothing(supervisor):
    """workers = 2: building the supervisor's tree (its sockets, launcher and workers are
    made only when it starts) changes nothing either."""
    assert supervisor["build"]["changes"] == []


# -- the services themselves, with fakes -----------------------------------------------------------


def settings(text: str = "") -> Any:
    return parse_config("[database]\ndsn = host=/nonexistent\n" + text)


class Limits:
    """getrlimit and setrlimit for RLIMIT_NOFILE, in memory."""

    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard
        self.reads = 0
        self.sets: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        self.reads += 1
        return self.soft, self.hard

    def setrlimit(self, which: int, value: tuple[int, int]) -> None:
        self.sets.append(value)
        self.soft, self.hard = value


def test_setup_raises_the_limit_once_when_started(logged):
    """Built, nothing is read or set; the first start raises the limit (and logs the room it
    leaves), the second start (twistd calls both) does nothing again."""
    limits = Limits(1024, 4096)
    setup = ProcessSetupService(settings(), getrlimit=limits.getrlimit,
                                setrlimit=limits.setrlimit)
    assert limits.reads == 0 and setup.limit is None
    setup.privilegedStartService()
    assert limits.sets == [(4096, 4096)]
    assert setup.limit == DescriptorLimit(before=1024, soft=4096, hard=4096)
    setup.startService()
    assert limits.sets == [(4096, 4096)] and limits.reads == 1
    texts = [text for _, text in logged]
    assert any("caps this process at about" in text for text in texts)
    assert any("Autobahn NVX native masking" in text for text in texts)


def test_supervisor_setup_leaves_the_limit_alone(logged):
    """A process that relays nothing (the supervisor) never touches its descriptor limit,
    and still gives the settings' warnings."""
    limits = Limits(1024, 4096)
    setup = ProcessSetupService(settings(), relays=False, getrlimit=limits.getrlimit,
                                setrlimit=limits.setrlimit)
    setup.startService()
    assert limits.reads == 0 and setup.limit is None
    assert any("allowed_origins is empty" in text for _, text in logged)


def test_startup_done_freezes_only_when_started():
    """The heap is collected then frozen when the service starts, not when it is made."""
    calls: list[str] = []
    done = StartupDoneService(collect=lambda: calls.append("collect"),
                              freeze=lambda: calls.append("freeze"))
    done.privilegedStartService()
    assert calls == []
    done.startService()
    assert calls == ["collect", "freeze"]


def _order(top: MultiService) -> list[str]:
    """Every service of the tree, depth first, in the order they start."""
    names = []
    for service in top:
        if type(service) is MultiService:
            names += _order(service)
        else:
            names.append(type(service).__name__)
    return names


def _check_order(names: list[str]) -> None:
    setup = names.index("ProcessSetupService")
    assert setup < names.index("ListenerService")
    assert "LogService" not in names or names.index("LogService") < setup
    assert names[-1] == "StartupDoneService" and names.count("StartupDoneService") == 1


def test_every_tree_sets_up_before_listening_and_freezes_last():
    """One process, the supervisor and a worker: setup after the log service and before any
    listener; the freeze after everything else has started."""
    _check_order(_order(make_service(settings(), MemoryReactorClock())))
    _check_order(_order(make_service(settings("[novnc]\nworkers = 2\n"), MemoryReactorClock())))
    sock = socket.socket()
    try:
        shared = [SharedSocket("tcp:0", sock.fileno(), socket.AF_INET)]
        worker, _ = make_worker_service(settings(), MemoryReactorClock(), b"", shared)
    finally:
        sock.close()
    _check_order(_order(worker))
    assert [s for s in worker if isinstance(s, ListenerService)]
