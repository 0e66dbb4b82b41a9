"""The viewer page shipped with the package ([web] viewer), in headless Chromium, served by
``twistd -n novnc`` itself and drawing a real Xvnc; and the README's frontend snippet
(``page/frontend.js``), run as a platform's page would.

The page is read as its user reads it: its status line, and the pixels of noVNC's canvas.
Every wait is on the page's own text, a page event or a log line, bounded.
"""

from __future__ import annotations

import os
import signal
import uuid
from urllib.parse import urlencode

import pytest
import pytest_twisted
from browser_harness import SCREEN, within
from db_fixtures import insert_ready, insert_session
from test_novnc import BLUE, EVERYWHERE, GREEN, paint_root
from test_viewer import viewer_messages
from twisted.internet import reactor

from twisted_novnc.front.auth import mint_token

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.integration]

WIDTH, HEIGHT = SCREEN
MESSAGES = viewer_messages()


def viewer_url(port: int, session_id: str, token: str | None = None) -> str:
    query = f"?{urlencode({'token': token})}" if token is not None else ""
    return f"http://127.0.0.1:{port}/vnc/{session_id}{query}"


def text_of(element: str) -> str:
    return f"document.getElementById('{element}').textContent"


def shows(points: list[tuple[int, int]], rgb: tuple[int, int, int], tolerance: int = 2) -> str:
    """A page expression: noVNC's canvas has ``rgb`` at every one of ``points``."""
    checks = " && ".join(
        f"[{x}, {y}].every((v, i) => i === 0 ? c.width > v : c.height > v)"
        f" && Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data.slice(0, 3))"
        f".every((v, i) => Math.abs(v - {list(rgb)}[i]) <= {tolerance})"
        for x, y in points
    )
    canvas = "document.querySelector('#screen canvas')"
    return f"(() => {{ const c = {canvas}; return !!c && {checks}; }})()"


def no_policy_violation(page) -> None:
    """The page ran under its Content-Security-Policy without tripping it."""
    assert "Content Security Policy" not in page.log(), page.log()
    assert "pageerror" not in page.log(), page.log()


@pytest_twisted.inlineCallbacks
def test_the_viewer_url_draws_the_desktop(browser, xvnc, daemon_factory, pg, sessions_table):
    """/vnc/<id> on the daemon's own listener opens noVNC on [novnc] path and draws."""
    yield paint_root(xvnc, BLUE)
    daemon = yield daemon_factory()
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)

    page = yield browser.open(viewer_url(daemon.port, sid))
    try:
        yield page.wait_for(shows(EVERYWHERE, BLUE))
        yield page.wait_for("document.getElementById('status').hidden")
        assert (yield page.evaluate("document.title")) == "tnovnc-test"
        no_policy_violation(page)
    finally:
        yield page.close()
    yield within(daemon.when_logged(rf"http GET /vnc/{sid} 200 from 127\.0\.0\.1"))
    yield within(daemon.when_logged(r"http GET /viewer/novnc/core/rfb\.js 200"))


@pytest_twisted.inlineCallbacks
def test_the_token_in_the_url_opens_the_session(
    browser, xvnc, daemon_factory, pg, sessions_table, tmp_path
):
    """With [auth] mode = hmac the page passes its URL's token on: a minted one draws, none
    gets 4401's message; the token is nowhere in the daemon's log."""
    secret = b"secret-" + uuid.uuid4().hex.encode()
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(secret + b"\n")
    os.chmod(secret_file, 0o600)
    yield paint_root(xvnc, BLUE)
    daemon = yield daemon_factory({"auth": {"mode": "hmac", "secret_file": str(secret_file)}})
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)
    token = mint_token(secret, sid, int(reactor.seconds()) + 60)

    page = yield browser.open(viewer_url(daemon.port, sid, token))
    bare = yield browser.open(viewer_url(daemon.port, sid))
    try:
        yield page.wait_for(shows(EVERYWHERE, BLUE))
        yield bare.wait_for(f"{text_of('detail')}.startsWith('Close code 4401')")
        assert (yield bare.evaluate(text_of("message"))) == MESSAGES[4401]
        no_policy_violation(page)
    finally:
        yield page.close()
        yield bare.close()
    yield within(daemon.when_logged(f"closed {sid}", times=2))
    assert token not in daemon.output and token.split(".")[-1] not in daemon.output


