"""Tests for twisted_novnc.config: the schema, parse_config / read_config and their errors."""

from __future__ import annotations

import configparser
import re
import string
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_novnc.config import (
    SCHEMA,
    ConfigError,
    DatabaseSettings,
    NovncSettings,
    Settings,
    effective_items,
    mask_dsn,
    parse_config,
    read_config,
    settings_text,
)
from twisted_novnc.front.origins import OriginPolicy
from twisted_novnc.relay.targets import parse_networks, parse_ports

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "twisted-novnc.ini"
DOCS = ROOT / "docs" / "configuration.rst"

ALL_KEYS = [(s.name, k) for s in SCHEMA.values() for k in s.keys]


def parse_one(section: str, key: str, text: str) -> Any:
    """The parsed value of one key given as ini text."""
    settings = parse_config(f"[{section}]\n{key} = {text}\n", "test.ini")
    return getattr(getattr(settings, section), key)


def error_for(text: str, source: str = "test.ini") -> ConfigError:
    """The ConfigError that parsing ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return info.value


# --- defaults ---------------------------------------------------------------------------------


def test_empty_text_gives_defaults() -> None:
    """An empty file is valid and every key takes the default the brief names."""
    settings = parse_config("")
    assert settings.source == "<string>"
    assert settings.novnc == NovncSettings(
        listen=("tcp:6080:interface=127.0.0.1",),
        path="/websockify/{session_id}",
        readiness_timeout=30.0,
        target_port=5900,
        reject="close",
        max_message_size=1048576,
    )
    assert settings.database == DatabaseSettings(
        dsn="embedded",
        table="auth_sessions",
        id_column="session_id",
        ip_column="vm_ip",
        port_column="",
        status_column="status",
        ended_statuses=("ended", "closed", "expired", "failed"),
        notify_channel="twisted_novnc",
        pool_size=4,
        embedded_dir="var/postgres",
    )


def test_settings_constructor_defaults_match_parsed_defaults() -> None:
    """Settings() (for tests and tools) holds the same defaults as an empty file."""
    assert Settings() == attrs.evolve(parse_config(""), source="<defaults>")


def test_empty_sections_give_defaults() -> None:
    """A section with no keys is allowed and changes nothing."""
    assert parse_config("[novnc]\n[database]\n") == parse_config("")


@pytest.mark.parametrize(("section", "key"), ALL_KEYS)
def test_default_survives_its_own_parser(section: str, key: str) -> None:
    """Each default, written as ini text, is a valid value that parses back to itself."""
    k = SCHEMA[section].keys[key]
    assert k.kind.parse(k.default_text) == k.default


def test_settings_are_frozen() -> None:
    """Settings are values: nobody can change them behind another module's back."""
    settings = parse_config("")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.novnc.target_port = 1  # type: ignore[misc]


# --- valid and invalid values -----------------------------------------------------------------

VALID = [
    ("novnc", "listen", "tcp:0", ("tcp:0",)),
    ("novnc", "listen", r"tcp:6080:interface=\:\:1", (r"tcp:6080:interface=\:\:1",)),
    ("novnc", "listen", "unix:/run/novnc.sock:mode=660", ("unix:/run/novnc.sock:mode=660",)),
    ("novnc", "path", "/{session_id}", "/{session_id}"),
    ("novnc", "path", "/vnc/{session_id}/websockify", "/vnc/{session_id}/websockify"),
    ("novnc", "path", "/a-b_c.d~e%20/s{session_id}x", "/a-b_c.d~e%20/s{session_id}x"),
    ("novnc", "readiness_timeout", "2.5", 2.5),
    ("novnc", "readiness_timeout", "0.001", 0.001),
    ("novnc", "readiness_timeout", ".5", 0.5),
    ("novnc", "readiness_timeout", "1e3", 1000.0),
    ("novnc", "target_port", "1", 1),
    ("novnc", "target_port", "65535", 65535),
    ("novnc", "target_port", "05901", 5901),
    ("novnc", "workers", "1", 1),
    ("novnc", "workers", "auto", None),
    ("novnc", "workers", "256", 256),
    ("novnc", "workers", "08", 8),
    ("novnc", "reject", "http", "http"),
    ("novnc", "reject", "close", "close"),
    ("novnc", "max_message_size", "1024", 1024),
    ("novnc", "max_message_size", "67108864", 67108864),
    ("database", "dsn", "host=db dbname=app user=novnc", "host=db dbname=app user=novnc"),
    ("database", "dsn", "postgresql://novnc@db/app", "postgresql://novnc@db/app"),
    ("database", "dsn", "", ""),
    ("database", "table", "public.auth_sessions", "public.auth_sessions"),
    ("database", "table", "_T1", "_T1"),
    ("database", "table", "x" * 63 + ".y", "x" * 63 + ".y"),
    ("database", "id_column", "id", "id"),
    ("database", "ip_column", "VmIp", "VmIp"),
    ("database", "port_column", "vnc_port", "vnc_port"),
    ("database", "port_column", "", ""),
    ("database", "status_column", "", ""),
    ("database", "ended_statuses", "done", ("done",)),
    ("database", "ended_statuses", "", ()),
    ("database", "ended_statuses", "a\n    b  c", ("a", "b", "c")),
    ("database", "notify_channel", "novnc_2", "novnc_2"),
    ("database", "pool_size", "1", 1),
    ("database", "pool_size", "64", 64),
    ("database", "prepared_statements", "on", "on"),
    ("database", "prepared_statements", "off", "off"),
    ("database", "embedded_dir", "/var/lib/novnc/pg", "/var/lib/novnc/pg"),
    ("record", "dir", "/var/lib/novnc/recordings", "/var/lib/novnc/recordings"),
    ("record", "mode", "all", "all"),
    ("record", "record_column", "record_me", "record_me"),
    ("record", "input", "on", True),
    ("record", "max_bytes", "1", 1),
    ("record", "max_total_bytes", "0", 0),
    ("record", "max_total_bytes", "1099511627776", 1 << 40),
]


