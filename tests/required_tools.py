"""What a test needs from the machine: skipped where it is missing, a failure under CI.

.ci/run installs every tool the suite uses, so under CI a missing one is a broken set-up,
never a reason to skip; on a developer's machine the test says what to install instead.
"""

from __future__ import annotations

import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(missing: list[str], what: str) -> None:
    """Fail (under CI) or skip (elsewhere) when ``missing`` names anything."""
    if not missing:
        return
    if under_ci():
        pytest.fail(f"CI is set but {what} cannot run; missing: " + "; ".join(missing),
                    pytrace=False)
    pytest.skip(f"{what} needs: " + "; ".join(missing))
