"""Slot squatting with the real daemon (issue 16): clients that know a session id but hold no
valid token, and never finish the close handshake, cannot lock the session's owner out under
``max_per_session = 1``, in ``hmac`` and in ``column`` mode; each of them is cut off after the
refusal's short close timeout; and every spelling of one UUID counts as one session."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
from db_fixtures import insert_session
from e2e_support import connect_client, connect_session, within
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from twisted_novnc.front.auth import mint_token, token_digest
from twisted_novnc.front.protocol import REFUSAL_CLOSE_TIMEOUT
from twisted_novnc.testing import RFB_BANNER, upgrade_request

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

#: How long a squatter may wait for the daemon to drop it: the close timeout, the abort grace
#: and a generous margin for a loaded machine.
DROP_LIMIT = 15.0


class Squatter(Protocol):
    """Sends an upgrade request, then reads nothing (its reading is paused) and never answers
    the close frame; ``lost`` fires with what it read once the daemon has dropped it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()
        self.started = 0.0
        self.ended = 0.0

    def connectionMade(self) -> None:
        self.started = reactor.seconds()
        self.transport.write(upgrade_request(self.path))  # type: ignore[union-attr]
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.ended = reactor.seconds()
        self.lost.callback(self.received)

    def close_code(self) -> int:
        """The code of the close frame after the 101 (a short, unmasked server frame)."""
        head, _, frame = self.received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), self.received[:200]
        assert frame[0] == 0x88, frame
        return int.from_bytes(frame[2:4], "big")


def squat(port: int, path: str) -> defer.Deferred[Squatter]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Squatter(path))


@pytest_twisted.inlineCallbacks
def dropped(squatters: list[Squatter], codes: list[int]):
    """Every squatter, let read again, was refused with its code and then dropped by the
    daemon no sooner than the close timeout and within DROP_LIMIT."""
    for squatter in squatters:
        squatter.transport.resumeProducing()  # type: ignore[union-attr]
    for squatter, code in zip(squatters, codes, strict=True):
        yield within(squatter.lost, DROP_LIMIT)
        assert squatter.close_code() == code
        assert squatter.ended - squatter.started >= REFUSAL_CLOSE_TIMEOUT - 0.05


@pytest_twisted.inlineCallbacks
def test_hmac_squatters_do_not_lock_out_the_owner(daemon_factory, pg, sessions_table,
                                                  vnc_server, tmp_path):
    """hmac, max_per_session = 1: squatters with missing, forged, other-session and
    too-far-ahead tokens, still connected and never answering their close, do not stop the
    owner's valid token from relaying; each squatter is dropped after the close timeout."""
    secret = b"secret-" + uuid.uuid4().hex.encode()
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(secret)
    os.chmod(secret_file, 0o600)
    sid = str(uuid.uuid4())
    insert_session(pg, sessions_table, sid, "127.0.0.1", vnc_server.port, "running")
    daemon = yield daemon_factory(
        {"auth": {"mode": "hmac", "secret_file": str(secret_file), "max_token_age": "3600"}},
        max_per_session=1,
    )
    now = int(reactor.seconds())
    bad = [
        ("", 4401),
        ("?token=" + mint_token(b"not-the-secret-at-all", sid, now + 60), 4403),
        ("?token=" + mint_token(secret, str(uuid.uuid4()), now + 60), 4403),
        ("?token=" + mint_token(secret, sid, now + 7200), 4403),
    ] * 2
    squatters = []
    for query, _ in bad:
        squatters.append((yield squat(daemon.port, f"/websockify/{sid}{query}")))
    yield within(daemon.when_logged(f"refused {sid}", times=len(bad)))
    owner = yield connect_session(daemon.port, sid, f"?token={mint_token(secret, sid, now + 60)}")
    yield within(owner.when_received(len(RFB_BANNER)))
    assert daemon.count(f"closed {sid}") == 0, "the squatters were still connected"
    yield dropped(squatters, [code for _, code in bad])
    owner.sendClose(1000)
    assert (yield within(owner.closed)) == (1000, None)


@pytest_twisted.inlineCallbacks
def test_column_squatters_do_not_lock_out_the_owner(daemon_factory, pg, sessions_table,
                                                    vnc_server):
    """column, max_per_session = 1: a squatter waiting with a wrong token before the row
    exists is refused once the row (vm_ip still NULL) is committed; more squatters with wrong
    or no tokens are refused at once; the owner's token waits, counted, and relays once vm_ip
    is committed; every squatter is dropped after the close timeout."""
    table = sessions_table.table
    with pg.cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" ADD COLUMN token_sha256 text')
    sid = str(uuid.uuid4())
    token = "tok-" + uuid.uuid4().hex
    daemon = yield daemon_factory(
        {"auth": {"mode": "column", "token_column": "token_sha256"}}, max_per_session=1,
    )
    waiting = f"request {sid} from 127.0.0.1: waiting for readiness"
    early = yield squat(daemon.port, f"/websockify/{sid}?token=early-guess")
    yield within(daemon.when_logged(waiting))
    with pg.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{table}" (session_id, vm_ip, vnc_port, status, token_sha256)'
            " VALUES (%s, NULL, NULL, 'pending', %s)",
            (sid, token_digest(token)),
        )
    yield within(daemon.when_logged(f"refused {sid}"))
    later = [("?token=guess-1", 4403), ("?token=guess-2", 4403), ("", 4401), ("", 4401)]
    squatters = [early]
    for query, _ in later:
        squatters.append((yield squat(daemon.port, f"/websockify/{sid}{query}")))
    yield within(daemon.when_logged(f"refused {sid}", times=1 + len(later)))
    owner = yield connect_session(daemon.port, sid, f"?token={token}")
    yield within(daemon.when_logged(waiting, times=4))  # early, two guesses, the owner
    with pg.cursor() as cur:
        cur.execute(
            f"UPDATE \"{table}\" SET vm_ip = '127.0.0.1', vnc_port = %s, status = 'running'"
            " WHERE session_id = %s",
            (vnc_server.port, sid),
        )
    yield within(owner.when_received(len(RFB_BANNER)))
    yield dropped(squatters, [4403] + [code for _, code in later])
    owner.sendClose(1000)
    assert (yield within(owner.closed)) == (1000, None)


@pytest_twisted.inlineCallbacks
def test_every_spelling_of_a_uuid_is_one_session(daemon_factory, pg, sessions_table,
                                                 vnc_server):
    """max_per_session = 1 counts the canonical id: while one browser waits on the lower-case
    id, the upper-case spelling of it gets 4429; the first then relays."""
    sid = str(uuid.uuid4())
    daemon = yield daemon_factory(max_per_session=1)
    first = yield connect_session(daemon.port, sid)
    yield within(daemon.when_logged(f"request {sid} from .*: waiting for readiness"))
    second = yield connect_client(daemon.port, f"/websockify/{sid.upper()}")
    assert (yield within(second.closed)) == (4429, "too many connections")
    insert_session(pg, sessions_table, sid, "127.0.0.1", vnc_server.port, "running")
    yield within(first.when_received(len(RFB_BANNER)))
    first.sendClose(1000)
    assert (yield within(first.closed)) == (1000, None)
