"""The start-up hint of ``dsn = embedded`` is built from the effective config: its psql line
and URL work as printed for the settings the daemon runs with."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from twisted_novnc.config import Settings, parse_config
from twisted_novnc.processes import databases
from twisted_novnc.processes.hint import listener_base, session_hint

SID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"


def settings(text: str = "", overrides: dict[tuple[str, str], str] | None = None) -> Settings:
    return parse_config(text, "<test>", overrides)


def psql(sql: str) -> str:
    return f"psql DSN -c {sql!r}"


def test_defaults_name_an_address_the_policy_admits() -> None:
    """With the default (private) networks the example VM is 10.0.0.5 on target_port, and the
    hint says how to reach a VNC server on this host instead."""
    s = settings()
    hint = session_hint(s, SID)
    assert (hint.vm_ip, hint.vm_port, hint.on_this_host) == ("10.0.0.5", 5900, False)
    assert hint.insert_sql == ("INSERT INTO auth_sessions (session_id, vm_ip)"
                               f" VALUES ('{SID}', '10.0.0.5')")
    assert hint.viewer_url == f"http://127.0.0.1:6080/vnc/{SID}"
    assert hint.websocket_url == f"ws://127.0.0.1:6080/websockify/{SID}"
    text = hint.text(psql, s)
    assert f"then open http://127.0.0.1:6080/vnc/{SID}\n" in text
    assert "make demo" in text and "upstream.allow_self=on" in text
    assert "--set novnc.target_port=N" in text


def test_overridden_networks_with_loopback_name_this_host() -> None:
    """--set upstream.allowed_networks=127.0.0.1/32 --set upstream.allow_self=on (the
    overrides make run's ARGS pass) make the example this host's VNC server, on the configured
    target_port, with no advice to change what is already set."""
    s = settings("[novnc]\ntarget_port = 5901\n", {
        ("upstream", "allowed_networks"): "127.0.0.1/32", ("upstream", "allow_self"): "on",
    })
    hint = session_hint(s, SID)
    assert (hint.vm_ip, hint.vm_port, hint.on_this_host) == ("127.0.0.1", 5901, True)
    assert "'127.0.0.1')" in hint.insert_sql
    text = hint.text(psql, s)
    assert "this host's VNC server at 127.0.0.1:5901" in text
    assert "allowed_networks=127.0.0.1/32" not in text


@pytest.mark.parametrize("networks", ["192.168.7.0/24", "172.20.0.8/32", "fd00:1::/64",
                                      "10.1.0.0/16 192.168.7.0/24"])
def test_the_example_address_is_inside_the_allowed_networks(networks: str) -> None:
    """Whatever allowed_networks says, the hint's vm_ip is inside it, so its row is never
    refused with 4403."""
    s = settings(f"[upstream]\nallowed_networks = {networks}\n")
    hint = session_hint(s, SID)
    address = ipaddress.ip_address(hint.vm_ip)
    assert any(address in n for n in s.upstream.allowed_networks)
    assert networks.split()[0] in hint.text(psql, s)


def test_port_column_puts_an_allowed_port_in_the_row() -> None:
    """With port_column the row carries the port, one that allowed_ports admits; the names
    are those of [database], quoted when their case matters."""
    s = settings("[database]\ntable = Sessions\nid_column = sid\nip_column = addr\n"
                 "port_column = vnc_port\n[upstream]\nallowed_ports = 5901-5910\n")
    hint = session_hint(s, SID)
    assert hint.vm_port == 5901
    assert hint.insert_sql == ('INSERT INTO "Sessions" (sid, addr, vnc_port)'
                               f" VALUES ('{SID}', '10.0.0.5', 5901)")
    assert "set vnc_port in the row" in hint.text(psql, s)


def test_a_target_port_outside_allowed_ports_is_called_out() -> None:
    """Without port_column a target_port that allowed_ports refuses would give 4403: said."""
    s = settings("[upstream]\nallowed_ports = 5901\n")
    assert "Port 5900 is outside [upstream] allowed_ports" in session_hint(s, SID).text(psql, s)


@pytest.mark.parametrize(("listen", "base"), [
    ("tcp:6080:interface=127.0.0.1", "http://127.0.0.1:6080"),
    ("tcp:port=7000:interface=0.0.0.0", "http://127.0.0.1:7000"),
    ("tcp:6080", "http://127.0.0.1:6080"),
    (r"tcp6:6080:interface=\:\:1", "http://[::1]:6080"),
    (r"tcp6:6080:interface=\:\:", "http://[::1]:6080"),
    ("tcp:0:interface=127.0.0.1", "http://127.0.0.1:<port>"),
    ("unix:/tmp/tnovnc.sock tcp:6081:interface=127.0.0.1", "http://127.0.0.1:6081"),
])
def test_the_url_is_the_listeners(listen: str, base: str) -> None:
    """The URL is the first listener a browser on this host can open; a wildcard interface
    is reached on loopback."""
    result = listener_base(settings(f"[novnc]\nlisten = {listen}\n"))
    assert result is not None and result[0] == base
    assert result[1] == "ws" + base.removeprefix("http")


def test_no_direct_listener_names_the_path() -> None:
    """A unix: listener has no URL to print: the hint names the path and the listener."""
    s = settings("[novnc]\nlisten = unix:/tmp/tnovnc.sock\n")
    hint = session_hint(s, SID)
    assert hint.viewer_url is None
    assert f"/websockify/{SID} on the listener 'unix:/tmp/tnovnc.sock'" in hint.text(psql, s)


def test_auth_modes_say_what_the_url_needs_without_a_token() -> None:
    """hmac: the mint-token command; column: the token column; no token is ever printed."""
    s = settings("[auth]\nmode = hmac\nsecret_file = /etc/twisted-novnc/secret\n")
    text = session_hint(s, SID).text(psql, s)
    assert (f"?token=<python -m twisted_novnc mint-token --secret-file"
            f" /etc/twisted-novnc/secret --session {SID} --ttl 300>") in text
    s = settings("[auth]\nmode = column\ntoken_column = token_sha256\n")
    assert f"SHA-256 hex digest the row holds in {s.auth.token_column}" in session_hint(
        s, SID).text(psql, s)


class FakeEmbedded:
    """What EmbeddedSchemaService needs of the cluster's service."""

    dsn = "host=/nowhere"

    class embedded:  # the attribute the real service has
        @staticmethod
        def psql_command(sql: str) -> str:
            return psql(sql)


def test_the_schema_service_logs_the_hint_as_one_database_hint_event(monkeypatch) -> None:
    """The hint is logged once the schema is in, as the database_hint event, with a fresh
    session id in both the psql line and the URL."""
    applied = []
    monkeypatch.setattr(databases, "apply_sql", lambda dsn, sql: applied.append(dsn))
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        databases.EmbeddedSchemaService(FakeEmbedded(), settings()).startService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert applied == ["host=/nowhere"]
    (event,) = [e for e in observer if e.get("event") == "database_hint"]
    text = event["hint"]
    session_id = text.split("/vnc/")[1].split()[0]
    assert f"VALUES ('{session_id}', '10.0.0.5')" in text


def test_the_readme_quotes_the_hint_as_the_daemon_prints_it() -> None:
    """README.rst's example of make run's output is the hint for the sample config (its
    first line, and the URL line with the README's session id), so the two cannot drift."""
    readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text(encoding="utf-8")
    sample = Path(__file__).resolve().parent.parent / "etc" / "twisted-novnc.ini"
    s = parse_config(sample.read_text(encoding="utf-8"), str(sample))
    text = session_hint(s, SID).text(psql, s)
    first, _, rest = text.partition("\n")
    assert f"    {first}\n" in readme
    url_line = next(line for line in rest.splitlines() if line.startswith("then open "))
    assert f"    {url_line}\n" in readme
    assert session_hint(s, SID).insert_sql in readme
