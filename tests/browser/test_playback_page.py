"""The recordings player (admin listener, /recordings/) in headless Chromium: a session on a
real Xvnc, drawn by noVNC through the daemon, is recorded; its player, opened in Chromium, ends
on exactly the live canvas's final pixels (same size, same bytes); the list shows it; pausing
stops progress and seeking to the end ends on the same pixels.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest
import pytest_twisted
from browser_harness import SCREEN, XClient, within
from db_fixtures import insert_ready
from test_novnc import BLUE, EVERYWHERE, paint_root
from test_viewer_page import no_policy_violation, shows, viewer_url
from twisted.internet import defer, reactor, task

from twisted_novnc.recording.format import SUFFIX, read_info

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.integration]

WIDTH, HEIGHT = SCREEN
RED = (0xCC, 0x33, 0x33)
GREEN = (0x22, 0xAA, 0x44)
WHITE = (0xFF, 0xFF, 0xFF)

#: The whole canvas, hashed in the page: its size and the SHA-256 of its RGBA bytes.
CANVAS_DIGEST = """(async () => {
    const c = document.querySelector('#screen canvas');
    if (!c) { return null; }
    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const hash = new Uint8Array(await crypto.subtle.digest('SHA-256', data));
    return {width: c.width, height: c.height,
            sha256: Array.from(hash, (b) => b.toString(16).padStart(2, '0')).join('')};
})()"""

STATE = "document.body.dataset.state"
POSITION = "Number(document.body.dataset.position)"


def player_url(admin_port: int, name: str, speed: str) -> str:
    return f"http://127.0.0.1:{admin_port}/recordings/{quote(name)}?speed={speed}"


def _complete(path) -> bool:  # type: ignore[no-untyped-def]
    """Whether the file holds a whole recording (the thread creates it, then writes it: a
    look in between finds it empty)."""
    try:
        return bool(read_info(str(path)).complete)
    except (OSError, ValueError):
        return False


@defer.inlineCallbacks
def complete_recording(directory):  # type: ignore[no-untyped-def]
    """The directory's one recording once its end record is written (the recorder's thread
    writes it just after the relay closes): checked every 50 ms; the caller bounds the wait."""
    while True:
        found = [p for p in directory.iterdir() if p.name.endswith(SUFFIX)]
        if len(found) == 1 and _complete(found[0]):
            return found[0]
        assert len(found) <= 1, found
        yield task.deferLater(reactor, 0.05, lambda: None)


def seek_to(position: str) -> str:
    """A page expression: move the position bar and let go (its ``change`` event)."""
    return (
        "(() => { const bar = document.getElementById('position');"
        f" bar.value = {position}; bar.dispatchEvent(new Event('change')); return true; }})()"
    )


@pytest_twisted.inlineCallbacks
def test_the_player_ends_on_the_live_canvas(
    browser, xvnc, daemon_factory, pg, sessions_table, tmp_path
):
    """A recorded session that draws a known picture, played at the fastest speed, ends on
    the live session's final canvas exactly; the list shows it; pause stops, and seeking
    back to the start then to the end ends on the same pixels."""
    yield paint_root(xvnc, BLUE)
    directory = tmp_path / "recordings"
    directory.mkdir(mode=0o700)
    daemon = yield daemon_factory(
        {"record": {"dir": str(directory)}, "admin": {"listen": "tcp:0:interface=127.0.0.1"}}
    )
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)

    live = yield browser.open(viewer_url(daemon.port, sid))
    try:
        yield live.wait_for(shows(EVERYWHERE, BLUE))
        # Two seconds of the plain desktop first, so that at real speed the player is still
        # playing when the test pauses it (a length for the recording, not a wait for anything).
        yield live.evaluate("new Promise((resolve) => setTimeout(() => resolve(true), 2000))")
        client = XClient.run(xvnc, "pattern", "#cc3333")
        assert (yield within(client.ended)) == 0, client.output
        yield live.wait_for(shows([(240, 80)], RED))
        yield live.wait_for(shows([(70, 50)], GREEN))
        yield live.wait_for(shows([(70, 180)], WHITE))
        final = yield live.evaluate(CANVAS_DIGEST)
        assert final["width"] == WIDTH and final["height"] == HEIGHT
        no_policy_violation(live)
    finally:
        yield live.close()
    yield within(daemon.when_logged(f"closed {sid}"))
    path = yield within(complete_recording(directory))
    info = read_info(str(path))
    assert info.header.session_id == sid and info.complete and not info.stopped, info
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"

    listing = yield browser.open(f"http://127.0.0.1:{daemon.admin_port}/recordings/")
    fast = yield browser.open(player_url(daemon.admin_port, path.name, "max"))
    try:
        links = yield listing.evaluate(
            "Array.from(document.querySelectorAll('#recordings a'), (a) => a.textContent)"
        )
        assert links == [sid]
        yield fast.wait_for(f"{STATE} === 'ended'")
        assert (yield fast.evaluate(CANVAS_DIGEST)) == final
        no_policy_violation(fast)
        no_policy_violation(listing)
    finally:
        yield listing.close()
        yield fast.close()

    slow = yield browser.open(player_url(daemon.admin_port, path.name, "1"))
    try:
        yield slow.wait_for(f"{STATE} === 'playing' && {POSITION} > 0")
        yield slow.evaluate("document.getElementById('play').click() ?? true")
        yield slow.wait_for(f"{STATE} === 'paused'")
        paused_at = yield slow.evaluate(POSITION)
        assert 0 < paused_at < info.last_ms
        # Nothing happens while paused: the position half a second later is the same.
        later = yield slow.evaluate(
            f"new Promise((resolve) => setTimeout(() => resolve({POSITION}), 500))"
        )
        assert later == paused_at
        # Back to the start (a fresh RFB), then to the end.
        yield slow.evaluate(seek_to("0"))
        yield slow.wait_for(f"{STATE} === 'paused' && {POSITION} === 0")
        yield slow.evaluate(seek_to("document.getElementById('position').max"))
        yield slow.wait_for(f"{STATE} === 'ended'")
        assert (yield slow.evaluate(CANVAS_DIGEST)) == final
        no_policy_violation(slow)
    finally:
        yield slow.close()
