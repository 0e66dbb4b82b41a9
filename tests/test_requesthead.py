"""The strict request-head check that runs before Autobahn's lenient parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_front import HANDSHAKE, TCPLikeTransport, Wired
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from twisted_novnc.front.protocol import ClosedAtAccept
from twisted_novnc.front.requesthead import MAX_HEAD, BadHead, check_head, head_end

GOOD = b"GET /websockify/x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n"


def test_well_formed_head_passes():
    """An ordinary upgrade request passes, with its end found."""
    assert head_end(GOOD + b"\x82\x80") == len(GOOD)
    check_head(GOOD)


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\rHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\x0bHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\x85Host: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\r\n Host: x\r\n\r\n",
    ],
    ids=["method", "version", "no-colon", "space-colon", "bare-cr", "vt", "nel", "obs-fold"],
)
def test_smuggling_shapes_are_refused(head):
    """Lines Autobahn would split or misread differently from a front proxy get 400."""
    with pytest.raises(BadHead) as e:
        check_head(head)
    assert e.value.status == 400


def test_oversized_head_is_431():
    """A head that has not ended within MAX_HEAD bytes is refused with 431."""
    assert head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 100)) is None
    with pytest.raises(BadHead) as e:
        head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
    assert e.value.status == 431


@given(st.binary(max_size=2000))
def test_never_raises_anything_else(data):
    """Arbitrary bytes give an end, None, or BadHead; nothing else."""
    try:
        end = head_end(data)
        if end is not None:
            check_head(data[:end])
    except BadHead:
        pass


# -- connections still sending their head, counted per peer address -----------------------------

@pytest.fixture(params=[True, False], ids=["fast_path=on", "fast_path=off"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Each test on the fast path, then on the stock path."""
    return bool(request.param)


def _accept(w, peer: str):
    """What the listener does for a new connection from ``peer``: build, then connect; None
    when the connection is closed at accept."""
    protocol = w.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    if isinstance(protocol, ClosedAtAccept):
        return None
    protocol.makeConnection(TCPLikeTransport(peerAddress=IPv4Address("TCP", peer, 40000)))
    return protocol


def test_one_peer_cannot_hold_more_than_max_per_ip_unfinished_heads(fast_path):
    """Beyond max_per_ip connections still sending their head, a peer's new connection is
    closed at accept (logged once a second at most); another peer still connects."""
    with Wired(fast_path, max_per_ip=3) as w:  # w's own connection is one
        held = [_accept(w, "127.0.0.1") for _ in range(2)]
        with capturedLogs() as events:
            assert _accept(w, "127.0.0.1") is None
            assert _accept(w, "127.0.0.1") is None
        assert [e["peer"] for e in events if "request head" in e["log_format"]] == ["127.0.0.1"]
        assert _accept(w, "127.0.0.2") is not None
        assert w.factory.unfinished == {"127.0.0.1": 3, "127.0.0.2": 1}
        held[0].connectionLost(Failure(ConnectionDone()))  # a connection gone: released
        assert _accept(w, "127.0.0.1") is not None
        assert _accept(w, "127.0.0.1") is None


@pytest.mark.parametrize(
    "head",
    [HANDSHAKE, b"GET / HTTP/1.0\r\n\r\n", b"GET /" + b"x" * (MAX_HEAD + 8)],
    ids=["upgrade", "bad head", "head too large"],
)
def test_a_head_read_whole_is_no_longer_unfinished(fast_path, head):
    """A connection leaves the count once its head is in, whatever the head holds."""
    with Wired(fast_path, max_per_ip=1) as w:
        assert _accept(w, "127.0.0.1") is None
        w.send(head)
        assert not w.factory.unfinished
        assert _accept(w, "127.0.0.1") is not None
        w.leave()


def test_a_head_in_pieces_is_unfinished_until_its_end(fast_path):
    """Half a head still counts."""
    with Wired(fast_path, max_per_ip=1) as w:
        w.send(GOOD[:20])
        assert w.factory.unfinished == {"127.0.0.1": 1}
        assert _accept(w, "127.0.0.1") is None


def test_trusted_proxies_are_not_counted(fast_path):
    """A trusted proxy's connections carry many clients: none is counted or refused."""
    with Wired(fast_path, max_per_ip=1, trusted_proxies=("127.0.0.0/8",)) as w:
        assert all(_accept(w, "127.0.0.1") is not None for _ in range(5))
        assert not w.factory.unfinished
        assert _accept(w, "10.1.2.3") is not None and _accept(w, "10.1.2.3") is None


def test_proxy_protocol_peers_are_not_counted(fast_path):
    """A peer in proxy_protocol_from (a HAProxy sending PROXY headers) carries many clients,
    whose addresses come only with the header: its connections are never capped as one."""
    with Wired(fast_path, max_per_ip=1, proxy_protocol_from=("127.0.0.0/8",)) as w:
        assert all(_accept(w, "127.0.0.1") is not None for _ in range(5))
        assert not w.factory.unfinished
        assert _accept(w, "10.1.2.3") is not None and _accept(w, "10.1.2.3") is None
