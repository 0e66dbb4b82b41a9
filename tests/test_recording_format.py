"""The recording file format (twisted_novnc.recording.format): round trips, cut files, names."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from twisted_novnc.recording import format as fmt
from twisted_novnc.recording.format import (
    DOWN,
    END,
    NOTE,
    UP,
    Ending,
    Header,
    NotARecording,
    encode_note,
    file_name,
    iter_records,
    list_recordings,
    read_header,
    read_info,
    record_head,
)

HEADER = Header("s-1", "abcdef012345", "192.0.2.7", 1767225600.25, True, "1.0")
ENDING = Ending(1767225610.5, "1000", 7, 11, 9, None)


def sample() -> tuple[bytes, list[tuple[bytes, int, bytes]]]:
    """A small whole recording, and its records (kind, ms, payload) in order."""
    records = [(DOWN, 0, b"RFB 003.008\n"), (UP, 5, b"RFB"), (DOWN, 70, b"\x01\x02")]
    body = b"".join(record_head(k, ms, len(p)) + p for k, ms, p in records)
    note = encode_note(80, {"stopped": "max_bytes"})
    return HEADER.encode() + body + note + ENDING.encode(90), records


def test_header_round_trips() -> None:
    """A header reads back as written, after the magic line."""
    f = io.BytesIO(HEADER.encode())
    assert f.read(len(fmt.MAGIC)) == b"TNOVNC-REC 1\n"
    f.seek(0)
    assert read_header(f) == HEADER


def test_records_round_trip_up_to_the_end() -> None:
    """Every record reads back in order, the note and the end record last."""
    data, records = sample()
    f = io.BytesIO(data)
    read_header(f)
    got = list(iter_records(f))
    assert [(r.kind, r.ms, r.payload) for r in got[:3]] == records
    assert got[3].kind == NOTE and fmt.decode_json(got[3]) == {"stopped": "max_bytes"}
    assert got[4].kind == END and Ending(**fmt.decode_json(got[4])) == ENDING
    assert len(got) == 5


def test_records_without_payloads_give_lengths() -> None:
    """Skipping payloads still gives each record's length, and notes are read."""
    data, records = sample()
    f = io.BytesIO(data)
    read_header(f)
    got = list(iter_records(f, payloads=False))
    assert [(r.kind, r.length, r.payload) for r in got[:3]] == [
        (k, len(p), b"") for k, _, p in records
    ]
    assert got[3].payload


def test_the_end_record_is_found_from_the_tail(tmp_path: Path) -> None:
    """A whole file's metadata comes from its header and end record."""
    data, _ = sample()
    path = tmp_path / "a.tnrec"
    path.write_bytes(data)
    info = read_info(str(path))
    assert info.header == HEADER and info.ending == ENDING
    assert info.complete and info.last_ms == 90 and info.size == len(data)
    assert info.recorded_bytes == 9 and info.ended_at == ENDING.ended_at


def test_every_cut_of_a_recording_reads_what_is_whole(tmp_path: Path) -> None:
    """Cut at every offset: read_info never raises past the header, and reports the
    whole records before the cut (a crash leaves such a file)."""
    data, records = sample()
    header_size = len(HEADER.encode())
    path = tmp_path / "cut.tnrec"
    ends = []
    offset = header_size
    for _, _, payload in records:
        offset += 13 + len(payload)
        ends.append(offset)
    note_end = ends[-1] + len(encode_note(80, {"stopped": "max_bytes"}))
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        if cut < header_size:
            with pytest.raises(NotARecording):
                read_info(str(path))
            continue
        info = read_info(str(path))
        whole = [r for r, end in zip(records, ends, strict=True) if end <= cut]
        if cut >= len(data) - 4:
            # The end record is whole, only its trailing length is cut: the end is known.
            assert info.ending == ENDING and info.last_ms == 90
            continue
        assert info.ending is None and not info.complete
        assert info.recorded_bytes == sum(len(p) for _, _, p in whole), cut
        assert info.last_ms == (80 if cut >= note_end else (whole[-1][1] if whole else 0))
        assert info.stopped == ("max_bytes" if cut >= note_end else None)
        f = io.BytesIO(data[:cut])
        read_header(f)
        assert [(r.kind, r.ms, r.payload) for r in iter_records(f)][: len(whole)] == whole


def test_garbage_after_the_header_stops_the_reading(tmp_path: Path) -> None:
    """Bytes that are no record end what is read: nothing after them is trusted."""
    data = HEADER.encode() + record_head(DOWN, 1, 2) + b"ok" + b"Zjunkjunkjunkjunk"
    path = tmp_path / "g.tnrec"
    path.write_bytes(data)
    info = read_info(str(path))
    assert info.recorded_bytes == 2 and info.ending is None


def test_a_file_that_is_no_recording_is_refused(tmp_path: Path) -> None:
    """No magic, or a header that is not the format's: NotARecording."""
    path = tmp_path / "x.tnrec"
    path.write_bytes(b"hello\n")
    with pytest.raises(NotARecording):
        read_info(str(path))
    path.write_bytes(fmt.MAGIC + b'{"who": 1}\n')
    with pytest.raises(NotARecording):
        read_info(str(path))


def test_file_name_sorts_by_session_then_time_and_is_safe() -> None:
    """The name holds the session (unsafe characters escaped), the UTC start and the
    connection id."""
    name = file_name("a/b c", 1767225600.25, "0123456789ab")
    assert name == "a%2Fb%20c_20260101T000000.250Z_0123456789ab.tnrec"
    assert "/" not in file_name("../../etc", 0.0, "x")
    assert len(file_name("x" * 1000, 0.0, "c")) < 200


def test_connection_ids_differ() -> None:
    """Two relays started in the same millisecond get two files."""
    assert fmt.new_connection_id() != fmt.new_connection_id()


def test_list_recordings_newest_first_with_unreadable_ones(tmp_path: Path) -> None:
    """Every .tnrec in the directory, newest first; an unreadable one is (path, why)."""
    older = Header("a", "1", "c", 100.0, False)
    newer = Header("b", "2", "c", 200.0, False)
    (tmp_path / "older.tnrec").write_bytes(older.encode())
    (tmp_path / "newer.tnrec").write_bytes(newer.encode())
    (tmp_path / "bad.tnrec").write_bytes(b"nope")
    (tmp_path / "other.txt").write_bytes(b"ignored")
    found = list_recordings(str(tmp_path))
    infos = [f for f in found if isinstance(f, fmt.RecordingInfo)]
    assert [i.header.session_id for i in infos] == ["b", "a"]
    bad = [f for f in found if isinstance(f, tuple)]
    assert [os.path.basename(p) for p, _ in bad] == ["bad.tnrec"]
