"""Which web pages may open a connection: the ``Origin`` check of ``[novnc] allowed_origins``.

A browser sends the page's origin with every WebSocket handshake and a page cannot forge it, so
checking it stops another site from opening a victim's session with the victim's cookies
(cross-site WebSocket hijacking).  A pattern is ``scheme://host[:port]``; ``*`` stands for
exactly one whole host label (``https://*.example.com`` matches ``https://a.example.com``, not
``https://example.com`` nor ``https://a.b.example.com``).  Scheme and port must match exactly,
with 80 and 443 the ports of ``http`` and ``https`` when none is written.  The opaque origin
``null`` (sandboxed frames, ``file:`` pages) is allowed only when ``null`` itself is listed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attrs

from twisted_novnc.errors import Refusal, Refused

#: The ports an origin has when it names none.
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Longer Origin headers are refused unread; real ones are far shorter.
MAX_ORIGIN_LENGTH = 1024

_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>\[[0-9a-f:.]+\]|[^:/\[\]?#@]+)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_WILDCARD = "*"
_NULL = "null"


@attrs.frozen
class _Origin:
    """An origin reduced to what is compared: scheme, host labels (or an IPv6 literal), port."""

    scheme: str
    host: tuple[str, ...]
    port: int | None


def _parse(text: str, wildcards: bool) -> _Origin:
    """``text`` as an origin (a pattern when ``wildcards``); ValueError says what is wrong."""
    if not text.isascii():
        # Checked before lower(): some non-ASCII letters lower-case to ASCII ones.
        raise ValueError("must be ASCII; write internationalised host names in punycode (xn--…)")
    lowered = text.lower()
    m = _ORIGIN.fullmatch(lowered)
    if m is None:
        if "://" in lowered and re.search(r"://[^/]*/", lowered):
            raise ValueError("must not have a path, not even '/' (an origin is scheme://host[:port])")
        raise ValueError("must look like scheme://host[:port], e.g. https://app.example.com")
    scheme, host_text, port_text = m["scheme"], m["host"], m["port"]
    if host_text.startswith("["):
        try:
            host: tuple[str, ...] = (f"[{ipaddress.IPv6Address(host_text[1:-1]).compressed}]",)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host_text}") from None
    else:
        host = tuple(host_text.split("."))
        for label in host:
            if wildcards and label == _WILDCARD:
                continue
            if wildcards and _WILDCARD in label:
                raise ValueError("'*' must stand for a whole host label, like https://*.example.com")
            if not _LABEL.fullmatch(label):
                raise ValueError(f"bad host name {host_text!r}")
    port = DEFAULT_PORTS.get(scheme)
    if port_text is not None:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be from 1 to 65535, got {port_text}")
    return _Origin(scheme, host, port)


def _matches(pattern: _Origin, origin: _Origin) -> bool:
    if (pattern.scheme, pattern.port) != (origin.scheme, origin.port):
        return False
    if len(pattern.host) != len(origin.host):
        return False
    return all(p in (_WILDCARD, o) for p, o in zip(pattern.host, origin.host, strict=True))


@attrs.frozen
class OriginPolicy:
    """The origins allowed to connect; with no patterns at all, every request is allowed."""

    #: The patterns as written, for showing the setting back.
    patterns: tuple[str, ...] = ()
    _compiled: tuple[_Origin, ...] = attrs.field(default=(), eq=False, repr=False)
    _allow_null: bool = attrs.field(default=False, eq=False, repr=False)

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> OriginPolicy:
        """A policy from patterns; ValueError names the first bad one and what is wrong."""
        written = tuple(patterns)
        compiled = []
        for i, pattern in enumerate(written):
            if pattern in written[:i]:
                raise ValueError(f"origin {pattern!r} is listed twice")
            if pattern == _NULL:
                continue
            if pattern == _WILDCARD:
                raise ValueError("'*' is not an origin; leave the list empty to allow every origin")
            try:
                compiled.append(_parse(pattern, wildcards=True))
            except ValueError as e:
                raise ValueError(f"bad origin {pattern!r}: {e}") from None
        return cls(written, tuple(compiled), _NULL in written)

    @classmethod
    def from_text(cls, text: str) -> OriginPolicy:
        """A policy from whitespace-separated patterns, as the ini value holds them."""
        return cls.from_patterns(text.split())

    def to_text(self) -> str:
        """The patterns as an ini value."""
        return " ".join(self.patterns)

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this ``Origin`` header (None or "" when absent) may connect.

        With patterns set, a request without an Origin is refused: browsers always send one,
        and other clients can send an allowed one just as easily.
        """
        if not self.patterns:
            return True
        if not isinstance(origin, str) or not origin or len(origin) > MAX_ORIGIN_LENGTH:
            return False
        if origin == _NULL:
            return self._allow_null
        try:
            parsed = _parse(origin, wildcards=False)
        except ValueError:
            return False
        return any(_matches(pattern, parsed) for pattern in self._compiled)

    def check(self, origin: str | None) -> None:
        """Return if ``origin`` may connect; raise ``Refused(FORBIDDEN)`` (4403) if not."""
        if not self.allows(origin):
            shown = origin if origin is None else origin[:200]
            raise Refused(Refusal.FORBIDDEN, f"origin {shown!r} is not in allowed_origins")
