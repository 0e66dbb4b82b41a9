"""Autobahn's module globals ``hltype``, ``hlval`` and ``pformat``, made lazy: Autobahn's
debug-line arguments are worked out only when a debug line is written.

Autobahn logs its connection steps at debug level as ``self.log.debug("{func} ...",
func=hltype(self.connectionMade), peer=hlval(self.peer))``: the arguments are built on
every call, debug or not, and ``hltype`` goes through ``inspect`` and colour codes.  That was
six calls and a few per cent of a connection's CPU.  :func:`install` puts lazy stand-ins in
the two Autobahn modules that call them; each renders exactly Autobahn's text when (if ever)
it is formatted.  Every such call in those modules is a keyword argument of a log call, which
is all a stand-in has to serve (``tests/compat/test_autobahn_debug.py`` checks both, and
names the Autobahn release that changes either).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import autobahn.twisted.websocket as _autobahn_twisted
import autobahn.util as _autobahn_util
import autobahn.websocket.protocol as _autobahn_protocol

#: The modules whose ``hltype`` and ``hlval`` are replaced.
MODULES = (_autobahn_protocol, _autobahn_twisted)

_hltype = _autobahn_util.hltype
_hlval = _autobahn_util.hlval


class LazyText:
    """Text rendered on first use: ``str()`` and ``format()`` give the function's result."""

    __slots__ = ("_args", "_kwargs", "_render")

    def __init__(self, render: Callable[..., str], *args: Any, **kwargs: Any) -> None:
        self._render = render
        self._args = args
        self._kwargs = kwargs

    def __str__(self) -> str:
        return self._render(*self._args, **self._kwargs)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    __repr__ = __str__


def lazy_hltype(obj: Any) -> LazyText:
    """Autobahn's ``hltype(obj)``, rendered when formatted."""
    return LazyText(_hltype, obj)


def lazy_hlval(val: Any, color: str = "white", bold: bool = True) -> LazyText:
    """Autobahn's ``hlval(val, color, bold)``, rendered when formatted."""
    return LazyText(_hlval, val, color=color, bold=bold)


def install() -> None:
    """Replace ``hltype`` and ``hlval`` in Autobahn's WebSocket modules (idempotent)."""
    for module in MODULES:
        module.hltype = lazy_hltype  # type: ignore[attr-defined]
        module.hlval = lazy_hlval  # type: ignore[attr-defined]


_pformat = _autobahn_protocol.pformat


def _lazy_pformat(value: Any) -> LazyText:
    return LazyText(_pformat, value)


@contextlib.contextmanager
def lazy_pformat() -> Iterator[None]:
    """While Autobahn's ``_connectionMade`` runs: its options' ``pformat`` for a debug line.

    Autobahn pretty-prints its ~40 options on every connection, debug or not (about a tenth
    of a connection's CPU).  Only for that call: ``Timings.__str__`` returns ``pformat``'s
    result, which must stay a real ``str``.
    """
    _autobahn_protocol.pformat = _lazy_pformat  # type: ignore[assignment]
    try:
        yield
    finally:
        _autobahn_protocol.pformat = _pformat
