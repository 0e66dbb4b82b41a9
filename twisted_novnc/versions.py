"""Which code is running: this package's version and those of the libraries it leans on.

One line for ``--version``, the start-up log and bug reports, because the daemon's behaviour
depends on private internals of Twisted, Autobahn and txpostgres (README, "Private
internals"), so "which twisted_novnc" is never the whole answer.
"""

from __future__ import annotations

import platform
from importlib import metadata

from twisted_novnc import __version__

#: The distributions named in the line, in its order.
LIBRARIES = ("twisted", "autobahn", "txpostgres", "psycopg2-binary")


def library_versions() -> dict[str, str]:
    """Each of :data:`LIBRARIES` with its installed version ("not installed" if absent)."""
    found: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe() -> str:
    """``twisted_novnc 0.1.0 (twisted 26.10.0, autobahn 26.11.1, ..., Python 3.11.7)``."""
    libraries = ", ".join(f"{name} {version}" for name, version in library_versions().items())
    return f"twisted_novnc {__version__} ({libraries}, Python {platform.python_version()})"