@pytest_twisted.inlineCallbacks
def test_a_held_session_says_waiting_then_connects(
    browser, xvnc, daemon_factory, pg, pg_factory, sessions_table
):
    """While the proxy holds the browser the page says "Waiting for your desktop…" and counts
    the seconds; the COMMIT 3 s later connects it and the desktop is drawn."""
    db = sessions_table
    yield paint_root(xvnc, GREEN)
    daemon = yield daemon_factory()
    sid = str(uuid.uuid4())
    insert_session(pg, db, sid, status="booting")

    page = yield browser.open(viewer_url(daemon.port, sid))
    try:
        yield page.wait_for(f"{text_of('message')} === 'Waiting for your desktop…'")
        yield within(daemon.when_logged(f"request {sid} from"))
        # The page's own counter measures the hold: no sleep here.
        yield page.wait_for(f"parseInt({text_of('elapsed')}) >= 3")
        assert (yield page.evaluate(text_of("message"))) == "Waiting for your desktop…"

        backend = pg_factory(autocommit=False)
        with backend.cursor() as cur:
            cur.execute(
                f'UPDATE "{db.table}" SET vm_ip = %s, "{db.port_column}" = %s, status = %s'
                " WHERE session_id = %s",
                ("127.0.0.1", xvnc.rfb_port, "running", sid),
            )
        backend.commit()

        yield page.wait_for(shows(EVERYWHERE, GREEN))
        yield page.wait_for("document.getElementById('status').hidden")
        assert (yield page.evaluate(text_of("elapsed"))) == ""
        no_policy_violation(page)
    finally:
        yield page.close()


@pytest_twisted.inlineCallbacks
def test_each_refusal_shows_its_message(browser, daemon_factory, pg, sessions_table):
    """Ended (4410), never ready (4504), never created (4404), and from an Origin outside
    allowed_origins (4403): the page says so in words, with the code, and stays put."""
    db = sessions_table
    daemon = yield daemon_factory(readiness_timeout=1)
    strict = yield daemon_factory(allowed_origins="https://platform.example")
    ended, booting, absent, elsewhere = (str(uuid.uuid4()) for _ in range(4))
    insert_session(pg, db, ended, "127.0.0.1", 5900, "ended")
    insert_session(pg, db, booting, status="booting")
    insert_session(pg, db, elsewhere, "127.0.0.1", 5900, "running")
    expected = {
        (daemon.port, ended): 4410,
        (daemon.port, booting): 4504,
        (daemon.port, absent): 4404,
        (strict.port, elsewhere): 4403,
    }
    pages = {}
    try:
        for port, sid in expected:
            pages[sid] = yield browser.open(viewer_url(port, sid))
        for (_, sid), code in expected.items():
            page = pages[sid]
            yield page.wait_for(f"{text_of('detail')}.startsWith('Close code {code}')")
            assert (yield page.evaluate(text_of("message"))) == MESSAGES[code]
            assert (yield page.evaluate(text_of("elapsed"))) == ""
            no_policy_violation(page)
    finally:
        for page in pages.values():
            yield page.close()


