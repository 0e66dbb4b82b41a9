"""Plain HTTP requests on the WebSocket listener are logged and counted as HTTP requests, with
their real client and duration, and never as WebSocket connections (front/plainhttp.py).

Each test runs on the fast path and on the stock path, over a StringTransport on a Clock.
"""

from __future__ import annotations

import pytest
from test_front import HANDSHAKE, READY, SID, Wired
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from twisted_novnc.front.plainhttp import MAX_LOGGED_PATH, request_line
from twisted_novnc.front.requesthead import MAX_HEAD


@pytest.fixture(params=[True, False], ids=["fast_path=on", "fast_path=off"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def logged():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "vnc.html").write_text("<title>noVNC</title>")
    return str(tmp_path)


def _requests(logged) -> list[dict]:
    return [e for e in logged if e.get("event") == "http_request"]


def _count(w: Wired, name: str, **labels: str) -> float | None:
    return w.factory.metrics.registry.get_sample_value(name, labels)


def _websocket_outcomes(w: Wired) -> list:
    return [
        sample
        for family in w.factory.metrics.registry.collect()
        if family.name == "twisted_novnc_connections"
        for sample in family.samples
        if sample.name == "twisted_novnc_connections_total"
    ]


def _get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_file_is_one_http_request_with_its_client_and_duration(fast_path, root, logged):
    """A file of [web] root: one http_request line (client, method, path without its query,
    status, duration from accept to close) and http_requests_total{status="200"}; no
    WebSocket outcome."""
    with Wired(fast_path) as w:
        w.factory.web_root = root
        w.clock.advance(0.25)
        w.send(_get("/vnc.html?path=websockify/x%3Ftoken%3Dsecret"))
        assert w.transport.value().startswith(b"HTTP/1.1 200 OK")
        w.clock.advance(0.5)
        w.leave()
    [line] = _requests(logged)
    assert (line["client"], line["method"], line["path"], line["status"]) == (
        "192.0.2.7", "GET", "/vnc.html", 200
    )
    assert line["duration_seconds"] == pytest.approx(0.75)
    assert "secret" not in repr(line)
    assert not [e for e in logged if e.get("event") == "connection_closed"]
    assert _count(w, "twisted_novnc_http_requests_total", status="200") == 1
    assert _count(w, "twisted_novnc_http_request_duration_seconds_count") == 1
    assert _count(w, "twisted_novnc_http_request_duration_seconds_sum") == pytest.approx(0.75)
    assert _websocket_outcomes(w) == []


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /a b HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n", 431),
])
def test_a_malformed_head_is_an_http_request(fast_path, logged, data, status):
    """A head that breaks the grammar is answered 400 / 431 and counted under that status
    with its client, not as a WebSocket connection."""
    with Wired(fast_path) as w:
        w.send(data)
        assert w.transport.value().startswith(f"HTTP/1.1 {status} ".encode())
        w.leave()
    [line] = _requests(logged)
    assert (line["client"], line["status"]) == ("192.0.2.7", status)
    assert _count(w, "twisted_novnc_http_requests_total", status=str(status)) == 1
    assert _websocket_outcomes(w) == []


def test_not_an_upgrade_without_web_root_is_autobahns_426(fast_path, logged):
    """Without [web] root a request that is no upgrade gets Autobahn's 426: an HTTP request."""
    with Wired(fast_path) as w:
        w.send(_get(f"/websockify/{SID}"))
        assert w.transport.value().startswith(b"HTTP/1.1 426 ")
        w.leave()
    [line] = _requests(logged)
    assert (line["status"], line["path"]) == (426, f"/websockify/{SID}")
    assert _count(w, "twisted_novnc_http_requests_total", status="426") == 1
    assert _websocket_outcomes(w) == []


def test_a_missing_file_is_a_404(fast_path, root, logged):
    """A path outside the root's files: 404, counted as such."""
    with Wired(fast_path) as w:
        w.factory.web_root = root
        w.send(_get("/../etc/passwd"))
        w.leave()
    assert [line["status"] for line in _requests(logged)] == [404]
    assert _count(w, "twisted_novnc_http_requests_total", status="404") == 1


def test_no_whole_head_is_an_http_request_without_status(fast_path, logged):
    """A connection that never sends a whole head (here: it times out) counts with status
    none, for as long as it held its socket."""
    with Wired(fast_path) as w:
        w.send(b"GET / HTT")
        w.clock.advance(w.factory.settings.request_timeout)
        assert w.transport.disconnecting
        w.leave()
    [line] = _requests(logged)
    assert (line["status"], line["method"], line["client"]) == ("none", "-", "192.0.2.7")
    assert line["duration_seconds"] == w.factory.settings.request_timeout
    assert _count(w, "twisted_novnc_http_requests_total", status="none") == 1
    assert _websocket_outcomes(w) == []


def test_the_client_behind_a_trusted_proxy_is_the_forwarded_one(fast_path, root, logged):
    """From a trusted proxy, the request is logged under the address its header names."""
    with Wired(fast_path, trusted_proxies=("192.0.2.0/24",)) as w:
        w.factory.web_root = root
        w.send(_get("/vnc.html", "X-Forwarded-For: 198.51.100.9"))
        w.leave()
    assert [line["client"] for line in _requests(logged)] == ["198.51.100.9"]


def test_websocket_connections_are_not_http_requests(fast_path, logged):
    """A WebSocket upgrade ends as a connection_closed line and a WebSocket outcome only."""
    with Wired(fast_path, READY) as w:
        w.send(HANDSHAKE)
        w.leave()
    assert _requests(logged) == []
    assert [e["outcome"] for e in logged if e.get("event") == "connection_closed"] == ["1006"]
    assert _count(w, "twisted_novnc_connections_total", outcome="1006") == 1
    assert _count(w, "twisted_novnc_http_requests_total", status="none") is None


def test_an_upgrade_refused_with_an_http_status_stays_a_websocket_outcome(fast_path, logged):
    """reject = http refuses an upgrade with a status: still a WebSocket outcome (http_400)."""
    with Wired(fast_path, reject="http") as w:
        w.send(HANDSHAKE.replace(b"/websockify/", b"/nope/"))
        w.leave()
    assert _requests(logged) == []
    assert _count(w, "twisted_novnc_connections_total", outcome="http_400") == 1


def test_the_logged_request_line_is_printable_and_bounded():
    """Method and path of any head are printable, the query dropped, the length bounded."""
    assert request_line(b"GET /a?token=x HTTP/1.1\r\n") == ("GET", "/a")
    assert request_line(b"GET /\x1b[31m\xff HTTP/1.1") == ("GET", "/?[31m?")
    assert request_line(b"\r\n") == ("-", "-")
    method, path = request_line(b"GET /" + b"a" * 1000 + b" HTTP/1.1")
    assert len(path) == MAX_LOGGED_PATH + 3 and path.endswith("...")
