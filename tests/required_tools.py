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


#: Debian's HAProxy (apt-get install haproxy), which tests/e2e/test_forwarded_haproxy.py puts
#: in front of the daemon with the shipped etc/haproxy.cfg's header rules.
HAPROXY = "/usr/sbin/haproxy"


def require_haproxy() -> str:
    """The HAProxy binary's path; skip (fail under CI) when it is not installed."""
    installed = os.access(HAPROXY, os.X_OK)
    require([] if installed else [f"{HAPROXY} (Debian: apt-get install haproxy)"],
            "the tests through a real HAProxy")
    return HAPROXY


#: Debian's PgBouncer (apt-get install pgbouncer), which tests/e2e/test_pgbouncer.py puts
#: between the daemon and PostgreSQL in transaction mode.
PGBOUNCER = "/usr/sbin/pgbouncer"


def require_pgbouncer() -> str:
    """The PgBouncer binary's path; skip (fail under CI) when it is not installed."""
    installed = os.access(PGBOUNCER, os.X_OK)
    require([] if installed else [f"{PGBOUNCER} (Debian: apt-get install pgbouncer)"],
            "the tests through a real PgBouncer")
    return PGBOUNCER
