"""The installed plugin and the twistd command line, run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_get_plugins_finds_novnc_outside_the_checkout(tmp_path):
    """The install exposes twisted/plugins: getPlugins(IServiceMaker) finds tapname novnc."""
    code = (
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "found = [p for p in getPlugins(IServiceMaker) if p.tapname == 'novnc']\n"
        "assert len(found) == 1, found\n"
        "print(found[0].module, found[0].options.__module__, found[0].options.__name__)\n"
    )
    result = run([sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["twisted_novnc.tap", "twisted_novnc.tap", "Options"]


def test_twistd_help_lists_the_plugin_options(tmp_path):
    """``twistd novnc --help`` documents --config."""
    result = run([TWISTD, "novnc", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ["--config", "--listen", "--dsn", "--readiness-timeout", "--admin-listen",
                   "--log-format", "--log-file", "--set"]:
        assert option in result.stdout, option


def test_check_config_prints_effective_settings_masked(tmp_path):
    """check-config validates a file and prints every key, the DSN password masked whole,
    escaped spaces and all."""
    config = tmp_path / "c.ini"
    config.write_text("[database]\ndsn = host=db user=u password=hunter2\n")
    result = run([sys.executable, "-m", "twisted_novnc", "check-config", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "dsn = host=db user=u password=***" in result.stdout
    assert "[upstream]" in result.stdout and "readiness_timeout = 30" in result.stdout
    escaped = tmp_path / "escaped.ini"
    escaped.write_text("[database]\ndsn = host=db password=correct\\ horse\\ battery dbname=x\n")
    result = run([sys.executable, "-m", "twisted_novnc", "check-config", str(escaped)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dsn = host=db password=*** dbname=x" in result.stdout
    for word in ("correct", "horse", "battery"):
        assert word not in result.stdout, word
    bad = tmp_path / "bad.ini"
    bad.write_text("[novnc]\nreject = maybe\n")
    result = run([sys.executable, "-m", "twisted_novnc", "check-config", str(bad)], tmp_path)
    assert result.returncode == 2 and f"{bad}: [novnc] reject:" in result.stderr


def test_bad_config_stops_start_up_with_one_line(tmp_path):
    """A bad value stops start-up with one line naming file, section, key and problem."""
    config = tmp_path / "bad.ini"
    config.write_text("[novnc]\ntarget_port = 70000\n")
    result = run([TWISTD, "--pidfile=", "-n", "novnc", "--config", str(config)], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    expected = f"twisted_novnc: configuration error: {config}: [novnc] target_port:"
    assert lines[0].startswith(expected)
    assert "65535" in lines[0]


def test_unknown_key_stops_start_up(tmp_path):
    """An unknown key is named, with the closest known key suggested."""
    config = tmp_path / "typo.ini"
    config.write_text("[database]\ntabel = sessions\n")
    result = run([TWISTD, "--pidfile=", "-n", "novnc", "--config", str(config)], tmp_path)
    assert result.returncode != 0
    assert f"{config}: [database] tabel: unknown key" in result.stderr
    assert "table" in result.stderr


def test_missing_config_file_is_named(tmp_path):
    """A config file that does not exist is named in the error."""
    result = run([TWISTD, "--pidfile=", "-n", "novnc", "--config", "nowhere.ini"], tmp_path)
    assert result.returncode != 0
    assert "nowhere.ini" in result.stderr


def test_version_names_the_package_and_its_libraries(tmp_path):
    """twistd novnc --version prints this package's version first, then its libraries'."""
    from twisted_novnc import __version__

    result = run([TWISTD, "novnc", "--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"twisted_novnc {__version__} (twisted ")
    assert "autobahn " in line and "txpostgres " in line and "Python " in line


def test_console_script_runs_the_helper_commands(tmp_path):
    """The installed twisted-novnc command is python -m twisted_novnc under its own name."""
    from twisted_novnc import __version__

    command = os.path.join(os.path.dirname(sys.executable), "twisted-novnc")
    version = run([command, "--version"], tmp_path)
    assert version.returncode == 0 and f"twisted_novnc {__version__}" in version.stdout
    config = tmp_path / "c.ini"
    config.write_text("[novnc]\nreadiness_timeout = 5\n")
    checked = run([command, "check-config", str(config)], tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "readiness_timeout = 5" in checked.stdout
    usage = run([command, "--help"], tmp_path)
    assert usage.stdout.startswith("usage: twisted-novnc")


def test_installed_distribution_carries_the_licence():
    """The MIT licence file ships in the installed distribution, as setup.cfg declares."""
    from importlib import metadata

    files = metadata.files("twisted_novnc") or []
    # (The vendored noVNC's own libraries carry their LICENSE files inside the package.)
    (licence,) = [f for f in files if f.name == "LICENSE" and f.parts[0] != "twisted_novnc"]
    assert "MIT License" in licence.read_text()
    assert metadata.metadata("twisted_novnc")["License"] == "MIT"


def test_a_vnc_password_file_open_to_others_stops_start_up(tmp_path):
    """``[vnc] password_file`` readable by others: start-up stops with one line naming the
    config, the key and the file, and never the password."""
    password = tmp_path / "vnc-password"
    password.write_text("Zq9-only-here\n")
    password.chmod(0o644)
    config = tmp_path / "vnc.ini"
    config.write_text(f"[vnc]\npassword_file = {password}\n")
    result = run([TWISTD, "--pidfile=", "-n", "novnc", "--config", str(config)], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    expected = f"twisted_novnc: configuration error: {config}: [vnc] password_file:"
    assert lines[0].startswith(expected)
    assert str(password) in lines[0] and "accessible to all users" in lines[0]
    assert "Zq9-only-here" not in result.stderr + result.stdout
