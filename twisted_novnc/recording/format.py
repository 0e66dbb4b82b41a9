"""The recording file: what one relay's browser received (and, with ``input = on``, sent).

One file per relay, written as it goes and readable at any point, so that a crash leaves a
recording complete up to its last flush::

    b"TNOVNC-REC 1\\n"                  magic and format version
    {...}\\n                            the header: one line of JSON (:class:`Header`)
    record, record, ...                each: kind (1 byte), milliseconds since ``started_at``
                                       (unsigned 64-bit, big-endian), payload length
                                       (unsigned 32-bit, big-endian), payload
    [end record, then its length]      kind ``E``, a JSON payload (:class:`Ending`), then the
                                       whole end record's length (unsigned 32-bit, big-endian)
                                       so a reader finds it from the file's end

Kinds: ``D`` bytes the browser received (the RFB stream as the browser saw it, the proxy's own
opening included), ``U`` bytes the browser sent (only with ``input = on``), ``N`` a note (JSON:
``{"stopped": reason}`` when the recording stopped early, ``{"moved": pid}`` where the relay
moved to another process), ``E`` the end.  A file without an end record ended with its process
(a crash, ``kill -9``) or with an I/O error: every whole record before the cut is good, and the
cut one is ignored.  (docs/recording.rst says the same, for operators.)

The metadata (:class:`RecordingInfo`) comes from the header and the end record, without
reading the payloads; only a file without an end record has its record headers walked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import time
from collections.abc import Iterator
from typing import IO, Any

import attrs

MAGIC = b"TNOVNC-REC 1\n"
#: The file name's suffix.
SUFFIX = ".tnrec"

DOWN = b"D"
UP = b"U"
NOTE = b"N"
END = b"E"
KINDS = frozenset((DOWN, UP, NOTE, END))

RECORD_HEAD = struct.Struct("!cQI")
END_LENGTH = struct.Struct("!I")
#: A header line longer than this is not a recording's.
MAX_HEADER = 64 * 1024
#: A note or end payload longer than this is not a recording's.
MAX_JSON_PAYLOAD = 64 * 1024


class NotARecording(ValueError):
    """The file does not start as a recording does."""


@attrs.frozen
class Header:
    """Who and when: written before the first byte."""

    session_id: str
    connection_id: str
    client: str
    #: Seconds since the epoch; every record's milliseconds count from here.
    started_at: float
    #: Whether the browser's own bytes (``U``) are recorded too.
    input: bool
    #: The twisted_novnc that wrote it.
    version: str = ""

    def encode(self) -> bytes:
        return MAGIC + json.dumps(attrs.asdict(self), sort_keys=True).encode() + b"\n"


@attrs.frozen
class Ending:
    """How the relay ended: the end record's payload."""

    #: Seconds since the epoch.
    ended_at: float
    #: The connection's outcome as the ``connections_total`` metric names it: a close code
    #: (``"1000"``, ``"4410"``), ``"1006"`` for none, ``"moved"``...
    outcome: str
    up_bytes: int
    down_bytes: int
    #: Payload bytes in the file (``D`` and ``U`` records).
    recorded_bytes: int
    #: Why recording stopped before the relay ended (``max_bytes``...), or None.
    stopped: str | None = None

    def encode(self, ms: int) -> bytes:
        payload = json.dumps(attrs.asdict(self), sort_keys=True).encode()
        record = RECORD_HEAD.pack(END, ms, len(payload)) + payload
        return record + END_LENGTH.pack(len(record))


def encode_note(ms: int, note: dict[str, Any]) -> bytes:
    payload = json.dumps(note, sort_keys=True).encode()
    return RECORD_HEAD.pack(NOTE, ms, len(payload)) + payload


def record_head(kind: bytes, ms: int, length: int) -> bytes:
    """A record's 13 bytes before its payload (the payload is written as it is, uncopied)."""
    return RECORD_HEAD.pack(kind, ms, length)


@attrs.frozen
class Record:
    kind: bytes
    ms: int
    payload: bytes
    #: The payload's length (also when it was skipped, not read).
    length: int


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_name(session_id: str, started_at: float, connection_id: str) -> str:
    """``<session>_<UTC start>_<connection>.tnrec``: sorted by session, then by time.

    Characters a file name should not hold are written ``%XX`` (a session id is the table's
    text, which may hold a ``/``); a long id is cut, the header keeps it whole.
    """
    safe = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), session_id)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_at))
    millis = int(started_at * 1000) % 1000
    return f"{safe[:120]}_{stamp}.{millis:03d}Z_{connection_id}{SUFFIX}"


def new_connection_id() -> str:
    """Unique across processes and daemons sharing a directory."""
    return os.urandom(6).hex()