@pytest.mark.parametrize(("section", "key", "text", "expected"), VALID)
def test_valid_value(section: str, key: str, text: str, expected: Any) -> None:
    """A valid value is read into its typed form."""
    assert parse_one(section, key, text) == expected


INVALID = [
    ("novnc", "listen", "", "needs at least one endpoint"),
    ("novnc", "listen", "tcp:http", "bad endpoint 'tcp:http'"),
    ("novnc", "listen", "tcp:65536", "bad endpoint 'tcp:65536': port 65536 is not in 0..65535"),
    ("novnc", "listen", "tcp:1 tcp:1", "endpoint 'tcp:1' is listed twice"),
    ("novnc", "readiness_timeout", "0", "must be greater than 0, got 0"),
    ("novnc", "readiness_timeout", "0.0", "must be greater than 0"),
    ("novnc", "readiness_timeout", "-1", "expected a number of seconds"),
    ("novnc", "readiness_timeout", "nan", "expected a number of seconds"),
    ("novnc", "readiness_timeout", "inf", "expected a number of seconds"),
    ("novnc", "readiness_timeout", "1e400", "must be finite"),
    ("novnc", "readiness_timeout", "30s", "expected a number of seconds"),
    ("novnc", "readiness_timeout", "", "expected a number of seconds"),
    ("novnc", "target_port", "0", "must be from 1 to 65535, got 0"),
    ("novnc", "target_port", "65536", "must be from 1 to 65535, got 65536"),
    ("novnc", "target_port", "9" * 5000, "must be from 1 to 65535"),
    ("novnc", "target_port", "-1", "expected a whole number from 1 to 65535"),
    ("novnc", "target_port", "5900.0", "expected a whole number"),
    ("novnc", "target_port", "5_900", "expected a whole number"),
    ("novnc", "target_port", "\u0665\u0669\u0660\u0660", "expected a whole number"),
    ("novnc", "target_port", "", "expected a whole number"),
    ("novnc", "workers", "0", "must be a positive integer or auto, got '0'"),
    ("novnc", "workers", "000", "must be a positive integer or auto"),
    ("novnc", "workers", "-1", "must be a positive integer or auto"),
    ("novnc", "workers", "AUTO", "must be a positive integer or auto"),
    ("novnc", "workers", "2.5", "must be a positive integer or auto"),
    ("novnc", "workers", "", "must be a positive integer or auto"),
    ("novnc", "workers", "257", "must be at most 256, got 257"),
    ("novnc", "workers", "9" * 5000, "must be at most 256"),
    ("novnc", "reject", "CLOSE", "must be one of close, http"),
    ("novnc", "reject", "reset", "must be one of close, http"),
    ("novnc", "max_message_size", "1023", "must be from 1024 to 67108864"),
    ("novnc", "max_message_size", "67108865", "must be from 1024 to 67108864"),
    ("database", "table", "1abc", "must be an SQL name"),
    ("database", "table", "a.b.c", "must be an SQL name"),
    ("database", "table", "a-b", "must be an SQL name"),
    ("database", "table", "public.", "must be an SQL name"),
    ("database", "table", "auth sessions", "must be an SQL name"),
    ("database", "table", "", "must be an SQL name"),
    ("database", "table", "x" * 64, "at most 63 characters"),
    ("database", "id_column", "", "must be an SQL name"),
    ("database", "id_column", "public.id", "must be an SQL name"),
    ("database", "ip_column", "vm-ip", "must be an SQL name"),
    ("database", "port_column", "vnc port", "must be an SQL name"),
    ("database", "status_column", "1status", "must be an SQL name"),
    ("database", "notify_channel", "", "must be an SQL name"),
    ("database", "notify_channel", "c" * 64, "at most 63 characters"),
    ("database", "pool_size", "0", "must be from 1 to 64, got 0"),
    ("database", "pool_size", "65", "must be from 1 to 64, got 65"),
    ("database", "prepared_statements", "yes", "must be one of auto, on, off; got 'yes'"),
    ("database", "embedded_dir", "", "must not be empty"),
    ("database", "embedded_dir", "var\n  postgres", "must be one line"),
    ("record", "dir", "a\n  b", "must be one line"),
    ("record", "mode", "some", "must be one of all, column"),
    ("record", "record_column", "record me", "must be an SQL name"),
    ("record", "input", "yes", "must be on or off"),
    ("record", "max_bytes", "0", "must be from 1 to"),
    ("record", "max_bytes", "1GiB", "expected a whole number"),
    ("record", "max_total_bytes", "-1", "expected a whole number"),
]


def test_record_column_required_with_mode_column() -> None:
    """[record] mode = column without record_column names the missing key."""
    err = error_for("[record]\nmode = column\n")
    assert str(err) == "test.ini: [record] record_column: required when mode = column"
    settings = parse_config("[record]\nmode = column\nrecord_column = rec\n")
    assert (settings.record.mode, settings.record.record_column) == ("column", "rec")


