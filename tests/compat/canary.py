"""The message a canary test fails with: which internal changed, in which release, who relies
on it and what to do.  Kept apart so that every canary says it the same way."""

from __future__ import annotations

from importlib.metadata import version

_NAMES = {"twisted": "Twisted", "autobahn": "Autobahn", "txpostgres": "txpostgres"}

#: What to do when a relay internal is gone: the stock path uses only public APIs.
FAST_PATH_OFF = "run with [novnc] fast_path = off"


def broken(dist: str, what: str, used_by: str, fallback: str = FAST_PATH_OFF) -> str:
    """``"Twisted 27.1.0: <what>: <used_by> relies on it; <fallback>; see docs/..."``."""
    return (
        f"{_NAMES[dist]} {version(dist)}: {what}: {used_by} relies on it; {fallback};"
        " see docs/installing.rst, 'Private internals' and 'Upgrading a dependency'"
    )
