"""Fixtures for the packaging tests: the installed wheel (wheel_install.py), and the daemon's
fixtures of tests/e2e for the one test that runs it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from wheel_install import Installed, install_wheel

# The daemon's helpers and fixtures live in tests/e2e, which pytest puts on sys.path only once
# it has loaded that directory's conftest: put it there for them.
_E2E = str(Path(__file__).resolve().parent.parent / "e2e")
if _E2E not in sys.path:
    sys.path.append(_E2E)
from db_fixtures import sessions_table  # noqa: E402, F401  (fixture)
from e2e.conftest import vnc_server  # noqa: E402, F401  (fixture)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The wheel of this checkout in a fresh virtualenv outside it (built once per module)."""
    yield from install_wheel(tmp_path_factory)