@pytest_twisted.inlineCallbacks
def test_1001_reconnects_to_the_restarted_daemon(
    browser, xvnc, daemon_factory, pg, sessions_table
):
    """SIGTERM drains the daemon: its relay ends with 1001, the page says the service is
    restarting and reconnects, with backoff, to the daemon started again on the same port."""
    yield paint_root(xvnc, BLUE)
    first = yield daemon_factory(drain_timeout=1)
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)

    page = yield browser.open(viewer_url(first.port, sid))
    try:
        yield page.wait_for(shows(EVERYWHERE, BLUE))
        first.transport.signalProcess(signal.SIGTERM)
        yield page.wait_for(f"{text_of('detail')}.includes('Close code 1001')")
        assert MESSAGES[1001] in (yield page.evaluate(text_of("detail")))
        yield within(first.ended)

        # A new colour, so the drawing checked below is the new connection's.
        yield paint_root(xvnc, GREEN)
        second = yield daemon_factory(listen=f"tcp:{first.port}:interface=127.0.0.1")
        yield page.wait_for(shows(EVERYWHERE, GREEN), seconds=30)
        yield page.wait_for("document.getElementById('status').hidden")
        yield within(second.when_logged(f"request {sid} from"))
        no_policy_violation(page)
    finally:
        yield page.close()


@pytest_twisted.inlineCallbacks
def test_4503_reconnects_and_waits_again(
    browser, xvnc, daemon_factory, pg, pg_factory, sessions_table
):
    """A browser held when its daemon stops gets 4503; the page reconnects to the daemon
    started again, waits there, and connects on the COMMIT."""
    db = sessions_table
    yield paint_root(xvnc, BLUE)
    first = yield daemon_factory()
    sid = str(uuid.uuid4())
    insert_session(pg, db, sid, status="booting")

    page = yield browser.open(viewer_url(first.port, sid))
    try:
        yield within(first.when_logged(f"request {sid} from"))
        first.transport.signalProcess(signal.SIGTERM)
        yield page.wait_for(f"{text_of('detail')}.includes('Close code 4503')")
        assert MESSAGES[4503] in (yield page.evaluate(text_of("detail")))
        yield within(first.ended)

        second = yield daemon_factory(listen=f"tcp:{first.port}:interface=127.0.0.1")
        yield within(second.when_logged(f"request {sid} from"), 30)
        yield page.wait_for(f"{text_of('message')} === 'Waiting for your desktop…'")
        insert_ready_after(pg_factory, db, sid, xvnc.rfb_port)
        yield page.wait_for(shows(EVERYWHERE, BLUE))
        yield page.wait_for("document.getElementById('status').hidden")
        no_policy_violation(page)
    finally:
        yield page.close()


def insert_ready_after(pg_factory, db, sid: str, port: int) -> None:
    """The backend commits the VM's address of a session that was booting."""
    backend = pg_factory(autocommit=False)
    with backend.cursor() as cur:
        cur.execute(
            f'UPDATE "{db.table}" SET vm_ip = %s, "{db.port_column}" = %s, status = %s'
            " WHERE session_id = %s",
            ("127.0.0.1", port, "running", sid),
        )
    backend.commit()


# -- the README's frontend snippet ------------------------------------------------------------


def frontend_url(web_root: str, daemon_port: int, session_id: str) -> str:
    query = urlencode({"proxy": f"ws://127.0.0.1:{daemon_port}", "session": session_id})
    return f"{web_root}/page/frontend.html?{query}"


@pytest_twisted.inlineCallbacks
def test_the_readme_snippet_draws_and_reads_close_codes(
    browser, web_root, xvnc, daemon_factory, pg, sessions_table
):
    """README's snippet (page/frontend.js, importing '@novnc/novnc' as noVNC 1.7 exports it)
    draws the desktop, and hands its showWhy the close code and reason of a refusal."""
    yield paint_root(xvnc, BLUE)
    # A session never created is refused (4404) once readiness_timeout has passed.
    daemon = yield daemon_factory(readiness_timeout=1)
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)

    page = yield browser.open(frontend_url(web_root, daemon.port, sid))
    absent = yield browser.open(frontend_url(web_root, daemon.port, str(uuid.uuid4())))
    try:
        yield page.when_event(type="connect")
        yield page.wait_for_colour(EVERYWHERE, BLUE)
        why = yield absent.when_event(type="why")
        assert (why["code"], why["reason"]) == (4404, "no such session")
    finally:
        yield page.close()
        yield absent.close()
