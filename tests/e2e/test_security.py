"""Authentication with the real daemon and the real PostgreSQL: one-time tokens consumed by
SQL, HMAC tokens, and secrets that never reach the log."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
from e2e_support import connect_client as connect
from e2e_support import within
from twisted.internet import reactor

from twisted_novnc.front.auth import mint_token, token_digest
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest_twisted.inlineCallbacks
def test_one_time_token_is_consumed_by_sql(daemon_factory, pg, sessions_table, vnc_server):
    """column + one_time: the first browser connects, a replay gets 4403, and the row's token
    is gone; a wrong token never connects."""
    table = sessions_table.table
    token = "tok-" + uuid.uuid4().hex
    sid = str(uuid.uuid4())
    with pg.cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" ADD COLUMN token_sha256 text')
        cur.execute(
            f'INSERT INTO "{table}" (session_id, vm_ip, vnc_port, status, token_sha256)'
            " VALUES (%s, '127.0.0.1', %s, 'running', %s)",
            (sid, vnc_server.port, token_digest(token)),
        )
    daemon = yield daemon_factory(
        {"auth": {"mode": "column", "token_column": "token_sha256", "one_time": "on"}}
    )
    wrong = yield connect(daemon.port, f"/websockify/{sid}?token=nope")
    assert (yield within(wrong.closed)) == (4403, "forbidden")
    first = yield connect(daemon.port, f"/websockify/{sid}?token={token}")
    yield within(first.when_received(len(RFB_BANNER)))
    replay = yield connect(daemon.port, f"/websockify/{sid}?token={token}")
    assert (yield within(replay.closed)) == (4403, "token already used")
    with pg.cursor() as cur:
        cur.execute(f'SELECT token_sha256 FROM "{table}" WHERE session_id = %s', (sid,))
        assert cur.fetchone() == (None,)
    first.sendClose(1000)
    yield within(first.closed)
    assert token not in daemon.output


@pytest_twisted.inlineCallbacks
def test_hmac_tokens_and_no_secret_in_logs(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """hmac: a minted token connects, a forged one gets 4403 before any waiting; neither the
    tokens nor the secret appear in the log."""
    secret = b"secret-" + uuid.uuid4().hex.encode()
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(secret + b"\n")
    os.chmod(secret_file, 0o600)
    sid = str(uuid.uuid4())
    with pg.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{sessions_table.table}" (session_id, vm_ip, vnc_port, status)'
            " VALUES (%s, '127.0.0.1', %s, 'running')",
            (sid, vnc_server.port),
        )
    daemon = yield daemon_factory(
        {"auth": {"mode": "hmac", "secret_file": str(secret_file)}}, readiness_timeout=60
    )
    good = mint_token(secret, sid, int(reactor.seconds()) + 60)
    forged = mint_token(b"not-the-secret-at-all", sid, int(reactor.seconds()) + 60)
    bad = yield connect(daemon.port, f"/websockify/{sid}?token={forged}")
    assert (yield within(bad.closed, 5)) == (4403, "forbidden")
    client = yield connect(daemon.port, f"/websockify/{sid}?token={good}")
    yield within(client.when_received(len(RFB_BANNER)))
    client.sendClose(1000)
    yield within(client.closed)
    yield within(daemon.when_logged(f"closed {sid}", times=2))
    for text in (good, forged, secret.decode()):
        assert text not in daemon.output


def test_world_readable_secret_stops_start_up(postgres_dsn, sessions_table, tmp_path):
    """A secret file others can read stops start-up with one line naming [auth] secret_file."""
    import subprocess

    from daemon_process import TWISTD, write_config

    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"0123456789abcdef0123")
    os.chmod(secret_file, 0o644)
    config = write_config(
        tmp_path / "c.ini", postgres_dsn, sessions_table,
        {"auth": {"mode": "hmac", "secret_file": str(secret_file)}},
    )
    result = subprocess.run(
        [TWISTD, "--pidfile=", "-n", "novnc", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"{config}: [auth] secret_file:" in result.stderr, result.stderr


def _own_addresses() -> list[str]:
    """127.0.0.1 and every other IPv4 address of this host's interfaces."""
    import ipaddress

    from twisted_novnc.relay.hostaddresses import read_interface_addresses

    others = sorted(
        str(a) for a in read_interface_addresses()
        if isinstance(a, ipaddress.IPv4Address) and not a.is_loopback
    )
    return ["127.0.0.1", *others]


@pytest_twisted.inlineCallbacks
def test_rows_never_reach_the_proxy_host_itself(daemon_factory, pg, sessions_table, vnc_server):
    """allow_self = off: with allowed_networks = everything, a row naming loopback or any of the
    host's interface addresses gets 4403 and no connection reaches the VNC server listening
    there; the same row connects with allow_self = on."""
    sids = {}
    with pg.cursor() as cur:
        for address in _own_addresses():
            sids[address] = str(uuid.uuid4())
            cur.execute(
                f'INSERT INTO "{sessions_table.table}" (session_id, vm_ip, vnc_port, status)'
                " VALUES (%s, %s, %s, 'running')",
                (sids[address], address, vnc_server.port),
            )
    guarded = yield daemon_factory(
        {"upstream": {"allowed_networks": "0.0.0.0/0 ::/0", "allow_self": "off"}}
    )
    for address, sid in sids.items():
        client = yield connect(guarded.port, f"/websockify/{sid}")
        assert (yield within(client.closed)) == (4403, "VM address not allowed"), address
    assert not vnc_server.connections and not vnc_server.lost
    allowed = yield daemon_factory({"upstream": {"allowed_networks": "127.0.0.0/8"}})
    client = yield connect(allowed.port, f"/websockify/{sids['127.0.0.1']}")
    yield within(client.when_received(len(RFB_BANNER)))
    client.sendClose(1000)
    yield within(client.closed)
