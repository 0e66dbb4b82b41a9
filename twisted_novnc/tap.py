"""``twistd novnc``: command-line options and the service maker.

Every option but ``--config`` overrides one ini key; ``--set SECTION.KEY=VALUE`` overrides any.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from twisted_novnc.config import ConfigError, read_config
from twisted_novnc.reactors import IDaemonReactor, installed_reactor

#: Named options and the ini key each one overrides.
OVERRIDES = {
    "listen": ("novnc", "listen"),
    "dsn": ("database", "dsn"),
    "readiness-timeout": ("novnc", "readiness_timeout"),
    "admin-listen": ("admin", "listen"),
    "log-format": ("log", "format"),
    "log-file": ("log", "file"),
}


class Options(usage.Options):
    """twistd novnc --config FILE [overrides]"""

    synopsis = "[--config FILE] [--listen ENDPOINTS] [--dsn DSN] [--set SECTION.KEY=VALUE ...]"
    longdesc = (
        "Serve noVNC WebSocket connections, each held until its session's vm_ip is committed "
        "in PostgreSQL, then relayed to the VM's VNC server.  Settings come from the ini "
        "file; each option below overrides the ini key it names."
    )
    optParameters = [
        ["config", "c", "etc/twisted-novnc.ini", "The ini file to read."],
        ["listen", None, None, "Overrides [novnc] listen (endpoint strings)."],
        ["dsn", None, None, "Overrides [database] dsn (a libpq DSN or URI, or embedded)."],
        ["readiness-timeout", None, None, "Overrides [novnc] readiness_timeout (seconds)."],
        ["admin-listen", None, None, "Overrides [admin] listen (metrics and health)."],
        ["log-format", None, None, "Overrides [log] format (text or json)."],
        ["log-file", None, None, "Overrides [log] file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.overrides: dict[tuple[str, str], str] = {}

    def opt_version(self) -> None:
        """Print this package's version and its libraries', then exit."""
        from twisted_novnc.versions import describe

        print(describe())
        sys.exit(0)

    def opt_set(self, assignment: str) -> None:
        """Override any ini key: --set SECTION.KEY=VALUE (repeatable)."""
        name, sep, value = assignment.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise usage.UsageError(f"--set wants SECTION.KEY=VALUE, got {assignment!r}")
        self.overrides[section, key] = value.strip()

    def postOptions(self) -> None:
        for option, key in OVERRIDES.items():
            if self[option] is not None:
                self.overrides[key] = self[option]


def makeService(options: Options, reactor: IDaemonReactor | None = None) -> IService:
    """The daemon's service tree, built and not started (twistd starts it), on the global
    reactor unless one is given."""
    from twisted_novnc.processes.service import load_secret, make_service

    if reactor is None:
        reactor = installed_reactor()
    try:
        settings = read_config(options["config"], options.overrides)
        secret = load_secret(settings)
    except ConfigError as e:
        # One line, then a non-zero exit: twistd would otherwise print a traceback.
        print(f"twisted_novnc: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return make_service(settings, reactor, secret, options.overrides)
