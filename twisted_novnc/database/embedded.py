"""The private PostgreSQL cluster behind ``dsn = embedded`` (and the test suite's throwaway one).

The cluster listens only on a Unix socket in a private directory beside its data directory
(``var/postgres-socket`` for ``var/postgres``), the same on every start, so the DSN and the psql
line a user saved keep working; and it trusts local connections, so nothing outside this
machine can ever reach it.  A socket path must fit in 107 bytes: when the data directory is too
deep for that, the socket goes to a directory under /tmp named after it (as stable).
``initdb`` refuses to run as root: when we are root, every PostgreSQL program runs as the
``postgres`` system user instead.

Everything here blocks: it runs before the reactor (twistd start-up) or in a test's set-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shlex
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from contextlib import closing
from typing import NoReturn

import attrs
import psycopg2
from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()

BINDIR_ENV = "TWISTED_NOVNC_PG_BINDIR"
VERSIONED_BINDIRS = "/usr/lib/postgresql"
PORT = 5432
SUPERUSER = "postgres"
SOCKET_PARENT = "/tmp"
#: The longest Unix socket path PostgreSQL accepts (sun_path holds 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
SOCKET_SUFFIX = "-socket"
#: Where a root-run cluster lives when its configured directory is inside one the cluster's
#: user cannot enter (a checkout in a private home or mktemp -d directory).
RELOCATED_PARENT = "/var/lib/twisted-novnc"
_NEEDED = ("initdb", "pg_ctl")
_INSTALL_HINT = (
    "install the PostgreSQL server package (Debian/Ubuntu: apt-get install postgresql) "
    f"or set ${BINDIR_ENV} to the directory holding initdb and pg_ctl"
)


class EmbeddedPostgresError(Exception):
    """The private cluster could not be found, created, started or stopped."""


def _has_server_binaries(directory: str) -> bool:
    return all(os.access(os.path.join(directory, name), os.X_OK) for name in _NEEDED)


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (-1,)


def find_pg_bindir(
    environ: Mapping[str, str] | None = None, versioned_root: str = VERSIONED_BINDIRS
) -> str:
    """The directory holding initdb, pg_ctl and postgres.

    Debian keeps them off PATH (in /usr/lib/postgresql/<version>/bin), and its ``pg_config``
    without the server-dev package answers /usr/bin, hence the search order.  ``environ``
    (default ``os.environ``, also used for PATH) and ``versioned_root`` exist for tests.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(BINDIR_ENV)
    if explicit:
        if _has_server_binaries(explicit):
            return os.path.abspath(explicit)
        raise EmbeddedPostgresError(
            f"${BINDIR_ENV} is {explicit!r}, which holds no initdb and pg_ctl: "
            "point it at the PostgreSQL server binaries or unset it"
        )
    path = env.get("PATH", os.defpath)
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True,
                stdin=subprocess.DEVNULL,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_binaries(out):
            return out
    try:
        versions = sorted(os.listdir(versioned_root), key=_version_key, reverse=True)
    except OSError:
        versions = []
    for version in versions:
        candidate = os.path.join(versioned_root, version, "bin")
        if _version_key(version) != (-1,) and _has_server_binaries(candidate):
            return candidate
    initdb = shutil.which("initdb", path=path)
    if initdb is not None:
        # Resolve symlinks: pg_ctl and postgres sit next to the real initdb.
        candidate = os.path.dirname(os.path.realpath(initdb))
        if _has_server_binaries(candidate):
            return candidate
    raise EmbeddedPostgresError(f"PostgreSQL server programs not found: {_INSTALL_HINT}")


@attrs.frozen
class PostmasterPid:
    """What a running postmaster wrote in ``postmaster.pid``: how to find and reach it."""

    pid: int
    port: int
    socket_dir: str
    status: str


def read_postmaster_pid(data_dir: str) -> PostmasterPid | None:
    """Parse ``<data_dir>/postmaster.pid``; None when it is missing or not (yet) complete."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    # Lines: pid, data dir, start time, port, first socket dir, listen address, shm key, status.
    if len(lines) < 5:
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except ValueError:
        return None
    status = lines[7].strip() if len(lines) > 7 else ""
    return PostmasterPid(pid, port, lines[4].strip(), status)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _tail_file(path: str, since: int = 0, lines: int = 20) -> str:
    """The last lines of ``path`` written after offset ``since`` (the log is appended to)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 8192))
            return _tail(f.read().decode("utf-8", "replace"), lines)
    except OSError:
        return ""


