"""A strict check of the HTTP request head, before Autobahn parses it.

Autobahn's parser is lenient: it splits lines on any Unicode line break and ignores lines
without a colon, so ``X-A: a\\x0bOrigin: …`` is one header to a load balancer in front and two
to Autobahn.  It also buffers a request head of any size.  The proxy reads only the upgrade
request, so it can afford to insist on RFC 9112's grammar and a size limit.
"""

from __future__ import annotations

import re

#: The largest request head accepted (request line and headers), in bytes.
MAX_HEAD = 16 * 1024

_REQUEST_LINE = re.compile(rb"(GET|HEAD) [\x21-\x7e]+ HTTP/1\.1")
# field-name ":" OWS field-value OWS; field-value is visible ASCII, SP, HTAB or obs-text,
# and no control character (so no bare CR, VT, NUL ...).
# NEL (0x85) is obs-text to RFC 9112 but a line break to Autobahn (it decodes ISO-8859-1 and
# calls splitlines), so it is refused too.
_FIELD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t]*[\x21-\x7e\x80-\x84\x86-\xff \t]*")


class BadHead(Exception):
    """The request head breaks the grammar; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def head_end(buffer: bytes) -> int | None:
    """The index just past the head's blank line, or None while it is incomplete.

    Raises :class:`BadHead` (431) once the buffer is over :data:`MAX_HEAD` without one.
    """
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end >= 0:
        return end + 4
    if len(buffer) > MAX_HEAD:
        raise BadHead(431, "request header fields too large")
    return None


def check_head(head: bytes) -> None:
    """Raise :class:`BadHead` unless ``head`` (up to and with its blank line) is well formed."""
    lines = head[:-4].split(b"\r\n")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        raise BadHead(400, "bad request line")
    for line in lines[1:]:
        if not _FIELD.fullmatch(line):
            raise BadHead(400, "bad header line")


def header_fields(head: bytes) -> dict[str, str]:
    """A checked head's fields by lower-case name, repeats joined with ", " (as Autobahn does)."""
    fields: dict[str, str] = {}
    for line in head[:-4].split(b"\r\n")[1:]:
        name, _, value = line.decode("iso-8859-1").partition(":")
        key, value = name.lower(), value.strip(" \t")
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    return fields