def read_header(f: IO[bytes]) -> Header:
    if f.read(len(MAGIC)) != MAGIC:
        raise NotARecording("no recording magic at the start")
    line = f.readline(MAX_HEADER)
    if not line.endswith(b"\n"):
        raise NotARecording("the header line is cut or too long")
    try:
        fields = json.loads(line)
        return Header(**fields)
    except (ValueError, TypeError) as e:
        raise NotARecording(f"the header is not a recording's: {e}") from None


def iter_records(f: IO[bytes], payloads: bool = True) -> Iterator[Record]:
    """Every whole record after the header (``f`` just past it), up to the end record
    (included) or a cut.  Without ``payloads`` the data records' payloads are skipped,
    not read: their ``payload`` is empty."""
    head_size = RECORD_HEAD.size
    while True:
        head = f.read(head_size)
        if len(head) < head_size:
            return
        kind, ms, length = RECORD_HEAD.unpack(head)
        if kind not in KINDS:
            return  # not a record boundary: the rest is not trusted
        if payloads or kind in (NOTE, END):
            payload = f.read(length)
            if len(payload) < length:
                return
        else:
            here = f.tell()
            if f.seek(0, os.SEEK_END) < here + length:
                return
            f.seek(here + length)
            payload = b""
        yield Record(kind, ms, payload, length)
        if kind == END:
            return


def decode_json(record: Record) -> dict[str, Any]:
    value = json.loads(record.payload)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


@attrs.frozen
class RecordingInfo:
    """A recording's metadata, read without replaying it."""

    path: str
    header: Header
    #: The end record's, or None: the file was cut (its process ended first).
    ending: Ending | None
    #: Milliseconds of the last whole record (the recording's length).
    last_ms: int
    #: The file's size in bytes.
    size: int
    #: Payload bytes of whole ``D`` and ``U`` records (from the end record when there is one).
    recorded_bytes: int
    #: Why recording stopped early (a note, or the end record), if it did.
    stopped: str | None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def ended_at(self) -> float:
        """When it ended; for a cut file, when its last record was written."""
        if self.ending is not None:
            return self.ending.ended_at
        return self.header.started_at + self.last_ms / 1000

    @property
    def complete(self) -> bool:
        return self.ending is not None


def _ending_from_tail(f: IO[bytes], size: int) -> tuple[Ending, int] | None:
    if size < END_LENGTH.size + RECORD_HEAD.size:
        return None
    f.seek(size - END_LENGTH.size)
    (length,) = END_LENGTH.unpack(f.read(END_LENGTH.size))
    start = size - END_LENGTH.size - length
    if length < RECORD_HEAD.size or length > RECORD_HEAD.size + MAX_JSON_PAYLOAD or start < 0:
        return None
    f.seek(start)
    record = f.read(length)
    kind, ms, payload_length = RECORD_HEAD.unpack(record[: RECORD_HEAD.size])
    if kind != END or payload_length != length - RECORD_HEAD.size:
        return None
    try:
        return Ending(**json.loads(record[RECORD_HEAD.size :])), ms
    except (ValueError, TypeError):
        return None


def read_info(path: str) -> RecordingInfo:
    """The header and how it ended; NotARecording (or OSError) when it cannot be read."""
    with open(path, "rb") as f:
        header = read_header(f)
        body = f.tell()
        size = os.fstat(f.fileno()).st_size
        found = _ending_from_tail(f, size)
        if found is not None:
            ending, last_ms = found
            return RecordingInfo(
                path, header, ending, last_ms, size, ending.recorded_bytes, ending.stopped
            )
        f.seek(body)
        last_ms = recorded = 0
        stopped = None
        for record in iter_records(f, payloads=False):
            last_ms = record.ms
            if record.kind in (DOWN, UP):
                recorded += record.length
            elif record.kind == NOTE:
                with contextlib.suppress(ValueError):
                    stopped = decode_json(record).get("stopped") or stopped
            elif record.kind == END:
                # Whole, but its trailing length was cut: the end is known all the same.
                with contextlib.suppress(ValueError, TypeError):
                    ending = Ending(**decode_json(record))
                    return RecordingInfo(
                        path, header, ending, last_ms, size, ending.recorded_bytes,
                        ending.stopped,
                    )
        return RecordingInfo(path, header, None, last_ms, size, recorded, stopped)


def list_recordings(directory: str) -> list[RecordingInfo | tuple[str, str]]:
    """Every ``*.tnrec`` in ``directory``, newest first; one that cannot be read is
    ``(path, why)``."""
    found: list[RecordingInfo | tuple[str, str]] = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            found.append(read_info(entry.path))
        except (OSError, NotARecording) as e:
            found.append((entry.path, str(e)))

    def newest(item: RecordingInfo | tuple[str, str]) -> float:
        return -item.header.started_at if isinstance(item, RecordingInfo) else 0.0

    found.sort(key=newest)
    return found