def _absolute(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))


def _make_dsn(socket_dir: str, port: int) -> str:
    return f"host={socket_dir} port={port} user={SUPERUSER} dbname=postgres"


def socket_file(socket_dir: str, port: int = PORT) -> str:
    """The path of the server's socket in ``socket_dir``, as PostgreSQL names it."""
    return os.path.join(socket_dir, f".s.PGSQL.{port}")


def fits_socket_path(socket_dir: str, port: int = PORT) -> bool:
    """Whether a socket in ``socket_dir`` has a path short enough for a Unix socket."""
    return len(os.fsencode(socket_file(socket_dir, port))) <= MAX_SOCKET_PATH


def stable_socket_dir(data_dir: str, fallback_parent: str = SOCKET_PARENT) -> str:
    """Where the cluster of ``data_dir`` puts its socket, the same on every start.

    Beside the data directory (``var/postgres`` -> ``var/postgres-socket``), or, when that
    path is too long for a Unix socket, ``<fallback_parent>/tnovnc-<hash of data_dir>``.
    """
    beside = _absolute(data_dir).rstrip(os.sep) + SOCKET_SUFFIX
    if fits_socket_path(beside):
        return beside
    digest = hashlib.sha256(os.fsencode(_absolute(data_dir))).hexdigest()[:16]
    fallback = os.path.join(fallback_parent, f"tnovnc-{digest}")
    if not fits_socket_path(fallback):
        raise EmbeddedPostgresError(
            f"no socket path short enough for the cluster in {data_dir}: {beside} and "
            f"{fallback} are both longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes)"
        )
    return fallback


