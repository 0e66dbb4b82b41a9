"""The drain with dsn = embedded, in both modes: /readyz is 503 from the SIGTERM on and the
admin listener answers through the drain; the live relay ends with 1001; the embedded database
stops only after the relays (the single process's drain, or every worker)."""

from __future__ import annotations

import os
import re
import signal

import psycopg2
import pytest
import pytest_twisted
from daemon_process import DaemonProcess, start_daemon, stop_daemon, write_config
from db_fixtures import insert_ready
from e2e_support import connect_session, http_get, new_id, until, within

from twisted_novnc.config import parse_config
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_embedded_database_stops_after_the_relays(scratch_dir, tmp_path, vnc_server, workers):
    """SIGTERM with a live relay on the embedded database: 503 at once, still served during
    drain_delay, 1001 after drain_timeout, and only then the cluster stops."""
    db = parse_config("[database]\nport_column = vnc_port\n").database
    sections = {
        "database": {"embedded_dir": os.path.join(scratch_dir, "pg")},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    }
    config = write_config(tmp_path / "embedded.ini", "embedded", db, sections,
                          drain_delay=2, drain_timeout=1, workers=workers)
    daemon = DaemonProcess()
    try:
        yield start_daemon(config, tmp_path, daemon)
        dsn = re.search(r"PostgreSQL cluster in .*?, dsn '([^']*)'", daemon.output)[1]
        pg = psycopg2.connect(dsn)
        pg.autocommit = True
        try:
            held, late = new_id(), new_id()
            insert_ready(pg, db, held, vnc_server.port)
            insert_ready(pg, db, late, vnc_server.port)
        finally:
            pg.close()
        client = yield connect_session(daemon.port, held)
        assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER
        yield until(  # every worker listens for changes
            lambda: http_get(daemon.admin_port, "/readyz").addCallback(lambda r: r[0] == 200)
        )

        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.when_logged(r"shutting down: /readyz answers 503"))
        assert (yield http_get(daemon.admin_port, "/readyz"))[0] == 503
        newcomer = yield connect_session(daemon.port, late)  # served during drain_delay
        assert (yield within(newcomer.when_received(len(RFB_BANNER)))) == RFB_BANNER
        yield within(daemon.when_logged(r"draining: "))
        code, body = yield http_get(daemon.admin_port, "/readyz")  # still answering
        assert code == 503 and b"shutting down" in body
        for browser in (client, newcomer):
            assert (yield within(browser.closed)) == (1001, "server shutting down")
        assert (yield within(daemon.ended, 30)) in (0, None), daemon.output[-3000:]
    finally:
        yield stop_daemon(daemon)
    relays_done = daemon.output.rindex("all workers stopped" if workers > 1 else "drained")
    assert relays_done < daemon.output.index("stopped the PostgreSQL cluster"), daemon.output
