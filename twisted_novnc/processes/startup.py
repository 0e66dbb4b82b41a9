"""What start-up changes in the process, done when the service tree starts.

Building the tree (``makeService``) and importing any module change nothing outside them: a
test, a tool or a second tree in the same process finds the process as it was.  Only starting
the tree does, in two services every tree has: :class:`ProcessSetupService` near its start and
:class:`StartupDoneService` at its end.
"""

from __future__ import annotations

import gc
import resource
from collections.abc import Callable

import attrs
from prometheus_client import disable_created_metrics
from twisted.application.service import Service
from twisted.logger import Logger

from twisted_novnc._compat import install_patches
from twisted_novnc.config import Settings
from twisted_novnc.operations.fdlimit import (
    BASE_RESERVE,
    DescriptorLimit,
    check_capacity,
    raise_descriptor_limit,
)
from twisted_novnc.versions import describe

_log = Logger()


@attrs.define(eq=False)
class ProcessSetupService(Service):
    """The process's settings, made once when the tree starts (the first of ``privileged``
    start and start), before any listener listens.

    Every process: Prometheus without its ``*_created`` series (they only double every counter;
    nothing reads them) and, where ``warn``, the warnings about the settings.  A process that
    ``relays``: its descriptor limit raised to the hard limit and the room that leaves for
    relays, whether Autobahn's native masking is in use, and the library patches
    (:func:`twisted_novnc._compat.install_patches`).
    """

    settings: Settings
    relays: bool = True
    warn: bool = True
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit
    #: The descriptor limit as start-up left it (None before, or where nothing relays).
    limit: DescriptorLimit | None = attrs.field(default=None, init=False)
    _done: bool = attrs.field(default=False, init=False)

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._set_up()

    def startService(self) -> None:
        Service.startService(self)
        self._set_up()

    def _set_up(self) -> None:
        if self._done:
            return
        self._done = True
        _log.info("running {versions}", event="versions", versions=describe())
        disable_created_metrics()
        if self.warn:
            warn_about(self.settings)
        if not self.relays:
            return
        self.limit = raise_descriptor_limit(self.getrlimit, self.setrlimit)
        check_capacity(self.limit, self.settings.novnc.max_connections, reserve(self.settings))
        log_nvx()
        install_patches()


@attrs.define(eq=False)
class StartupDoneService(Service):
    """The last of every tree: once everything before it has started (every listener listens),
    what start-up allocated is moved out of the collector's sight.

    A full collection then no longer walks the start-up heap (tens of MB of modules and
    settings), which made each one a pause of up to 100 ms under load (bench/README.md,
    "Garbage collection").
    """

    collect: Callable[[], object] = gc.collect
    freeze: Callable[[], None] = gc.freeze

    def startService(self) -> None:
        Service.startService(self)
        self.collect()
        self.freeze()


def reserve(settings: Settings) -> int:
    """Descriptors a proxy process needs besides its relays: the base, the database pool and its
    LISTEN connection, and one per listening socket."""
    return BASE_RESERVE + settings.database.pool_size + 1 + len(settings.novnc.listen)


def warn_about(settings: Settings) -> None:
    """Start-up warnings about settings that are allowed but rarely what anyone wants."""
    if settings.auth.mode == "none":
        _log.warn("[auth] mode = none: the session id is the only capability; anyone who"
                  " learns one can connect to its VM", event="auth_none_warning")
    if not settings.novnc.allowed_origins.patterns:
        _log.warn("[novnc] allowed_origins is empty: pages of any origin may connect",
                  event="origins_open_warning")


def log_nvx() -> bool:
    """Say whether Autobahn's native masking (NVX) is in use: without it, unmasking what
    browsers send runs in pure Python, about 70 times slower."""
    from autobahn.websocket import USES_NVX

    if USES_NVX:
        _log.info("Autobahn NVX native masking: in use", event="nvx")
    else:
        _log.warn("Autobahn NVX native masking: NOT in use (pure-Python unmasking is about 70x"
                  " slower); install autobahn with its native extension, unset AUTOBAHN_USE_NVX=0",
                  event="nvx")
    return bool(USES_NVX)
