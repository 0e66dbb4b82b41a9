"""The smaller holes of the second security round, each shown on the real daemon: a zoned
IPv6 vm_ip, dotfiles under [web] root, made-up close codes in metrics, and hmac tokens that
expire too far ahead."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
from db_fixtures import insert_ready, insert_session
from e2e_support import connect_client as connect
from e2e_support import exchange, http_get, metric_values, within
from twisted.internet import reactor

from twisted_novnc.front.auth import mint_token
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest_twisted.inlineCallbacks
def test_zoned_ipv6_vm_ip_is_a_bad_address(daemon_factory, pg, sessions_table):
    """A row naming fd00::2%lo inside allowed_networks gets 4403 'bad VM address', and the
    daemon logs no traceback (it used to reach the connect and fail there, critically)."""
    sid = str(uuid.uuid4())
    insert_session(pg, sessions_table, sid, "fd00::2%lo", 5900, "running")
    daemon = yield daemon_factory({"upstream": {"allowed_networks": "fd00::/8"}})
    client = yield connect(daemon.port, f"/websockify/{sid}")
    assert (yield within(client.closed)) == (4403, "bad VM address")
    yield within(daemon.when_logged(f"closed {sid}"))
    assert "Traceback" not in daemon.output and "CRITICAL" not in daemon.output.upper()


@pytest_twisted.inlineCallbacks
def test_dotfiles_are_never_served(daemon_factory, tmp_path):
    """.git/config, .env and a dot-directory's files under [web] root are 404s; vnc.html is
    served."""
    root = tmp_path / "novnc"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "config").write_text("[remote] secret-remote")
    (root / ".env").write_text("SECRET=dotenv")
    (root / "vnc.html").write_text("<title>noVNC</title>")
    daemon = yield daemon_factory({"web": {"root": str(root)}})
    page = yield exchange(daemon.port, b"GET /vnc.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert page.startswith(b"HTTP/1.1 200 OK") and page.endswith(b"<title>noVNC</title>")
    for target in ("/.git/config", "/.env", "/%2egit/config", "/.git/"):
        answer = yield exchange(
            daemon.port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 404 "), (target, answer[:40])
        assert b"secret" not in answer.lower() and b"dotenv" not in answer.lower(), target


@pytest_twisted.inlineCallbacks
def test_made_up_close_codes_share_one_metrics_label(
    daemon_factory, pg, sessions_table, vnc_server
):
    """Browsers closing with codes nobody defined (3333, 4999) are counted as outcome="other",
    not one new series per code; 1000 keeps its own label."""
    daemon = yield daemon_factory({"admin": {"listen": "tcp:0:interface=127.0.0.1"}})
    for code in (3333, 4999, 1000):
        sid = str(uuid.uuid4())
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        client = yield connect(daemon.port, f"/websockify/{sid}")
        yield within(client.when_received(len(RFB_BANNER)))
        client.sendClose(code)
        yield within(client.closed)
        yield within(daemon.when_logged(f"closed {sid}"))
    status, body = yield http_get(daemon.admin_port, "/metrics")
    assert status == 200
    values = metric_values(body.decode())
    totals = {
        dict(labels)["outcome"]: value
        for (name, labels), value in values.items()
        if name == "twisted_novnc_connections_total"
    }
    assert totals.get("other") == 2 and totals.get("1000") == 1, totals
    assert "3333" not in totals and "4999" not in totals


@pytest_twisted.inlineCallbacks
def test_hmac_token_expiring_beyond_max_token_age_is_refused(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """With max_token_age = 600, a genuine token that expires in a year is refused 4403; one
    that expires in 5 minutes connects."""
    secret = b"secret-" + uuid.uuid4().hex.encode()
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(secret)
    os.chmod(secret_file, 0o600)
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    daemon = yield daemon_factory(
        {"auth": {"mode": "hmac", "secret_file": str(secret_file), "max_token_age": "600"}}
    )
    now = int(reactor.seconds())
    far_token = mint_token(secret, sid, now + 365 * 86400)
    far = yield connect(daemon.port, f"/websockify/{sid}?token={far_token}")
    assert (yield within(far.closed)) == (4403, "forbidden")
    near_token = mint_token(secret, sid, now + 300)
    near = yield connect(daemon.port, f"/websockify/{sid}?token={near_token}")
    yield within(near.when_received(len(RFB_BANNER)))
    near.sendClose(1000)
    yield within(near.closed)
