"""``python -m twisted_novnc recordings list|export``: the recordings from the command line.

``list`` prints one line per recording of ``[record] dir`` (or ``--dir``), newest first, or
the JSON the admin listener's ``/recordings/?format=json`` gives.  ``export`` writes one
recording as

- ``novnc``: the playback file websockify's ``--record`` writes and noVNC's
  ``tests/vnc_playback.html`` plays: a script defining ``VNC_frame_data``, one string per
  frame, ``{<ms>{<bytes>`` from the server and ``}<ms>}<bytes>`` from the client (the bytes
  as a JavaScript string of code points 0-255, noVNC's "binary" encoding), ending ``'EOF'``;
- ``json``: the metadata and every record, payloads in base64.

A file that is not a recording, or cannot be read, is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from twisted_novnc.config import ConfigError, read_config
from twisted_novnc.recording.format import (
    DOWN,
    END,
    NOTE,
    UP,
    NotARecording,
    RecordingInfo,
    iter_records,
    read_header,
    read_info,
)
from twisted_novnc.recording.playback import describe, listing

FORMATS = ("novnc", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("list", help="one line per recording, newest first")
    where = show.add_mutually_exclusive_group()
    where.add_argument("--config", help="the daemon's ini file: its [record] dir")
    where.add_argument("--dir", help="the recordings directory")
    show.add_argument("--json", action="store_true", help="as JSON (the admin listener's form)")
    export = actions.add_parser("export", help="write one recording in another format")
    export.add_argument("file", metavar="FILE", help="a recording (*.tnrec)")
    export.add_argument("-o", "--output", metavar="OUT", help="where to write (default: stdout)")
    export.add_argument(
        "--format", choices=FORMATS, default="novnc",
        help="novnc = noVNC's playback file (VNC_frame_data, as websockify --record writes);"
        " json = metadata and records, payloads in base64 (default: novnc)",
    )


def _fail(message: str) -> int:
    print(f"twisted_novnc: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list(args)
    return _export(args)


def _list(args: argparse.Namespace) -> int:
    if args.dir is not None:
        directory = str(args.dir)
    elif args.config is None:
        return _fail("recordings list: give --config FILE (its [record] dir) or --dir DIR")
    else:
        try:
            directory = read_config(args.config).record.dir
        except ConfigError as e:
            return _fail(f"configuration error: {e}")
    if not directory:
        return _fail("recording is off: [record] dir is empty")
    try:
        body = listing(directory, limit=sys.maxsize)
    except OSError as e:
        return _fail(f"cannot list {directory}: {e.strerror or e}")
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    for row in body["recordings"]:
        print(line(row))
    return 0


def line(row: dict[str, Any]) -> str:
    """One recording, as ``recordings list`` prints it (tab-separated)."""
    if "error" in row:
        return f"{row['name']}\tunreadable: {row['error']}"
    outcome = row["outcome"] if row["complete"] else "-"
    fields = [
        row["name"], row["session_id"], row["client"], row["start"], f"{row['duration']:.1f}s",
        f"{row['recorded_bytes']}B", f"outcome={outcome}",
        "complete" if row["complete"] else "cut",
    ]
    if row["stopped"]:
        fields.append(f"stopped={row['stopped']}")
    return "\t".join(fields)


def _export(args: argparse.Namespace) -> int:
    try:
        info = read_info(args.file)
        with open(args.file, "rb") as f:
            read_header(f)
            chunks = novnc_frames(f) if args.format == "novnc" else json_export(info, f)
            text = "".join(chunks)
    except NotARecording as e:
        return _fail(f"{args.file} is not a recording: {e}")
    except OSError as e:
        return _fail(f"cannot read {args.file}: {e.strerror or e}")
    try:
        if args.output is None:
            sys.stdout.write(text)
        else:
            with open(args.output, "w", encoding="ascii") as out:
                out.write(text)
    except OSError as e:
        return _fail(f"cannot write {args.output}: {e.strerror or e}")
    return 0


def js_bytes(data: bytes) -> str:
    """``data`` as the body of a single-quoted JavaScript string, one code point per byte."""
    out = []
    for byte in data:
        if 0x20 <= byte < 0x7F and byte not in (0x27, 0x5C):  # printable, not ' or \
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def novnc_frames(f: IO[bytes]) -> Iterator[str]:
    """noVNC's playback file, from a recording's records (``f`` just past its header)."""
    yield "var VNC_frame_encoding = 'binary';\nvar VNC_frame_data = [\n"
    for record in iter_records(f):
        if record.kind == DOWN:
            yield f"'{{{record.ms}{{{js_bytes(record.payload)}',\n"
        elif record.kind == UP:
            yield f"'}}{record.ms}}}{js_bytes(record.payload)}',\n"
    yield "'EOF'];\n"


def json_export(info: RecordingInfo, f: IO[bytes]) -> Iterator[str]:
    """The metadata and every record (``f`` just past the header), payloads in base64."""
    records = []
    for record in iter_records(f):
        item: dict[str, Any] = {"kind": record.kind.decode(), "ms": record.ms}
        if record.kind in (NOTE, END):
            try:
                item["value"] = json.loads(record.payload)
            except ValueError:
                item["data"] = base64.b64encode(record.payload).decode()
        else:
            item["data"] = base64.b64encode(record.payload).decode()
        records.append(item)
    yield json.dumps({"recording": describe(info), "records": records}, indent=1) + "\n"
