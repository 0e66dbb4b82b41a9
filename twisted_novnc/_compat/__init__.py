"""Every use of a private name of Twisted, Autobahn or txpostgres, fenced in one place.

The daemon's speed leans on a few internals of its libraries.  Each is used only from a module
of this package, one per library (:mod:`.twisted`, :mod:`.txpostgres`, :mod:`.lazydebug` for
Autobahn's debug-line globals), each has a canary test in ``tests/compat/`` that names the
internal and the installed version when a release changes it, and each has a public-API path
beside it where the library has one.  ``tests/test_private_names.py`` fails on any private name
used elsewhere in the package.  Nothing is patched at import: :func:`install_patches` runs
when the daemon's services start.
"""

from __future__ import annotations


def install_patches() -> None:
    """Apply every change this package makes to a library's modules (idempotent), and turn
    the direct socket writes off, saying so, if this Twisted lacks an internal they read."""
    from twisted_novnc._compat import lazydebug, twisted

    lazydebug.install()
    twisted.check_transport_internals()