@pytest.mark.parametrize(("section", "key", "text", "problem"), INVALID)
def test_invalid_value(section: str, key: str, text: str, problem: str) -> None:
    """A bad value is a ConfigError naming the file, section, key and problem, on one line."""
    err = error_for(f"[{section}]\n{key} = {text}\n")
    assert (err.source, err.section, err.key) == ("test.ini", section, key)
    assert problem in err.problem
    assert str(err) == f"test.ini: [{section}] {key}: {err.problem}"
    assert "\n" not in str(err)


def test_bad_value_message_exact() -> None:
    """The whole message for a bad value reads file: [section] key: problem."""
    err = error_for("[novnc]\ntarget_port = 70000\n", "etc/x.ini")
    assert str(err) == "etc/x.ini: [novnc] target_port: must be from 1 to 65535, got 70000"


def test_inline_comment_is_part_of_the_value() -> None:
    """A '#' after a value is not a comment (a DSN password may hold one), so it is an error."""
    err = error_for("[novnc]\ntarget_port = 5900 # VNC\n")
    assert str(err) == (
        "test.ini: [novnc] target_port: "
        "expected a whole number from 1 to 65535, got '5900 # VNC'"
    )


def test_values_are_stripped_and_comments_skipped() -> None:
    """Spaces around '=' and whole-line comments do not matter."""
    text = "# top\n[novnc]\n; note\n  # indented\ntarget_port=5901   \n"
    assert parse_config(text).novnc.target_port == 5901


# --- the error's format -----------------------------------------------------------------------


def test_config_error_str_forms() -> None:
    """str(ConfigError) has three forms, by how much of the location is known."""
    assert str(ConfigError("a.ini", "novnc", "listen", "bad")) == "a.ini: [novnc] listen: bad"
    assert str(ConfigError("a.ini", "novnc", None, "bad")) == "a.ini: [novnc]: bad"
    assert str(ConfigError("a.ini", None, None, "bad")) == "a.ini: bad"


def test_config_error_attributes() -> None:
    """The parts of a ConfigError are attributes, for tools that want them apart."""
    err = ConfigError("a.ini", "database", "dsn", "bad")
    assert (err.source, err.section, err.key, err.problem) == ("a.ini", "database", "dsn", "bad")


def test_config_error_str_is_one_line() -> None:
    """A problem holding a newline (say, from a library) still prints as one line."""
    assert str(ConfigError("a.ini", None, None, "two\nlines")) == "a.ini: two lines"


# --- unknown names, duplicates, syntax --------------------------------------------------------


def test_unknown_key_suggests_closest() -> None:
    """A misspelt key is an error suggesting the key that was meant."""
    err = error_for("[novnc]\nlisten_on = tcp:1\n")
    assert (err.section, err.key) == ("novnc", "listen_on")
    assert str(err) == "test.ini: [novnc] listen_on: unknown key (did you mean 'listen'?)"


def test_unknown_key_without_suggestion() -> None:
    """A key like no known one is an error with no suggestion."""
    assert str(error_for("[database]\nzzz = 1\n")) == "test.ini: [database] zzz: unknown key"


def test_unknown_key_in_wrong_section() -> None:
    """A key is known only in its own section."""
    err = error_for("[database]\ntarget_port = 5900\n")
    assert (err.section, err.key, err.problem) == ("database", "target_port", "unknown key")


def test_keys_are_case_sensitive() -> None:
    """'Listen' is not 'listen', but the error points to it."""
    err = error_for("[novnc]\nListen = tcp:1\n")
    assert err.problem == "unknown key (did you mean 'listen'?)"


def test_unknown_section_suggests_closest() -> None:
    """A misspelt section is an error suggesting the section that was meant."""
    err = error_for("[novcn]\nlisten = tcp:1\n")
    assert (err.section, err.key) == ("novcn", None)
    assert str(err) == "test.ini: [novcn]: unknown section (did you mean [novnc]?)"


def test_unknown_section_case() -> None:
    """Section names are case-sensitive too, and the error points to the right one."""
    assert error_for("[DATABASE]\n").problem == "unknown section (did you mean [database]?)"


def test_unknown_section_without_suggestion() -> None:
    """A section like no known one is an error with no suggestion."""
    assert str(error_for("[zzz]\n")) == "test.ini: [zzz]: unknown section"


def test_default_section_is_not_special() -> None:
    """[DEFAULT] would leak its keys into every section; here it is just an unknown section."""
    err = error_for("[DEFAULT]\ntarget_port = 1\n")
    assert (err.section, err.problem) == ("DEFAULT", "unknown section")


def test_duplicate_key() -> None:
    """A key set twice in a section is an error naming it and the second line."""
    err = error_for("[novnc]\nlisten = tcp:1\nlisten = tcp:2\n")
    assert str(err) == "test.ini: [novnc] listen: key set twice (again on line 3)"


def test_duplicate_section() -> None:
    """A section given twice is an error naming it."""
    err = error_for("[novnc]\n\n[novnc]\n")
    assert str(err) == "test.ini: [novnc]: section appears twice (again on line 3)"


def test_key_before_any_section() -> None:
    """A key above the first section header is an error naming the line."""
    err = error_for("listen = tcp:1\n")
    assert str(err) == "test.ini: line 1: 'listen = tcp:1' comes before any [section] header"


def test_line_that_is_not_key_value() -> None:
    """A line with no '=' is an error naming the line and what it holds."""
    err = error_for("[novnc]\nlisten\n")
    assert str(err) == "test.ini: line 2: expected 'key = value' or '[section]', got 'listen'"


def test_colon_is_not_a_delimiter() -> None:
    """Only '=' separates key and value, so 'listen: tcp:1' is not silently read."""
    assert error_for("[novnc]\nlisten: tcp:1\n").problem.startswith("line 2: expected")


