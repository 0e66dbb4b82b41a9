"""The Containerfile's promises, read from its text (no container engine needed): a non-root
user, the locks installed with every hash checked, a healthcheck on the admin listener's
/healthz, and a config that listens where the image says it does.  docs/container.rst has the
commands that build and run it."""

from __future__ import annotations

import configparser
import re
import shlex

from docutils.core import publish_doctree
from wheel_install import ROOT

from twisted_novnc.config import read_config

CONTAINERFILE = ROOT / "Containerfile"
CONTAINER_INI = ROOT / "etc" / "container.ini"
IMAGE_CONFIG = "/etc/twisted-novnc/twisted-novnc.ini"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments left out."""
    lines = [line for line in CONTAINERFILE.read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = re.sub(r"[ \t]*\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage: what the image is."""
    found = instructions()
    last_from = max(i for i, (word, _) in enumerate(found) if word == "FROM")
    return found[last_from:]


def port_of(endpoint: str) -> int:
    match = re.match(r"tcp:(\d+):interface=0\.0\.0\.0$", endpoint)
    assert match, f"{endpoint}: not a TCP listener on 0.0.0.0"
    return int(match.group(1))


def test_every_stage_is_debian_slim():
    """Both stages start from the Debian slim Python image."""
    found = instructions()
    arg = next(rest for word, rest in found if word == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert arg.endswith("python:3.11-slim-bookworm")
    froms = [rest for word, rest in found if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]


def test_the_daemon_runs_as_an_unprivileged_user():
    """The image's USER is a numeric, non-root uid, set before the CMD and the HEALTHCHECK."""
    stage = final_stage()
    users = [(i, rest) for i, (word, rest) in enumerate(stage) if word == "USER"]
    assert users, "no USER: the daemon would run as root"
    index, user = users[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, user
    assert [word for word, _ in stage[index:]].count("RUN") == 0
    cmd = next(i for i, (word, _) in enumerate(stage) if word == "CMD")
    assert index < cmd


def test_everything_installed_is_locked_and_hash_checked():
    """The build backend and the runtime dependencies come from their locks with
    --require-hashes, built (the wheel, txpostgres' sdist) with the locked backend only; the
    wheel goes in alone (--no-deps); the image keeps no build backend."""
    runs = [rest for word, rest in instructions() if word == "RUN"]
    installs = [part for command in runs for part in command.split("&&") if "pip install" in part]
    assert installs
    for part in installs:
        words = shlex.split(part)
        if "--require-hashes" in words:
            assert words[words.index("-r") + 1].endswith(("build.txt", "runtime.txt")), part
        else:
            assert "--no-deps" in words and words[-1].endswith(".whl"), part
    text = " ".join(runs)
    assert "pip install --require-hashes -r requirements/build.txt" in text
    assert "pip wheel --no-deps --no-build-isolation" in text
    stage_runs = " ".join(rest for word, rest in final_stage() if word == "RUN")
    assert ("pip install --require-hashes --no-build-isolation -r /tmp/locks/runtime.txt"
            in stage_runs)
    assert "pip uninstall --yes setuptools wheel" in stage_runs
    assert "pip install --no-deps /tmp/dist/*.whl" in stage_runs


def test_the_healthcheck_asks_healthz_of_the_admin_listener():
    """HEALTHCHECK runs Python (the slim image has no curl) against /healthz on the port the
    container config's [admin] listen names."""
    settings = read_config(str(CONTAINER_INI))
    admin_port = port_of(settings.admin.listen[0])
    (check,) = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    assert '"python", "-c"' in check and "urllib.request" in check
    assert f"http://127.0.0.1:{admin_port}/healthz" in check


def test_the_image_config_listens_where_the_image_says():
    """etc/container.ini is valid, becomes the config the CMD names, listens on 0.0.0.0 on the
    EXPOSEd ports, and takes its database from libpq's PG* variables (no host in the DSN)."""
    settings = read_config(str(CONTAINER_INI))
    stage = final_stage()
    assert ("COPY", f"etc/container.ini {IMAGE_CONFIG}") in stage
    (cmd,) = [rest for word, rest in stage if word == "CMD"]
    assert cmd == f'["twistd", "--pidfile=", "-n", "novnc", "--config", "{IMAGE_CONFIG}"]'
    exposed = {int(port) for word, rest in stage if word == "EXPOSE" for port in rest.split()}
    ports = {port_of(e) for e in settings.novnc.listen + settings.admin.listen}
    assert exposed == ports
    assert settings.database.dsn != "embedded" and "host" not in settings.database.dsn


def test_the_unit_points_at_the_installed_documentation():
    """The systemd unit's Documentation= URLs are the README and changelog the wheel installs
    into the unit's venv (no placeholder)."""
    text = (ROOT / "etc" / "twisted-novnc.service").read_text()
    urls = re.findall(r"^Documentation=(\S+)$", text, re.M)
    assert urls and not [url for url in urls if "example" in url]
    setup = configparser.ConfigParser(interpolation=None)
    setup.read(ROOT / "setup.cfg")
    docs = setup.get("options.data_files", "share/doc/twisted-novnc").split()
    for url in urls:
        prefix = "file:///opt/twisted-novnc/venv/share/doc/twisted-novnc/"
        assert url.startswith(prefix), url
        assert url.removeprefix(prefix) in docs, url


def test_the_container_docs_are_clean_rest():
    """docs/container.rst parses without a warning, under one title, and gives the build and
    run commands the Containerfile's header gives."""
    text = (ROOT / "docs" / "container.rst").read_text()
    tree = publish_doctree(text, settings_overrides={"halt_level": 2, "report_level": 5})
    # One top-level title: docutils lifts a lone one to the document's title (two would stay
    # sections side by side).
    assert tree.children[0].tagname == "title"
    assert "build -f Containerfile" in text
    assert "--stop-timeout" in text and "PGHOST" in text