@attrs.define(eq=False)
class EmbeddedPostgres:
    """One private cluster in ``data_dir``: created on first start, reused while running.

    ``durable=False`` skips every fsync (``initdb --no-sync``, ``fsync=off``): fine for
    throwaway test clusters, never for the daemon's persistent one.  When we are root the
    cluster runs as ``system_user``.
    """

    data_dir: str = attrs.field(converter=_absolute)
    durable: bool = True
    bindir: str | None = None
    system_user: str = "postgres"
    #: Use this socket directory instead of the one :func:`stable_socket_dir` names.
    socket_dir_fixed: str | None = None
    #: Where the socket goes when the data directory is too deep for one beside it.
    socket_fallback_parent: str = SOCKET_PARENT
    #: Where the cluster lives instead when ``data_dir`` is out of the cluster user's reach.
    relocated_parent: str = RELOCATED_PARENT
    _dsn: str | None = attrs.field(default=None, init=False)
    _socket_dir: str | None = attrs.field(default=None, init=False)
    _owned: bool = attrs.field(default=False, init=False)

    @property
    def log_file(self) -> str:
        """The server log (kept in the data directory, which the cluster's user owns)."""
        return os.path.join(self.data_dir, "postgres.log")

    @property
    def dsn(self) -> str:
        """The libpq connection string; only valid between start() and stop()."""
        if self._dsn is None:
            raise EmbeddedPostgresError(f"the cluster in {self.data_dir} is not started")
        return self._dsn

    @property
    def socket_dir(self) -> str:
        """The directory holding the server's socket; only valid between start() and stop()."""
        if self._socket_dir is None:
            raise EmbeddedPostgresError(f"the cluster in {self.data_dir} is not started")
        return self._socket_dir

    @property
    def owned(self) -> bool:
        """Whether stop() stops the server: False when start() found it already running."""
        return self._owned

    def start(self) -> str:
        """Create the cluster if needed, start it (or adopt a running one); return its DSN."""
        if self._dsn is not None:
            return self._dsn
        self._bindir()  # fail before creating anything
        self.data_dir = self._reachable_data_dir()
        running = self._running_postmaster()
        if running is not None:
            if not running.socket_dir:
                raise EmbeddedPostgresError(
                    f"the cluster in {self.data_dir} (pid {running.pid}) is running "
                    "without a Unix socket; stop it first"
                )
            self._socket_dir, self._owned = running.socket_dir, False
            self._dsn = _make_dsn(running.socket_dir, running.port)
            _log.info("reusing the PostgreSQL cluster already running in {data_dir} "
                      "(pid {pid})",
                      event="database_cluster_reused", data_dir=self.data_dir, pid=running.pid)
            return self._dsn
        if not os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            self._initdb()
        socket_dir = self._prepare_socket_dir()
        try:
            self._pg_ctl_start(socket_dir)
        except BaseException:
            self._remove_socket_dir(socket_dir)
            raise
        self._socket_dir, self._owned = socket_dir, True
        self._dsn = _make_dsn(socket_dir, PORT)
        return self._dsn

    def stop(self) -> None:
        """Stop the server if this object started it, and remove its socket directory."""
        if self._dsn is None:
            return
        if self._owned:
            log_start = _file_size(self.log_file)
            result = self._run(["pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "-t", "60",
                                "stop"], timeout=90)
            if result.returncode != 0 and self._status() == 0:
                self._fail(result, log_since=log_start)
            if self._socket_dir is not None:
                self._remove_socket_dir(self._socket_dir)
            _log.info("stopped the PostgreSQL cluster in {data_dir}",
                      event="database_cluster_stopped", data_dir=self.data_dir)
        self._dsn = self._socket_dir = None
        self._owned = False

    def psql_command(self, sql: str) -> str:
        """A shell command line a human can paste to run ``sql`` against this cluster."""
        bindir_psql = os.path.join(self._bindir(), "psql")
        psql = shutil.which("psql") or bindir_psql
        return f"{shlex.quote(psql)} -X {shlex.quote(self.dsn)} -c {shlex.quote(sql)}"

    def planned_socket_dir(self) -> str:
        """The socket directory the next start() uses (before a root-run relocation, which
        moves it beside the relocated data directory)."""
        return self.socket_dir_fixed or stable_socket_dir(self.data_dir,
                                                          self.socket_fallback_parent)

    def _remove_socket_dir(self, socket_dir: str) -> None:
        """Tidy up after a stop: the directory goes, its path stays the next start's."""
        if self.socket_dir_fixed is None:
            with contextlib.suppress(OSError):
                os.rmdir(socket_dir)

    # -- the steps -------------------------------------------------------------------------

    def _prepare_socket_dir(self) -> str:
        """Make (or check) the stable socket directory: ours, private, not a symbolic link.

        The fallback under /tmp has a name anyone can predict, so one that someone else made
        first is refused rather than used.
        """
        socket_dir = self.planned_socket_dir()
        if self.socket_dir_fixed is not None:
            self._give_to_cluster_user(socket_dir)
            return socket_dir
        if socket_dir != self.data_dir.rstrip(os.sep) + SOCKET_SUFFIX:
            _log.warn("the socket path beside {data_dir} is too long for a Unix socket"
                      " ({limit} bytes); the cluster's socket is in {socket_dir} instead",
                      event="database_socket_fallback", data_dir=self.data_dir,
                      limit=MAX_SOCKET_PATH, socket_dir=socket_dir)
        with contextlib.suppress(FileExistsError):
            os.mkdir(socket_dir, mode=0o700)
        info = os.lstat(socket_dir)
        user = self._cluster_user()
        owners = {os.geteuid()} | ({user.pw_uid} if user is not None else set())
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners:
            raise EmbeddedPostgresError(
                f"{socket_dir} (the embedded cluster's socket directory) is not a directory"
                " of this user's: remove it, or set [database] embedded_dir elsewhere"
            )
        os.chmod(socket_dir, 0o700)
        self._give_to_cluster_user(socket_dir)
        return socket_dir

    def _initdb(self) -> None:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self._give_to_cluster_user(self.data_dir)
        # Trust only the Unix socket (whose directory only the cluster's user can enter);
        # TCP is both unconfigured (listen_addresses='') and rejected here.
        args = ["initdb", "-D", self.data_dir, "-U", SUPERUSER, "--auth-local=trust",
                "--auth-host=reject", "--encoding=UTF8", "--locale=C"]
        if not self.durable:
            args.append("--no-sync")
        result = self._run(args, timeout=300)
        if result.returncode != 0:
            self._fail(result)
        _log.info("created a PostgreSQL cluster in {data_dir}",
                  event="database_cluster_created", data_dir=self.data_dir)

    def _pg_ctl_start(self, socket_dir: str) -> None:
        settings = {"listen_addresses": "", "port": str(PORT),
                    "unix_socket_directories": socket_dir}
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        # pg_ctl hands -o to a shell, hence the quoting.
        options = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())
        log_start = _file_size(self.log_file)
        result = self._run(["pg_ctl", "-D", self.data_dir, "-l", self.log_file, "-w", "-t", "60",
                            "-o", options, "start"], timeout=90)
        if result.returncode != 0:
            self._fail(result, log_since=log_start)
        _log.info("started the PostgreSQL cluster in {data_dir} on {socket_dir}",
                  event="database_cluster_started",
                  data_dir=self.data_dir, socket_dir=socket_dir)

    def _running_postmaster(self) -> PostmasterPid | None:
        """The live postmaster of this data directory, if any; clears a stale pid file.

        PostgreSQL clears a pid file whose process is dead, but refuses to start over an empty
        one (a crash) or one whose pid was reused by another process (a reboot, a container
        restart).  ``pg_ctl status`` only asks whether the pid is alive, so on Linux the
        process's working directory (a postmaster runs in its data directory) settles it.
        """
        pid_file = os.path.join(self.data_dir, "postmaster.pid")
        try:
            with open(pid_file, encoding="utf-8", errors="replace") as f:
                first_line = f.readline().strip()
        except FileNotFoundError:
            return None
        if first_line.isdigit():
            if self._status() != 0:
                return None
            if _is_postmaster_of(int(first_line), self.data_dir):
                info = read_postmaster_pid(self.data_dir)
                if info is None:
                    raise EmbeddedPostgresError(
                        f"a server is starting in {self.data_dir} (pid {first_line}); "
                        "try again when it is up"
                    )
                return info
        _log.warn("removing the stale {pid_file} (it names no postmaster of this directory)",
                  event="database_stale_pid_file",
                  pid_file=pid_file)
        os.unlink(pid_file)
        return None

    def _status(self) -> int:
        """``pg_ctl status``: 0 running, 3 not running, 4 no usable data directory."""
        return self._run(["pg_ctl", "-D", self.data_dir, "status"], timeout=30).returncode

    # -- running PostgreSQL's programs ---------------------------------------------------

    def _bindir(self) -> str:
        if self.bindir is None:
            self.bindir = find_pg_bindir()
        elif not _has_server_binaries(self.bindir):
            raise EmbeddedPostgresError(f"{self.bindir} holds no initdb and pg_ctl: "
                                        f"{_INSTALL_HINT}")
        return self.bindir

    def _cluster_user(self) -> pwd.struct_passwd | None:
        """The account the cluster runs as when we are root; None means "as ourselves"."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.system_user)
        except KeyError:
            raise EmbeddedPostgresError(
                f"running as root, the embedded cluster needs the {self.system_user!r} system "
                "user (initdb refuses to run as root); it comes with the postgresql package"
            ) from None

    def _reachable_data_dir(self) -> str:
        """``data_dir``, or where it points: a directory the cluster's user can reach.

        As root the cluster runs as ``system_user``, which cannot enter a private directory
        (mode 0700, as a home directory or ``mktemp -d`` often is) above ``data_dir``.  Then the
        cluster lives in ``relocated_parent`` instead, one directory per configured path, and
        ``data_dir`` becomes a symbolic link to it, so the next start finds it again.
        """
        real = os.path.realpath(self.data_dir)
        if self._cluster_user() is None or self._can_enter(os.path.dirname(real)):
            return real
        digest = hashlib.sha256(self.data_dir.encode()).hexdigest()[:16]
        target = os.path.join(self.relocated_parent, digest, "postgres")
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if not os.path.lexists(self.data_dir):
            os.makedirs(os.path.dirname(self.data_dir), exist_ok=True)
            os.symlink(target, self.data_dir)
        _log.warn(
            "the {user!r} user cannot enter a directory above {configured} (a private"
            " directory); the embedded cluster lives in {target} instead ({configured} links"
            " to it)", event="database_directory_private",
            user=self.system_user, configured=self.data_dir, target=target,
        )
        return target

    def _can_enter(self, directory: str) -> bool:
        """Whether the cluster's user can reach ``directory`` (its nearest existing part)."""
        while not os.path.isdir(directory):
            directory = os.path.dirname(directory)
        return self._run_as_cluster_user(["/bin/sh", "-c", 'cd "$1"', "sh", directory],
                                         timeout=10).returncode == 0

    def _give_to_cluster_user(self, path: str) -> None:
        """As root, hand a directory we made to the cluster's user (it is already 0700)."""
        user = self._cluster_user()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _run(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run one of PostgreSQL's programs (as the cluster's user) and capture its output.

        The Python-level ``user``/``group`` switch needs neither runuser nor sudo, and
        ``cwd="/"`` spares the postgres user a working directory it may not enter.
        """
        return self._run_as_cluster_user([os.path.join(self._bindir(), args[0]), *args[1:]],
                                         timeout)

    def _run_as_cluster_user(
        self, command: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        user = self._cluster_user()
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
        try:
            return subprocess.run(
                command, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace", env=env, cwd="/",
                timeout=timeout,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )
        except subprocess.TimeoutExpired as e:
            raise EmbeddedPostgresError(
                f"{shlex.join(command)} did not finish within {timeout:g}s"
            ) from e
        except OSError as e:
            raise EmbeddedPostgresError(f"cannot run {shlex.join(command)}: {e}") from e

    def _fail(
        self, result: subprocess.CompletedProcess[str], log_since: int | None = None
    ) -> NoReturn:
        """Raise with the command, the tail of its output and of the server log it wrote."""
        lines = [f"{shlex.join(result.args)} failed with exit status {result.returncode}"]
        if result.stdout.strip():
            lines += ["--- output ---", _tail(result.stdout)]
        if log_since is not None and (log_tail := _tail_file(self.log_file, log_since)):
            lines += [f"--- {self.log_file} ---", log_tail]
        user = self._cluster_user()
        if user is not None and "Permission denied" in "\n".join(lines):
            lines.append(f"(as root, the cluster runs as {user.pw_name!r}, which must be able "
                         f"to enter every directory above {self.data_dir})")
        raise EmbeddedPostgresError("\n".join(lines))


def _is_postmaster_of(pid: int, data_dir: str) -> bool:
    """Whether ``pid`` is a live process working in ``data_dir`` (trusted if /proc is absent)."""
    if not os.path.isdir("/proc/self"):
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                return False  # exited, not yet reaped by its parent
        return os.path.samefile(os.readlink(f"/proc/{pid}/cwd"), data_dir)
    except PermissionError:
        return True  # not ours to inspect: let PostgreSQL's own interlock decide
    except OSError:
        return False


def apply_sql(dsn: str, sql: str) -> None:
    """Run ``sql`` (one or more statements) in autocommit mode, e.g. a schema at start-up."""
    with closing(psycopg2.connect(dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql)


class EmbeddedPostgresService(Service):
    """Runs one :class:`EmbeddedPostgres` (durable, when given a data directory) for the
    daemon's lifetime.

    start() blocks for about half a second, which is acceptable in ``startService``: twistd
    calls it before the reactor runs, and a failure there aborts start-up with its message.
    Start it before the services that connect to ``dsn``.
    """

    def __init__(self, embedded: EmbeddedPostgres | str | os.PathLike[str]) -> None:
        if not isinstance(embedded, EmbeddedPostgres):
            embedded = EmbeddedPostgres(embedded)
        self.embedded = embedded

    @property
    def dsn(self) -> str:
        """The cluster's DSN, once the service has started."""
        return self.embedded.dsn

    def startService(self) -> None:
        dsn = self.embedded.start()
        _log.info(
            "PostgreSQL cluster in {data_dir} (log {log_file}){adopted}, dsn {dsn!r}",
            event="database_cluster_ready",
            data_dir=self.embedded.data_dir, log_file=self.embedded.log_file, dsn=dsn,
            adopted="" if self.embedded.owned else ", already running: left running at stop",
        )
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.embedded.stop()