# --- listen and path --------------------------------------------------------------------------


def test_listen_two_endpoints() -> None:
    """listen takes several endpoints separated by whitespace, in order."""
    value = parse_one("novnc", "listen", "tcp:6080:interface=127.0.0.1  unix:/tmp/novnc.sock")
    assert value == ("tcp:6080:interface=127.0.0.1", "unix:/tmp/novnc.sock")


def test_listen_on_continuation_lines() -> None:
    """listen endpoints may continue on indented lines."""
    text = "[novnc]\nlisten =\n    tcp:6080\n    tcp:6081\n"
    assert parse_config(text).novnc.listen == ("tcp:6080", "tcp:6081")


def test_bad_endpoint_named() -> None:
    """A bad endpoint among good ones is an error naming the bad one and Twisted's complaint."""
    err = error_for("[novnc]\nlisten = tcp:6080 nosuchtype:1\n")
    assert (err.section, err.key) == ("novnc", "listen")
    assert err.problem == "bad endpoint 'nosuchtype:1': Unknown endpoint type: 'nosuchtype'"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("websockify/{session_id}", "must start with '/'"),
        ("/websockify", "must contain {session_id} exactly once"),
        ("/{session_id}/{session_id}", "must contain {session_id} exactly once"),
        ("/{sessionid}", "must contain {session_id} exactly once"),
        ("/{session_id}/{x}", "may not contain '{' or '}' other than {session_id}"),
        ("/{{session_id}}", "may not contain '{' or '}' other than {session_id}"),
        ("/{session_id}}", "may not contain '{' or '}' other than {session_id}"),
        ("/{session_id}?x=1", "may not contain '?' or '#'"),
        ("/{session_id}#top", "may not contain '?' or '#'"),
        ("/a b/{session_id}", "printable ASCII"),
        ("/caf\u00e9/{session_id}", "printable ASCII"),
        ("/a\n  b/{session_id}", "printable ASCII"),
    ],
)
def test_path_template_rules(text: str, problem: str) -> None:
    """The path starts with '/', holds {session_id} once and no other braces, '?', '#'."""
    err = error_for(f"[novnc]\npath = {text}\n")
    assert (err.section, err.key) == ("novnc", "path")
    assert problem in err.problem


# --- files ------------------------------------------------------------------------------------


def test_read_config_names_source(tmp_path: Path) -> None:
    """read_config reads the file, and the settings remember where they came from."""
    path = tmp_path / "novnc.ini"
    path.write_text("[novnc]\ntarget_port = 5901\n")
    settings = read_config(str(path))
    assert settings.novnc.target_port == 5901
    assert settings.source == str(path)


def test_read_config_errors_name_the_file(tmp_path: Path) -> None:
    """An error in a file names that file."""
    path = tmp_path / "novnc.ini"
    path.write_text("[novnc]\nreject = maybe\n")
    with pytest.raises(ConfigError) as info:
        read_config(str(path))
    assert str(info.value).startswith(f"{path}: [novnc] reject: must be one of")


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it, not an OSError."""
    path = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert (info.value.source, info.value.section, info.value.key) == (path, None, None)
    assert str(info.value) == f"{path}: cannot read the file: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as the config file is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        read_config(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: cannot read the file")


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError naming it."""
    path = tmp_path / "novnc.ini"
    path.write_bytes(b"[novnc]\npath = /\xff/{session_id}\n")
    with pytest.raises(ConfigError) as info:
        read_config(str(path))
    assert str(info.value) == f"{path}: not UTF-8 text (byte 16)"


def test_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    """A file saved by a Windows editor (BOM, CRLF) reads like any other."""
    path = tmp_path / "novnc.ini"
    path.write_bytes(b"\xef\xbb\xbf[novnc]\r\ntarget_port = 5901\r\n")
    assert read_config(str(path)).novnc.target_port == 5901


def test_crlf_text() -> None:
    """parse_config copes with CRLF line ends in text as well."""
    assert parse_config("[novnc]\r\ntarget_port = 5901\r\n").novnc.target_port == 5901


# --- showing settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("embedded", "embedded"),
        ("host=db user=u password=s3cret dbname=app", "host=db user=u password=*** dbname=app"),
        ("password=s3cret", "password=***"),
        ("host=db password = 'two words' port=5432", "host=db password = *** port=5432"),
        (r"password='it\'s' host=db", "password=*** host=db"),
        ("host=db sslpassword=k3y", "host=db sslpassword=***"),
        ("host=db user=password", "host=db user=password"),
        (r"host=db password=two\ words\ here port=5432", "host=db password=*** port=5432"),
        (r"password=ends\\ host=db", "password=*** host=db"),
        ("postgresql://u:s3cret@db/app", "postgresql://u:***@db/app"),
        (
            "postgres://u:s3cret@db:5432/app?sslmode=require",
            "postgres://u:***@db:5432/app?sslmode=require",
        ),
        ("postgresql://:s3cret@db/app", "postgresql://:***@db/app"),
        ("postgresql://u@db/app", "postgresql://u@db/app"),
        (
            "postgresql://db/app?user=u&password=s3cret&x=1",
            "postgresql://db/app?user=u&password=***&x=1",
        ),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    """Passwords in key/value DSNs and URIs are masked; nothing else changes."""
    assert mask_dsn(dsn) == masked


def _libpq_value(text: str) -> str:
    """``text`` as an unquoted libpq value: spaces, quotes and backslashes escaped."""
    return "".join("\\" + c if c in " \t\v\f\\'" else c for c in text)


