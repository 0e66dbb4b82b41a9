"""On SIGTERM /readyz turns 503 at once and the tree stops only [novnc] drain_delay later
(processes/drain.py ShutdownNotice); the admin listener is the last thing to stop."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twisted_novnc.config import parse_config
from twisted_novnc.database.embedded import EmbeddedPostgresService
from twisted_novnc.operations.admin import AdminSite, admin_site, serve_workers, unserved_site
from twisted_novnc.operations.metrics import LiveState, Metrics
from twisted_novnc.processes.drain import ShutdownNotice
from twisted_novnc.processes.listeners import ListenerService
from twisted_novnc.processes.service import make_service
from twisted_novnc.processes.startup import StartupDoneService
from twisted_novnc.processes.supervisor import Supervisor


def _get(site: AdminSite, path: str) -> tuple[int, dict]:
    """GET ``path`` on ``site`` over a StringTransport: (status, JSON body)."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _ready_site(clock: Clock) -> AdminSite:
    live = LiveState(database_reachable=lambda: True, listen_connected=lambda: True)
    metrics = Metrics(live=live)
    return admin_site(metrics, clock)


def test_readyz_is_503_once_shutting_down_and_healthz_stays():
    """A ready process answers /readyz 503 ("shutting down") from the moment it stops;
    /healthz still answers 200."""
    site = _ready_site(Clock())
    assert _get(site, "/readyz")[0] == 200
    site.shutting_down = True
    code, body = _get(site, "/readyz")
    assert code == 503 and body == {"ready": False, "shutting_down": True,
                                     "reason": "shutting down"}
    assert _get(site, "/healthz")[0] == 200


def test_readyz_is_503_once_shutting_down_with_workers():
    """The supervisor's site (pages given later by serve_workers) says 503 too, without asking
    the workers."""

    class NoWorkers:
        count, restarts = 0, 0

        def alive(self):
            return 0

        def pids(self):
            return {}

        def ask_all(self, what):
            raise AssertionError("asked the workers")

    site = unserved_site(Clock())
    serve_workers(site, NoWorkers(), None)
    site.shutting_down = True
    assert _get(site, "/readyz")[0] == 503


def test_notice_holds_the_stop_for_drain_delay():
    """Stopping the notice turns /readyz 503 at once and fires drain_delay seconds later."""
    clock = Clock()
    site = _ready_site(clock)
    notice = ShutdownNotice([site], 5.0, clock)
    notice.startService()
    stopped = notice.stopService()
    assert site.shutting_down and stopped is not None
    clock.advance(4.9)
    assert not stopped.called and _get(site, "/readyz")[0] == 503
    clock.advance(0.1)
    assert stopped.called and not clock.getDelayedCalls()


def test_notice_ends_early_when_asked():
    """end_delay (a second SIGTERM) lets the stop go on at once."""
    clock = Clock()
    notice = ShutdownNotice([_ready_site(clock)], 5.0, clock)
    notice.startService()
    stopped = notice.stopService()
    notice.end_delay()
    assert stopped is not None and stopped.called and not clock.getDelayedCalls()


def test_no_delay_without_an_admin_site_or_with_zero():
    """Nothing could notice without an admin listener, and 0 means no delay: no wait."""
    clock = Clock()
    for notice in (ShutdownNotice([], 5.0, clock), ShutdownNotice([_ready_site(clock)], 0, clock)):
        notice.startService()
        assert notice.stopService() is None
    assert not clock.getDelayedCalls()


def _tree(workers: int) -> list[object]:
    settings = parse_config(
        f"[novnc]\nworkers = {workers}\ndrain_delay = 3\n[admin]\nlisten = tcp:0\n"
        "[database]\ndsn = embedded\n"
    )
    return list(make_service(settings, MemoryReactorClock()))


def test_every_tree_stops_the_notice_first_and_the_admin_listener_after_the_database():
    """In both trees (stopped last child first): the notice stops first (only the start-up
    freeze is after it), then what serves, then the embedded database, and the admin listener
    after all of them."""
    for workers in (1, 2):
        tree = _tree(workers)
        assert isinstance(tree[-1], StartupDoneService)
        notice = tree[-2]
        assert isinstance(notice, ShutdownNotice) and notice.delay == 3 and notice.sites
        admin = [i for i, s in enumerate(tree) if isinstance(s, ListenerService) and s.role]
        embedded = [i for i, s in enumerate(tree) if isinstance(s, EmbeddedPostgresService)]
        assert admin and embedded and max(admin) < min(embedded)
        if workers > 1:
            supervisor = [i for i, s in enumerate(tree) if isinstance(s, Supervisor)]
            assert min(embedded) < min(supervisor)
