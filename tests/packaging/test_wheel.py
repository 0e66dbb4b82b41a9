"""The wheel, installed in a clean virtualenv outside the checkout, is the whole product: the
package and its data, the plugin twistd finds, the console script, and a daemon that serves a
session with ``twistd -n novnc --config /etc/...``-style absolute config path."""

from __future__ import annotations

import zipfile

import pytest
import pytest_twisted
from daemon_process import LISTENING_FOR_CHANGES, DaemonProcess, stop_daemon, write_config
from db_fixtures import insert_session
from e2e_support import banner_echo_close, connect_session, http_get, new_id, within
from psycopg2.extensions import parse_dsn
from twisted.internet import reactor
from wheel_install import ROOT, Installed, clean_env, run

from twisted_novnc import __version__

pytestmark = [pytest.mark.e2e]

#: libpq's environment variable for each DSN keyword the suite's database may use.
PG_ENVIRONMENT = {
    "host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
    "dbname": "PGDATABASE", "sslmode": "PGSSLMODE",
}


def pg_environment(dsn: str) -> dict[str, str]:
    """``dsn`` as libpq's PG* variables: how the container's config reaches its database."""
    parts = parse_dsn(dsn)
    unknown = set(parts) - set(PG_ENVIRONMENT)
    assert not unknown, f"no PG* variable for {sorted(unknown)} of the test DSN"
    return {PG_ENVIRONMENT[key]: value for key, value in parts.items()}


def test_the_wheel_holds_the_package_its_plugin_and_its_data(installed_wheel: Installed):
    """Every file of the package (data included), the plugin file without a
    twisted/plugins/__init__.py of its own, the licence, the console script and the operator's
    files under share/; no tests."""
    names = set(zipfile.ZipFile(installed_wheel.wheel).namelist())
    package = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "twisted_novnc").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    missing = sorted(set(package) - names)
    assert not missing, f"not in the wheel: {missing}"
    assert "twisted/plugins/twisted_novnc_plugin.py" in names
    # An __init__.py there would shadow Twisted's own twisted.plugins package.
    assert "twisted/plugins/__init__.py" not in names
    assert not [name for name in names if name.startswith(("tests/", "bench/"))]
    info = f"twisted_novnc-{__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(installed_wheel.wheel).read(f"{info}/entry_points.txt")
    assert b"twisted-novnc = twisted_novnc.__main__:console" in entry_points
    data = f"twisted_novnc-{__version__}.data/data/share"
    for name in ("twisted-novnc.ini", "container.ini", "schema.sql", "twisted-novnc.service"):
        assert f"{data}/twisted-novnc/{name}" in names, name
        installed = installed_wheel.venv / "share" / "twisted-novnc" / name
        assert installed.read_bytes() == (ROOT / "etc" / name).read_bytes(), name
    for name in ("README.rst", "CHANGELOG.rst"):
        assert f"{data}/doc/twisted-novnc/{name}" in names, name


def test_the_console_script_and_the_plugin_come_from_the_venv(installed_wheel: Installed):
    """From a directory outside the checkout, ``twisted-novnc --version`` names this version, and
    the package, the plugin and the plugin cache twistd writes are the venv's."""
    elsewhere, venv = installed_wheel.elsewhere, installed_wheel.venv
    result = run([installed_wheel.bin("twisted-novnc"), "--version"], elsewhere)
    assert result.stdout.startswith(f"twisted_novnc {__version__} (twisted "), result.stdout
    checkout_cache = ROOT / "twisted" / "plugins" / "dropin.cache"
    before = checkout_cache.stat().st_mtime_ns if checkout_cache.exists() else None
    code = (
        "import twisted_novnc, twisted.plugins.twisted_novnc_plugin as stub\n"
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "print(twisted_novnc.__file__)\n"
        "print(stub.__file__)\n"
        "print(*sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
    )
    package, stub, tapnames = run([installed_wheel.bin("python"), "-c", code],
                                  elsewhere).stdout.splitlines()
    for path in (package, stub):
        assert path.startswith(f"{venv}/"), path
    assert "novnc" in tapnames.split()
    cache = installed_wheel.site_packages / "twisted" / "plugins" / "dropin.cache"
    assert b"twisted_novnc_plugin" in cache.read_bytes()
    after = checkout_cache.stat().st_mtime_ns if checkout_cache.exists() else None
    assert after == before, "the installed twistd wrote the checkout's plugin cache"


@pytest_twisted.inlineCallbacks
def test_the_installed_daemon_serves_a_session(
    installed_wheel: Installed, postgres_dsn, sessions_table, pg, vnc_server
):
    """``twistd -n novnc --config <absolute path>`` from the venv, in a directory outside the
    checkout, its database given as the container gives it (libpq's PG* variables): it logs
    its version, answers /healthz, and relays a committed session to the VNC server."""
    config = write_config(
        installed_wheel.elsewhere / "twisted-novnc.ini",
        "application_name=twisted-novnc-wheel-test",
        sessions_table,
        {"admin": {"listen": "tcp:0:interface=127.0.0.1"}},
    )
    twistd = installed_wheel.bin("twistd")
    command = [twistd, "-n", "novnc", "--config", str(config.resolve())]
    proto = DaemonProcess()
    reactor.spawnProcess(
        proto, twistd, command, env=clean_env() | pg_environment(postgres_dsn),
        path=str(installed_wheel.elsewhere),
    )
    try:
        yield within(proto.listening)
        yield within(proto.when_logged(LISTENING_FOR_CHANGES))
        assert f"running twisted_novnc {__version__} (" in proto.output
        assert proto.admin_port is not None
        status, _ = yield http_get(proto.admin_port, "/healthz")
        assert status == 200
        session_id = new_id()
        insert_session(pg, sessions_table, session_id, "127.0.0.1", vnc_server.port, "running")
        client = yield within(connect_session(proto.port, session_id))
        yield within(client.opened)
        yield banner_echo_close(client, b"\x01\x02\x03")
    finally:
        yield stop_daemon(proto)
    assert "Traceback" not in proto.output, proto.output
