"""Fixtures shared by the whole suite.

``postgres_dsn`` is the one PostgreSQL server of a test session: the one named by
``$TWISTED_NOVNC_TEST_DSN``, or else a throwaway private cluster started the first time a test
asks for it (tests that do not ask never pay for it) and removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, settings

from twisted_novnc.database.embedded import EmbeddedPostgres

# The suite runs on a small machine next to real daemons and databases: time is not what the
# property tests measure, so neither deadlines nor the too-slow check may fail them.
settings.register_profile(
    "twisted_novnc", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("twisted_novnc")

TEST_DSN_ENV = "TWISTED_NOVNC_TEST_DSN"


def make_scratch_dir() -> str:
    """A fresh directory under /tmp that the cluster's user can traverse.

    pytest's ``tmp_path`` is private to root (0700) when the suite runs as root, and the
    cluster then runs as ``postgres``, which must reach its data directory.
    """
    path = tempfile.mkdtemp(prefix="tnovnc-test-", dir="/tmp")
    os.chmod(path, 0o711)
    return path


@pytest.fixture
def scratch_dir() -> Iterator[str]:
    """A fresh directory to put a test's own cluster in; removed afterwards."""
    path = make_scratch_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """The libpq DSN of the session's PostgreSQL server."""
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        yield dsn
        return
    root = make_scratch_dir()
    cluster = EmbeddedPostgres(os.path.join(root, "pgdata"), durable=False)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg(postgres_dsn: str) -> Iterator[Any]:
    """A plain autocommit psycopg2 connection to the session's server, closed afterwards."""
    conn = psycopg2.connect(postgres_dsn)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def logged() -> Iterator[list[tuple[str, str]]]:
    """(level, text) of every log event while the test runs."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[tuple[str, str]] = []

    def observe(event: dict[str, Any]) -> None:
        events.append((getattr(event.get("log_level"), "name", ""), formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
