#!/usr/bin/env python3
"""twisted_novnc's benchmark: one command, every proxy in one run, interleaved; see README.md.

    .venv/bin/python bench/run.py [--quick] [--rounds 3] [--scenarios down,up,...]
                                  [--proxies ceiling-tcp,ceiling-ws,socat,twisted-tcp,websockify,
                                             twisted_novnc,twisted_novnc-2w]

It builds what it needs (the C target with gcc, the Node client with ``npm ci``, websockify in
its own virtualenv, socat from apt), starts a private PostgreSQL cluster with the sessions
table, then for every round, scenario and proxy (the proxy order rotating each round) starts a
fresh target and a fresh proxy, runs the load client once, measures, and stops both by PID.
twisted_novnc runs as a real ``twistd -n novnc`` subprocess with a config written here; its
sessions are rows committed in that table.  Everything listens on 127.0.0.1, every wait is
bounded, and everything started is stopped at the end.  Output: a markdown table of medians and
same-run ratios and the issue's targets, on stdout and in bench/out/run-*/ (report.md,
summary.json, results.jsonl, every process's log).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import procs
import profiles
import report

try:
    import psycopg2
    from prometheus_client.parser import text_string_to_metric_families

    import twisted_novnc
    from twisted_novnc.config import parse_config
    from twisted_novnc.database.channels import shard_of
    from twisted_novnc.database.embedded import (
        EmbeddedPostgres,
        apply_sql,
        read_postmaster_pid,
    )
    from twisted_novnc.database.schema import quote_ident, schema_sql, trigger_sql
    from twisted_novnc.recording.format import RecordingInfo, list_recordings
except ImportError as e:  # pragma: no cover - a message instead of a traceback
    sys.exit(f"bench/run.py runs in the project's virtualenv ({e}): use `make bench` or "
             "`.venv/bin/python bench/run.py`")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Built and installed tools (C target, websockify's and py-spy's virtualenvs), kept between runs.
BUILD = HERE / "out"
MiB = 1 << 20

SCENARIOS = ("down", "down-vnc", "down-rec", "up", "echo", "echo-rec", "setup", "conc", "conc-rec",
             "streams", "ready", "upgrade", "scale")
#: Run only when asked for by name (--scenarios soak): hours at its default size.
ON_REQUEST = ("soak",)
PROXIES = ("ceiling-tcp", "ceiling-ws", "socat", "twisted-tcp", "websockify", "twisted_novnc",
           "twisted_novnc-2w")
#: twisted_novnc with [novnc] workers = 2 (issue 6: streams with 2 workers; issue 12: the
#: upgrade with 2 workers); streams and upgrade only.
WORKERS_PROXY = "twisted_novnc-2w"
#: Which proxies a scenario runs: ready and upgrade are twisted_novnc's own (socat and
#: websockify have no readiness wait, and no upgrade: a restart closes every connection), and
#: so is down-vnc (issue 13: down with [vnc] set, the proxy logging in to the VM first).
ONLY = {"ready": ("twisted_novnc",), "upgrade": ("twisted_novnc", WORKERS_PROXY),
        "streams": PROXIES, "down-vnc": ("twisted_novnc", WORKERS_PROXY),
        "down-rec": ("twisted_novnc",), "echo-rec": ("twisted_novnc",),
        "conc-rec": ("twisted_novnc",), "scale": ("twisted_novnc",), "soak": ("twisted_novnc",)}
#: The scenario each VNC scenario is compared with, proxy by proxy in the same round: the same
#: build with credentials off.
VNC_REFERENCE = {"down-vnc": "down"}
#: The recording scenarios (issue 14, point 4): the same build with ``[record] dir`` set,
#: each compared with the scenario it varies, in the same round.
RECORD_REFERENCE = {"down-rec": "down", "echo-rec": "echo", "conc-rec": "conc"}


def base_scenario(scenario: str) -> str:
    """What the load client and the target do: a variant runs its reference's."""
    return VNC_REFERENCE.get(scenario, RECORD_REFERENCE.get(scenario, scenario))


def records(scenario: str) -> bool:
    """Whether twisted_novnc runs this scenario with ``[record]`` set (recording on)."""
    return scenario in RECORD_REFERENCE


def commit_latencies(opens: Sequence[Sequence[Any]],
                     committed: dict[str, int]) -> tuple[list[float], int]:
    """Each open's COMMIT → 101 in ms, sorted, from the client's ``[id, t101, ok]`` and each
    session's COMMIT time (both CLOCK_MONOTONIC ns); and how many 101s came before their COMMIT
    (the race the daemon exists to prevent)."""
    lat, early = [], 0
    for sid, t101, ok in opens:
        if not ok or t101 is None:
            continue
        ms = (int(t101) - committed[sid]) / 1e6
        if ms < 0:
            early += 1
        lat.append(ms)
    lat.sort()
    return lat, early


def eligible(scenario: str, proxy: str, scenarios: Sequence[str] = ()) -> bool:
    """Whether ``proxy`` runs ``scenario`` when ``scenarios`` are asked for: down runs
    twisted_novnc-2w too when down-vnc does, as its reference."""
    if proxy == WORKERS_PROXY and any(VNC_REFERENCE.get(s) == scenario for s in scenarios):
        return True
    return proxy in ONLY.get(scenario, [p for p in PROXIES if p != WORKERS_PROXY])


def logs_in_to_vm(scenario: str) -> bool:
    """Whether twisted_novnc runs this scenario with ``[vnc]`` set (credentials on)."""
    return scenario in VNC_REFERENCE


#: The VMs' VNC password in the VNC scenarios ([vnc] password_file); the target accepts any.
VNC_PASSWORD = "bench-pw"


def is_twisted_novnc(proxy: str) -> bool:
    return proxy in ("twisted_novnc", WORKERS_PROXY)


WEBSOCKIFY = "websockify==0.13.*"

@attrs.frozen
class Upgrade:
    """The upgrade scenario: ``relays`` streaming one record each way every ``interval_ms``,
    the upgrade triggered after ``before_s`` of streaming, streaming ``after_s`` more after
    its answer."""

    relays: int
    interval_ms: int
    before_s: float
    after_s: float


#: Full sizes are the issue's; --quick is a smoke test that exercises every code path.
@attrs.frozen
class Scale:
    """The scale scenario (issue 18, point 4): for each daemon count, ``waiting`` browsers held
    per daemon, then COMMITs one per transaction at each rate, round-robin over the daemons."""

    daemons: tuple[int, ...]
    rates: tuple[int, ...]
    waiting: int
    #: ``[database] notify_shards`` settings, each measured over every K and rate (0 = the one
    #: shared channel).
    shards: tuple[int, ...] = (0, 1024)


@attrs.frozen
class Soak:
    """The soak scenario (issue 18, point 6): ``connections`` through one daemon, the database
    restarted every ``db_restart`` seconds."""

    connections: int
    db_restart: float
    parallel: int = 64
    #: Sessions of each kind the connections take turns on (max_per_session is 16).
    sessions: int = 512
    #: The daemon's readiness deadline: how long an unknown session is held before its 4404.
    readiness_timeout: float = 1.0
    #: RSS and descriptors are sampled after every this many connections (for the slope), and
    #: compared between the end and the first sample after ``first`` connections.
    every: int = 10_000
    first: int = 10_000


SIZES: dict[str, dict[str, Any]] = {
    "full": {"down": 256 * MiB, "up": 256 * MiB, "echo": 10_000, "setup": 1000, "conc": 9000,
             "streams": (50, 8 * MiB), "ready": 1000, "ready_rate": 200,
             "upgrade": Upgrade(1000, 100, 5.0, 5.0),
             "scale": Scale((1, 2, 4, 8), (200, 500, 1000), 500),
             "soak": Soak(1_000_000, 300.0)},
    "quick": {"down": 16 * MiB, "up": 16 * MiB, "echo": 1000, "setup": 100, "conc": 200,
              "streams": (10, 2 * MiB), "ready": 100, "ready_rate": 200,
              "upgrade": Upgrade(100, 100, 2.0, 2.0),
              "scale": Scale((1, 2), (200, 500), 50),
              "soak": Soak(2000, 1.5)},
}

#: What twisted_novnc logs when a browser's upgrade is held (counted to know all are waiting),
#: when its LISTEN is up (it is ready to serve), and when something went wrong.
HELD_LINE = re.compile(r"waiting for readiness")
LISTENING_LINE = "listening for session changes"
ERROR_LINE = re.compile(r"Unhandled Error|Traceback \(most recent call last\)|CRITICAL|"
                        r"unexpected error")
#: What txpostgres logs when the server goes away (STYLE.md, known pitfalls: an "Unhandled
#: Error" per pooled connection, and at times a ValueError re-adding a closed one to the
#: reactor): the soak restarts the database on purpose, so these are counted apart.
DB_RESTART_TRACEBACK = re.compile(
    r"\[connection\] Unhandled Error\n(?:\t.*\n)*?\t  File \"[^\"\n]*txpostgres/txpostgres\.py"
    r"\".*\n(?:\t.*\n)*")
REFUSED_LINE = re.compile(r"refused \S+ from")


class BenchError(Exception):
    """A run could not be set up; the message says what to do."""


# -- setting up the tools ---------------------------------------------------------------------


