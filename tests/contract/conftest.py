"""Fixtures of the contract suite: each implementation in turn, built for an id column type."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from session_store_harness import Harness, memory, postgres


@pytest.fixture
def id_type() -> str:
    """The id column's type; the reference schema's unless a test parametrizes it."""
    return "uuid"


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.integration)])
def harness(request: pytest.FixtureRequest, id_type: str) -> Iterator[Harness]:
    """Each implementation in turn, empty, its id column of type ``id_type``."""
    if request.param == "memory":
        yield memory(id_type)
    else:
        yield from postgres(request.getfixturevalue("postgres_dsn"), id_type)