@given(
    password=st.text(st.characters(codec="ascii", exclude_characters="\x00\r\n"), min_size=1),
    quoted=st.booleans(),
)
def test_mask_dsn_hides_every_password_libpq_reads(password: str, quoted: bool) -> None:
    """Whatever the password holds, libpq's own parser reads *** from the masked DSN and the
    other keys unchanged: no part of an escaped or quoted password is left behind."""
    from psycopg2.extensions import parse_dsn

    escaped = password.replace("\\", "\\\\").replace("'", "\\'")
    value = f"'{escaped}'" if quoted else _libpq_value(password)
    dsn = f"host=db password={value} dbname=app"
    assert parse_dsn(dsn)["password"] == password  # the DSN says what the test means
    assert parse_dsn(mask_dsn(dsn)) == {"host": "db", "password": "***", "dbname": "app"}


def test_effective_items_cover_every_key_in_order() -> None:
    """effective_items lists every schema key once, in schema order, as ini text."""
    items = effective_items(parse_config(""))
    assert [(s, k) for s, k, _ in items] == ALL_KEYS
    assert ("novnc", "readiness_timeout", "30") in items
    assert ("database", "ended_statuses", "ended closed expired failed") in items
    assert ("database", "port_column", "") in items


def test_effective_items_mask_the_password() -> None:
    """effective_items never shows a DSN password."""
    settings = parse_config("[database]\ndsn = postgresql://u:s3cret@db/app\n")
    items = dict(((s, k), v) for s, k, v in effective_items(settings))
    assert items["database", "dsn"] == "postgresql://u:***@db/app"
    assert "s3cret" not in repr(effective_items(settings))


def test_effective_items_read_back() -> None:
    """effective_items' text, written back as an ini file, gives the same settings."""
    text = (
        "[novnc]\nlisten = tcp:1 tcp:2\nreadiness_timeout = 2.5\n"
        "[database]\ndsn = host=a\n  dbname=b\nended_statuses = x y\n"
    )
    settings = parse_config(text)
    assert parse_config(ini_text(effective_items(settings))) == settings


def test_workers_error_names_file_section_and_key() -> None:
    """A bad workers value says exactly what is allowed, on one line naming where it is."""
    err = error_for("[novnc]\nworkers = none\n", "etc/x.ini")
    assert str(err) == "etc/x.ini: [novnc] workers: must be a positive integer or auto, got 'none'"


def test_workers_refuse_systemd_sockets() -> None:
    """An inherited systemd: socket cannot be handed to workers: a ConfigError names it."""
    from twisted_novnc.config import _check_together

    novnc = NovncSettings(listen=("tcp:1", "systemd:domain=INET:index=0"), workers=2)
    with pytest.raises(ConfigError) as info:
        _check_together(Settings(novnc=novnc), "x.ini")
    assert (info.value.section, info.value.key) == ("novnc", "listen")
    assert "systemd:domain=INET:index=0" in info.value.problem and "workers" in info.value.problem
    _check_together(Settings(novnc=attrs.evolve(novnc, workers=1)), "x.ini")


def test_settings_text_keeps_secrets_and_reads_back() -> None:
    """settings_text is the exact settings, DSN password included, as parse_config reads them."""
    text = (
        "[novnc]\nlisten = tcp:1 tcp:2\nworkers = auto\n"
        "[database]\ndsn = host=a password=s3cret\n  dbname=b\n"
    )
    settings = parse_config(text, "a.ini", {("novnc", "readiness_timeout"): "2.5"})
    written = settings_text(settings)
    assert "s3cret" in written and "workers = auto" in written
    assert parse_config(written, "a.ini") == settings


def ini_text(items: list[tuple[str, str, str]]) -> str:
    """(section, key, text) triples as an ini file."""
    lines: list[str] = []
    for section, key, value in items:
        if f"[{section}]" not in lines:
            lines.append(f"[{section}]")
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


# --- the sample file and the docs follow the schema -------------------------------------------


def test_sample_parses_to_the_defaults() -> None:
    """etc/twisted-novnc.ini is valid, and every value in it is the default."""
    assert read_config(str(SAMPLE)) == Settings(source=str(SAMPLE))


def test_sample_names_every_key() -> None:
    """The sample sets every schema key (and only those), so a new key needs a sample line."""
    raw = configparser.ConfigParser(interpolation=None)
    raw.optionxform = str  # type: ignore[assignment, method-assign]
    raw.read_string(SAMPLE.read_text(encoding="utf-8"))
    assert [(s, k) for s in raw.sections() for k in raw.options(s)] == ALL_KEYS


def test_sample_comments_every_key_with_its_default() -> None:
    """Each key in the sample has a comment above it ending with 'Default: <its default>'."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    section = None
    for i, line in enumerate(lines):
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header[1]
            continue
        assignment = re.fullmatch(r"(\w+) =.*", line)
        if assignment is None:
            continue
        assert section is not None
        key = SCHEMA[section].keys[assignment[1]]
        comment = []
        for above in reversed(lines[:i]):
            if not above.startswith("#"):
                break
            comment.append(above)
        assert len(comment) >= 2, f"[{section}] {key.name} needs a comment saying what it does"
        expected = f"# Default: {key.default_text or 'empty'}"
        assert comment[0] == expected or comment[0].startswith(expected + " ("), key.name


def docs_entries() -> dict[tuple[str, str], str]:
    """The docs' entries: (section, key) -> the text of its definition."""
    entries: dict[tuple[str, str], str] = {}
    section = None
    key = None
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        header = re.fullmatch(r"``\[(\w+)\]``", line)
        term = re.fullmatch(r"``(\w+)``", line)
        if header:
            section, key = header[1], None
        elif term and section is not None:
            key = term[1]
            entries[section, key] = ""
        elif key is not None and section is not None:
            entries[section, key] += line.strip() + "\n"
    return entries


