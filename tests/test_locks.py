"""The locks of requirements/ keep their rules: hashed, separated, and inside setup.cfg's ranges.

No network: these read setup.cfg and the lock files as text.  ``make lock`` rewrites the locks;
these tests fail when setup.cfg changed without it, or when a lock was edited by hand.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
LOCKS = ["runtime.txt", "test.txt", "lowest.txt", "tools.txt", "build.txt"]

# Libraries whose private internals the code uses: their ranges stop below the next major.
INTERNALS_USED = ["twisted", "autobahn", "txpostgres"]
# What the daemon's environment never holds, whatever setup.cfg's test extra says.
TEST_ONLY = ["pytest", "pytest-twisted", "hypothesis", "mypy", "mypy-zope", "ruff", "websockify"]


def setup_cfg_requirements(section: str, option: str) -> list[Requirement]:
    """The requirements of setup.cfg's ``section``/``option``, comment lines left out."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = [line.strip() for line in parser.get(section, option).splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def runtime_requirements() -> dict[str, Requirement]:
    """setup.cfg's install_requires, by canonical name."""
    return {canonicalize_name(req.name): req
            for req in setup_cfg_requirements("options", "install_requires")}


def extra_test_requirements() -> dict[str, Requirement]:
    """setup.cfg's ``test`` extra, by canonical name."""
    return {canonicalize_name(req.name): req
            for req in setup_cfg_requirements("options.extras_require", "test")}


def lock_entries(name: str) -> list[str]:
    """Each requirement of a lock file, its continuation lines joined, comments left out."""
    text = (REQUIREMENTS / name).read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    entries = []
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            entries.append(line)
    return entries


def pins(name: str) -> dict[str, Version]:
    """Canonical name -> pinned version, for every package of a lock file."""
    found: dict[str, Version] = {}
    for entry in lock_entries(name):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", entry)
        assert match, f"{name}: not an exact pin: {entry[:80]}"
        found[canonicalize_name(match.group(1))] = Version(match.group(2))
    return found


@pytest.mark.parametrize("lock", LOCKS)
def test_every_locked_package_is_pinned_with_hashes(lock: str) -> None:
    """Each entry of each lock is one ``name==version`` with at least one sha256 hash."""
    entries = lock_entries(lock)
    assert entries, f"{lock} is empty"
    for entry in entries:
        assert re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+ ", entry), entry[:80]
        assert "--hash=sha256:" in entry, f"{lock}: no hash for {entry.split()[0]}"
        options = entry.split()[1:]
        assert all(option.startswith("--hash=sha256:") for option in options), entry[:80]


def test_the_daemons_lock_holds_no_test_tool() -> None:
    """requirements/runtime.txt, what make run installs, has none of the test tools."""
    runtime = pins("runtime.txt")
    for name in {canonicalize_name(n) for n in TEST_ONLY} | set(extra_test_requirements()):
        assert name not in runtime, f"{name} is in the daemon's lock"


@pytest.mark.parametrize("lock", ["runtime.txt", "test.txt", "lowest.txt"])
def test_every_runtime_dependency_is_locked(lock: str) -> None:
    """Every name of install_requires is pinned in the runtime, test and lowest locks."""
    locked = pins(lock)
    for name in runtime_requirements():
        assert name in locked, f"{name} (install_requires) is not in {lock}"


def test_the_test_lock_holds_the_test_tools() -> None:
    """Every name of the test extra is pinned in requirements/test.txt."""
    locked = pins("test.txt")
    for name in extra_test_requirements():
        assert name in locked, f"{name} (the test extra) is not in test.txt"


@pytest.mark.parametrize("lock", ["runtime.txt", "test.txt", "lowest.txt"])
def test_locked_versions_lie_inside_setup_cfg_ranges(lock: str) -> None:
    """Every install_requires package is locked at a version its setup.cfg range admits."""
    locked = pins(lock)
    for name, req in runtime_requirements().items():
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{lock} pins {name}=={locked[name]}, outside setup.cfg's {req}")


@pytest.mark.parametrize("name", INTERNALS_USED)
def test_ranges_stop_below_the_next_major(name: str) -> None:
    """Twisted, Autobahn and txpostgres admit no major release after the locked one."""
    req = runtime_requirements()[name]
    next_major = Version(f"{pins('runtime.txt')[name].major + 1}")
    assert not req.specifier.contains(next_major, prereleases=True), (
        f"setup.cfg: {req} admits {next_major}, a major release no test has seen")


def test_the_tests_run_what_the_daemon_runs() -> None:
    """Every package of the runtime lock has the same version in the test lock."""
    runtime, test = pins("runtime.txt"), pins("test.txt")
    for name, version in runtime.items():
        assert test.get(name) == version, (
            f"runtime.txt pins {name}=={version}, test.txt {test.get(name)}: run make lock")


def test_the_lowest_lock_pins_each_floor() -> None:
    """requirements/lowest.txt holds each install_requires package at its range's floor."""
    lowest = pins("lowest.txt")
    for name, req in runtime_requirements().items():
        floors = [Version(spec.version) for spec in req.specifier if spec.operator == ">="]
        assert len(floors) == 1, f"setup.cfg: {req} needs one >= floor"
        assert lowest[name] == floors[0], (
            f"lowest.txt pins {name}=={lowest[name]}, setup.cfg's floor is {floors[0]}: "
            "run make lock")


def test_the_lowest_lock_keeps_the_locked_test_tools() -> None:
    """The test tools of the lowest lock are those of the test lock: only the floors differ."""
    lowest, test = pins("lowest.txt"), pins("test.txt")
    for name in extra_test_requirements():
        assert lowest.get(name) == test[name], (
            f"lowest.txt pins {name}=={lowest.get(name)}, test.txt {test[name]}: run make lock")