def run_quiet(args: Sequence[str], what: str, timeout: float = 600, **kw: Any) -> None:
    """Run a set-up command; on failure raise with its output's tail."""
    try:
        cp = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
                            **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"{what}: {shlex.join(args)}: {e}") from e
    if cp.returncode != 0:
        tail = "\n".join(cp.stdout.strip().splitlines()[-15:])
        raise BenchError(f"{what} failed ({shlex.join(args)}, exit {cp.returncode}):\n{tail}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tools:
    """The programs the bench runs, built or installed on first use under bench/out."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.target = out / "bin" / "target"
        self.websockify = out / "venv-websockify" / "bin" / "websockify"
        self.pyspy = out / "venv-tools" / "bin" / "py-spy"

    def say(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def require(self, program: str, how: str) -> str:
        path = shutil.which(program)
        if path is None:
            raise BenchError(f"{program} is not installed: {how}")
        return path

    def node_client(self) -> None:
        """``npm ci`` from the committed lock, again whenever the lock changes."""
        self.require("node", "install Node.js 18 or later (Debian: apt-get install nodejs npm)")
        self.require("npm", "install npm (Debian: apt-get install npm)")
        self.out.mkdir(parents=True, exist_ok=True)
        stamp = self.out / "npm-ci.stamp"
        lock = sha256(HERE / "package-lock.json")
        if (HERE / "node_modules" / "ws").is_dir() and stamp.exists() \
                and stamp.read_text() == lock:
            return
        self.say("npm ci (ws + bufferutil) in bench/")
        run_quiet(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], "npm ci",
                  cwd=HERE)
        stamp.write_text(lock)

    def target_binary(self) -> None:
        source = HERE / "target.c"
        if self.target.exists() and self.target.stat().st_mtime >= source.stat().st_mtime:
            return
        gcc = self.require("gcc", "install a C compiler (Debian: apt-get install gcc)")
        self.say("building the TCP target with gcc")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        run_quiet([gcc, "-O2", "-pthread", "-o", str(self.target), str(source)], "gcc")

    def _venv(self, name: str, requirement: str, marker: Path) -> None:
        venv = self.out / name
        stamp = venv / ".bench-installed"
        if marker.exists() and stamp.exists() and stamp.read_text() == requirement:
            return
        self.say(f"creating {venv} with {requirement} from PyPI")
        python = getattr(sys, "_base_executable", None) or sys.executable
        run_quiet([python, "-m", "venv", "--clear", str(venv)], "python -m venv")
        run_quiet([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                   "--disable-pip-version-check", requirement], f"pip install {requirement}")
        stamp.write_text(requirement)

    def websockify_venv(self) -> None:
        self._venv("venv-websockify", WEBSOCKIFY, self.websockify)

    def pyspy_venv(self) -> None:
        self._venv("venv-tools", "py-spy", self.pyspy)

    def socat(self) -> None:
        if shutil.which("socat"):
            return
        how = "install it (Debian: apt-get install socat) or leave it out with --proxies"
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise BenchError(f"socat is not installed: {how}")
        self.say("installing socat with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q", "-y"]
        try:
            run_quiet([*apt, "install", "socat"], "apt-get install socat", env=env)
        except BenchError:
            run_quiet([*apt, "update"], "apt-get update", env=env)
            run_quiet([*apt, "install", "socat"], "apt-get install socat", env=env)
        if not shutil.which("socat"):
            raise BenchError(f"socat is still not on PATH: {how}")


# -- the database -----------------------------------------------------------------------------


class Sessions:
    """The sessions table in a private cluster (or a given server): rows are the sessions."""

    def __init__(self, dsn: str | None, scratch: Path) -> None:
        self._cluster: EmbeddedPostgres | None = None
        self._scratch = scratch
        self.table = "bench_sessions_" + os.urandom(4).hex()
        if dsn is None:
            # The cluster runs as `postgres` when we are root: it must be able to enter this.
            os.chmod(scratch, 0o711)
            self._cluster = EmbeddedPostgres(str(scratch / "pgdata"), durable=False)
            dsn = self._cluster.start()
        self.dsn = dsn
        self.settings = parse_config(
            f"[database]\ndsn = {dsn}\ntable = {self.table}\nport_column = vnc_port\n"
            f"notify_channel = {self.table}\n", "<bench>").database
        apply_sql(dsn, schema_sql(self.settings))
        self._conn = psycopg2.connect(dsn)
        self._conn.autocommit = True
        self._q = quote_ident(self.table)

    def add(self, n: int, port: int, ready: bool) -> list[str]:
        """Commit ``n`` new sessions on 127.0.0.1:``port``: ready, or booting (no vm_ip yet)."""
        with self._conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {self._q} (session_id, vm_ip, vnc_port, status)"
                " SELECT gen_random_uuid(), %s, %s, %s FROM generate_series(1, %s)"
                " RETURNING session_id::text",
                ("127.0.0.1" if ready else None, port, "running" if ready else "booting", n))
            return [r[0] for r in cur.fetchall()]

    def clear(self) -> None:
        with self._conn.cursor() as cur:
            cur.execute(f"TRUNCATE {self._q}")

    def set_shards(self, shards: int) -> None:
        """Re-install the table's trigger to NOTIFY over ``shards`` channels (0 = one)."""
        self.settings = attrs.evolve(self.settings, notify_shards=shards)
        apply_sql(self.dsn, trigger_sql(self.settings))

    def postmaster_pid(self) -> int:
        """The private cluster's postmaster: its process tree is the database's CPU."""
        if self._cluster is None:
            raise BenchError("scale measures the database's CPU: it needs the private cluster"
                             " (no --dsn)")
        pid = read_postmaster_pid(self._cluster.data_dir)
        if pid is None:
            raise BenchError("no postmaster.pid in the private cluster")
        return pid.pid

    def backend_count(self, also_ours: Sequence[int] = ()) -> int:
        """Client connections held on the database, the bench's own left out."""
        with self._conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client"
                        " backend' AND pid <> pg_backend_pid() AND NOT pid = ANY(%s)",
                        (list(also_ours),))
            return int(cur.fetchone()[0])

    def restart_cluster(self) -> bool:
        """``pg_ctl restart -m fast`` on the private cluster (the soak's outage), then a fresh
        connection of our own; whether the restart succeeded."""
        if self._cluster is None:
            raise BenchError("the soak restarts the database: it needs the private cluster")
        # -l: the new postmaster must not inherit _run's pipe, or the call waits for it to end.
        result = self._cluster._run(["pg_ctl", "-D", self._cluster.data_dir, "-l",
                                     self._cluster.log_file, "-m", "fast", "-w", "-t", "60",
                                     "restart"], timeout=90)
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = psycopg2.connect(self.dsn)
        self._conn.autocommit = True
        return result.returncode == 0

    def committer(self) -> Committer:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = False
        return Committer(conn, self._q)

    def close(self) -> None:
        with contextlib.suppress(Exception), self._conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {self._q}")
        with contextlib.suppress(Exception):
            self._conn.close()
        if self._cluster is not None:
            self._cluster.stop()


class Committer:
    """The platform's backend: sets vm_ip in transactions and notes when each COMMIT is sent."""

    def __init__(self, conn: Any, table: str) -> None:
        self._conn = conn
        self.backend_pid: int = conn.get_backend_pid()
        self._update = (f"UPDATE {table} SET vm_ip = '127.0.0.1', status = 'running'"
                        " WHERE session_id = ANY(%s::uuid[])")

    def paced(self, ids: Sequence[str], rate: float) -> dict[str, int]:
        """One session per transaction, COMMITs ``rate`` per second on a fixed schedule."""
        sent: dict[str, int] = {}
        start = time.monotonic() + 0.01
        with self._conn.cursor() as cur:
            for i, sid in enumerate(ids):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                cur.execute(self._update, ([sid],))
                sent[sid] = time.monotonic_ns()
                self._conn.commit()
        return sent

    def all_at_once(self, ids: Sequence[str]) -> int:
        """Every session in one transaction; the time the COMMIT was sent."""
        with self._conn.cursor() as cur:
            cur.execute(self._update, (list(ids),))
            sent = time.monotonic_ns()
            self._conn.commit()
        return sent

    def close(self) -> None:
        self._conn.close()


