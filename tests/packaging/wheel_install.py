"""The wheel of this checkout, installed in a virtualenv of its own outside the checkout, the way
an operator installs it (docs/container.rst, the Containerfile): built with the locked build
backend (requirements/build.txt), its dependencies from requirements/runtime.txt with every hash
checked, then the wheel alone (``--no-deps``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[2]

#: What a build does not read from the checkout (the .dockerignore of the Containerfile, too).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "var", "__pycache__", "*.pyc",
    "dropin.cache", "node_modules", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".hypothesis", "twistd.pid",
)
#: One pip or venv step; a cold pip cache downloads the runtime lock within it.
STEP_LIMIT = 300


def clean_env() -> dict[str, str]:
    """This environment without what would point a child at the checkout or the test venv."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one step to completion; fail the test with its output if it fails."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
        timeout=STEP_LIMIT,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@attrs.frozen
class Installed:
    """The built wheel, the virtualenv it is installed in, and a directory that is neither
    the checkout nor the virtualenv, to run from."""

    wheel: Path
    venv: Path
    elsewhere: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    @property
    def site_packages(self) -> Path:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self.venv / "lib" / version / "site-packages"


def install_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The wheel built from a copy of the checkout, installed in a fresh virtualenv."""
    base = tmp_path_factory.mktemp("wheel")
    # A copy: a build in the checkout would leave build/ there, whose stale files a later
    # build may pack.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES, symlinks=True)
    builder, dist, venv = base / "build-venv", base / "dist", base / "venv"
    run([sys.executable, "-m", "venv", builder], base)
    run([builder / "bin" / "pip", "install", "--require-hashes",
         "-r", source / "requirements" / "build.txt"], base)
    run([builder / "bin" / "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", dist, source], base)
    (wheel,) = dist.glob("*.whl")
    run([sys.executable, "-m", "venv", venv], base)
    run([venv / "bin" / "pip", "install", "--require-hashes",
         "-r", ROOT / "requirements" / "runtime.txt"], base)
    run([venv / "bin" / "pip", "install", "--no-deps", wheel], base)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    yield Installed(wheel, venv, elsewhere)
