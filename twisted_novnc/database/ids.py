"""Session ids in the form the database prints them, decided without asking the database.

Pure functions, shared by the PostgreSQL store and the in-memory fake so the two cannot disagree
on which ids name the same row.  An id that no row of the column can hold is answered with None
here, so it is never sent to the database (where it would fail the whole batched read).
"""

from __future__ import annotations

import uuid

#: PostgreSQL's integer column types and the size of their range on each side of zero.
INTEGER_TYPES = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}


def normalise_id(raw: str, column_type: str | None) -> str | None:
    """The id as PostgreSQL prints it for a column of ``column_type``, or None when no row of
    that column can have it.

    ``uuid``: any spelling :class:`uuid.UUID` reads (upper case, braces, no dashes) becomes the
    lower-case dashed form.  Integer types: optional minus and ASCII digits, in range, without
    leading zeros (``"007"`` is row 7).  Anything else (``text``, ``varchar``, unknown yet) is
    the id as given, unless it holds a NUL, which no PostgreSQL string can.
    """
    if column_type == "uuid":
        try:
            return str(uuid.UUID(raw))
        except ValueError:
            return None
    if column_type in INTEGER_TYPES:
        digits = raw[1:] if raw.startswith("-") else raw
        if not (digits.isascii() and digits.isdigit()):
            return None
        value = int(raw)
        limit = INTEGER_TYPES[column_type]
        return str(value) if -limit <= value < limit else None
    return None if "\x00" in raw else raw