# -- one run ----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile, as the Node client computes its own."""
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(i)]


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = dict(SIZES["quick" if args.quick else "full"])
        if args.conc:
            self.sizes["conc"] = args.conc
        scale: Scale = self.sizes["scale"]
        self.sizes["scale"] = Scale(
            tuple(args.scale_daemons) if args.scale_daemons else scale.daemons,
            tuple(args.scale_rates) if args.scale_rates else scale.rates,
            args.scale_waiting or scale.waiting,
            tuple(args.scale_shards) if args.scale_shards is not None else scale.shards)
        soak: Soak = self.sizes["soak"]
        n = args.soak_connections or soak.connections
        self.sizes["soak"] = attrs.evolve(
            soak, connections=n, db_restart=args.soak_db_restart or soak.db_restart,
            first=min(soak.first, max(1, n // 2)),
            every=min(soak.every, max(1, n // 10)))
        if args.upgrade_relays or args.upgrade_interval:
            self.sizes["upgrade"] = attrs.evolve(
                self.sizes["upgrade"],
                relays=args.upgrade_relays or self.sizes["upgrade"].relays,
                interval_ms=args.upgrade_interval or self.sizes["upgrade"].interval_ms)
        self.out = Path(args.out).resolve()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = self.out / f"run-{stamp}-{os.getpid()}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.run_dir / "bench.log", "a", encoding="utf-8")  # noqa: SIM115
        self.tools = Tools(BUILD)
        self.twistd = args.twistd or str(Path(sys.executable).parent / "twistd")
        self.sessions: Sessions | None = None
        self.rows: list[dict[str, Any]] = []

    # -- set-up and tear-down

    def prepare(self, proxies: Sequence[str]) -> None:
        self.tools.node_client()
        self.tools.target_binary()
        if "socat" in proxies:
            self.tools.socat()
        if "websockify" in proxies:
            self.tools.websockify_venv()
        if self.args.profile:
            self.tools.pyspy_venv()
        if any(is_twisted_novnc(p) for p in proxies):
            if not os.access(self.twistd, os.X_OK):
                raise BenchError(f"no twistd at {self.twistd}: install the project (make venv) "
                                 "or pass --twistd")
            self.sessions = Sessions(self.args.dsn, Path(tempfile.mkdtemp(prefix="tnovnc-bench-",
                                                                          dir="/tmp")))

    def close(self) -> None:
        if self.sessions is not None:
            scratch = self.sessions._scratch
            self.sessions.close()
            shutil.rmtree(scratch, ignore_errors=True)
        self.log.close()

    # -- processes

    def _spawn(self, args: Sequence[str], log_name: str, **kw: Any) -> subprocess.Popen[Any]:
        log = open(self.run_dir / log_name, "ab")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        finally:
            log.close()

    def start_backend(self, scenario: str, proxy: str, port: int,
                      tag: str) -> subprocess.Popen[Any]:
        s = self.sizes
        mode = {"down": ["source", s["down"]], "down-vnc": ["vncauth", s["down"]],
                "up": ["sink", s["up"]], "echo": ["echo"],
                "streams": ["source", s["streams"][1]]}.get(
            scenario if scenario in VNC_REFERENCE else base_scenario(scenario), ["banner"])
        if proxy == "ceiling-ws":
            args = ["node", str(HERE / "wsserver.js"), str(mode[0]), str(port),
                    *map(str, mode[1:])]
        else:
            args = [str(self.tools.target), str(mode[0]), str(port), *map(str, mode[1:])]
        return self._spawn_listening(args, port, "the target", f"{tag}-target.log")

    def start_proxy(self, proxy: str, port: int, target_port: int, tag: str,
                    admin_port: int | None = None, vnc: bool = False, record: bool = False,
                    ) -> subprocess.Popen[Any] | None:
        if proxy.startswith("ceiling"):
            return None
        if proxy == "socat":
            args = ["socat", "-b", "65536",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                    f"TCP:127.0.0.1:{target_port}"]
        elif proxy == "websockify":
            args = [str(self.tools.websockify), f"127.0.0.1:{port}", f"127.0.0.1:{target_port}"]
        elif proxy == "twisted-tcp":
            args = [sys.executable, str(HERE / "twisted_relay.py"), str(port), str(target_port)]
        else:
            return self.start_twisted_novnc(port, target_port, tag,
                                            workers=2 if proxy == WORKERS_PROXY else 1,
                                            admin_port=admin_port, vnc=vnc, record=record)
        return self._spawn_listening(args, port, proxy, f"{tag}-proxy.log")

    def recordings_dir(self, tag: str) -> Path:
        return self.run_dir / f"{tag}-recordings"

    def _spawn_listening(self, args: list[str], port: int, what: str,
                         log: str) -> subprocess.Popen[Any]:
        """Start ``args`` and return once it listens on ``port`` (15 s at most)."""
        proc = self._spawn(args, log)
        if not procs.wait_until(lambda: procs.is_listening(port) or proc.poll() is not None, 15):
            raise BenchError(f"{what} did not listen on {port}")
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}); see {log}")
        return proc

    def start_twisted_novnc(self, port: int, target_port: int, tag: str, workers: int = 1,
                            admin_port: int | None = None,
                            vnc: bool = False, record: bool = False,
                            readiness_timeout: float = 120,
                            notify_shards: int = 0,
                            malloc_log: Path | None = None) -> subprocess.Popen[Any]:
        assert self.sessions is not None
        config = self.run_dir / f"{tag}.ini"
        vnc_section = ""
        if vnc:
            # One password for every VM, in a file only we may read (the daemon refuses
            # anything looser): the login on, as issue 13's "credentials on".
            secret = self.run_dir / f"{tag}-vnc-password"
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(VNC_PASSWORD + "\n")
            vnc_section = f"[vnc]\npassword_file = {secret}\n"
        if record:
            # Recording on, the browser's own bytes too: the most a recording writes.
            vnc_section += f"[record]\ndir = {self.recordings_dir(tag)}\ninput = on\n"
        # Defaults everywhere but where the daemon must find the bench's table, and the listen
        # backlog (Twisted's default of 50 drops SYNs when a thousand clients arrive at once;
        # socat gets the same 4096).  The readiness deadline only has to outlast the scenario.
        config.write_text(
            "[novnc]\n"
            f"listen = tcp:{port}:interface=127.0.0.1:backlog=4096\n"
            f"readiness_timeout = {readiness_timeout:g}\n"
            f"target_port = {target_port}\n"
            f"workers = {workers}\n"
            # The bench's clients all come from 127.0.0.1, so the per-address limits (safe
            # defaults for the open internet) are raised to the bench's own counts.
            "max_connections = 20000\nmax_per_ip = 20000\nmax_waiting = 20000\n"
            "max_waiting_per_ip = 20000\n"
            "[database]\n"
            f"dsn = {self.sessions.dsn}\n"
            f"table = {self.sessions.table}\n"
            "port_column = vnc_port\n"
            f"notify_channel = {self.sessions.table}\n"
            # Only when set: a build from before notify_shards (a "before" daemon) refuses it.
            + (f"notify_shards = {notify_shards}\n" if notify_shards else "")
            +
            # Its targets are on loopback, this very host, which the defaults refuse.
            "[upstream]\nallowed_networks = 127.0.0.0/8\nallow_self = on\n"
            # The upgrade scenario posts /upgrade there; the others run without one.
            + (f"[admin]\nlisten = tcp:{admin_port}:interface=127.0.0.1\n"
               if admin_port is not None else "") + vnc_section, encoding="utf-8")
        log = self.run_dir / f"{tag}-proxy.log"
        env = None
        if (self.args.trace_malloc or self.args.gc_log or malloc_log is not None
                or self.args.lookup_from_memory):
            env = dict(os.environ, PYTHONPATH=str(HERE / "inject"))
            if self.args.lookup_from_memory:
                env["TNOVNC_BENCH_LOOKUP_FROM_MEMORY"] = "1"
            if malloc_log is not None:
                env["TNOVNC_BENCH_MALLOC"] = str(malloc_log)
            if self.args.trace_malloc:
                env["TNOVNC_BENCH_TRACEMALLOC"] = str(self.run_dir / f"{tag}-tracemalloc")
            if self.args.gc_log:
                env["TNOVNC_BENCH_GCLOG"] = str(self.run_dir / f"{tag}-gc.log")
        overrides = [arg for item in self.args.daemon_set for arg in ("--set", item)]
        proc = self._spawn([self.twistd, "--pidfile=", "-n", "novnc", "--config", str(config),
                            *overrides], log.name, cwd=str(self.run_dir), env=env)

        def up() -> bool:
            # Every worker (or the one process) says so once its LISTEN is in place.
            text = log.read_text(errors="replace")
            return proc.poll() is not None or text.count(LISTENING_LINE) >= workers

        if not procs.wait_until(up, 60, 0.05) or proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"twisted_novnc did not start (exit {proc.poll()}):\n{tail}")
        if not procs.wait_until(lambda: procs.is_listening(port), 15):
            raise BenchError(f"twisted_novnc did not listen on {port}")
        return proc

    # -- the load client

    def client_command(self, scenario: str, url: str, proxy: str, ids: Path | None,
                       extra: Sequence[Any] = ()) -> list[str]:
        s = self.sizes
        args: list[Any] = {
            "down": ["--bytes", s["down"]],
            "down-vnc": ["--bytes", s["down"]],
            "up": ["--bytes", s["up"], "--msg-size", 65536],
            "echo": ["--count", s["echo"], "--msg-size", 64],
            "setup": ["--count", s["setup"], "--open", self.args.client_open],
            "conc": ["--conns", s["conc"], "--parallel", 64, "--open", self.args.client_open],
            "streams": ["--conns", s["streams"][0], "--bytes", s["streams"][1]],
            "ready": ["--wait", 60],
            "upgrade": [],
        }[base_scenario(scenario) if scenario in RECORD_REFERENCE else scenario]
        client_scenario = base_scenario(scenario) if scenario in RECORD_REFERENCE else scenario
        cmd = ["node", str(HERE / "client.js"), client_scenario, "--url", url, "--timeout",
               str(self.args.client_timeout), "--label", proxy, *map(str, args),
               *map(str, extra)]
        if ids is not None:
            cmd += ["--ids", str(ids)]
        return cmd

    def client(self, cmd: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.log, text=True)

    def run_plain(self, cmd: Sequence[str]) -> dict[str, Any]:
        try:
            cp = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=self.log, text=True,
                                timeout=self.args.client_timeout + 30, stdin=subprocess.DEVNULL,
                                check=False)
        except subprocess.TimeoutExpired:
            return {"error": "client killed after its timeout"}
        lines = [line for line in cp.stdout.splitlines() if line.startswith("{")]
        if not lines:
            return {"error": f"client printed no result (exit {cp.returncode})"}
        result: dict[str, Any] = json.loads(lines[-1])
        if cp.returncode != 0 and not result.get("error"):
            result["error"] = f"client exit {cp.returncode}"
        return result

    def run_conc(self, cmd: Sequence[str], proxy_proc: subprocess.Popen[Any] | None,
                 ) -> dict[str, Any]:
        """Hold the connections, sample the proxy's memory, release them, look for leaks."""
        root = proxy_proc.pid if proxy_proc is not None else None

        def sample() -> dict[str, int] | None:
            return procs.memory_kb(procs.process_tree(root)) if root else None

        before = sample()
        fds_before = procs.fd_count(root) if root else None
        self.snapshot_memory(proxy_proc)
        cl = self.client(cmd)
        lines = procs.LineReader(cl.stdout)  # type: ignore[arg-type]
        try:
            first = lines.next(self.args.client_timeout + 30)
            ready = json.loads(first) if first else None
            if not ready or ready.get("event") != "ready":
                return {"error": f"client not ready: {(first or '')[:300]}"}
            time.sleep(1.0)  # let the proxy settle (and forked children finish starting)
            held = sample()
            fds_held = procs.fd_count(root) if root else None
            self.snapshot_memory(proxy_proc)
            assert cl.stdin is not None
            cl.stdin.write("go\n")
            cl.stdin.flush()
            last = lines.next(120)
            result: dict[str, Any] = json.loads(last) if last else {"error": "no result"}
        finally:
            procs.stop(cl, grace=10)
        if before and held:
            ok = max(1, int(result.get("ok") or ready.get("open") or 1))
            result.update(
                rss_before_mb=round(before["rss_kb"] / 1024, 1),
                rss_held_mb=round(held["rss_kb"] / 1024, 1),
                pss_before_mb=round(before["pss_kb"] / 1024, 1),
                pss_held_mb=round(held["pss_kb"] / 1024, 1),
                procs_held=held["procs"],
                rss_kb_per_conn=round((held["rss_kb"] - before["rss_kb"]) / ok, 1),
                pss_kb_per_conn=round((held["pss_kb"] - before["pss_kb"]) / ok, 1),
                fds_before=fds_before, fds_held=fds_held)
            # Released: descriptors should be back where they started.
            procs.wait_until(lambda: procs.fd_count(root) == fds_before, 10, 0.2)  # type: ignore[arg-type]
            self.snapshot_memory(proxy_proc)  # what is left once every connection is gone
            after = sample()
            result.update(fds_after_close=procs.fd_count(root),  # type: ignore[arg-type]
                          pss_after_close_mb=round(after["pss_kb"] / 1024, 1) if after else None)
        return result

    def run_upgrade(self, url: str, proxy: str, ids_file: Path, vm_port: int,
                    admin_port: int, daemon: subprocess.Popen[Any] | None) -> dict[str, Any]:
        """Relays stream both ways; POST /upgrade on the admin listener while they do."""
        size: Upgrade = self.sizes["upgrade"]
        cmd = self.client_command("upgrade", url, proxy, ids_file,
                                  ["--conns", size.relays, "--interval", size.interval_ms,
                                   "--vm-port", vm_port])
        cl = self.client(cmd)
        lines = procs.LineReader(cl.stdout)  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        try:
            first = lines.next(self.args.client_timeout)
            streaming = json.loads(first) if first and first.startswith("{") else {}
            if streaming.get("event") != "streaming":
                return {"error": f"client not streaming: {(first or '')[:300]}"}
            # How busy the steady state keeps the daemon (cores), before the upgrade adds to
            # it; then, from the trigger to the answer, which of its processes was busy.
            assert daemon is not None
            sampler = procs.CpuSampler(daemon.pid)
            try:
                cpu0, t0 = sum(sampler.sample().values()), time.monotonic()
                time.sleep(size.before_s)
                before = sampler.sample()
                out["daemon_cores_streaming"] = round(
                    (sum(before.values()) - cpu0) / (time.monotonic() - t0), 2)
                trigger = time.monotonic_ns()
                out.update(self.post_upgrade(admin_port))
                answered = time.monotonic_ns()
                after = sampler.sample()
            finally:
                sampler.stop()
            out.update(upgrade_cpu(daemon.pid, before, after, (answered - trigger) / 1e9))
            time.sleep(size.after_s)
            assert cl.stdin is not None
            cl.stdin.write(f"stop {trigger} {answered}\n")
            cl.stdin.flush()
            last = lines.next(120)
            result: dict[str, Any] = json.loads(last) if last else {"error": "no result"}
        finally:
            procs.stop(cl, grace=10)
        result.update(out)
        if out.get("upgrade_error") and not result.get("error"):
            result["error"] = f"upgrade: {out['upgrade_error']}"
        return result

    def post_upgrade(self, admin_port: int) -> dict[str, Any]:
        """``POST /upgrade`` (what ``python -m twisted_novnc upgrade --url`` sends); it answers
        once every movable relay has left the old generation, its ``seconds`` saying when."""
        request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/upgrade", data=b"",
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return {"upgrade_error": f"HTTP {e.code}: {e.read()[:300]!r}"}
        except (OSError, ValueError) as e:
            return {"upgrade_error": str(e)}
        return {"upgrade_seconds": body.get("seconds"), "upgrade_moved": body.get("moved"),
                "upgrade_kept": body.get("kept"), "upgrade_generation": body.get("generation"),
                "upgrade_workers": len(body.get("workers") or [])}

    def snapshot_memory(self, proc: subprocess.Popen[Any] | None) -> None:
        """With --trace-malloc, have the daemon write its allocations (inject/)."""
        if self.args.trace_malloc and proc is not None and proc.poll() is None:
            os.kill(proc.pid, TRACE_MALLOC_SIGNAL)
            time.sleep(2.0)  # a snapshot of a large heap takes a moment

    def run_ready(self, url: str, proxy: str, log: Path, paced_ids: Path, burst_ids: Path,
                  proxy_pid: int | None = None) -> dict[str, Any]:
        """Clients wait; sessions are committed one per transaction, then all in one."""
        assert self.sessions is not None
        committer = self.sessions.committer()
        try:
            paced = self._ready_phase(url, proxy, log, paced_ids, "ready",
                                      lambda ids: committer.paced(ids, self.sizes["ready_rate"]),
                                      proxy_pid)
            burst = self._ready_phase(url, proxy, log, burst_ids, "burst",
                                      lambda ids: dict.fromkeys(ids, committer.all_at_once(ids)),
                                      proxy_pid)
        finally:
            committer.close()
        return {**paced, **burst}

    def _ready_phase(self, url: str, proxy: str, log: Path, ids_file: Path, name: str,
                     commit: Any, proxy_pid: int | None = None) -> dict[str, Any]:
        ids = ids_file.read_text().split()
        offset = log.stat().st_size
        cl = self.client(self.client_command("ready", url, proxy, ids_file))
        lines = procs.LineReader(cl.stdout)  # type: ignore[arg-type]
        try:
            first = lines.next(60)
            if not first or json.loads(first).get("event") != "sent":
                return {f"{name}_error": f"client did not send: {(first or '')[:200]}",
                        "error": f"{name}: client did not send"}

            def held() -> int:
                with open(log, encoding="utf-8", errors="replace") as f:
                    f.seek(offset)
                    return len(HELD_LINE.findall(f.read()))

            all_held = procs.wait_until(lambda: held() >= len(ids), 60, 0.1)
            time.sleep(0.5)  # the first reads of the held sessions (all not ready) finish
            tree = procs.process_tree(proxy_pid) if proxy_pid is not None else []
            cpu_before, busy_before = procs.cpu_seconds(tree), procs.machine_busy()
            committed = commit(ids)
            last = lines.next(120)
            # From the COMMIT to the client's result (just after the last 101): what the
            # daemon used of a core, and how busy the whole machine was meanwhile.
            cpu_used = procs.cpu_seconds(tree) - cpu_before
            busy_after = procs.machine_busy()
            result = json.loads(last) if last else {"error": "no result"}
        finally:
            procs.stop(cl, grace=10)
        if result.get("error"):
            return {"error": f"{name}: {result['error']}"}
        lat, early = commit_latencies(result["opens"], committed)
        out: dict[str, Any] = {
            f"{name}_n": len(ids), f"{name}_ok": result["ok"], f"{name}_errors": result["errors"],
            f"{name}_error_kinds": result.get("error_kinds"), f"{name}_early": early,
            f"{name}_all_held_before_commit": all_held,
            f"{name}_p50_ms": r3(percentile(lat, 50)), f"{name}_p99_ms": r3(percentile(lat, 99)),
            f"{name}_max_ms": r3(lat[-1] if lat else None),
            # The fixed part (NOTIFY, the read, the first connect): how the rest spreads out.
            f"{name}_first_ms": r3(lat[0] if lat else None),
        }
        # CLOCK_MONOTONIC, to line the phase up with the daemon's own logs (e.g. GC pauses).
        out[f"{name}_commits_ns"] = [min(committed.values()), max(committed.values())]
        if tree:
            out[f"{name}_daemon_cpu_ms"] = r3(cpu_used * 1000)
            out[f"{name}_machine_busy"] = r3(procs.busy_share(busy_before, busy_after))
        if name == "burst":
            out["burst_last_ms"] = out["burst_max_ms"]
        else:
            spread = (max(committed.values()) - min(committed.values())) / 1e9
            out["ready_commit_rate"] = r3((len(ids) - 1) / spread) if spread > 0 else None
        return out

    # -- scale: many daemons on one database (issue 18, point 4)

    def _admin_port(self, used: set[int]) -> int:
        port = procs.free_port()
        while port in used:
            port = procs.free_port()
        used.add(port)
        return port

    def run_scale(self, tag: str) -> dict[str, Any]:
        """For each shard setting, each K: K daemons (and one observer holding nothing),
        ``waiting`` browsers held on each, then paced COMMITs at each rate, round-robin over
        the daemons."""
        assert self.sessions is not None
        size: Scale = self.sizes["scale"]
        used: set[int] = set()
        tport = self._admin_port(used)
        target = None
        phases: list[dict[str, Any]] = []
        sampler = None
        try:
            target = self.start_backend("scale", "twisted_novnc", tport, tag)
            sampler = procs.CpuSampler(self.sessions.postmaster_pid(), interval=0.2)
            for shards in size.shards:
                self.sessions.set_shards(shards)
                self._scale_shards(tag, shards, size, tport, used, sampler, phases)
        finally:
            if sampler is not None:
                sampler.stop()
            procs.stop(target, grace=5)
            self.sessions.set_shards(0)
        failed = [p for p in phases if p.get("error")]
        out: dict[str, Any] = {"scale": phases, "scale_daemons": list(size.daemons),
                               "scale_rates": list(size.rates), "scale_waiting": size.waiting,
                               "scale_shards": list(size.shards),
                               "scale_early": sum(int(p.get("early") or 0) for p in phases)}
        if failed:
            out["error"] = "scale: " + "; ".join(
                f"shards={p.get('shards')} K={p.get('k')} {p.get('rate', '')}: {p['error']}"
                for p in failed[:3])
        return out

    def _scale_shards(self, tag: str, shards: int, size: Scale, tport: int, used: set[int],
                      sampler: procs.CpuSampler, phases: list[dict[str, Any]]) -> None:
        """Every K and rate with the trigger and the daemons on ``shards`` channels."""
        tag = f"{tag}-s{shards}"
        # The observer: a daemon with no browser at all, so every NOTIFY it gets is one it
        # does not need; its CPU in a phase is what a shared channel costs a daemon (with
        # shards it listens on none, and gets nothing).
        oport, oadmin = self._admin_port(used), self._admin_port(used)
        observer = self.start_twisted_novnc(oport, tport, f"{tag}-observer",
                                            admin_port=oadmin, notify_shards=shards)
        try:
            for k in size.daemons:
                daemons: list[tuple[subprocess.Popen[Any], int, int, Path]] = []
                try:
                    for d in range(k):
                        port, admin = self._admin_port(used), self._admin_port(used)
                        name = f"{tag}-k{k}-d{d}"
                        daemons.append((self.start_twisted_novnc(port, tport, name,
                                                                 admin_port=admin,
                                                                 notify_shards=shards),
                                        port, admin, self.run_dir / f"{name}-proxy.log"))
                    for rate in size.rates:
                        phase = self._scale_phase(tag, k, rate, size.waiting, tport, daemons,
                                                  (observer, oadmin), sampler, shards)
                        phases.append(phase)
                        self.tools.say(f"scale shards={shards} K={k} {rate}/s: p50 "
                                       f"{phase.get('p50_ms')} p99 {phase.get('p99_ms')} ms,"
                                       f" observer {phase.get('observer_cpu_pct')} % of a core"
                                       + (f", error: {phase['error']}" if phase.get("error")
                                          else ""))
                finally:
                    for proc, *_ in daemons:
                        procs.stop(proc, grace=15)
                    for _, _, _, log in daemons:
                        row: dict[str, Any] = {}
                        self.scan_daemon_log(log, row)
                        if row.get("daemon_log_errors"):
                            phases.append({"k": k, "shards": shards,
                                           "error": f"daemon log {log.name}: "
                                           f"{row['daemon_log_first_error']!r}"})
        finally:
            procs.stop(observer, grace=15)

    def _scale_phase(self, tag: str, k: int, rate: int, waiting: int, tport: int,
                     daemons: Sequence[tuple[subprocess.Popen[Any], int, int, Path]],
                     observer: tuple[subprocess.Popen[Any], int],
                     sampler: procs.CpuSampler, shards: int = 0) -> dict[str, Any]:
        assert self.sessions is not None
        name = f"{tag}-k{k}-{rate}"
        per_daemon = [self.sessions.add(waiting, tport, ready=False)
                      for _ in daemons]
        ids_file = self.run_dir / f"{name}.ids"
        ids_file.write_text("".join(f"{sid} {port}\n" for (_, port, _, _), sids
                                    in zip(daemons, per_daemon, strict=True) for sid in sids))
        # Round-robin: the i-th session of every daemon, then the (i+1)-th...
        order = [sids[i] for i in range(waiting) for sids in per_daemon]
        url = f"ws://127.0.0.1:{daemons[0][1]}/websockify/{{id}}"
        phase: dict[str, Any] = {"shards": shards, "k": k, "rate": rate, "n": len(order)}
        cl = self.client(self.client_command("ready", url, "twisted_novnc", ids_file))
        lines = procs.LineReader(cl.stdout)  # type: ignore[arg-type]
        committer = self.sessions.committer()
        try:
            first = lines.next(60)
            if not first or json.loads(first).get("event") != "sent":
                phase["error"] = f"client did not send: {(first or '')[:200]}"
                return phase

            def held() -> bool:
                return all(scrape(admin).get("twisted_novnc_waiting_clients") == waiting
                           for _, _, admin, _ in daemons)

            # With shards, held means LISTENed too: at least the shards of its sessions (more
            # may linger from the phase before).
            shards_of = [len({shard_of(i, shards) for i in sids}) if shards else 1
                         for sids in per_daemon]

            def listened() -> bool:
                return all(scrape(admin).get("twisted_novnc_listened_channels", 0) >= n
                           for (_, _, admin, _), n in zip(daemons, shards_of, strict=True))

            # Held: every daemon's own gauge says so (its waiters are registered, their first
            # read scheduled, their shards LISTENed); no sleep.
            phase["all_held_before_commit"] = (procs.wait_until(held, 60, 0.1)
                                               and procs.wait_until(listened, 60, 0.1))
            pids = {proc.pid: procs.process_tree(proc.pid) for proc, *_ in daemons}
            opid = observer[0].pid
            before_m = [scrape(admin) for _, _, admin, _ in daemons]
            before_o = scrape(observer[1])
            cpu_before = {p: procs.cpu_seconds(tree) for p, tree in pids.items()}
            ocpu_before = procs.cpu_seconds([opid])
            pg_before = sampler.sample()
            t0 = time.monotonic()
            committed = committer.paced(order, rate)
            t1 = time.monotonic()
            pg_after = sampler.sample()
            phase["db_connections"] = self.sessions.backend_count([committer.backend_pid])
            # The last COMMIT's NOTIFY is still on its way: wait (bounded) until every daemon
            # read every session it held, and the observer got every NOTIFY.
            procs.wait_until(lambda: all(
                scrape(admin).get("twisted_novnc_waiting_clients") == 0
                for _, _, admin, _ in daemons), 10, 0.05)
            if not shards:  # with shards the observer listens on none: nothing to wait for
                procs.wait_until(lambda: notifications(scrape(observer[1]))[1]
                                 - notifications(before_o)[1] >= len(order), 10, 0.05)
            ocpu_after = procs.cpu_seconds([opid])
            cpu_after = {p: procs.cpu_seconds(tree) for p, tree in pids.items()}
            after_m = [scrape(admin) for _, _, admin, _ in daemons]
            after_o = scrape(observer[1])
            last = lines.next(120)
            result = json.loads(last) if last else {"error": "no result"}
        finally:
            committer.close()
            procs.stop(cl, grace=10)
        if result.get("error"):
            phase["error"] = str(result["error"])
            return phase
        wall = t1 - t0
        lat, early = commit_latencies(result["opens"], committed)
        spread = (max(committed.values()) - min(committed.values())) / 1e9
        pg_cpu = sum(v - pg_before.get(p, 0.0) for p, v in pg_after.items())
        phase.update({
            "ok": result["ok"], "errors": result["errors"],
            "error_kinds": result.get("error_kinds"), "early": early,
            "p50_ms": r3(percentile(lat, 50)), "p99_ms": r3(percentile(lat, 99)),
            "max_ms": r3(lat[-1] if lat else None),
            "commit_rate": r3((len(order) - 1) / spread) if spread > 0 else None,
            "commit_seconds": r3(wall),
            "db_cpu_us_per_commit": r3(pg_cpu / len(order) * 1e6),
            "db_cpu_pct": r3(100 * pg_cpu / wall),
            "observer_cpu_pct": r3(100 * (ocpu_after - ocpu_before) / wall),
            "observer_notifications": notifications(after_o)[1] - notifications(before_o)[1],
            "daemons": [{
                "needed": notifications(a)[0] - notifications(b)[0],
                "discarded": notifications(a)[1] - notifications(b)[1],
                "channels": a.get("twisted_novnc_listened_channels"),
                "cpu_pct": r3(100 * (cpu_after[pid] - cpu_before[pid]) / wall),
            } for a, b, pid in zip(after_m, before_m, pids, strict=True)],
        })
        if phase["errors"]:
            phase["error"] = f"{phase['errors']} browser(s) not served: {phase['error_kinds']}"
        elif early:
            phase["error"] = f"{early} 101(s) before their COMMIT"
        elif not phase["all_held_before_commit"]:
            phase["error"] = "not every browser was held before the first COMMIT"
        self.sessions.clear()
        return phase

    # -- soak: a million short relays through one daemon (issue 18, point 6)

    def run_soak(self, tag: str) -> dict[str, Any]:
        assert self.sessions is not None
        size: Soak = self.sizes["soak"]
        used: set[int] = set()
        tport, cport = self._admin_port(used), self._admin_port(used)
        pport, aport = self._admin_port(used), self._admin_port(used)
        echo = cut = daemon = None
        restarts: list[dict[str, Any]] = []
        stop_restarts = threading.Event()
        restarter = None
        out: dict[str, Any] = {"soak_n": size.connections}
        try:
            echo = self._spawn_listening([str(self.tools.target), "echo", str(tport)], tport,
                                         "the target", f"{tag}-target.log")
            cut = self._spawn_listening([str(self.tools.target), "cut", str(cport), "16384"],
                                        cport, "the cutting target", f"{tag}-cut-target.log")
            served_ids = self.run_dir / f"{tag}.ids"
            served_ids.write_text("\n".join(self.sessions.add(size.sessions, tport, True)) + "\n")
            cut_ids = self.run_dir / f"{tag}-cut.ids"
            cut_ids.write_text("\n".join(self.sessions.add(size.sessions, cport, True)) + "\n")
            malloc_log = (self.run_dir / f"{tag}-malloc.jsonl" if self.args.soak_malloc_trim
                          else None)
            daemon = self.start_twisted_novnc(pport, tport, tag, admin_port=aport,
                                              readiness_timeout=size.readiness_timeout,
                                              malloc_log=malloc_log)
            idle = scrape(aport)
            out["idle_delayed_calls"] = idle.get("twisted_novnc_delayed_calls")

            def restart_loop() -> None:
                assert self.sessions is not None
                while not stop_restarts.wait(size.db_restart):
                    t = time.monotonic()
                    ok = self.sessions.restart_cluster()
                    restarts.append({"at_s": r3(t - started), "ok": ok,
                                     "seconds": r3(time.monotonic() - t)})

            url = f"ws://127.0.0.1:{pport}/websockify/{{id}}"
            cmd = ["node", str(HERE / "client.js"), "soak", "--url", url, "--timeout",
                   str(self.args.client_timeout), "--conns", str(size.connections),
                   "--parallel", str(size.parallel), "--bytes", "65536",
                   "--ids", str(served_ids), "--cut-ids", str(cut_ids),
                   "--progress", str(size.every), "--pause-at", str(size.first)]
            started = time.monotonic()
            restarter = threading.Thread(target=restart_loop, daemon=True)
            restarter.start()
            cl = self.client(cmd)
            lines = procs.LineReader(cl.stdout)  # type: ignore[arg-type]
            samples: list[dict[str, Any]] = []
            result: dict[str, Any] = {"error": "no result"}
            try:
                while True:
                    line = lines.next(self.args.client_timeout + 30)
                    if line is None:
                        break
                    event = json.loads(line)
                    if event.get("event") == "progress":
                        samples.append(soak_sample(daemon.pid, aport, event["done"],
                                                   time.monotonic() - started))
                        continue
                    if event.get("event") == "paused":
                        # Every connection so far has ended: the daemon idle after `first`.
                        wait_idle(aport)
                        out["soak_first"] = soak_sample(daemon.pid, aport, event["done"],
                                                        time.monotonic() - started)
                        if malloc_log is not None:
                            out["soak_first"]["malloc"] = malloc_sample(daemon.pid, malloc_log)
                        assert cl.stdin is not None
                        cl.stdin.write("go\n")
                        cl.stdin.flush()
                        continue
                    result = event
                    break
            finally:
                procs.stop(cl, grace=10)
                stop_restarts.set()
                restarter.join(timeout=120)
            seconds = time.monotonic() - started
            # The last connections' closes are logged a turn later: wait (bounded) for none
            # open, then count.
            wait_idle(aport)
            # Timers of the last connections (close handshakes, a reconnect's backoff) run
            # out: wait (bounded) until no more are pending than when the daemon was idle.
            settled = time.monotonic()
            out["soak_timers_settled"] = procs.wait_until(
                lambda: scrape(aport).get("twisted_novnc_delayed_calls", 1e9)
                <= (idle.get("twisted_novnc_delayed_calls") or 0), 30, 0.2)
            out["soak_timers_settle_s"] = r3(time.monotonic() - settled)
            end = scrape(aport)
            samples.append(soak_sample(daemon.pid, aport, "end", seconds))
            if malloc_log is not None:
                samples[-1]["malloc"] = malloc_sample(daemon.pid, malloc_log)
        finally:
            stop_restarts.set()
            procs.stop(daemon, grace=15)
            procs.stop(echo, grace=5)
            procs.stop(cut, grace=5)
            if daemon is not None:
                self.scan_daemon_log(self.run_dir / f"{tag}-proxy.log", out,
                                     expected=DB_RESTART_TRACEBACK)
        out.update(soak_figures(result, samples, end, size, restarts, seconds,
                                out.get("idle_delayed_calls"), out.get("soak_first")))
        return out


    # -- one (round, scenario, proxy)

    def run_one(self, rnd: int, scenario: str, proxy: str) -> dict[str, Any]:
        tag = f"r{rnd}-{scenario}-{proxy}"
        row: dict[str, Any] = {"round": rnd, "scenario": scenario, "proxy": proxy,
                               "t": round(time.time(), 3), "load1": os.getloadavg()[0]}
        target = proxy_proc = profiler = None
        tport = procs.free_port()
        pport = procs.free_port()
        while pport == tport:
            pport = procs.free_port()
        started = time.monotonic()
        if scenario in ("scale", "soak"):
            try:
                row.update(self.run_scale(tag) if scenario == "scale" else self.run_soak(tag))
            except BenchError as e:
                row["error"] = f"harness: {e}"
            finally:
                if self.sessions is not None:
                    self.sessions.clear()
            row["wall_s"] = round(time.monotonic() - started, 1)
            return row
        aport = None
        if scenario == "upgrade":
            aport = procs.free_port()
            while aport in (tport, pport):
                aport = procs.free_port()
        try:
            # In upgrade the client is the VMs too (it times both ends of every relay).
            if scenario != "upgrade":
                target = self.start_backend(scenario, proxy, tport, tag)
            ids_file = burst_file = None
            if is_twisted_novnc(proxy):
                assert self.sessions is not None
                n = {"setup": self.sizes["setup"], "conc": self.sizes["conc"],
                     "conc-rec": self.sizes["conc"],
                     "streams": self.sizes["streams"][0], "ready": self.sizes["ready"],
                     "upgrade": self.sizes["upgrade"].relays}
                count = n.get(scenario, 1)
                ids_file = self.run_dir / f"{tag}.ids"
                ids_file.write_text("\n".join(
                    self.sessions.add(count, tport, ready=scenario != "ready")) + "\n")
                if scenario == "ready":
                    burst_file = self.run_dir / f"{tag}-burst.ids"
                    burst_file.write_text("\n".join(
                        self.sessions.add(count, tport, ready=False)) + "\n")
            proxy_proc = self.start_proxy(proxy, pport, tport, tag, aport,
                                          vnc=logs_in_to_vm(scenario),
                                          record=records(scenario))
            if proxy_proc is not None and self.args.profile and proxy == "twisted_novnc":
                profiler = self.start_profiler(proxy_proc.pid, tag)
            url = {
                "ceiling-tcp": f"tcp://127.0.0.1:{tport}",
                "ceiling-ws": f"ws://127.0.0.1:{tport}/websockify",
                "socat": f"tcp://127.0.0.1:{pport}",
                "twisted-tcp": f"tcp://127.0.0.1:{pport}",
                "websockify": f"ws://127.0.0.1:{pport}/websockify",
                "twisted_novnc": f"ws://127.0.0.1:{pport}/websockify/{{id}}",
                WORKERS_PROXY: f"ws://127.0.0.1:{pport}/websockify/{{id}}",
            }[proxy]
            if scenario == "ready":
                assert ids_file is not None and burst_file is not None
                result = self.run_ready(url, proxy, self.run_dir / f"{tag}-proxy.log",
                                        ids_file, burst_file,
                                        proxy_proc.pid if proxy_proc is not None else None)
            elif scenario == "upgrade":
                assert ids_file is not None and aport is not None
                result = self.run_upgrade(url, proxy, ids_file, tport, aport,
                                          proxy_proc)
            elif base_scenario(scenario) == "conc":
                result = self.run_conc(self.client_command(scenario, url, proxy, ids_file),
                                       proxy_proc)
            else:
                result = self.run_plain(self.client_command(scenario, url, proxy, ids_file))
            result.pop("scenario", None)
            row.update(result)
            if proxy_proc is not None and proxy_proc.poll() is not None:
                row["proxy_exited"] = proxy_proc.returncode
        except BenchError as e:
            row["error"] = f"harness: {e}"
        finally:
            if profiler is not None:
                self.stop_profiler(profiler, tag)
            procs.stop(proxy_proc, grace=15)
            procs.stop(target, grace=5)
            if is_twisted_novnc(proxy):
                self.scan_daemon_log(self.run_dir / f"{tag}-proxy.log", row)
                if records(scenario):
                    self.count_recordings(self.recordings_dir(tag), row)
                if self.args.gc_log:
                    gc_pauses(self.run_dir / f"{tag}-gc.log", row)
                if self.sessions is not None:
                    self.sessions.clear()
        row["wall_s"] = round(time.monotonic() - started, 1)
        return row

    def count_recordings(self, directory: Path, row: dict[str, Any]) -> None:
        """What the recording scenarios wrote, checked against what was relayed (a recording
        that stopped early would flatter the figures), then deleted: 256 MiB a round."""
        infos = [i for i in list_recordings(str(directory)) if isinstance(i, RecordingInfo)]
        row["recordings"] = len(infos)
        row["recorded_bytes"] = sum(i.recorded_bytes for i in infos)
        stopped = sorted({i.stopped for i in infos if i.stopped})
        if stopped:
            row["recordings_stopped"] = ", ".join(stopped)
        shutil.rmtree(directory, ignore_errors=True)

    def scan_daemon_log(self, log: Path, row: dict[str, Any],
                        expected: re.Pattern[str] | None = None) -> None:
        """Error lines and tracebacks of the daemon's log in the row; those ``expected``
        matches (the soak's database restarts) are counted apart, not as errors."""
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return
        if expected is not None:
            text, n = expected.subn("", text)
            if n:
                row["daemon_log_expected_tracebacks"] = n
        errors = ERROR_LINE.findall(text)
        if errors:
            row["daemon_log_errors"] = len(errors)
            m = ERROR_LINE.search(text)
            assert m is not None
            row["daemon_log_first_error"] = text[max(0, m.start() - 100):m.start() + 400]
        refused = REFUSED_LINE.findall(text)
        if refused:
            row["daemon_refused"] = len(refused)

    # -- profiling

    def start_profiler(self, pid: int, tag: str) -> subprocess.Popen[Any]:
        out = self.run_dir / "profile" / f"{tag}.txt"
        out.parent.mkdir(exist_ok=True)
        native = ["--native"] if self.args.profile_native else []
        return self._spawn([str(self.tools.pyspy), "record", "--pid", str(pid), "--rate",
                            str(self.args.profile_rate), "--format", "raw", *native, "--output",
                            str(out)], f"{tag}-py-spy.log")

    def stop_profiler(self, proc: subprocess.Popen[Any], tag: str) -> None:
        # py-spy writes its output on SIGINT.
        procs.stop(proc, grace=30, sig=signal.SIGINT)
        raw = self.run_dir / "profile" / f"{tag}.txt"
        if raw.exists():
            (raw.with_suffix(".md")).write_text(profiles.summarise(raw.read_text(), title=tag))

    # -- the whole matrix

    def run(self, scenarios: Sequence[str], proxies: Sequence[str]) -> None:
        results = open(self.run_dir / "results.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        with results:
            for rnd in range(1, self.args.rounds + 1):
                for scenario in scenarios:
                    these = [p for p in proxies if eligible(scenario, p, scenarios)]
                    if not these:
                        continue
                    k = (rnd - 1) % len(these)
                    for proxy in these[k:] + these[:k]:
                        row = self.run_one(rnd, scenario, proxy)
                        self.rows.append(row)
                        results.write(json.dumps(row) + "\n")
                        results.flush()
                        self.tools.say(progress_line(row))
        if self.args.profile:
            self.summarise_profiles(scenarios)

    def summarise_profiles(self, scenarios: Sequence[str]) -> None:
        """One summary per scenario over every round's samples: profile/<scenario>.md."""
        folder = self.run_dir / "profile"
        for scenario in scenarios:
            raws = sorted(folder.glob(f"r*-{scenario}-twisted_novnc.txt"))
            if raws:
                text = "".join(raw.read_text() for raw in raws)
                title = f"twisted_novnc, {scenario}, {len(raws)} round(s)"
                (folder / f"{scenario}.md").write_text(profiles.summarise(text, title=title))


# -- scraping a daemon's /metrics (scale and soak) ------------------------------------------------


def scrape(admin_port: int) -> dict[str, float]:
    """One daemon's metrics by sample name, labels in braces (``name{k=v}``); {} when it does
    not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def notifications(metrics: dict[str, float]) -> tuple[int, int]:
    """(needed, discarded) NOTIFYs so far, from a scrape."""
    return (int(metrics.get("twisted_novnc_notifications_total{result=needed}", 0)),
            int(metrics.get("twisted_novnc_notifications_total{result=discarded}", 0)))


#: How the soak's client names what it saw, and what the daemon's outcome says, by class.
SOAK_CLASSES = ("served", "refused", "cut")


def soak_client_class(kind: str) -> str:
    if kind == "served":
        return "served"
    if kind.startswith("refused_"):
        return "refused"
    if kind in ("cut_browser", "cut_vm"):
        return "cut"
    return "other"


def soak_daemon_class(outcome: str) -> str:
    """The daemon's ``connections_total`` outcome, classed: 1000 is a relay closed cleanly
    (by the browser, the soak's only clean end), a refusal its close code
    (4404 unknown, 4503 database unavailable) or HTTP status, a cut the VM's reset (4502) or
    the browser's vanishing (1006, no close frame)."""
    if outcome == "1000":
        return "served"
    if outcome in ("http_404", "http_503", "http_504", "4404", "4503", "4504"):
        return "refused"
    if outcome in ("1006", "4502", "1001"):
        return "cut"
    return "other"


def wait_idle(admin_port: int) -> None:
    """Until the daemon has no connection open (30 s at most), and has done what it does on
    falling idle: its memory trim (``[novnc] memory_trim_interval``, within a second of its
    last close; 5 s at most, so a daemon that trims nothing only waits)."""
    trims = scrape(admin_port).get("twisted_novnc_memory_trims_total", 0)
    procs.wait_until(
        lambda: scrape(admin_port).get("twisted_novnc_connections_open") == 0, 30, 0.1)
    procs.wait_until(
        lambda: scrape(admin_port).get("twisted_novnc_memory_trims_total", 0) > trims, 5, 0.1)


def soak_sample(pid: int, admin_port: int, done: int | str, t: float) -> dict[str, Any]:
    """The daemon's RSS and descriptors now, and the connections it had open."""
    m = scrape(admin_port)
    return {"done": done, "rss_kb": procs.memory_kb([pid])["rss_kb"],
            "fds": procs.fd_count(pid), "open": m.get("twisted_novnc_connections_open"),
            "t_s": r3(t)}


#: The signal bench/inject/sitecustomize.py snapshots tracemalloc on (--trace-malloc; SIGUSR2
#: is the daemon's upgrade, which replaces any handler installed before it).
TRACE_MALLOC_SIGNAL = signal.SIGRTMIN + 3

#: The signal bench/inject/sitecustomize.py samples the heap on (SIGUSR2 is the upgrade).
MALLOC_SIGNAL = signal.SIGRTMIN + 2


def malloc_sample(pid: int, log: Path) -> dict[str, Any] | None:
    """The daemon's heap, and its RSS after ``malloc_trim(0)`` (--soak-malloc-trim): one line
    it appends to ``log`` when signalled; None when it does not catch the signal (not glibc),
    which would otherwise end it, or does not answer within 10 s."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    if not caught >> (MALLOC_SIGNAL - 1) & 1:
        return None

    def lines() -> list[str]:
        return log.read_text(encoding="ascii").splitlines() if log.exists() else []

    before = len(lines())
    os.kill(pid, MALLOC_SIGNAL)
    if not procs.wait_until(lambda: len(lines()) > before, 10, 0.05):
        return None
    row: dict[str, Any] = json.loads(lines()[before])
    return row


def soak_figures(result: dict[str, Any], samples: list[dict[str, Any]], end: dict[str, float],
                 size: Soak, restarts: list[dict[str, Any]], seconds: float,
                 idle_timers: float | None, first: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"soak_samples": samples, "soak_restarts": restarts,
                           "soak_seconds": r3(seconds)}
    if result.get("error"):
        out["error"] = f"soak client: {result['error']}"
        return out
    tally: dict[str, int] = result["tally"]
    client = dict.fromkeys((*SOAK_CLASSES, "other"), 0)
    for kind, n in tally.items():
        client[soak_client_class(kind)] += n
    outcomes = {k.split("outcome=")[1].rstrip("}"): int(v) for k, v in end.items()
                if k.startswith("twisted_novnc_connections_total{")}
    daemon = dict.fromkeys((*SOAK_CLASSES, "other"), 0)
    for outcome, n in outcomes.items():
        daemon[soak_daemon_class(outcome)] += n
    progress = [s for s in samples if isinstance(s["done"], int)]
    last = samples[-1]
    out.update({
        "soak_tally": tally, "soak_client": client, "soak_outcomes": outcomes,
        "soak_daemon": daemon, "soak_conn_per_s": result.get("conn_per_s"),
        "soak_waiting_end": end.get("twisted_novnc_waiting_clients"),
        "soak_watched_end": end.get("twisted_novnc_watched_relays"),
        "soak_delayed_calls_end": end.get("twisted_novnc_delayed_calls"),
        "soak_open_end": end.get("twisted_novnc_connections_open"),
        "soak_restarts_ok": sum(1 for r in restarts if r["ok"]),
    })
    if first is not None:
        out["soak_rss_change_pct"] = r3(100 * (last["rss_kb"] - first["rss_kb"])
                                        / first["rss_kb"])
        if first["fds"] and last["fds"] is not None:
            out["soak_fds_change_pct"] = r3(100 * (last["fds"] - first["fds"]) / first["fds"])
        if first.get("malloc") and last.get("malloc"):
            a, b = first["malloc"]["rss_trimmed_kb"], last["malloc"]["rss_trimmed_kb"]
            out["soak_rss_trimmed_change_pct"] = r3(100 * (b - a) / a)
    # The slope after the first sample compared: before it the heap is still warming up.
    settled = [s for s in progress if s["done"] >= size.first]
    fit = settled if len(settled) >= 2 else progress
    if len(fit) >= 2:
        xs = [s["done"] for s in fit]
        ys = [s["rss_kb"] for s in fit]
        out["soak_rss_slope_kb_per_100k"] = r3(statistics.linear_regression(xs, ys).slope
                                               * 100_000)
    # And over the second half alone: a heap that warms up to a plateau is not a leak.
    half = [s for s in progress if s["done"] >= size.connections // 2]
    if len(half) >= 2:
        out["soak_rss_slope_second_half_kb_per_100k"] = r3(statistics.linear_regression(
            [s["done"] for s in half], [s["rss_kb"] for s in half]).slope * 100_000)
    problems = []
    if sum(client.values()) != size.connections or client["other"]:
        problems.append(f"client tally {tally} is not {size.connections} served, refused or "
                        "cut")
    # Class by class: a VM's reset is a cut (4502), never a clean close (1000).
    if sum(outcomes.values()) != size.connections or daemon != client:
        problems.append(f"the daemon's outcomes {outcomes} do not match the client's {client}")
    if end.get("twisted_novnc_waiting_clients") or end.get("twisted_novnc_watched_relays"):
        problems.append("waiters or watches left at the end")
    if (end.get("twisted_novnc_delayed_calls") or 0) > (idle_timers or 0):
        problems.append("more timers pending at the end than when idle")
    if not restarts or not all(r["ok"] for r in restarts):
        problems.append(f"database restarts: {restarts or 'none happened'}")
    if problems:
        out["error"] = "soak: " + "; ".join(problems)
    return out


def gc_pauses(log: Path, row: dict[str, Any]) -> None:
    """Summarise the daemon's GC pauses (--gc-log): all of them, and those inside ready's
    paced phase and burst (ended between the phase's first COMMIT and its last 101)."""
    try:
        pauses = [(int(t), gen, float(ms)) for t, gen, ms in
                  (line.split() for line in log.read_text().splitlines() if line.strip())]
    except (OSError, ValueError):
        return
    row["gc_pauses"] = len(pauses)
    row["gc_gen2"] = sum(1 for _, gen, _ in pauses if gen == "gen2")
    row["gc_max_ms"] = max((ms for _, _, ms in pauses), default=0.0)
    row["gc_total_ms"] = round(sum(ms for _, _, ms in pauses), 1)
    for phase in ("ready", "burst"):
        window = row.get(f"{phase}_commits_ns")
        if window and row.get(f"{phase}_max_ms") is not None:
            end = window[1] + row[f"{phase}_max_ms"] * 1e6
            inside = [ms for t, _, ms in pauses if window[0] <= t <= end]
            row[f"{phase}_gc_ms"] = round(sum(inside), 1)
            row[f"{phase}_gc_max_ms"] = max(inside, default=0.0)


def progress_line(row: dict[str, Any]) -> str:
    s = row["scenario"]
    shown = [f"{m.key}={report.fmt(report.number(row.get(m.key)))}"
             for m in report.METRICS.get(s, []) if row.get(m.key) is not None]
    head = f"round {row['round']} {s:7} {row['proxy']:13} {row.get('wall_s', 0):5.1f}s "
    return head + (" ".join(shown) or "") + (f"  ERROR {row['error']}" if row.get("error") else "")


# -- what was measured, and on what ---------------------------------------------------------


def _version(args: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=30,
                             check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "os": platform.platform(terse=True), "loadavg_at_start": load,
            "python": platform.python_version(), "node": _version(["node", "--version"])}


def code_under_test(twistd: str) -> dict[str, Any]:
    """Which twisted_novnc the daemon ran: the package the ``twistd``'s own Python imports
    (another virtualenv's with ``--twistd``), compared with the tree."""
    installed = Path(twisted_novnc.__file__).resolve().parent
    python = Path(twistd).parent / "python"
    if python.exists():
        found = subprocess.run(
            [str(python), "-c", "import twisted_novnc; print(twisted_novnc.__file__)"],
            capture_output=True, text=True, check=False, timeout=60).stdout.strip()
        if found:
            installed = Path(found).resolve().parent
    source = ROOT / "twisted_novnc"
    differs = []
    if installed != source.resolve():
        for f in sorted(source.glob("*.py")):
            other = installed / f.name
            if not other.exists() or other.read_bytes() != f.read_bytes():
                differs.append(f.name)
    git = ["git", "-C", str(ROOT)]
    return {
        "git_commit": _version([*git, "rev-parse", "--short", "HEAD"]),
        "git_dirty_twisted_novnc": bool(subprocess.run(
            [*git, "status", "--porcelain", "--", "twisted_novnc"], capture_output=True,
            text=True, check=False).stdout.strip()),
        "installed_package": str(installed),
        "installed_differs_from_tree": differs,
        "twistd": twistd,
    }


def versions(tools: Tools, proxies: Sequence[str]) -> dict[str, str]:
    out = {}
    if "socat" in proxies:
        lines = subprocess.run(["socat", "-V"], capture_output=True, text=True,
                               check=False).stdout.splitlines()
        found = next((line for line in lines if "socat version" in line), "")
        out["socat"] = found.split("socat version", 1)[-1].split(" on ")[0].strip() or "?"
    if "websockify" in proxies:
        python = tools.websockify.parent / "python"
        out["websockify"] = _version([str(python), "-c", "import importlib.metadata as m; "
                                      "print(m.version('websockify'))"])
    import autobahn

    import twisted

    out["autobahn"] = autobahn.__version__
    out["twisted"] = twisted.__version__
    return out


def render(bench: Bench, meta: dict[str, Any]) -> str:
    rows = bench.rows
    lines = [
        f"## {meta['date']} — {meta['label']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory']}, Linux {meta['machine']['kernel']}, load average "
        f"{meta['machine']['loadavg_at_start']} at the start and "
        f"{meta['machine'].get('loadavg_at_end', '?')} at the end (1, 5, 15 min; the bench "
        f"itself keeps about 2 busy); Python {meta['machine']['python']}, "
        f"Node {meta['machine']['node']}; " +
        ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
    ]
    code = meta.get("code")
    if code:
        note = (f"Daemon: {code['twistd']}, package {code['installed_package']}"
                + (", which differs from the working tree in "
                   + ", ".join(code["installed_differs_from_tree"])
                   if code["installed_differs_from_tree"] else ", the same as the working tree")
                + f". Checkout (and bench) at {code['git_commit']}"
                + (" with uncommitted changes in twisted_novnc/"
                   if code["git_dirty_twisted_novnc"] else ""))
        lines += [note + ".", ""]
    if bench.args.lookup_from_memory:
        lines += ["**Experiment, not the product:** `--lookup-from-memory`: twisted_novnc read "
                  "the first lookup from PostgreSQL and answered every later one from memory.",
                  ""]
    s = bench.sizes
    lines += [
        f"Sizes: down/down-vnc/up {s['down'] // MiB} MiB, echo {s['echo']:,} x 64 B, setup "
        f"{s['setup']:,}, conc {s['conc']:,}, streams {s['streams'][0]} x "
        f"{s['streams'][1] // MiB} MiB, ready {s['ready']:,} at {s['ready_rate']}/s then "
        f"{s['ready']:,} in one transaction, upgrade {s['upgrade'].relays:,} relays x one "
        f"record each way every {s['upgrade'].interval_ms} ms. Wall time {meta['wall_s']:.0f} s.",
        "",
        report.markdown(rows, s["conc"], bench.args.rounds),
    ]
    extra = (ready_details(rows) + conc_details(rows) + upgrade_details(rows)
             + scale_details(rows) + soak_details(rows))
    if extra:
        lines += extra
    return "\n".join(lines)


def scale_details(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Issue 18, point 4: a row per (daemons, rate) of every round, and the targets."""
    runs = [r for r in rows if r["scenario"] == "scale" and r.get("scale")]
    if not runs:
        return []
    lines = [
        "scale (issue 18, point 4): K daemons (`workers = 1` each) on one PostgreSQL, "
        f"{runs[0]['scale_waiting']} browsers held per daemon, COMMITs one per transaction at "
        "the rate, round-robin over the daemons; one more daemon, the observer, holds no "
        "browser and only receives every NOTIFY. CPU in % of one core over the commit phase; "
        "the database's is its cluster's whole process tree. Two cores run all of it (client,"
        " K + 1 daemons, PostgreSQL, target): from K = 4 the figures are CPU-bound.",
        "",
        "`shards` is `[database] notify_shards` (0 = one shared channel; N = each daemon"
        " LISTENs only on the shards of the sessions it holds, `channels` its"
        " `twisted_novnc_listened_channels` at the end of the commits).",
        "",
        "| round | shards | K | rate/s | achieved/s | COMMIT→101 p50 / p99 / max ms "
        "| 101 before COMMIT | errors | DB CPU µs/commit | DB CPU % | DB conns | per daemon: "
        "needed / discarded NOTIFYs, CPU %, channels | observer NOTIFYs, CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for p in r["scale"]:
            if "rate" not in p:
                continue
            per = "; ".join(f"{d['needed']} / {d['discarded']}, {fmt_num(d['cpu_pct'])}, "
                            f"{fmt_num(d.get('channels'))}" for d in p.get("daemons", []))
            lines.append(
                f"| {r['round']} | {p.get('shards', 0)} | {p['k']} | {p['rate']} | "
                f"{fmt_num(p.get('commit_rate'))} | "
                f"{fmt_num(p.get('p50_ms'))} / {fmt_num(p.get('p99_ms'))} / "
                f"{fmt_num(p.get('max_ms'))} | {p.get('early', '—')} | "
                f"{p.get('errors', '—')}{' (' + p['error'] + ')' if p.get('error') else ''} | "
                f"{fmt_num(p.get('db_cpu_us_per_commit'))} | {fmt_num(p.get('db_cpu_pct'))} | "
                f"{p.get('db_connections', '—')} | {per or '—'} | "
                f"{p.get('observer_notifications', '—')}, {fmt_num(p.get('observer_cpu_pct'))} |")
    early = sum(int(r.get("scale_early") or 0) for r in runs)
    verdict = {True: "yes", False: "**no**", None: "—"}
    lines += ["", "Targets (issue 18, point 4; medians over rounds):", "",
              "| target | shards | measured | met |", "|---|---|---|---|"]
    top = [p for r in runs for p in r["scale"] if p.get("k") == 8 and p.get("rate") == 1000
           and p.get("p99_ms") is not None]
    # What one NOTIFY a daemon does not need costs it, from the observer on the shared channel.
    per_notify = [p["observer_cpu_pct"] * p["commit_seconds"] / 100
                  / p["observer_notifications"]
                  for p in top if not p.get("shards") and p.get("observer_notifications")]
    cost = statistics.median(per_notify) if per_notify else None
    for shards in sorted({int(p.get("shards") or 0) for p in top}) or [0]:
        these = [p for p in top if int(p.get("shards") or 0) == shards]
        p99 = statistics.median(p["p99_ms"] for p in these) if these else None
        if not shards:
            obs = statistics.median(p["observer_cpu_pct"] for p in these) if these else None
            how = "observer"
        else:
            # No daemon gets a NOTIFY it does not listen for: what remains is the discarded
            # ones of its own shards, costed at the shared channel's price per NOTIFY.
            rates = [
                statistics.mean(d["discarded"] for d in p["daemons"]) / p["commit_seconds"]
                for p in these if p.get("daemons") and p.get("commit_seconds")
            ]
            obs = (statistics.median(rates) * cost * 100) if rates and cost else None
            how = "discarded/s times the observer's cost per NOTIFY"
        lines += [
            f"| K = 8, 1,000 commits/s: COMMIT→101 p99 ≤ 10 ms | {shards} | "
            f"{fmt_num(p99) + ' ms' if p99 is not None else 'not measured'} | "
            f"{verdict[None if p99 is None else p99 <= 10]} |",
            f"| K = 8, 1,000 commits/s: CPU for NOTIFYs not needed ({how}) ≤ 5 % of a core | "
            f"{shards} | {fmt_num(obs) + ' %' if obs is not None else 'not measured'} | "
            f"{verdict[None if obs is None else obs <= 5]} |",
        ]
    lines += [f"| no 101 before its COMMIT | all | {early} | {verdict[early == 0]} |", ""]
    return lines


def soak_malloc_rows(r: dict[str, Any], first: dict[str, Any] | None,
                     last: dict[str, Any]) -> list[str]:
    """With --soak-malloc-trim: what of the RSS is free memory the allocators keep."""
    a, b = (first or {}).get("malloc"), last.get("malloc")
    if not a or not b:
        return []
    pct = r.get("soak_rss_trimmed_change_pct")
    met = "yes" if pct is not None and abs(pct) <= 5 else "**no**"
    return [
        f"| glibc heap: from the system / in use / free, after {first['done']:,} → at the end"
        f" | {a['heap_kb']} / {a['heap_used_kb']} / {a['heap_free_kb']} → {b['heap_kb']} / "
        f"{b['heap_used_kb']} / {b['heap_free_kb']} KB | |",
        f"| pymalloc arenas (1 MiB), after {first['done']:,} → at the end | "
        f"{a['pymalloc_arenas']} → {b['pymalloc_arenas']} | |",
        f"| RSS after malloc_trim(0), idle after {first['done']:,} → idle at the end | "
        f"{a['rss_trimmed_kb']} → {b['rss_trimmed_kb']} KB ({fmt_num(pct)} %) | {met} |",
    ]


def soak_details(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Issue 18, point 6: memory and descriptors over the run, and every connection's end."""
    runs = [r for r in rows if r["scenario"] == "soak" and r.get("soak_samples")]
    lines: list[str] = []
    verdict = {True: "yes", False: "**no**", None: "—"}
    for r in runs:
        first, last = r.get("soak_first"), r["soak_samples"][-1]
        rss, fds = r.get("soak_rss_change_pct"), r.get("soak_fds_change_pct")
        timers_left = r.get("soak_delayed_calls_end") or 0
        lines += [
            f"soak (issue 18, point 6), round {r['round']}: {r['soak_n']:,} connections in "
            f"{fmt_num(r.get('soak_seconds'))} s ({fmt_num(r.get('soak_conn_per_s'))} conn/s),"
            f" the database restarted {r.get('soak_restarts_ok', 0)} time(s) "
            f"({len(r.get('soak_restarts') or [])} tried).",
            "",
            "| figure | value | met |", "|---|---|---|",
            f"| RSS, idle after {first['done'] if first else '?':,} → idle at the end | "
            f"{first['rss_kb'] if first else '?'} → {last['rss_kb']} KB "
            f"({fmt_num(rss)} %) | {verdict[None if rss is None else abs(rss) <= 5]} |",
            *soak_malloc_rows(r, first, last),
            f"| descriptors, idle after {first['done'] if first else '?':,} → idle at the end | "
            f"{first['fds'] if first else '?'} → {last['fds']} ({fmt_num(fds)} %) | "
            f"{verdict[None if fds is None else abs(fds) <= 5]} |",
            f"| RSS slope (fit over the samples from {first['done'] if first else '?':,} on) | "
            f"{fmt_num(r.get('soak_rss_slope_kb_per_100k'))} KB per 100k connections | |",
            f"| RSS slope over the second half | "
            f"{fmt_num(r.get('soak_rss_slope_second_half_kb_per_100k'))} KB per 100k "
            "connections | |",
            f"| waiters / watched relays / open connections at the end | "
            f"{r.get('soak_waiting_end')} / {r.get('soak_watched_end')} / "
            f"{r.get('soak_open_end')} | "
            f"{verdict[not r.get('soak_waiting_end') and not r.get('soak_watched_end')]} |",
            f"| reactor timers at the end (idle baseline before the run) | "
            f"{r.get('soak_delayed_calls_end')} ({r.get('idle_delayed_calls')}; waited "
            f"{fmt_num(r.get('soak_timers_settle_s'))} s for it) | "
            f"{verdict[timers_left <= (r.get('idle_delayed_calls') or 0)]} |",
            f"| tracebacks txpostgres logged when the database went away (known pitfall, "
            f"counted apart) | {r.get('daemon_log_expected_tracebacks', 0)} | |",
            "",
            "| class | client's tally | daemon's connections_total |", "|---|---|---|",
        ]
        client, daemon = r.get("soak_client") or {}, r.get("soak_daemon") or {}
        for cls in (*SOAK_CLASSES, "other"):
            lines.append(f"| {cls} | {client.get(cls, '—')} | {daemon.get(cls, '—')} |")
        lines += ["", f"Client's kinds: {r.get('soak_tally')}; daemon's outcomes: "
                  f"{r.get('soak_outcomes')}.", ""]
    return lines


def fmt_num(x: Any) -> str:
    return "—" if x is None else f"{x:,.3g}" if isinstance(x, float) and abs(x) < 100 else (
        f"{x:,.0f}" if isinstance(x, float) else str(x))


def ready_details(rows: Sequence[dict[str, Any]]) -> list[str]:
    runs = [r for r in rows if r["scenario"] == "ready" and not r.get("error")]
    if not runs:
        return []
    rates = [r["ready_commit_rate"] for r in runs if r.get("ready_commit_rate")]
    early = sum(int(r.get("ready_early") or 0) + int(r.get("burst_early") or 0) for r in runs)
    unheld = sum(1 for r in runs if not r.get("ready_all_held_before_commit", True)
                 or not r.get("burst_all_held_before_commit", True))
    cpu = [(r["burst_daemon_cpu_ms"], r.get("burst_machine_busy"), r.get("burst_last_ms"))
           for r in runs if r.get("burst_daemon_cpu_ms") is not None]
    burst = ("; the burst, per run, the daemon's CPU from the COMMIT to the last 101 (and the "
             "machine's busy share of its cores meanwhile, last open): " + ", ".join(
                 f"{c:.0f} ms ({b:.0%}, {last:.0f} ms)" if b is not None and last is not None
                 else f"{c:.0f} ms" for c, b, last in cpu)) if cpu else ""
    return [
        f"ready: COMMITs paced at a median {statistics.median(rates):.0f}/s achieved; "
        f"{early} client(s) opened before their COMMIT was sent (must be 0); "
        f"{unheld} run(s) where not every client was seen held before the first COMMIT"
        f"{burst}.",
        "",
    ] if rates else []


def upgrade_cpu(main: int, before: dict[int, float], after: dict[int, float],
                seconds: float) -> dict[str, Any]:
    """Cores each part of the daemon kept busy from the trigger to the answer: the main
    process (the relay itself with workers = 1; the supervisor and router otherwise), the old
    generation's workers, and the new generation's processes."""
    if seconds <= 0:
        return {}
    old = sum(after.get(p, v) - v for p, v in before.items() if p != main)
    new = sum(v for p, v in after.items() if p not in before)
    return {"upgrade_cores_main": round((after.get(main, 0) - before.get(main, 0)) / seconds, 2),
            "upgrade_cores_old_workers": round(old / seconds, 2),
            "upgrade_cores_new": round(new / seconds, 2)}


def upgrade_details(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per upgrade run: what the table's medians hide (the baseline, where the worst
    record was, the client's own lateness)."""
    runs = [r for r in rows if r["scenario"] == "upgrade" and not r.get("error")]
    if not runs:
        return []
    out = ["upgrade (twisted_novnc only: socat and websockify have no upgrade, a restart closes "
           "every connection): per run, pause = a relay's longest record delay less its median "
           "delay, either direction; baseline = the same over records sent before the trigger:"]
    for r in runs:
        workers = 2 if r["proxy"] == WORKERS_PROXY else 1
        out.append(
            f"round {r['round']} workers = {workers}: {r.get('conns')} relays, "
            f"{r.get('records_per_s')} records/s; pause p50/p99/max "
            f"{r.get('pause_p50_ms')}/{r.get('pause_p99_ms')}/{r.get('pause_max_ms')} ms "
            f"(baseline {r.get('baseline_pause_p50_ms')}/{r.get('baseline_pause_p99_ms')}/"
            f"{r.get('baseline_pause_max_ms')}; arrival gap less interval "
            f"{r.get('gap_pause_p50_ms')}/{r.get('gap_pause_p99_ms')}/"
            f"{r.get('gap_pause_max_ms')}); {r.get('pause_over_100ms')} relays paused over "
            f"100 ms; worst record sent {r.get('worst_sent_after_trigger_min_ms')} to "
            f"{r.get('worst_sent_after_trigger_max_ms')} ms after the trigger (p50 "
            f"{r.get('worst_sent_after_trigger_p50_ms')}); upgrade {r.get('upgrade_seconds')} s "
            f"({r.get('upgrade_moved')} moved, {r.get('upgrade_kept')} kept), answered in "
            f"{r.get('trigger_to_answer_ms')} ms; closed {r.get('relays_closed')}, lost "
            f"{r.get('lost')}, duplicated {r.get('duplicated')}, reordered {r.get('reordered')}, "
            f"torn {r.get('torn')}; daemon {r.get('daemon_cores_streaming')} cores busy while "
            f"streaming before the trigger, from the trigger to the answer main process "
            f"{r.get('upgrade_cores_main')}, old workers {r.get('upgrade_cores_old_workers')}, "
            f"new generation {r.get('upgrade_cores_new')}; client CPU {r.get('client_cpu_s')} "
            f"s over {r.get('streamed_s')} s, its send lag max {r.get('send_lag_max_ms')} ms")
    return [out[0], "", *(f"- {line}" for line in out[1:]), ""]


def conc_details(rows: Sequence[dict[str, Any]]) -> list[str]:
    runs = [r for r in rows if r["scenario"] == "conc" and r["proxy"] == "twisted_novnc"
            and not r.get("error") and r.get("fds_before") is not None]
    if not runs:
        return []
    out = ["conc, twisted_novnc's descriptors (before / held / after release) and PSS (before /"
           " held / after release, MB):"]
    for r in runs:
        out.append(f"round {r['round']}: fds {r['fds_before']} / {r['fds_held']} / "
                   f"{r['fds_after_close']}; PSS {r['pss_before_mb']} / {r['pss_held_mb']} / "
                   f"{r['pss_after_close_mb']}")
    return [" ".join(out[:1]), "", *(f"- {line}" for line in out[1:]), ""]


# -- the command ------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive integers, please: {text!r}")
    return values


def _ints0(text: str) -> list[int]:
    """A comma list of shard counts: whole numbers, 0 allowed (the shared channel)."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values or min(values) < 0 or max(values) > 65536:
        raise argparse.ArgumentTypeError(f"whole numbers from 0 to 65536, please: {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma list of {', '.join(SCENARIOS + ON_REQUEST)} (default all but "
                    f"{', '.join(ON_REQUEST)})")
    ap.add_argument("--proxies", default=",".join(PROXIES),
                    help=f"comma list of {', '.join(PROXIES)} (default all)")
    ap.add_argument("--conc", type=int, default=0, help="idle connections for conc "
                    "(default 9000; quick 200)")
    ap.add_argument("--upgrade-relays", type=int, default=0, help="relays streaming through "
                    "the upgrade (default 1000; quick 100)")
    ap.add_argument("--upgrade-interval", type=int, default=0, metavar="MS", help="each "
                    "upgrade relay sends one record each way every MS ms (default 100)")
    ap.add_argument("--scale-daemons", type=_ints, default=None, metavar="K,K,...",
                    help="scale: daemon counts (default 1,2,4,8; quick 1,2)")
    ap.add_argument("--scale-rates", type=_ints, default=None, metavar="R,R,...",
                    help="scale: COMMITs per second (default 200,500,1000; quick 200,500)")
    ap.add_argument("--scale-waiting", type=int, default=0, metavar="N",
                    help="scale: browsers held per daemon (default 500; quick 50)")
    ap.add_argument("--scale-shards", type=_ints0, default=None, metavar="N,N,...",
                    help="scale: [database] notify_shards settings, each measured over every K"
                         " and rate (default 0,1024; 0 = the one shared channel)")
    ap.add_argument("--soak-connections", type=int, default=0, metavar="N",
                    help="soak: connections (default 1,000,000; quick 2,000)")
    ap.add_argument("--soak-db-restart", type=float, default=0, metavar="SECONDS",
                    help="soak: restart the database every SECONDS (default 300; quick 1.5)")
    ap.add_argument("--soak-malloc-trim", action="store_true",
                    help="soak: at the idle samples, also the daemon's glibc heap and its RSS "
                    "after malloc_trim(0) (bench/inject): what the allocator keeps")
    ap.add_argument("--dsn", default=None, help="use this PostgreSQL (libpq DSN) instead of "
                    "a private cluster; the bench makes and drops its own table")
    ap.add_argument("--daemon-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="an ini key for twisted_novnc's config, passed as twistd novnc --set "
                    "(repeatable), e.g. log.file=/dev/stdout to measure [log] file's writer")
    ap.add_argument("--twistd", default=None, help="the twistd that runs twisted_novnc "
                    "(default: next to this Python)")
    ap.add_argument("--profile", action="store_true", help="record twisted_novnc with py-spy "
                    "(figures of profiled runs are not comparable)")
    ap.add_argument("--profile-native", action="store_true", help="with --profile: include C"
                    " frames (py-spy --native), to see which syscall or extension takes the time")
    ap.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--trace-malloc", action="store_true", help="run twisted_novnc under "
                    "tracemalloc and write what conc's held connections allocated (slow)")
    ap.add_argument("--gc-log", action="store_true", help="log twisted_novnc's garbage-"
                    "collection pauses of 1 ms or more, and count those inside ready's phases")
    ap.add_argument("--lookup-from-memory", action="store_true", help="an experiment: "
                    "twisted_novnc answers every lookup after the first from memory (the "
                    "first row, under the asked id), to measure what the database's round "
                    "trip costs setup; figures of such runs are not the product's")
    ap.add_argument("--client-open", choices=("raw", "ws"), default="raw",
                    help="how the client opens setup's and conc's connections: a minimal "
                    "hand-written handshake (default) or the ws library")
    ap.add_argument("--client-timeout", type=int, default=300,
                    help="seconds any one client run may take")
    ap.add_argument("--out", default=str(BUILD), help="where each run's directory goes "
                    "(default bench/out; tools are always built in bench/out)")
    ap.add_argument("--md", default=None, help="also write the report here")
    ap.add_argument("--json", default=None, help="also write the summary (medians, ratios, "
                    "targets, every run) here as JSON")
    ap.add_argument("--label", default="", help="a title for this run in the report")
    args = ap.parse_args(argv)
    for name, allowed in (("scenarios", SCENARIOS + ON_REQUEST), ("proxies", PROXIES)):
        chosen = [x for x in getattr(args, name).split(",") if x]
        unknown = [x for x in chosen if x not in allowed]
        if unknown or not chosen:
            ap.error(f"--{name}: unknown {', '.join(unknown) or '(none)'}; "
                     f"choose from {', '.join(allowed)}")
        setattr(args, name, [x for x in allowed if x in chosen])
    if args.rounds < 1 or args.rounds > 50:
        ap.error("--rounds: from 1 to 50")
    if args.lookup_from_memory and args.scenarios != ["setup"]:
        # Its rows are committed before the run and all name one target; elsewhere a row read
        # from memory would open sessions not committed yet, or the wrong target.
        ap.error("--lookup-from-memory: only with --scenarios setup")
    return args


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every process started is stopped on the way out."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Each relay holds two descriptors in the daemon and the target one per connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.upgrade_relays and hard < 4 * args.upgrade_relays + 200:
        print(f"[bench] warning: the hard descriptor limit {hard} is below what "
              f"{args.upgrade_relays} relays need (both ends are the client's)", file=sys.stderr)
    if args.conc and hard < 2 * args.conc + 200:
        print(f"[bench] warning: the hard descriptor limit {hard} is below what {args.conc} "
              "relays need", file=sys.stderr)
    bench = Bench(args)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "label": args.label or ("quick" if args.quick else "full"),
        "command": "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "nofile": [hard, hard],
    }
    with sigterm_as_exit():
        try:
            bench.prepare(args.proxies)
            meta["versions"] = versions(bench.tools, args.proxies)
            if any(is_twisted_novnc(p) for p in args.proxies):
                meta["code"] = code_under_test(bench.twistd)
            bench.run(args.scenarios, args.proxies)
        except BenchError as e:
            print(f"[bench] {e}", file=sys.stderr)
            return 2
        finally:
            bench.close()
    meta["wall_s"] = time.monotonic() - started
    meta["machine"]["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(bench, meta)
    print(text)
    (bench.run_dir / "report.md").write_text(text, encoding="utf-8")
    sizes = {k: attrs.asdict(v) if attrs.has(type(v)) else v for k, v in bench.sizes.items()}
    summary = {"meta": meta, "sizes": sizes, **report.summary(bench.rows,
                                                                      bench.sizes["conc"]),
               "runs": bench.rows}
    (bench.run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if args.md:
        Path(args.md).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"[bench] results in {bench.run_dir}", file=sys.stderr)
    return 1 if any(r.get("error") for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
