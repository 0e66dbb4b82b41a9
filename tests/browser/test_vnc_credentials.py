"""VM credentials ([vnc]): the real noVNC client in headless Chromium, through ``twistd -n
novnc``, to a real Xvnc that asks for a password (VncAuth, VeNCrypt TLSVnc and X509Vnc).

The proxy logs in with the password from the session's row or ``[vnc] password_file``; the
page must draw the desktop without ever asking for a password, and a wrong password must
reach the page as the documented close code.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from browser_harness import SCREEN, within
from db_fixtures import insert_ready
from e2e.e2e_support import http_get, metric_values
from e2e.test_tls import self_signed
from test_novnc import BLUE, EVERYWHERE, page_url, paint_root

from twisted_novnc.database.embedded import apply_sql

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.integration]

PASSWORD = "s3cr-t!7"
WIDTH, HEIGHT = SCREEN


def xvnc_password_file(directory: Path, password: str) -> Path:
    """A password file for Xvnc's ``-PasswordFile``, made by TigerVNC's own ``vncpasswd``."""
    made = subprocess.run(
        ["vncpasswd", "-f"], input=password.encode(), capture_output=True, check=True
    )
    path = directory / "xvnc.passwd"
    path.write_bytes(made.stdout)
    path.chmod(0o600)
    return path


def password_option(directory: Path) -> tuple[str, str]:
    """Xvnc's arguments for a password file holding PASSWORD."""
    return ("-PasswordFile", str(xvnc_password_file(directory, PASSWORD)))


def add_password_column(postgres_dsn: str, db) -> None:  # type: ignore[no-untyped-def]
    apply_sql(postgres_dsn, f'ALTER TABLE "{db.table}" ADD COLUMN vnc_password text')


def set_password(pg, db, session_id: str, password: str) -> None:  # type: ignore[no-untyped-def]
    with pg.cursor() as cur:
        cur.execute(
            f'UPDATE "{db.table}" SET vnc_password = %s WHERE session_id = %s',
            (password, session_id),
        )


@pytest_twisted.inlineCallbacks
def see_desktop(browser, web_root, daemon, sid, security):  # type: ignore[no-untyped-def]
    """The page connects, draws the root's colour at the full framebuffer size, and never
    asks for credentials; the daemon says how it logged in, and never says the password."""
    page = yield browser.open(page_url(web_root, daemon.port, sid))
    try:
        yield page.when_event(type="connect")
        name = yield page.when_event(type="desktopname")
        assert name["name"] == "tnovnc-test"
        yield page.wait_for_colour(EVERYWHERE, BLUE)
        size = yield page.evaluate(
            "(() => { const c = document.querySelector('#screen canvas');"
            " return [c.width, c.height]; })()"
        )
        assert tuple(size) == (WIDTH, HEIGHT)
        assert "credentialsrequired" not in page.types(), page.log()
        assert "securityfailure" not in page.types(), page.log()
        yield within(daemon.when_logged(f"logged in to the VM of {sid} with {security} "))
    finally:
        yield page.close()
    assert PASSWORD not in daemon.output


@pytest_twisted.inlineCallbacks
def test_vncauth_password_from_the_row(
    browser, web_root, xvnc_factory, daemon_factory, pg, sessions_table, postgres_dsn, tmp_path
):
    """Xvnc with VncAuth: the row's password logs the proxy in; noVNC shows no prompt."""
    xvnc = yield xvnc_factory("VncAuth", password_option(tmp_path))
    yield paint_root(xvnc, BLUE)
    add_password_column(postgres_dsn, sessions_table)
    daemon = yield daemon_factory({"vnc": {"password_column": "vnc_password"}})
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)
    set_password(pg, sessions_table, sid, PASSWORD)
    yield see_desktop(browser, web_root, daemon, sid, "VncAuth")


@pytest_twisted.inlineCallbacks
def test_tlsvnc_password_from_the_file(
    browser, web_root, xvnc_factory, daemon_factory, pg, sessions_table, tmp_path
):
    """Xvnc with VeNCrypt TLSVnc (anonymous TLS, then VNC Authentication inside it): the
    password of ``[vnc] password_file`` logs the proxy in."""
    xvnc = yield xvnc_factory("TLSVnc", password_option(tmp_path))
    yield paint_root(xvnc, BLUE)
    shared = tmp_path / "vnc-password"
    shared.write_text(PASSWORD + "\n")
    shared.chmod(0o600)
    daemon = yield daemon_factory({"vnc": {"password_file": str(shared)}})
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)
    yield see_desktop(browser, web_root, daemon, sid, "VeNCrypt/TLSVnc")


@pytest_twisted.inlineCallbacks
def test_x509vnc_checks_the_certificate_against_ca_file(
    browser, web_root, xvnc_factory, daemon_factory, pg, sessions_table, tmp_path
):
    """Xvnc with VeNCrypt X509Vnc: its certificate is checked against ``[upstream]
    ca_file`` and the desktop is drawn."""
    key, cert = self_signed(tmp_path)
    xvnc = yield xvnc_factory(
        "X509Vnc", (*password_option(tmp_path), "-X509Cert", str(cert), "-X509Key", str(key))
    )
    yield paint_root(xvnc, BLUE)
    shared = tmp_path / "vnc-password"
    shared.write_text(PASSWORD)
    shared.chmod(0o640)
    daemon = yield daemon_factory(
        {"vnc": {"password_file": str(shared)}, "upstream": {"ca_file": str(cert)}}
    )
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)
    yield see_desktop(browser, web_root, daemon, sid, "VeNCrypt/X509Vnc")


@pytest_twisted.inlineCallbacks
def test_wrong_password_closes_with_4520(
    browser, web_root, xvnc_factory, daemon_factory, pg, sessions_table, postgres_dsn, tmp_path
):
    """A wrong password in the row: the page gets 4520 "VM refused the credentials", the
    daemon logs it with the session id and counts it, and does not try again."""
    xvnc = yield xvnc_factory("VncAuth", password_option(tmp_path))
    add_password_column(postgres_dsn, sessions_table)
    daemon = yield daemon_factory({
        "vnc": {"password_column": "vnc_password"},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    })
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, xvnc.rfb_port)
    set_password(pg, sessions_table, sid, "wrong-pw")
    page = yield browser.open(page_url(web_root, daemon.port, sid))
    try:
        closed = yield page.when_event(type="wsclose")
        assert (closed["code"], closed["reason"]) == (4520, "VM refused the credentials")
        assert "credentialsrequired" not in page.types(), page.log()
        assert "connect" not in page.types()
    finally:
        yield page.close()
    yield within(daemon.when_logged(f"{sid} .*4520 VM refused the credentials"))
    status, body = yield http_get(daemon.admin_port, "/metrics")
    assert status == 200
    values = metric_values(body.decode())
    assert values["twisted_novnc_vm_logins_total", (("result", "credentials_refused"),)] == 1
    assert values["twisted_novnc_connections_total", (("outcome", "4520"),)] == 1
    # One attempt, never a loop: Xvnc saw exactly one connection.
    assert xvnc.output.count("Connections: accepted") == 1, xvnc.output
    assert "wrong-pw" not in daemon.output