def test_docs_describe_every_key() -> None:
    """docs/configuration.rst has an entry for every schema key, under its section."""
    assert list(docs_entries()) == ALL_KEYS


def test_docs_give_every_default() -> None:
    """Each docs entry states the schema's default, so the two cannot drift."""
    for (section, name), body in docs_entries().items():
        key = SCHEMA[section].keys[name]
        expected = f":Default: ``{key.default_text}``" if key.default_text else ":Default: empty"
        assert expected in body, f"[{section}] {name}"


def test_docs_examples_are_real_errors() -> None:
    """The error lines quoted in the docs are what the parser really says."""
    source = "etc/twisted-novnc.ini"
    docs = DOCS.read_text(encoding="utf-8")
    for text in ["[novnc]\nlistn = tcp:1\n", "[novnc]\ntarget_port = 70000\n"]:
        assert f"    {error_for(text, source)}\n" in docs


# --- properties -------------------------------------------------------------------------------

PROPERTY_SETTINGS = hypothesis.settings(max_examples=200, deadline=None)

identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,62}", fullmatch=True)
# One line of text as configparser gives it back: stripped, no newline.
one_line = st.text(st.characters(exclude_characters="\n")).map(str.strip)
WHITESPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())
word = st.text(st.characters(exclude_characters=WHITESPACE), min_size=1, max_size=12)
path_chars = "".join(c for c in string.printable if "!" <= c <= "~" and c not in "?#{}")
path_part = st.text(st.sampled_from(path_chars), max_size=20)
endpoint = st.one_of(
    st.builds(
        "tcp:{}:interface={}".format,
        st.integers(0, 65535),
        st.sampled_from(["127.0.0.1", "0.0.0.0", r"\:\:1"]),
    ),
    st.builds("tcp:{}".format, st.integers(0, 65535)),
    st.builds("unix:/tmp/{}.sock".format, st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)),
)

VALUES: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("novnc", "listen"): st.lists(endpoint, min_size=1, max_size=4, unique=True).map(tuple),
    ("novnc", "workers"): st.one_of(st.none(), st.integers(1, 256)),
    ("novnc", "path"): st.builds("/{}{{session_id}}{}".format, path_part, path_part),
    ("novnc", "readiness_timeout"): st.floats(
        min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False
    ),
    ("novnc", "target_port"): st.integers(1, 65535),
    ("novnc", "reject"): st.sampled_from(["close", "http"]),
    ("novnc", "max_message_size"): st.integers(1024, 64 * 1024 * 1024),
    ("novnc", "drain_timeout"): st.floats(0.001, 1e6),
    ("novnc", "drain_delay"): st.one_of(st.just(0.0), st.floats(0.001, 1e6)),
    ("novnc", "memory_trim_interval"): st.one_of(st.just(0.0), st.floats(0.001, 1e6)),
    ("novnc", "upgrade_drain_timeout"): st.floats(0.001, 1e6),
    ("novnc", "trusted_proxies"): st.lists(
        st.sampled_from(["10.0.0.0/8", "127.0.0.1/32", "192.168.1.0/24", "::1/128"]),
        max_size=3,
    ).map(tuple),
    ("novnc", "forwarded_header"): st.sampled_from(["x-forwarded-for", "forwarded"]),
    ("novnc", "proxy_protocol_from"): st.lists(
        st.sampled_from(["10.0.0.0/8", "127.0.0.1/32", "::1/128"]), max_size=3
    ).map(tuple),
    ("novnc", "ping_interval"): st.integers(0, 86400),
    ("novnc", "allowed_origins"): st.sampled_from(
        ["", "https://desk.example.com", "https://*.example.com http://localhost:6080"]
    ).map(OriginPolicy.from_text),
    ("novnc", "max_connections"): st.integers(1, 1_000_000),
    ("novnc", "max_per_ip"): st.integers(1, 1_000_000),
    ("novnc", "max_per_session"): st.integers(1, 1_000_000),
    ("novnc", "max_waiting"): st.integers(1, 1_000_000),
    ("novnc", "max_waiting_per_ip"): st.integers(1, 1_000_000),
    ("novnc", "request_timeout"): st.floats(0.001, 1e6),
    ("novnc", "idle_timeout"): st.integers(0, 1_000_000),
    ("novnc", "write_timeout"): st.integers(0, 1_000_000),
    ("novnc", "ping_timeout"): st.integers(2, 3600),
    ("novnc", "fast_path"): st.booleans(),
    ("database", "dsn"): st.one_of(st.just("embedded"), one_line),
    # Only empty: any other value must agree with dsn (test_listen_dsn_agrees_with_dsn).
    ("database", "listen_dsn"): st.just(""),
    ("database", "table"): identifier | st.builds("{}.{}".format, identifier, identifier),
    ("database", "id_column"): identifier,
    ("database", "ip_column"): identifier,
    ("database", "port_column"): st.one_of(st.just(""), identifier),
    ("database", "status_column"): st.one_of(st.just(""), identifier),
    ("database", "ended_statuses"): st.lists(word, max_size=5).map(tuple),
    ("database", "notify_channel"): identifier,
    # Only 0: any other count must keep <notify_channel>_<N-1> within 63 characters
    # (test_notify_shards_channel_fits).
    ("database", "notify_shards"): st.just(0),
    ("database", "expires_column"): st.one_of(st.just(""), identifier),
    ("database", "pool_size"): st.integers(1, 64),
    ("database", "prepared_statements"): st.sampled_from(["auto", "on", "off"]),
    ("database", "embedded_dir"): one_line.filter(bool),
    ("upstream", "allowed_networks"): st.sampled_from(
        ["10.0.0.0/8", "192.168.0.0/16 fc00::/7", "0.0.0.0/0 ::/0"]
    ).map(parse_networks),
    ("upstream", "allow_self"): st.booleans(),
    ("upstream", "allowed_ports"): st.sampled_from(["1-65535", "5900-5999 6080"]).map(parse_ports),
    ("upstream", "mode"): st.sampled_from(["tcp", "websocket"]),
    ("upstream", "port"): st.integers(0, 65535),
    ("upstream", "tls"): st.sampled_from(["off", "on", "verify"]),
    ("upstream", "ca_file"): st.sampled_from(["", "/etc/novnc/vm-ca.pem"]),
    ("upstream", "connect_retry"): st.booleans(),
    ("vnc", "password_column"): st.one_of(st.just(""), identifier),
    ("vnc", "username_column"): st.one_of(st.just(""), identifier),
    ("vnc", "password_file"): st.sampled_from(["", "/etc/novnc/vnc-password"]),
    ("vnc", "handshake_timeout"): st.floats(0.001, 1e6),
    ("auth", "mode"): st.just("none"),
    ("auth", "token_column"): st.one_of(st.just(""), identifier),
    ("auth", "one_time"): st.just(False),
    ("auth", "cookie"): st.sampled_from(["", "novnc_token"]),
    ("auth", "secret_file"): st.sampled_from(["", "/etc/novnc/secret"]),
    ("auth", "max_token_age"): st.floats(0.001, 1e9),
    ("web", "root"): st.sampled_from(["", "/usr/share/novnc"]),
    ("web", "send_timeout"): st.floats(0.001, 1e6),
    ("web", "viewer"): st.booleans(),
    ("admin", "listen"): st.one_of(
        st.just(()), st.lists(endpoint, min_size=1, max_size=2, unique=True).map(tuple)
    ),
    ("log", "format"): st.sampled_from(["text", "json"]),
    ("log", "file"): one_line,
    ("log", "admin_access"): st.booleans(),
    ("record", "dir"): st.sampled_from(["", "/var/lib/novnc/recordings"]),
    # Only all: column needs record_column (test_record_column_required_with_mode_column).
    ("record", "mode"): st.just("all"),
    ("record", "record_column"): st.one_of(st.just(""), identifier),
    ("record", "input"): st.booleans(),
    ("record", "max_bytes"): st.integers(1, 1 << 60),
    ("record", "max_total_bytes"): st.integers(0, 1 << 60),
}


