"""Matching request paths against the configured template, e.g. ``/websockify/{session_id}``.

The match runs on the raw (still percent-encoded) path, and a session id may hold only
unreserved URL characters, so an encoded slash, a traversal or a quote can never reach a query.
"""

from __future__ import annotations

import re

import attrs

SESSION_ID_PATTERN = r"[A-Za-z0-9._~-]{1,128}"


@attrs.frozen
class PathMatch:
    """What a request path names: the session, and whatever followed its segment."""

    session_id: str
    suffix: str


@attrs.frozen
class PathTemplate:
    """A compiled path template with exactly one ``{session_id}`` placeholder."""

    template: str
    _regex: re.Pattern[str] = attrs.field(init=False)

    @_regex.default
    def _compile(self) -> re.Pattern[str]:
        before, _, after = self.template.partition("{session_id}")
        pattern = (
            re.escape(before)
            + f"(?P<session_id>{SESSION_ID_PATTERN})"
            + re.escape(after)
            + r"(?:/(?P<suffix>[^?#]*))?"
        )
        return re.compile(pattern)

    def match(self, path: str) -> PathMatch | None:
        """The session named by ``path``, or None when the path does not fit the template."""
        m = self._regex.fullmatch(path)
        if m is None or m["session_id"] in (".", ".."):
            return None
        return PathMatch(m["session_id"], m["suffix"] or "")
