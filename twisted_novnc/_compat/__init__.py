"""Every use of a private name of Twisted, Autobahn or txpostgres, fenced in one place.

The daemon's speed leans on a few internals of its libraries.  Each is used only from a module
of this package, each has a canary test that names the internal and the installed version when
a release changes it, and each has a public-API path beside it (``[novnc] fast_path = off``).
Nothing is patched at import: :func:`install_patches` runs when the daemon's services start.
"""

from __future__ import annotations


def install_patches() -> None:
    """Apply every change this package makes to a library's modules (idempotent)."""
    from twisted_novnc._compat import lazydebug

    lazydebug.install()