def test_every_key_has_a_value_strategy() -> None:
    """The round-trip property covers every schema key, including ones added later."""
    assert list(VALUES) == ALL_KEYS


@st.composite
def chosen_values(draw: st.DrawFn) -> dict[tuple[str, str], Any]:
    """Valid values for a random subset of keys."""
    keys = draw(st.lists(st.sampled_from(ALL_KEYS), unique=True))
    return {key: draw(VALUES[key]) for key in keys}


@PROPERTY_SETTINGS
@given(chosen_values())
def test_round_trip(values: dict[tuple[str, str], Any]) -> None:
    """Any valid values, written as ini text, parse back to themselves; the rest stay default."""
    lines: list[str] = []
    for section in SCHEMA.values():
        lines.append(f"[{section.name}]")
        for key in section.keys.values():
            if (section.name, key.name) in values:
                lines.append(f"{key.name} = {key.kind.format(values[section.name, key.name])}")
    settings = parse_config("\n".join(lines) + "\n")
    expected = Settings(
        source="<string>",
        **{
            section.name: section.record(
                **{k: v for (s, k), v in values.items() if s == section.name}
            )
            for section in SCHEMA.values()
        },
    )
    assert settings == expected


@PROPERTY_SETTINGS
@given(chosen_values())
def test_settings_text_round_trip(values: dict[tuple[str, str], Any]) -> None:
    """Whatever the settings, settings_text reads back to them: workers get exactly these."""
    settings = Settings(
        **{
            section.name: section.record(
                **{k: v for (s, k), v in values.items() if s == section.name}
            )
            for section in SCHEMA.values()
        },
    )
    assert parse_config(settings_text(settings), settings.source) == settings


@PROPERTY_SETTINGS
@given(st.text())
def test_arbitrary_text_parses_or_raises_config_error(text: str) -> None:
    """No text makes parse_config raise anything but ConfigError."""
    try:
        parse_config(text)
    except ConfigError as e:
        assert "\n" not in str(e)


known_key = st.sampled_from([k for _, k in ALL_KEYS])
ini_line = st.one_of(
    st.builds("[{}]".format, st.sampled_from([*SCHEMA, "DEFAULT", "novnc ", "x"])),
    st.builds("{} = {}".format, known_key, st.one_of(one_line, st.sampled_from(["", "0", "1e9"]))),
    st.builds("{}={}".format, one_line, one_line),
    st.builds("  {}".format, one_line),
    st.builds("# {}".format, one_line),
    one_line,
)


@PROPERTY_SETTINGS
@given(st.lists(ini_line, max_size=12))
def test_ini_like_text_parses_or_raises_config_error(lines: list[str]) -> None:
    """Text shaped like an ini file, with any values, never raises anything but ConfigError."""
    try:
        parse_config("\n".join(lines))
    except ConfigError as e:
        assert "\n" not in str(e)


