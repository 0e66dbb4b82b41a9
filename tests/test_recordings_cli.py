"""``python -m twisted_novnc recordings list|export`` (recording/cli.py): the lines, the
noVNC playback file parsed back as noVNC's tests/playback-ui.js reads it, JSON, errors."""

from __future__ import annotations

import ast
import base64
import json
import re

import pytest
from recording_samples import RECORDS, write_recording

from twisted_novnc.__main__ import main
from twisted_novnc.recording.format import DOWN, UP


@pytest.fixture
def directory(tmp_path):
    directory = tmp_path / "rec"
    directory.mkdir()
    return directory


def parse_novnc(text: str) -> list[tuple[bytes, int, bytes]]:
    """The frames of a noVNC playback file, as playback-ui.js splits them: a frame is
    ``{ms{data`` (server) or ``}ms}data`` (client), data one code point per byte; 'EOF' ends."""
    assert text.startswith("var VNC_frame_encoding = 'binary';\nvar VNC_frame_data = [\n")
    assert text.endswith("'EOF'];\n")
    body = text.split("var VNC_frame_data = [\n", 1)[1]
    frames = []
    for line in body.splitlines():
        # A JavaScript single-quoted string of printable ASCII and \xNN escapes only, which
        # Python reads the same way.
        assert re.fullmatch(r"'([\x20-\x26\x28-\x5b\x5d-\x7e]|\\x[0-9a-f]{2})*',?|'EOF'\];", line)
        value = ast.literal_eval(line.rstrip(",").removesuffix("];"))
        if value == "EOF":
            break
        mark = value[0]
        ms, _, data = value[1:].partition(mark)
        frames.append((DOWN if mark == "{" else UP, int(ms), data.encode("latin-1")))
    return frames


def test_list_prints_one_line_per_recording(directory, capsys):
    """``list --dir`` prints name, session, client, start, duration, bytes, outcome and
    complete/cut, newest first; --json is the admin listener's JSON."""
    complete = write_recording(directory, "s-new", 1_700_000_300.0)
    cut = write_recording(directory, "s-old", 1_700_000_100.0, complete=False, stopped="disk")
    assert main(["recordings", "list", "--dir", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [complete.name, cut.name]
    fields = lines[0].split("\t")
    assert fields[1:] == ["s-new", "192.0.2.7", "2023-11-14T22:18:20.000Z", "0.1s", "288B",
                          "outcome=1000", "complete"]
    assert lines[1].split("\t")[-3:] == ["outcome=-", "cut", "stopped=disk"]
    assert main(["recordings", "list", "--dir", str(directory), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in listed["recordings"]] == [complete.name, cut.name]


def test_list_reads_the_config(directory, tmp_path, capsys):
    """``list --config`` lists its [record] dir; with it empty it says recording is off (2)."""
    write_recording(directory)
    config = tmp_path / "on.ini"
    config.write_text(f"[record]\ndir = {directory}\n")
    assert main(["recordings", "list", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    off = tmp_path / "off.ini"
    off.write_text("[record]\n")
    assert main(["recordings", "list", "--config", str(off)]) == 2
    assert capsys.readouterr().err == "twisted_novnc: recording is off: [record] dir is empty\n"


@pytest.mark.parametrize("complete", [True, False])
def test_export_novnc_parses_back_to_the_records(directory, tmp_path, complete):
    """The noVNC export holds every D record as a server frame and every U record as a
    client frame, with their milliseconds and exact bytes (a cut file: up to the cut)."""
    path = write_recording(directory, complete=complete)
    out = tmp_path / "out.js"
    assert main(["recordings", "export", str(path), "-o", str(out)]) == 0
    assert parse_novnc(out.read_text(encoding="ascii")) == RECORDS
    # playback-ui.js picks the encoding from the first frame: not base64 ("UkZC") here.
    assert "'{0{RFB 003.008\\x0a'," in out.read_text()


def test_export_json(directory, capsys):
    """The JSON export: the metadata as ``list --json`` gives it, and every record with its
    payload in base64 (notes and the end as JSON)."""
    path = write_recording(directory, stopped="max_bytes")
    assert main(["recordings", "export", str(path), "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["recording"]["session_id"] == "s1"
    assert exported["recording"]["stopped"] == "max_bytes"
    data = [
        (r["kind"].encode(), r["ms"], base64.b64decode(r["data"]))
        for r in exported["records"] if r["kind"] in "DU"
    ]
    assert data == RECORDS
    assert [r["kind"] for r in exported["records"][-2:]] == ["N", "E"]
    assert exported["records"][-1]["value"]["outcome"] == "1000"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["recordings", "export", "{missing}"], "cannot read {missing}: No such file"),
        (["recordings", "export", "{other}"], "{other} is not a recording: no recording magic"),
        (["recordings", "export", "{good}", "-o", "{nodir}"], "cannot write {nodir}"),
        (["recordings", "list", "--dir", "{missing}"], "cannot list {missing}"),
        (["recordings", "list"], "recordings list: give --config FILE"),
        (["recordings", "list", "--config", "{missing}"], "configuration error"),
    ],
)
def test_errors_are_one_line_and_exit_2(directory, tmp_path, capsys, argv, message):
    """A missing file, a file that is not a recording, an unwritable output, a missing
    directory or config: one line on stderr, exit code 2."""
    names = {
        "missing": str(tmp_path / "missing"),
        "other": str(tmp_path / "other.tnrec"),
        "good": str(write_recording(directory)),
        "nodir": str(tmp_path / "no" / "out.js"),
    }
    (tmp_path / "other.tnrec").write_text("hello")
    assert main([arg.format(**names) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twisted_novnc: " + message.format(**names)), err
    assert err.count("\n") == 1
