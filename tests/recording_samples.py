"""Recordings written with format.py's own encoders, for the player's and the CLI's tests."""

from __future__ import annotations

import os
from pathlib import Path

from twisted_novnc.recording.format import (
    DOWN,
    UP,
    Ending,
    Header,
    encode_note,
    file_name,
    record_head,
)

#: What each sample holds: (kind, ms, payload) in order.
RECORDS: list[tuple[bytes, int, bytes]] = [
    (DOWN, 0, b"RFB 003.008\n"),
    (UP, 5, b"RFB 003.008\n"),
    (DOWN, 12, b"\x01\x01"),
    (UP, 20, b"\x01"),
    (DOWN, 40, bytes(range(256)) + b"'\\{}\n"),
]


def write_recording(
    directory: Path,
    session_id: str = "s1",
    started_at: float = 1_700_000_000.25,
    complete: bool = True,
    stopped: str | None = None,
    connection_id: str = "abc123",
    client: str = "192.0.2.7",
) -> Path:
    """A recording of RECORDS: with an end record (``complete``) or cut in its last record,
    and with a note and the end's ``stopped`` when recording ``stopped`` early."""
    header = Header(session_id, connection_id, client, started_at, True, "test")
    body = header.encode()
    recorded = 0
    for kind, ms, payload in RECORDS:
        body += record_head(kind, ms, len(payload)) + payload
        recorded += len(payload)
    if stopped is not None:
        body += encode_note(45, {"stopped": stopped})
    if complete:
        down = sum(len(p) for k, _, p in RECORDS if k == DOWN)
        up = sum(len(p) for k, _, p in RECORDS if k == UP)
        body += Ending(started_at + 0.05, "1000", up, down, recorded, stopped).encode(50)
    else:
        body += record_head(DOWN, 60, 100) + b"only part"
    path = directory / file_name(session_id, started_at, connection_id)
    path.write_bytes(body)
    os.chmod(path, 0o600)
    return path
