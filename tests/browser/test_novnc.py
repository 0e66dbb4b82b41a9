"""The real noVNC client in headless Chromium, through ``twistd -n novnc``, to a real Xvnc.

Each test starts its own Xvnc and daemon (on its own sessions table); the browser and the page
server are shared by the module. Every wait is on an event (a page event, a log line, an X
client's output, a page condition polled by Playwright) and bounded.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

import pytest
import pytest_twisted
from browser_harness import SCREEN, XClient, within
from db_fixtures import insert_ready, insert_session

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.integration]

BLUE = (0x33, 0x66, 0xCC)
GREEN = (0x22, 0xAA, 0x44)
WIDTH, HEIGHT = SCREEN
#: Corners and centre of the framebuffer.
EVERYWHERE = [(0, 0), (WIDTH - 1, 0), (WIDTH // 2, HEIGHT // 2), (0, HEIGHT - 1),
              (WIDTH - 1, HEIGHT - 1)]


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)



def page_url(web_root: str, daemon_port: int, session_id: str) -> str:
    ws = f"ws://127.0.0.1:{daemon_port}/websockify/{session_id}"
    return f"{web_root}/page/index.html?{urlencode({'ws': ws})}"


@pytest_twisted.inlineCallbacks
def paint_root(xvnc, rgb):
    """Set the X root window's colour (it outlives the client: Xvnc runs with -noreset)."""
    client = XClient.run(xvnc, "paint", hex_colour(rgb))
    code = yield within(client.ended)
    assert code == 0, client.output


@pytest_twisted.inlineCallbacks
def test_connect_and_render(browser, web_root, xvnc, daemon_factory, pg, sessions_table):
    """noVNC connects through the daemon and draws the X server's root colour."""
    yield paint_root(xvnc, BLUE)
    daemon = yield daemon_factory()
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)

    page = yield browser.open(page_url(web_root, daemon.port, sid))
    try:
        yield page.when_event(type="connect")
        name = yield page.when_event(type="desktopname")
        assert name["name"] == "tnovnc-test"
        yield page.wait_for_colour(EVERYWHERE, BLUE)
        yield within(xvnc.when_line(lambda fd, line: "Connections: accepted" in line))

        # The browser leaves: noVNC reports a clean disconnect (its close code is 1005, so none
        # is asserted) and the daemon closes its connection to the VNC server.
        yield page.evaluate("tnovnc.rfb.disconnect()")
        event = yield page.when_event(type="disconnect")
        assert event["clean"] is True
        yield within(xvnc.when_line(lambda fd, line: "Connections: closed" in line))
        assert "Clean disconnection" in xvnc.output, xvnc.output  # an EOF, not a reset
    finally:
        yield page.close()


@pytest_twisted.inlineCallbacks
def test_keyboard_and_mouse_reach_the_x_server(
    browser, web_root, xvnc, daemon_factory, pg, sessions_table
):
    """Clicks and key presses in the page arrive at an X client as X events."""
    recorder = XClient.run(xvnc, "record", hex_colour(GREEN))
    try:
        ready = yield within(recorder.when_event(type="ready"))
        assert ready["focused"] is True
        daemon = yield daemon_factory()
        sid = str(uuid.uuid4())
        insert_ready(pg, sessions_table, sid, xvnc.rfb_port)

        page = yield browser.open(page_url(web_root, daemon.port, sid))
        try:
            yield page.when_event(type="connect")
            # The recorder's window covers the screen: once noVNC draws it, clicks land on it.
            yield page.wait_for_colour(EVERYWHERE, GREEN)

            yield page.click(200, 150)
            yield within(recorder.when_event(type="button", button=1))
            yield page.click(40, 30, button="right")
            yield within(recorder.when_event(type="button", button=3))
            # The click focused noVNC's canvas, so the keyboard now types into the VNC session.
            for key in ("q", "Shift+A", "Enter"):
                yield page.press(key)
            yield within(recorder.when_event(type="key", keysym="Return"))
        finally:
            yield page.close()
    finally:
        yield recorder.stop()

    buttons = [(e["button"], e["x"], e["y"]) for e in recorder.events if e["type"] == "button"]
    assert buttons == [(1, 200, 150), (3, 40, 30)]
    keys = [e["keysym"] for e in recorder.events if e["type"] == "key"]
    assert [k for k in keys if not k.startswith("Shift")] == ["q", "A", "Return"], keys
    assert "Shift_L" in keys or "Shift_R" in keys, keys


@pytest_twisted.inlineCallbacks
def test_page_opened_before_commit_connects_after_it(
    browser, web_root, xvnc, daemon_factory, pg, pg_factory, sessions_table
):
    """The page is held connecting while the row has no vm_ip; the COMMIT connects it."""
    db = sessions_table
    yield paint_root(xvnc, BLUE)
    daemon = yield daemon_factory()
    sid = str(uuid.uuid4())
    insert_session(pg, db, sid, status="booting")

    page = yield browser.open(page_url(web_root, daemon.port, sid))
    try:
        yield page.when_event(type="created")
        yield within(daemon.when_logged(f"request {sid} from"))
        # The upgrade is held: the page's socket is still CONNECTING and noVNC still waits.
        assert (yield page.evaluate("tnovnc.sockets.map((ws) => ws.readyState)")) == [0]
        status = yield page.evaluate("document.getElementById('status').textContent")
        assert status == "connecting"
        assert page.types() == ["created"], page.log()

        backend = pg_factory(autocommit=False)
        with backend.cursor() as cur:
            cur.execute(
                f'UPDATE "{db.table}" SET vm_ip = %s, "{db.port_column}" = %s, status = %s'
                " WHERE session_id = %s",
                ("127.0.0.1", xvnc.rfb_port, "running", sid),
            )
        backend.commit()

        yield page.when_event(type="connect")
        yield page.wait_for_colour(EVERYWHERE, BLUE)
        assert (yield page.evaluate("document.getElementById('status').textContent")) == (
            "connected"
        )
    finally:
        yield page.close()


@pytest_twisted.inlineCallbacks
def test_refusals_show_their_close_code_in_the_page(
    browser, web_root, daemon_factory, pg, sessions_table
):
    """An ended session, one never ready and one never created close with 4410/4504/4404."""
    db = sessions_table
    daemon = yield daemon_factory(readiness_timeout=1)
    ended, booting, absent = (str(uuid.uuid4()) for _ in range(3))
    # An ended session is refused before any connect, so its port needs no server.
    insert_session(pg, db, ended, "127.0.0.1", 5900, "ended")
    insert_session(pg, db, booting, status="booting")
    expected = {
        ended: (4410, "session ended"),
        booting: (4504, "session not ready in time"),
        absent: (4404, "no such session"),
    }

    pages = {}
    try:
        for sid in expected:
            pages[sid] = yield browser.open(page_url(web_root, daemon.port, sid))
        for sid, (code, reason) in expected.items():
            page = pages[sid]
            closed = yield page.when_event(type="wsclose")
            assert (closed["code"], closed["reason"]) == (code, reason), page.log()
            # What a user would see, and what noVNC itself logged: not a bare 1006.
            status = yield page.evaluate("document.getElementById('status').textContent")
            assert status == f"closed {code} {reason}"
            disconnect = yield page.when_event(type="disconnect")
            assert disconnect["clean"] is False
            assert page.console_line(f"(code: {code}, reason: {reason})")
            assert "connect" not in page.types()
    finally:
        for page in pages.values():
            yield page.close()
