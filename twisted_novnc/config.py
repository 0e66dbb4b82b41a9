"""The daemon's settings: an ini file, checked against one schema, held in frozen records.

Each key is declared once, as a field of its section's record, with its parser, default and help
line; ``SCHEMA`` is built from those fields, so the parser, the sample ``etc/twisted-novnc.ini``,
docs/configuration.rst (both checked by tests) and ``check-config`` cannot drift
apart.

To add a key, add one ``_setting(...)`` field to its record.  To add a section, write a record of
``_setting`` fields and add one field for it to ``Settings``, made by ``_section(...)``.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from twisted_novnc._compat.twisted import endpoint_port
from twisted_novnc.front.auth import DEFAULT_MAX_TOKEN_AGE, parse_cookie_name
from twisted_novnc.front.forwarded import FORWARDED_HEADERS, proxied_endpoint
from twisted_novnc.front.origins import OriginPolicy
from twisted_novnc.relay.targets import (
    ALL_PORTS,
    DEFAULT_NETWORKS,
    format_networks,
    format_ports,
    parse_networks,
    parse_ports,
)

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, told in one line that says where it is and what is wrong."""

    def __init__(self, source: str, section: str | None, key: str | None, problem: str) -> None:
        super().__init__(source, section, key, problem)
        self.source = source
        self.section = section
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        if self.section is None:
            text = f"{self.source}: {self.problem}"
        elif self.key is None:
            text = f"{self.source}: [{self.section}]: {self.problem}"
        else:
            text = f"{self.source}: [{self.section}] {self.key}: {self.problem}"
        # Names and messages come from user text and libraries; keep the promise of one line.
        return " ".join(text.splitlines())


# --- kinds of value ---------------------------------------------------------------------------


def _verbatim(text: str) -> str:
    return text


@attrs.frozen
class Kind(Generic[T]):
    """One kind of value: how ini text becomes a value and back, and what it allows (for docs).

    ``parse`` raises ValueError with the problem, which the caller turns into a ConfigError
    naming the file, section and key.  ``redact`` hides secrets when settings are shown.
    """

    parse: Callable[[str], T]
    format: Callable[[T], str]
    allowed: str
    redact: Callable[[str], str] = _verbatim


def _integer(low: int, high: int) -> Kind[int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError(f"expected a whole number from {low} to {high}, got {text!r}")
        # int() of a huge digit string is slow or refused; such a number is out of range anyway.
        digits = text.lstrip("0") or "0"
        value = int(digits) if len(digits) <= len(str(high)) else high + 1
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, got {text}")
        return value

    return Kind(parse, str, f"a whole number from {low} to {high}")


_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _parse_seconds(text: str) -> float:
    # A regex, not float() alone: float() also takes "nan", "1_0" and non-ASCII digits.
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"expected a number of seconds, like 30 or 2.5, got {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {text}")
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {text}")
    return value