def test_loopback_network_needs_allow_self() -> None:
    """allowed_networks holding loopback without allow_self = on is an error naming the key and
    the way out; with allow_self = on it is accepted."""
    with pytest.raises(ConfigError) as caught:
        parse_config("[upstream]\nallowed_networks = 10.0.0.0/8 127.0.0.1/32\n", "x.ini")
    message = str(caught.value)
    assert "x.ini" in message and "[upstream]" in message and "allowed_networks" in message
    assert "allow_self = on" in message
    settings = parse_config(
        "[upstream]\nallowed_networks = 127.0.0.0/8\nallow_self = on\n", "x.ini"
    )
    assert settings.upstream.allow_self is True
    assert parse_config("").upstream.allow_self is False


@pytest.mark.parametrize(
    ("dsn", "listen_dsn"),
    [("host=pooler port=6432", "embedded"), ("embedded", "host=db"), ("", "embedded")],
)
def test_listen_dsn_agrees_with_dsn(dsn: str, listen_dsn: str) -> None:
    """listen_dsn = embedded only with dsn = embedded, and nothing else with it: LISTEN must
    watch the database the sessions are read from."""
    err = error_for(f"[database]\ndsn = {dsn}\nlisten_dsn = {listen_dsn}\n")
    assert (err.section, err.key) == ("database", "listen_dsn")


@pytest.mark.parametrize(
    ("dsn", "listen_dsn"),
    [("host=pooler port=6432 dbname=app", "host=db dbname=app"), ("embedded", "embedded"),
     ("embedded", ""), ("host=db", "")],
)
def test_listen_dsn_accepted(dsn: str, listen_dsn: str) -> None:
    """A direct listen_dsn beside a pooler's dsn, or embedded twice, or empty, is accepted."""
    settings = parse_config(f"[database]\ndsn = {dsn}\nlisten_dsn = {listen_dsn}\n")
    assert settings.database.listen_dsn == listen_dsn


@pytest.mark.parametrize(
    ("channel", "shards", "problem"),
    [
        ("c" * 58, "100000", "must be from 0 to 65536"),
        ("c" * 58, "-1", "expected a whole number"),
        ("c" * 58, "10001", "longer than PostgreSQL's 63 characters"),
        ("c" * 63, "1", "longer than PostgreSQL's 63 characters"),
    ],
)
def test_notify_shards_channel_fits(channel: str, shards: str, problem: str) -> None:
    """notify_shards is bounded, and its last channel must be a PostgreSQL name (63 bytes)."""
    err = error_for(f"[database]\nnotify_channel = {channel}\nnotify_shards = {shards}\n")
    assert (err.section, err.key) == ("database", "notify_shards")
    assert problem in err.problem


def test_notify_shards_accepted() -> None:
    """The longest name that fits, and the cap, are accepted; 0 is the shared channel."""
    fits = parse_config(f"[database]\nnotify_channel = {'c' * 58}\nnotify_shards = 1000\n")
    assert fits.database.notify_shards == 1000
    assert parse_config("[database]\nnotify_shards = 65536\n").database.notify_shards == 65536
    assert parse_config("").database.notify_shards == 0


def test_prepared_statements_on_is_refused_behind_a_transaction_pooler() -> None:
    """prepared_statements = on beside a listen_dsn (which says dsn is a transaction pooler's)
    is refused, naming the key and what to use instead; auto and off are accepted there."""
    pooled = "[database]\ndsn = host=pooler port=6432\nlisten_dsn = host=db\n"
    err = error_for(pooled + "prepared_statements = on\n")
    assert (err.source, err.section, err.key) == ("test.ini", "database", "prepared_statements")
    assert "transaction" in err.problem and "use auto" in err.problem
    for mode in ("auto", "off"):
        settings = parse_config(pooled + f"prepared_statements = {mode}\n")
        assert settings.database.prepared_statements == mode
    direct = parse_config("[database]\nprepared_statements = on\n")
    assert direct.database.prepared_statements == "on"


def test_drain_delay_may_be_zero() -> None:
    """drain_delay = 0 (drain at once) is accepted, unlike the timeouts; a negative is not."""
    assert parse_one("novnc", "drain_delay", "0") == 0.0
    assert parse_one("novnc", "drain_delay", "0.0") == 0.0
    assert parse_one("novnc", "drain_delay", "2.5") == 2.5
    assert error_for("[novnc]\ndrain_delay = -1\n").key == "drain_delay"


def test_haproxy_listener_needs_proxy_protocol_from() -> None:
    """A haproxy: listener without proxy_protocol_from is a config error naming that key
    (any peer could otherwise name any client); haproxy:unix: needs none."""
    with pytest.raises(ConfigError) as info:
        parse_config("[novnc]\nlisten = tcp:6080 HAPROXY:tcp:6081\n")
    assert (info.value.section, info.value.key) == ("novnc", "proxy_protocol_from")
    assert "HAPROXY:tcp:6081" in info.value.problem
    settings = parse_config(
        "[novnc]\nlisten = haproxy:tcp:6081\nproxy_protocol_from = 10.0.0.0/8\n"
    )
    assert settings.novnc.proxy_protocol_from == ("10.0.0.0/8",)
    parse_config("[novnc]\nlisten = haproxy:unix:/tmp/x.sock\n")


def test_forwarded_header_choices() -> None:
    """forwarded_header names one of the two headers, nothing else."""
    assert parse_config("").novnc.forwarded_header == "x-forwarded-for"
    with pytest.raises(ConfigError) as info:
        parse_config("[novnc]\nforwarded_header = x-real-ip\n")
    assert (info.value.section, info.value.key) == ("novnc", "forwarded_header")
