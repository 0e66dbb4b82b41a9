"""``/recordings/`` on the admin listener (recording/playback.py): the list, the player page,
the raw files, and every name that must not be served, over the admin Site itself."""

from __future__ import annotations

import json
import os

import pytest
from recording_samples import write_recording
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twisted_novnc.front.viewer import CONTENT_SECURITY_POLICY
from twisted_novnc.operations.admin import admin_site, serve_workers
from twisted_novnc.operations.metrics import Metrics
from twisted_novnc.recording.playback import NOVNC_DIR, PLAYER_DIR, recording_path


def get(site, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; a file sent by a producer is pulled to its end."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    for _ in range(10_000):
        if transport.producer is None or transport.disconnecting:
            break
        transport.producer.resumeProducing()
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(": ")
        headers[key.lower()] = value
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


@pytest.fixture
def recordings(tmp_path):
    """A directory with a complete, a cut and a stopped recording, and a stray file."""
    directory = tmp_path / "rec"
    directory.mkdir(mode=0o700)
    paths = {
        "complete": write_recording(directory, "s-complete", 1_700_000_300.0),
        "cut": write_recording(directory, "s-cut", 1_700_000_200.0, complete=False),
        "stopped": write_recording(directory, "s/stopped", 1_700_000_100.0, stopped="max_bytes"),
    }
    (directory / "notes.txt").write_text("not a recording")
    (directory / "broken.tnrec").write_bytes(b"nothing like it")
    return directory, paths


def site_for(directory) -> object:
    return admin_site(Metrics(), Clock(), recordings_dir=str(directory))


def test_the_list_as_json_newest_first(recordings):
    """?format=json lists every *.tnrec, newest first: complete, cut, stopped early; an
    unreadable one says why; other files are not listed."""
    directory, paths = recordings
    code, headers, body = get(site_for(directory), "/recordings/?format=json")
    assert code == 200 and headers["content-type"] == "application/json"
    listed = json.loads(body)
    rows = [row for row in listed["recordings"] if "error" not in row]
    assert [row["session_id"] for row in rows] == ["s-complete", "s-cut", "s/stopped"]
    complete, cut, stopped = rows
    assert complete["complete"] and complete["outcome"] == "1000" and not complete["stopped"]
    assert complete["client"] == "192.0.2.7" and complete["duration"] == 0.05
    assert complete["start"] == "2023-11-14T22:18:20.000Z"
    assert not cut["complete"] and cut["outcome"] is None and cut["duration"] == 0.04
    assert stopped["stopped"] == "max_bytes" and stopped["complete"]
    errors = [row for row in listed["recordings"] if "error" in row]
    assert [row["name"] for row in errors] == ["broken.tnrec"]
    assert "notes.txt" not in body.decode()


def test_the_list_as_html_escapes_and_links(recordings):
    """/recordings/ is an HTML table linking each recording's player, values escaped, under
    the viewer's Content-Security-Policy; /recordings redirects there."""
    directory, paths = recordings
    site = site_for(directory)
    code, headers, body = get(site, "/recordings/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    page = body.decode()
    assert page.index("s-complete") < page.index("s-cut") < page.index("s/stopped")
    # The file name holds %2F for the session's "/": its link quotes the %.
    assert f'href="{paths["stopped"].name.replace("%", "%25")}"' in page
    assert "stopped early: max_bytes" in page and "cut (its process ended first)" in page
    assert "<script" not in page
    code, headers, _ = get(site, "/recordings")
    assert code == 302 and headers["location"].endswith("/recordings/")


def test_the_player_page_and_its_files(recordings):
    """/recordings/<name> is the player page (strict CSP); its script and noVNC come from the
    package's own files (noVNC from the viewer's copy)."""
    directory, paths = recordings
    site = site_for(directory)
    code, headers, body = get(site, f"/recordings/{paths['complete'].name}")
    assert code == 200 and body == (PLAYER_DIR / "page.html").read_bytes()
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    code, headers, body = get(site, "/recordings/player/player.js")
    assert code == 200 and headers["content-type"].startswith("text/javascript")
    assert body == (PLAYER_DIR / "player.js").read_bytes()
    code, _, body = get(site, "/recordings/novnc/core/rfb.js")
    assert code == 200 and body == (NOVNC_DIR / "core" / "rfb.js").read_bytes()
    for path in ("/recordings/novnc/", "/recordings/novnc/core", "/recordings/novnc/LICENSE.txt",
                 "/recordings/novnc/.hidden.js", "/recordings/player/../../config.py"):
        assert get(site, path)[0] == 404, path


def test_the_raw_file_is_streamed_as_written(recordings):
    """/recordings/<name>/data is the file, byte for byte, with its length; a cut file too."""
    directory, paths = recordings
    site = site_for(directory)
    for path in paths.values():
        quoted = path.name.replace("%", "%25")
        code, headers, body = get(site, f"/recordings/{quoted}/data")
        assert code == 200 and body == path.read_bytes()
        assert headers["content-type"] == "application/octet-stream"
        assert int(headers["content-length"]) == path.stat().st_size


def test_names_that_are_not_served(recordings, tmp_path):
    """Traversal, a symlink (even to a recording), another suffix, a directory and an unknown
    name are all 404."""
    directory, paths = recordings
    outside = write_recording(tmp_path, "outside", 1_700_000_000.0)
    os.symlink(paths["complete"], directory / "link.tnrec")
    os.symlink(outside, directory / "out.tnrec")
    (directory / "sub.tnrec").mkdir()
    site = site_for(directory)
    for name in ("link.tnrec", "out.tnrec", "sub.tnrec", "notes.txt", "unknown.tnrec",
                 "..%2F" + outside.name, "%2E%2E", ".tnrec", "%00.tnrec"):
        for suffix in ("", "/data"):
            code, _, body = get(site, f"/recordings/{name}{suffix}")
            assert code == 404, name + suffix
            assert b"RFB" not in body
    assert recording_path(str(directory), "link.tnrec") is None
    assert recording_path(str(directory), "../" + outside.name) is None
    assert recording_path(str(directory), paths["cut"].name) == str(paths["cut"])


def test_recording_off_is_404_saying_so():
    """With [record] dir empty every /recordings page is 404 and says recording is off."""
    site = admin_site(Metrics(), Clock())
    for path in ("/recordings/", "/recordings", "/recordings/x.tnrec/data",
                 "/recordings/player/player.js"):
        code, _, body = get(site, path)
        assert code == 404 and b"Recording is off" in body, path


def test_the_supervisor_serves_the_directory_itself(recordings):
    """With [novnc] workers the supervisor's admin site lists the directory itself."""

    class Pool:
        count = restarts = 0

        def alive(self):
            return 0

        def pids(self):
            return {}

        def ask_all(self, what):
            raise AssertionError("the recordings are not the workers' business")

    directory, paths = recordings
    site = admin_site(Metrics(), Clock())
    serve_workers(site, Pool(), None, str(directory))
    code, _, body = get(site, "/recordings/?format=json")
    assert code == 200 and len(json.loads(body)["recordings"]) == 4


def test_canary_novnc_internals_the_player_uses():
    """The player's fenced use of noVNC's private names (player.js, ``display``) still
    matches the vendored noVNC: RFB's ``_flushing`` and ``_display``, Display's ``pending()``
    and ``flush()``; a noVNC update that renames them fails here, naming which."""
    core = os.path.join(NOVNC_DIR, "core")
    with open(os.path.join(core, "rfb.js"), encoding="utf-8") as f:
        rfb = f.read()
    with open(os.path.join(core, "display.js"), encoding="utf-8") as f:
        display = f.read()
    missing = [
        name for name, found in (
            ("RFB._flushing", "this._flushing = false;" in rfb),
            ("RFB._display", "this._display = new Display(" in rfb),
            ("Display.pending()", "\n    pending() {" in display),
            ("Display.flush()", "\n    flush() {" in display),
        ) if not found
    ]
    assert not missing, f"vendored noVNC lacks what player.js's display fence uses: {missing}"
    with open(os.path.join(PLAYER_DIR, "player.js"), encoding="utf-8") as f:
        player = f.read()
    fence_start = player.index("const display = {")
    fence_end = player.index("\n};\n", fence_start)
    outside = player[:fence_start] + player[fence_end:]
    assert "._flushing" not in outside and "._display" not in outside