def _format_seconds(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


_SECONDS = Kind(_parse_seconds, _format_seconds, "a number of seconds greater than 0")


def _parse_seconds_or_zero(text: str) -> float:
    return 0.0 if _DECIMAL.fullmatch(text) and float(text) == 0 else _parse_seconds(text)


_SECONDS_OR_ZERO = Kind(_parse_seconds_or_zero, _format_seconds, "a number of seconds, or 0")


def _parse_networks(text: str) -> tuple[str, ...]:
    networks = []
    for word in text.split():
        try:
            networks.append(str(ipaddress.ip_network(word, strict=False)))
        except ValueError:
            raise ValueError(f"not an IP network (CIDR) or address: {word!r}") from None
    return tuple(networks)


_NETWORKS = Kind(
    _parse_networks,
    " ".join,
    "IP networks in CIDR notation or single addresses, separated by whitespace, or empty",
)


def _choice(*choices: str) -> Kind[str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return Kind(parse, _verbatim, "one of " + ", ".join(f"``{c}``" for c in choices))


def _parse_switch(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(f"must be on or off; got {text!r}")
    return text == "on"


_SWITCH = Kind(_parse_switch, lambda value: "on" if value else "off", "``on`` or ``off``")


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# PostgreSQL silently truncates longer names, and pg_notify() refuses longer channels.
_NAME_MAX = 63


def _identifier(qualified: bool = False, optional: bool = False) -> Kind[str]:
    """An SQL name, used quoted (so case matters), optionally ``schema.name``, optionally empty."""
    pattern = re.compile(rf"{_NAME}(?:\.{_NAME})?" if qualified else _NAME)
    what = "an SQL name, optionally schema-qualified" if qualified else "an SQL name"

    def parse(text: str) -> str:
        if optional and text == "":
            return text
        if not pattern.fullmatch(text):
            raise ValueError(
                f"must be {what} (ASCII letters, digits and _, not starting with a digit),"
                f" got {text!r}"
            )
        if any(len(part) > _NAME_MAX for part in text.split(".")):
            raise ValueError(f"a name may be at most {_NAME_MAX} characters long, got {text!r}")
        return text

    allowed = what + " (letters, digits, ``_``; case matters)"
    return Kind(parse, _verbatim, allowed + ", or empty" if optional else allowed)


def _parse_words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_WORDS = Kind(_parse_words, " ".join, "words separated by whitespace, or empty")


def _check_endpoint(description: str) -> None:
    try:
        endpoint = serverFromString(MemoryReactor(), description)
    # Endpoint parsers (plugins too) raise all sorts: TypeError, KeyError, OSError, SSL errors.
    except Exception as e:
        raise ValueError(f"bad endpoint {description!r}: {e}") from None
    # Twisted parses "tcp:70000" happily and fails only at listen time; say so now.
    port = endpoint_port(endpoint)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"bad endpoint {description!r}: port {port} is not in 0..65535")


def _parse_endpoints(text: str) -> tuple[str, ...]:
    descriptions = tuple(text.split())
    if not descriptions:
        raise ValueError("needs at least one endpoint, like tcp:6080:interface=127.0.0.1")
    for description in descriptions:
        _check_endpoint(description)
    for i, description in enumerate(descriptions):
        if description in descriptions[:i]:
            raise ValueError(f"endpoint {description!r} is listed twice")
    return descriptions


def _parse_optional_endpoints(text: str) -> tuple[str, ...]:
    return _parse_endpoints(text) if text.split() else ()


_OPTIONAL_ENDPOINTS = Kind(
    _parse_optional_endpoints,
    " ".join,
    "Twisted server endpoint strings separated by whitespace, or empty for none",
)

_ENDPOINTS = Kind(
    _parse_endpoints,
    " ".join,
    "one or more Twisted server endpoint strings separated by whitespace,"
    " e.g. ``tcp:6080:interface=127.0.0.1``, ``unix:/run/novnc.sock``,"
    " ``systemd:domain=INET:index=0``",
)

#: The most channels ``[database] notify_shards`` may spread sessions over: PostgreSQL matches
#: each NOTIFY against every channel a backend listens on, so far more would cost, not save.
MAX_NOTIFY_SHARDS = 65536

#: The most worker processes ``[novnc] workers`` may ask for: a typo must not fork-bomb.
MAX_WORKERS = 256


def _parse_workers(text: str) -> int | None:
    if text == "auto":
        return None
    if not re.fullmatch(r"[0-9]+", text) or not text.strip("0"):
        raise ValueError(f"must be a positive integer or auto, got {text!r}")
    digits = text.lstrip("0")
    if len(digits) > len(str(MAX_WORKERS)) or int(digits) > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS}, got {text}")
    return int(digits)


_WORKERS = Kind(
    _parse_workers,
    lambda value: "auto" if value is None else str(value),
    f"a whole number from 1 to {MAX_WORKERS}, or ``auto`` (one per core)",
)

_PLACEHOLDER = "{session_id}"


def _parse_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    # A request's raw path is printable ASCII; anything else could never match.
    if not re.fullmatch(r"[!-~]*", text):
        raise ValueError(f"may hold only printable ASCII characters, without spaces, got {text!r}")
    if "?" in text or "#" in text:
        raise ValueError(f"may not contain '?' or '#' (only the path is matched), got {text!r}")
    if text.count(_PLACEHOLDER) != 1:
        raise ValueError(f"must contain {_PLACEHOLDER} exactly once, got {text!r}")
    if re.search(r"[{}]", text.replace(_PLACEHOLDER, "")):
        raise ValueError(f"may not contain '{{' or '}}' other than {_PLACEHOLDER}, got {text!r}")
    return text


_PATH = Kind(
    _parse_path,
    _verbatim,
    "a path starting with ``/`` holding ``{session_id}`` exactly once;"
    " printable ASCII without spaces, ``?``, ``#`` or other braces",
)


def _parse_directory(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    if "\n" in text:
        raise ValueError(f"must be one line, got {text!r}")
    return text


_DIRECTORY = Kind(_parse_directory, _verbatim, "a directory path, relative or absolute")


def _parse_optional_file(text: str) -> str:
    if "\n" in text:
        raise ValueError(f"must be one line, got {text!r}")
    return text


_OPTIONAL_FILE = Kind(_parse_optional_file, _verbatim, "a file path, or empty")

# libpq's keyword/value grammar: a value is quoted ('...', with \' and \\ inside) or runs to the
# next unescaped space, a backslash escaping the next character (so ``password=a\ b`` is "a b").
# Space is C's isspace(), not Python's wider \s.
_KV_PASSWORD = re.compile(
    r"(?i)((?:^|(?<=[ \t\n\r\f\v]))\w*password[ \t\n\r\f\v]*=[ \t\n\r\f\v]*)"
    r"('(?:[^'\\]|\\[\s\S]?)*'?|(?:\\[\s\S]?|[^ \t\n\r\f\v\\])*)"
)
_URI = re.compile(r"(?i)postgres(?:ql)?://")
# libpq ends the userinfo at the first '@' or '/', so the password is what lies before either.
_URI_PASSWORD = re.compile(r"(?i)^(postgres(?:ql)?://[^:@/]*):[^@/]*@")
_URI_QUERY_PASSWORD = re.compile(r"(?i)([?&]\w*password=)[^&#]*")


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, fit to print or log."""
    if _URI.match(dsn):
        return _URI_QUERY_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1:***@", dsn))
    return _KV_PASSWORD.sub(r"\1***", dsn)


def _format_lines(text: str) -> str:
    """Text as an ini value: continuation lines are indented."""
    return "\n    ".join(text.split("\n"))


_DSN = Kind(
    _verbatim,
    _format_lines,
    "``embedded``, or a libpq connection string (``host=... dbname=...``)"
    " or URI (``postgresql://user@host/db``)",
    redact=mask_dsn,
)

_OPTIONAL_DSN = Kind(
    _verbatim,
    _format_lines,
    "empty, ``embedded`` (with ``dsn = embedded``), or a libpq connection string or URI",
    redact=mask_dsn,
)


# --- the schema -------------------------------------------------------------------------------

_META = "twisted_novnc.config"


def _setting(kind: Kind[T], default: T, help: str) -> Any:
    """A record field that is an ini key: its parser, its default and its one-line help."""
    return attrs.field(default=default, metadata={_META: (kind, help)})


def _section(record: type[T], help: str) -> T:
    """A ``Settings`` field that is an ini section, read into ``record``."""
    return attrs.field(factory=record, metadata={_META: (record, help)})


@attrs.frozen
class NovncSettings:
    """``[novnc]``: where browsers connect and how their connections are answered."""

    listen: tuple[str, ...] = _setting(
        _ENDPOINTS,
        ("tcp:6080:interface=127.0.0.1",),
        "Where to accept browser connections.",
    )
    workers: int | None = _setting(
        _WORKERS,
        1,
        "How many processes serve browsers, sharing the listening sockets; auto = one per"
        " core (None here).  More than one makes this process their supervisor.",
    )
    path: str = _setting(
        _PATH,
        "/websockify/{session_id}",
        "The URL path a browser opens; {session_id} names the session row to connect to.",
    )
    readiness_timeout: float = _setting(
        _SECONDS,
        30.0,
        "How long a connection waits for its session's VM address to be committed.",
    )
    target_port: int = _setting(
        _integer(1, 65535),
        5900,
        "The VNC port on the VM, used when the session row names none.",
    )
    reject: str = _setting(
        _choice("close", "http"),
        "close",
        "How a refused connection is told why: close = complete the handshake, then close with"
        " code 4000 + HTTP status (browsers can read it); http = refuse the handshake with the"
        " HTTP status (browsers see only 1006).",
    )
    max_message_size: int = _setting(
        _integer(1024, 64 * 1024 * 1024),
        1024 * 1024,
        "The largest WebSocket frame or message, in bytes, accepted from a browser.",
    )
    drain_timeout: float = _setting(
        _SECONDS,
        10.0,
        "On SIGTERM, how long live relays may go on before they are closed with 1001.",
    )
    drain_delay: float = _setting(
        _SECONDS_OR_ZERO,
        5.0,
        "On SIGTERM, how long /readyz answers 503 while new browsers are still accepted and"
        " served (a load balancer's time to notice) before the drain starts; only with an"
        " [admin] listener (nothing else could notice); 0 = drain at once.",
    )
    memory_trim_interval: float = _setting(
        _SECONDS_OR_ZERO,
        60.0,
        "Every this many seconds, and once each time the last browser connection closes, hand"
        " the heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere):"
        " without it the process keeps its busiest moment's memory; 0 = never.",
    )
    upgrade_drain_timeout: float = _setting(
        _SECONDS,
        86400.0,
        "After an upgrade (SIGUSR2), how long what stays in the old generation (waiting"
        " browsers, TLS relays, any relay that could not move) may go on before it is closed"
        " with 1001.",
    )
    trusted_proxies: tuple[str, ...] = _setting(
        _NETWORKS,
        (),
        "Proxies whose forwarded_header names the real client address.",
    )
    forwarded_header: str = _setting(
        _choice(*FORWARDED_HEADERS),
        "x-forwarded-for",
        "The one header the trusted proxies write the client address in (read from the right);"
        " the other is ignored.",
    )
    proxy_protocol_from: tuple[str, ...] = _setting(
        _NETWORKS,
        (),
        "The peers that may send a PROXY header to a haproxy: listener; any other is closed at"
        " accept.  Required with a haproxy: listener (except over unix:).",
    )
    ping_interval: int = _setting(
        _integer(0, 86400),
        25,
        "Seconds between WebSocket pings to an idle browser (0 = never).",
    )
    allowed_origins: OriginPolicy = _setting(  # noqa: RUF009  (frozen, so shared safely)
        Kind(OriginPolicy.from_text, OriginPolicy.to_text,
             "origins (``scheme://host[:port]``, ``*`` for one whole host label) separated by"
             " whitespace, or empty for no check"),
        OriginPolicy(),
        "The browser Origins allowed to connect; any other gets 4403.",
    )
    max_connections: int = _setting(
        _integer(1, 1_000_000),
        10000,
        "The most browser connections open at once; more are refused at accept.",
    )
    max_per_ip: int = _setting(
        _integer(1, 1_000_000),
        256,
        "The most connections open at once from one client address (4429 beyond); also the"
        " most from one peer address still sending their request head (closed at accept).",
    )
    max_per_session: int = _setting(
        _integer(1, 1_000_000),
        16,
        "The most connections (waiting or relaying) on one session (4429 beyond).",
    )
    max_waiting: int = _setting(
        _integer(1, 1_000_000),
        2000,
        "The most browsers held waiting for readiness at once (4429 beyond).",
    )
    max_waiting_per_ip: int = _setting(
        _integer(1, 1_000_000),
        64,
        "The most browsers from one client address held waiting at once (4429 beyond).",
    )
    request_timeout: float = _setting(
        _SECONDS,
        10.0,
        "How long a client may take to send its HTTP upgrade request before it is dropped.",
    )
    idle_timeout: int = _setting(
        _integer(0, 1_000_000),
        3600,
        "Seconds a relay may move no byte either way before it is closed (4408); 0 = never.",
    )
    write_timeout: int = _setting(
        _integer(0, 1_000_000),
        60,
        "Seconds a browser (or, in websocket mode, the VM) may leave a full write buffer"
        " untaken before it is dropped; 0 = never.",
    )
    ping_timeout: int = _setting(
        _integer(2, 3600),
        10,
        "Seconds a ping may go unanswered before the browser is taken for gone.",
    )
    fast_path: bool = _setting(
        _SWITCH,
        True,
        "Relay through the fast path (frames parsed chunk by chunk, sockets written at once,"
        " which reach into Autobahn's and Twisted's internals); off = only their public APIs.",
    )


@attrs.frozen
class DatabaseSettings:
    """``[database]``: the PostgreSQL table that says where each session's VM is."""

    dsn: str = _setting(
        _DSN,
        "embedded",
        "The database: embedded = a private PostgreSQL cluster under embedded_dir; anything"
        " else is a libpq connection string or URI, used as written.",
    )
    listen_dsn: str = _setting(
        _OPTIONAL_DSN,
        "",
        "The database for the LISTEN connection alone, when dsn goes through a pooler in"
        " transaction mode (PgBouncer): a direct connection to the same database; empty = dsn.",
    )
    table: str = _setting(
        _identifier(qualified=True),
        "auth_sessions",
        "The sessions table, optionally schema-qualified.",
    )
    id_column: str = _setting(
        _identifier(),
        "session_id",
        "The column matched against the {session_id} of the path.",
    )
    ip_column: str = _setting(
        _identifier(),
        "vm_ip",
        "The column holding the VM's IP address; a connection waits until it is committed.",
    )
    port_column: str = _setting(
        _identifier(optional=True),
        "",
        "The column holding the VM's VNC port; empty means every VM listens on target_port.",
    )
    status_column: str = _setting(
        _identifier(optional=True),
        "status",
        "The column holding the session's status; empty means the status is not checked.",
    )
    ended_statuses: tuple[str, ...] = _setting(
        _WORDS,
        ("ended", "closed", "expired", "failed"),
        "Statuses meaning the session is over: its connections are refused.",
    )
    notify_channel: str = _setting(
        _identifier(),
        "twisted_novnc",
        "The LISTEN/NOTIFY channel the table's trigger announces changed sessions on.",
    )
    notify_shards: int = _setting(
        _integer(0, MAX_NOTIFY_SHARDS),
        0,
        "0 = one channel (notify_channel) for every session; N > 0 = the trigger NOTIFYs"
        " <notify_channel>_<shard>, one of N by the id's md5, and each daemon LISTENs only on"
        " the shards its waiting browsers and live relays are in (many daemons, one database).",
    )
    expires_column: str = _setting(
        _identifier(optional=True),
        "",
        "A timestamp column; when set, a session's connections are closed (4410) at that time.",
    )
    pool_size: int = _setting(
        _integer(1, 64),
        4,
        "How many connections run session lookups (LISTEN has one more of its own).",
    )
    prepared_statements: str = _setting(
        _choice("auto", "on", "off"),
        "auto",
        "Run the session lookup and the token update as SQL prepared statements on each pool"
        " connection (planned once, about 40 us less a lookup): auto = prepared, and back to"
        " unprepared for good at the first sign of a transaction pooler (PgBouncer's"
        " pool_mode = transaction, even with max_prepared_statements); on = always prepared"
        " (a direct connection or a session pooler only); off = never.",
    )
    embedded_dir: str = _setting(
        _DIRECTORY,
        "var/postgres",
        "Where the private cluster lives when dsn = embedded; relative to the working directory.",
    )


@attrs.frozen
class UpstreamSettings:
    """``[upstream]``: how the proxy connects to the VM."""

    allowed_networks: tuple[Any, ...] = _setting(
        Kind(parse_networks, format_networks,
             "IP networks in CIDR notation separated by whitespace"),
        DEFAULT_NETWORKS,
        "The networks a session's vm_ip may be in; any other is refused (4403), never reached.",
    )
    allow_self: bool = _setting(
        _SWITCH,
        False,
        "Whether a vm_ip may be one of the proxy host's own addresses (any interface's, or"
        " loopback); off = refused with 4403 even inside allowed_networks.",
    )
    allowed_ports: tuple[Any, ...] = _setting(
        Kind(parse_ports, format_ports, "ports and ranges (``5900-5999``) separated by whitespace"),
        ALL_PORTS,
        "The VNC ports the proxy may connect to; any other is refused (4403).",
    )
    mode: str = _setting(
        _choice("tcp", "websocket"),
        "tcp",
        "tcp = raw TCP to the VM's VNC server; websocket = a WebSocket client connection to a"
        " websockify on the VM (ws://vm_ip:port/<path suffix>?<query without token>).",
    )
    port: int = _setting(
        _integer(0, 65535),
        0,
        "The upstream port when it differs from the session's VNC port; 0 = the same.",
    )
    tls: str = _setting(
        _choice("off", "on", "verify"),
        "off",
        "TLS to the VM (wss:// in websocket mode): on = encrypt without checking the"
        " certificate; verify = check it against ca_file (or the system's roots) and vm_ip.",
    )
    ca_file: str = _setting(
        _OPTIONAL_FILE,
        "",
        "With tls = verify: a PEM file of the CA certificates the VMs' certificates chain to.",
    )
    connect_retry: bool = _setting(
        _SWITCH,
        True,
        "While the VM refuses connections (still booting), retry with backoff until the"
        " readiness deadline, then refuse with 4502; off = refuse at the first failure.",
    )


@attrs.frozen
class VncSettings:
    """``[vnc]``: the VMs' VNC credentials, which the proxy answers with (never the browser)."""

    password_column: str = _setting(
        _identifier(optional=True),
        "",
        "The column holding the VM's VNC password, read with the session; empty = none.",
    )
    username_column: str = _setting(
        _identifier(optional=True),
        "",
        "The column holding the VM's VNC user name (VeNCrypt Plain schemes); empty = none.",
    )
    password_file: str = _setting(
        _OPTIONAL_FILE,
        "",
        "A file holding one VNC password for every VM (one line; mode 0600 or 0640),"
        " read at start and on upgrade; a row's password_column wins over it.",
    )
    handshake_timeout: float = _setting(
        _SECONDS,
        10.0,
        "With credentials: how long the VM may take to complete the RFB opening"
        " (version, security, authentication) before the browser gets 4522.",
    )

    @property
    def enabled(self) -> bool:
        """Whether the proxy speaks RFB to both ends: any source of credentials is set."""
        return bool(self.password_column or self.username_column or self.password_file)


@attrs.frozen
class AuthSettings:
    """``[auth]``: what a browser must show besides the session id."""

    mode: str = _setting(
        _choice("none", "column", "hmac"),
        "none",
        "none = the session id is the only capability; column = a token whose SHA-256 is in"
        " token_column; hmac = a token signed with the key in secret_file.",
    )
    token_column: str = _setting(
        _identifier(optional=True),
        "",
        "With mode = column: the column holding the SHA-256 hex digest of the session's token.",
    )
    one_time: bool = _setting(
        _SWITCH,
        False,
        "With mode = column: consume the token on first use, so a replay gets 4403.",
    )
    cookie: str = _setting(
        Kind(lambda text: parse_cookie_name(text) or "", _verbatim, "a cookie name, or empty"),
        "",
        "A cookie that may carry the token instead of the token query parameter.",
    )
    secret_file: str = _setting(
        _OPTIONAL_FILE,
        "",
        "With mode = hmac: the file holding the HMAC key (at least 16 bytes, not world-readable).",
    )
    max_token_age: float = _setting(
        _SECONDS,
        float(DEFAULT_MAX_TOKEN_AGE),
        "With mode = hmac: a token that expires more than this many seconds ahead is refused"
        " (4403).",
    )


@attrs.frozen
class WebSettings:
    """``[web]``: the viewer page and the noVNC client's files, served on the WebSocket
    listener."""

    root: str = _setting(
        _OPTIONAL_FILE,
        "",
        "A directory (e.g. noVNC's) served over HTTP on the listener; empty = none.",
    )
    send_timeout: float = _setting(
        _SECONDS,
        30.0,
        "How long a client may take no data of a file it asked for before it is dropped.",
    )
    viewer: bool = _setting(
        _SWITCH,
        True,
        "Serve the viewer page shipped with the package (noVNC 1.7.0) on the listener:"
        " http://host:port/vnc/<session_id>?token=...; off = no page.",
    )


@attrs.frozen
class AdminSettings:
    """``[admin]``: the operators' listener: metrics and health."""

    listen: tuple[str, ...] = _setting(
        _OPTIONAL_ENDPOINTS,
        (),
        "Where to serve /metrics, /healthz, /readyz, /upgrade and /recordings/; empty = no"
        " admin listener.",
    )


@attrs.frozen
class LogSettings:
    """``[log]``: where the daemon's log goes, and in which format."""

    format: str = _setting(
        _choice("text", "json"),
        "text",
        "text = twistd's lines; json = one JSON object per line from the first, each with"
        " an event name, for log shippers.",
    )
    file: str = _setting(
        _OPTIONAL_FILE,
        "",
        "A file to write the log to, reopened on SIGHUP; empty = twistd's own log.",
    )
    admin_access: bool = _setting(
        _SWITCH,
        False,
        "Log one line per admin listener request (/metrics, /healthz, /readyz); off = none,"
        " so that scrapes and health checks do not fill the log.",
    )


#: ``[record] max_bytes``'s default: one recording's payload stops at 1 GiB.
DEFAULT_RECORD_MAX_BYTES = 1 << 30
#: The largest byte count a ``[record]`` limit may name (an exabyte: a typo, not a disk).
_MAX_BYTE_COUNT = 1 << 60


@attrs.frozen
class RecordSettings:
    """``[record]``: what each relay's browser saw, written to a file for audit and playback."""

    dir: str = _setting(
        _OPTIONAL_FILE,
        "",
        "The directory recordings are written to (created 0700; refused at start if group or"
        " others have any permission on it); empty = nothing is recorded.",
    )
    mode: str = _setting(
        _choice("all", "column"),
        "all",
        "all = every relay is recorded; column = only sessions whose record_column is true.",
    )
    record_column: str = _setting(
        _identifier(optional=True),
        "",
        "With mode = column: a boolean column of the sessions table, read with the session.",
    )
    input: bool = _setting(
        _SWITCH,
        False,
        "Also record what the browser sent (keystrokes, pointer); off by default because"
        " keystrokes include passwords.",
    )
    max_bytes: int = _setting(
        _integer(1, _MAX_BYTE_COUNT),
        DEFAULT_RECORD_MAX_BYTES,
        "The most payload bytes one recording holds; beyond it the recording stops (the"
        " session goes on).",
    )
    max_total_bytes: int = _setting(
        _integer(0, _MAX_BYTE_COUNT),
        0,
        "The most bytes the directory may hold; beyond it new recordings are refused (never"
        " sessions); 0 = no limit but the disk.",
    )

    @property
    def enabled(self) -> bool:
        """Whether anything is recorded at all."""
        return bool(self.dir)


@attrs.frozen
class Settings:
    """Everything the daemon is configured with, and the file it came from."""

    novnc: NovncSettings = _section(
        NovncSettings, "The browser-facing listener and how it answers."
    )
    database: DatabaseSettings = _section(
        DatabaseSettings, "The table that says where each session's VM is."
    )
    upstream: UpstreamSettings = _section(UpstreamSettings, "How the proxy connects to the VM.")
    vnc: VncSettings = _section(
        VncSettings, "The VMs' VNC credentials: the proxy logs in, the browser never sees them."
    )
    auth: AuthSettings = _section(AuthSettings, "What a browser must show besides the session id.")
    web: WebSettings = _section(WebSettings, "The noVNC client's files, on the same listener.")
    admin: AdminSettings = _section(AdminSettings, "The operators' listener: metrics and health.")
    log: LogSettings = _section(LogSettings, "Where the log goes, and in which format.")
    record: RecordSettings = _section(
        RecordSettings, "Recordings of what each browser saw, for audit and playback."
    )
    source: str = "<defaults>"


@attrs.frozen
class Key:
    """One ini key: its section, name, kind of value, default and one-line help."""

    section: str
    name: str
    kind: Kind[Any]
    default: Any
    help: str

    @property
    def default_text(self) -> str:
        """The default as it is written in an ini file."""
        return self.kind.format(self.default)


@attrs.frozen
class Section:
    """One ini section: its name, the record it is read into, its help and its keys in order."""

    name: str
    record: type
    help: str
    keys: Mapping[str, Key]


def _build_schema() -> dict[str, Section]:
    schema = {}
    for field in attrs.fields(Settings):
        if _META not in field.metadata:
            continue
        record, section_help = field.metadata[_META]
        keys = {}
        for f in attrs.fields(record):
            kind, key_help = f.metadata[_META]
            keys[f.name] = Key(field.name, f.name, kind, f.default, key_help)
        schema[field.name] = Section(field.name, record, section_help, keys)
    return schema


SCHEMA: Mapping[str, Section] = _build_schema()
"""Every section and its keys, in file order: the one list the parser, docs and tools follow."""


# --- reading ----------------------------------------------------------------------------------


class _Parser(configparser.ConfigParser):
    """configparser with case-sensitive keys, no interpolation, ``=`` only, no DEFAULT magic."""

    def __init__(self) -> None:
        # A section header cannot hold a newline, so no file can open this "default" section;
        # "[DEFAULT]" is then an ordinary (unknown) section instead of one merged into all.
        super().__init__(interpolation=None, delimiters=("=",), default_section="\n")

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def _did_you_mean(name: str, known: Iterable[str], template: str) -> str:
    known = list(known)
    same_but_case = [k for k in known if k.lower() == name.lower()]
    close = same_but_case or difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {template.format(close[0])}?)" if close else ""


def _again(lineno: int | None) -> str:
    return f" (again on line {lineno})" if lineno is not None else ""


def _read_ini(text: str, source: str) -> _Parser:
    """configparser's own view of the text, its errors turned into ConfigErrors."""
    parser = _Parser()
    try:
        parser.read_string(text, source)
    except configparser.DuplicateSectionError as e:
        problem = "section appears twice" + _again(e.lineno)
        raise ConfigError(source, e.section, None, problem) from None
    except configparser.DuplicateOptionError as e:
        problem = "key set twice" + _again(e.lineno)
        raise ConfigError(source, e.section, e.option, problem) from None
    except configparser.MissingSectionHeaderError as e:
        problem = f"line {e.lineno}: {e.line.strip()!r} comes before any [section] header"
        raise ConfigError(source, None, None, problem) from None
    except configparser.ParsingError as e:
        lineno = e.errors[0][0]
        line = text.split("\n")[lineno - 1].strip()  # configparser splits lines on "\n" alone
        problem = f"line {lineno}: expected 'key = value' or '[section]', got {line!r}"
        raise ConfigError(source, None, None, problem) from None
    except configparser.Error as e:  # any other complaint configparser may grow
        raise ConfigError(source, None, None, e.message) from None
    return parser


#: Where values given on the command line come from, in error messages.
COMMAND_LINE = "command line"


def parse_config(
    text: str,
    source: str = "<string>",
    overrides: Mapping[tuple[str, str], str] | None = None,
) -> Settings:
    """Settings from ini text; ``source`` names it in errors.  Absent keys take their defaults.

    ``overrides`` maps (section, key) to ini text that replaces the file's value (the command
    line's ``--listen`` and friends); their errors name the command line.
    """
    parser = _read_ini(text, source)
    overridden: set[tuple[str, str]] = set()
    for (section_name, key_name), value in (overrides or {}).items():
        section = SCHEMA.get(section_name)
        if section is None or key_name not in section.keys:
            raise ConfigError(COMMAND_LINE, section_name, key_name, "unknown key")
        if not parser.has_section(section_name):
            parser.add_section(section_name)
        parser.set(section_name, key_name, value)
        overridden.add((section_name, key_name))
    records: dict[str, Any] = {}
    for section_name in parser.sections():
        section = SCHEMA.get(section_name)
        if section is None:
            hint = _did_you_mean(section_name, SCHEMA, "[{}]")
            raise ConfigError(source, section_name, None, "unknown section" + hint)
        values: dict[str, Any] = {}
        for key_name in parser.options(section_name):
            key = section.keys.get(key_name)
            if key is None:
                hint = _did_you_mean(key_name, section.keys, "{!r}")
                raise ConfigError(source, section_name, key_name, "unknown key" + hint)
            try:
                values[key_name] = key.kind.parse(parser.get(section_name, key_name))
            except ValueError as e:
                where = COMMAND_LINE if (section_name, key_name) in overridden else source
                raise ConfigError(where, section_name, key_name, str(e)) from None
        records[section_name] = section.record(**values)
    settings = Settings(source=source, **records)
    _check_together(settings, source)
    return settings


def _check_together(settings: Settings, source: str) -> None:
    """Keys that only make sense with others."""
    auth = settings.auth
    if auth.mode == "column" and not auth.token_column:
        raise ConfigError(source, "auth", "token_column", "required when mode = column")
    if auth.mode == "hmac" and not auth.secret_file:
        raise ConfigError(source, "auth", "secret_file", "required when mode = hmac")
    if auth.one_time and auth.mode != "column":
        raise ConfigError(source, "auth", "one_time", "only applies to mode = column")
    db = settings.database
    if (db.listen_dsn == "embedded") != (db.dsn == "embedded") and db.listen_dsn:
        raise ConfigError(
            source, "database", "listen_dsn",
            "embedded only with dsn = embedded, and only embedded (or empty) then: LISTEN must"
            " see the commits of the database the sessions are read from",
        )
    if db.notify_shards and len(f"{db.notify_channel}_{db.notify_shards - 1}") > _NAME_MAX:
        raise ConfigError(
            source, "database", "notify_shards",
            f"the last shard's channel {db.notify_channel}_{db.notify_shards - 1} is longer than"
            f" PostgreSQL's {_NAME_MAX} characters: use a shorter notify_channel or fewer shards",
        )
    if db.prepared_statements == "on" and db.listen_dsn and db.dsn != "embedded":
        raise ConfigError(
            source, "database", "prepared_statements",
            "on with a listen_dsn: listen_dsn says dsn goes through a pooler in transaction"
            " mode, where a prepared statement may be run on a server connection that never"
            " prepared it; use auto (falls back to unprepared there) or off",
        )
    upstream = settings.upstream
    if not upstream.allow_self:
        for network in upstream.allowed_networks:
            if network.is_loopback:
                raise ConfigError(
                    source, "upstream", "allowed_networks",
                    f"{network} is loopback, which is this host: every address in it would be"
                    " refused; set [upstream] allow_self = on to reach the proxy's own host",
                )
    record = settings.record
    if record.mode == "column" and not record.record_column:
        raise ConfigError(source, "record", "record_column", "required when mode = column")
    novnc = settings.novnc
    if not novnc.proxy_protocol_from:
        for description in novnc.listen:
            inner = proxied_endpoint(description)
            while inner is not None and proxied_endpoint(inner) is not None:
                inner = proxied_endpoint(inner)
            if inner is not None and not inner.lower().startswith("unix:"):
                raise ConfigError(
                    source, "novnc", "proxy_protocol_from",
                    f"required with the haproxy: listener {description!r}: the load balancers'"
                    " addresses (CIDR networks or single addresses), the only peers whose"
                    " PROXY header naming the client is believed",
                )
    if novnc.workers != 1:
        for description in novnc.listen:
            if "systemd:" in description:
                raise ConfigError(
                    source, "novnc", "listen",
                    f"{description!r}: an inherited (systemd:) socket cannot be shared with"
                    " [novnc] workers; use workers = 1, or tcp:, ssl: or unix: endpoints",
                )


def read_config(
    path: str, overrides: Mapping[tuple[str, str], str] | None = None
) -> Settings:
    """Settings from the ini file at ``path``; an unreadable file is a ConfigError naming it."""
    try:
        # utf-8-sig: a byte-order mark left by an editor is not a parse error.
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read the file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, None, f"not UTF-8 text (byte {e.start})") from None
    return parse_config(text, path, overrides)


def _items(settings: Settings, redact: bool) -> list[tuple[str, str, str]]:
    items = []
    for section in SCHEMA.values():
        record = getattr(settings, section.name)
        for key in section.keys.values():
            text = key.kind.format(getattr(record, key.name))
            items.append((section.name, key.name, key.kind.redact(text) if redact else text))
    return items


def effective_items(settings: Settings) -> list[tuple[str, str, str]]:
    """Every (section, key, value as ini text) in effect, secrets masked, for showing to people."""
    return _items(settings, redact=True)


def settings_text(settings: Settings) -> str:
    """The settings as ini text that :func:`parse_config` reads back to equal settings.

    Secrets are left in: this is how a supervisor hands its exact settings (command-line
    overrides and all) to its workers, over a pipe; never show it to people.
    """
    lines: list[str] = []
    section = None
    for name, key, text in _items(settings, redact=False):
        if name != section:
            lines.append(f"[{name}]")
            section = name
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
