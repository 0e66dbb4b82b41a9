"""``twistd novnc``: command-line options and the service maker."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, read_config


class Options(usage.Options):
    """twistd novnc --config FILE"""

    synopsis = "[--config FILE]"
    longdesc = (
        "Serve noVNC WebSocket connections, each held until its session's vm_ip is committed "
        "in PostgreSQL, then relayed to the VM's VNC server."
    )
    optParameters = [
        ["config", "c", "etc/twisted-novnc.ini", "The ini file to read."],
    ]


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from .service import make_service

    try:
        settings = read_config(options["config"])
    except ConfigError as e:
        # One line, then a non-zero exit: twistd would otherwise print a traceback.
        print(f"twisted_novnc: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return make_service(settings, reactor)
