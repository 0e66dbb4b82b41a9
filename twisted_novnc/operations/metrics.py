"""Prometheus metrics: what the daemon counts, in one registry per daemon.

Values that exist anyway (open connections, waiters, bytes on live relays) are read at scrape
time by a collector instead of being updated on every message, so metrics cost nothing on
the relay's hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from twisted_novnc import __version__
from twisted_novnc.errors import Refusal

#: The close codes an outcome label may name: RFC 6455's and the refusal table's.  A browser
#: may close with any code from 1000 to 4999; each new one would be a new time series.
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015}
    | {refusal.close_code for refusal in Refusal}
)


def outcome_label(outcome: str) -> str:
    """The ``outcome`` label for a connection's end: a known close code or HTTP status (or
    ``write_timeout``) as it is, any other close code as ``other`` (the log line keeps the
    exact code)."""
    if outcome in ("write_timeout", "moved") or outcome.startswith("http_") or (
        outcome.isdigit() and int(outcome) in KNOWN_CLOSE_CODES
    ):
        return outcome
    return "other"


WAIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MOVE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def status_label(status: int | None) -> str:
    """The ``status`` label of a plain HTTP request: the status answered (they are ours, a
    bounded set), or ``none`` for a connection that ended before any answer (no whole
    request head: a port scan, a timeout, a client that gave up)."""
    return "none" if status is None else str(status)


@attrs.define(eq=False)
class LiveState:
    """Callables that read the daemon's live state at scrape time."""

    connections_open: Callable[[], int] = lambda: 0
    relays_open: Callable[[], int] = lambda: 0
    waiting: Callable[[], int] = lambda: 0
    live_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0)
    listen_connected: Callable[[], bool] = lambda: False
    listened_channels: Callable[[], int] = lambda: 0
    database_reachable: Callable[[], bool] = lambda: False
    database_prepared: Callable[[], bool] = lambda: False


class _LiveCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m, live = self.metrics, self.metrics.live
        yield GaugeMetricFamily(
            "twisted_novnc_connections_open", "Browser connections open now.",
            value=live.connections_open(),
        )
        yield GaugeMetricFamily(
            "twisted_novnc_relays_open", "Relays moving bytes now.", value=live.relays_open()
        )
        yield GaugeMetricFamily(
            "twisted_novnc_waiting_clients", "Browsers held waiting for their session.",
            value=live.waiting(),
        )
        up, down = live.live_bytes()
        relayed = CounterMetricFamily(
            "twisted_novnc_relayed_bytes",
            "Bytes relayed: up = browser to VM, down = VM to browser.",
            labels=["direction"],
        )
        relayed.add_metric(["up"], m.closed_up_bytes + up - m.moved_in_up_bytes)
        relayed.add_metric(["down"], m.closed_down_bytes + down - m.moved_in_down_bytes)
        yield relayed
        yield GaugeMetricFamily(
            "twisted_novnc_listen_connected",
            "1 while the LISTEN connection is up and listening, else 0.",
            value=1 if live.listen_connected() else 0,
        )
        yield GaugeMetricFamily(
            "twisted_novnc_listened_channels",
            "NOTIFY channels the LISTEN connection listens on now: 1 (or 0) with one shared"
            " channel; with [database] notify_shards, the shards of the sessions held here.",
            value=live.listened_channels(),
        )
        yield GaugeMetricFamily(
            "twisted_novnc_database_reachable",
            "1 while the database answers, else 0.",
            value=1 if live.database_reachable() else 0,
        )
        yield GaugeMetricFamily(
            "twisted_novnc_database_prepared",
            "1 while lookups run as prepared statements, 0 while unprepared"
            " ([database] prepared_statements = off, or auto behind a transaction pooler).",
            value=1 if live.database_prepared() else 0,
        )
        info = GaugeMetricFamily(
            "twisted_novnc_build_info", "The running version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info


@attrs.define(eq=False)
class Metrics:
    """Every metric of one daemon process."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    live: LiveState = attrs.field(factory=LiveState)
    closed_up_bytes: int = 0
    closed_down_bytes: int = 0
    #: Bytes that relays taken over from an older process had moved before they came here:
    #: not this process's, so not in its relayed-bytes counter.
    moved_in_up_bytes: int = 0
    moved_in_down_bytes: int = 0
    connections: Any = attrs.field(init=False)
    http_requests: Any = attrs.field(init=False)
    http_duration: Any = attrs.field(init=False)
    readiness_wait: Any = attrs.field(init=False)
    upstream_connect: Any = attrs.field(init=False)
    database_reconnects: Any = attrs.field(init=False)
    descriptor_limit_hits: Any = attrs.field(init=False)
    relay_move: Any = attrs.field(init=False)
    vm_logins: Any = attrs.field(init=False)
    recordings: Any = attrs.field(init=False)
    recordings_stopped: Any = attrs.field(init=False)
    recorded_bytes: Any = attrs.field(init=False)
    memory_trims: Any = attrs.field(init=False)
    readiness: ReadinessCounts = attrs.field(factory=lambda: ReadinessCounts())

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.connections = Counter(
            "twisted_novnc_connections",
            "WebSocket connections ended, by outcome (close code, or the HTTP status that"
            " refused the upgrade).",
            ["outcome"], registry=r,
        )
        self.memory_trims = Counter(
            "twisted_novnc_memory_trims",
            "Times the heap's free memory was handed back to the system ([novnc]"
            " memory_trim_interval, and each time the process fell idle).",
            registry=r,
        )
        self.vm_logins = Counter(
            "twisted_novnc_vm_logins",
            "Logins to a VM's VNC server with the session's credentials ([vnc]), by result: ok,"
            " credentials_refused, no_security_type, not_rfb, refused, lost.",
            ["result"], registry=r,
        )
        self.http_requests = Counter(
            "twisted_novnc_http_requests",
            "Plain HTTP requests on the WebSocket listener (files of [web] root, malformed or"
            " non-upgrade requests), by the status answered (none: no whole request).",
            ["status"], registry=r,
        )
        self.http_duration = Histogram(
            "twisted_novnc_http_request_duration_seconds",
            "How long each plain HTTP request held its connection, from accept to close.",
            buckets=HTTP_BUCKETS, registry=r,
        )
        self.readiness_wait = Histogram(
            "twisted_novnc_readiness_wait_seconds",
            "How long browsers waited for their session to be ready.",
            buckets=WAIT_BUCKETS, registry=r,
        )
        self.upstream_connect = Histogram(
            "twisted_novnc_upstream_connect_seconds",
            "How long connecting to the VM took, retries included.",
            buckets=CONNECT_BUCKETS, registry=r,
        )
        self.database_reconnects = Counter(
            "twisted_novnc_database_reconnects", "Database connections re-established.",
            registry=r,
        )
        self.descriptor_limit_hits = Counter(
            "twisted_novnc_descriptor_limit_hits",
            "Times accept() found no free descriptor (EMFILE/ENFILE): the descriptor limit, not"
            " the proxy, refused connections, and accepting paused.",
            registry=r,
        )
        self.relay_move = Histogram(
            "twisted_novnc_relay_move_seconds",
            "How long each relay taken over in an upgrade stood still: from the old process's"
            " last read to this one's take-over.",
            buckets=MOVE_BUCKETS, registry=r,
        )
        self.recordings = Counter(
            "twisted_novnc_recordings",
            "Recordings ([record]) by result: started, resumed (a relay moved here by an"
            " upgrade), refused (the directory at max_total_bytes).",
            ["result"], registry=r,
        )
        self.recordings_stopped = Counter(
            "twisted_novnc_recordings_stopped",
            "Recordings stopped before their relay ended (the session went on), by reason:"
            " max_bytes, backlog, disk_full, io_error.",
            ["reason"], registry=r,
        )
        self.recorded_bytes = Counter(
            "twisted_novnc_recorded_bytes",
            "Bytes written to recording files (records' heads included).",
            registry=r,
        )
        r.register(_LiveCollector(self))
        r.register(_ReadinessCollector(self.readiness))
        # process_open_fds and process_max_fds beside the limit hits; CPU and memory too.
        ProcessCollector(registry=r)

    def http_request(self, status: int | None, seconds: float) -> None:
        """A plain HTTP request's connection ended: counted apart from WebSocket outcomes."""
        self.http_requests.labels(status_label(status)).inc()
        self.http_duration.observe(seconds)

    def relay_closed(self, up_bytes: int, down_bytes: int) -> None:
        self.closed_up_bytes += up_bytes
        self.closed_down_bytes += down_bytes

    def relay_moved_out(self, up_bytes: int, down_bytes: int) -> None:
        """A relay went on in a new process: what it moved here stays counted here."""
        self.relay_closed(up_bytes, down_bytes)

    def relay_moved_in(self, up_bytes: int, down_bytes: int) -> None:
        """A relay came from an older process with these totals, which are that one's."""
        self.moved_in_up_bytes += up_bytes
        self.moved_in_down_bytes += down_bytes


# -- the readiness gate's NOTIFYs and what is left pending (issue 18) -------------------------


@attrs.define(eq=False)
class ReadinessCounts:
    """What the readiness gate counts for itself, and reads of what it and the reactor hold.

    The gate adds one to a plain int per NOTIFY (no lock, no label lookup); the collector
    turns them into counters at scrape time.  The gauges prove, after a soak, that no waiter,
    watch or timer was left behind.
    """

    #: NOTIFYs for a session this process has a waiter or a live relay for.
    needed: int = 0
    #: NOTIFYs for sessions this process does not hold: the cost of one shared channel.
    discarded: int = 0
    watched: Callable[[], int] = lambda: 0
    delayed_calls: Callable[[], int] = lambda: 0


class _ReadinessCollector(Collector):
    def __init__(self, counts: ReadinessCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        notifications = CounterMetricFamily(
            "twisted_novnc_notifications",
            "NOTIFYs received on the session channel (or shards), by result: needed (a waiter"
            " or a live relay of this process has that session, so its row is read) or"
            " discarded.",
            labels=["result"],
        )
        notifications.add_metric(["needed"], c.needed)
        notifications.add_metric(["discarded"], c.discarded)
        yield notifications
        yield GaugeMetricFamily(
            "twisted_novnc_watched_relays",
            "Live relays the readiness gate watches for their session's end.",
            value=c.watched(),
        )
        yield GaugeMetricFamily(
            "twisted_novnc_delayed_calls",
            "Timers pending in the reactor (every deadline, expiry, retry and timeout).",
            value=c.delayed_calls(),
        )


def worker_families(texts: Mapping[int, str]) -> list[Metric]:
    """Every worker's metrics (Prometheus text) merged by family, each sample labelled with
    ``worker="<index>"``, so one scrape of the supervisor shows them all."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(index)}
                merged.samples.append(sample._replace(labels=labels))
    return list(families.values())


def supervisor_families(
    configured: int, alive: int, restarts: int, pids: Mapping[int, int | None],
    answered: Mapping[int, bool],
) -> list[Metric]:
    """The supervisor's own metrics: its workers, how many run, how often they were restarted."""
    workers = GaugeMetricFamily(
        "twisted_novnc_workers", "Worker processes configured ([novnc] workers).",
        value=configured,
    )
    running = GaugeMetricFamily(
        "twisted_novnc_workers_alive", "Worker processes running now.", value=alive
    )
    restarted = CounterMetricFamily(
        "twisted_novnc_worker_restarts", "Worker processes restarted after they ended.",
        value=restarts,
    )
    info = GaugeMetricFamily(
        "twisted_novnc_worker_info",
        "1 per running worker, with its process id; 0 while it is being restarted.",
        labels=["worker", "pid"],
    )
    scraped = GaugeMetricFamily(
        "twisted_novnc_worker_scraped",
        "1 when the worker answered this scrape in time (its metrics are included), else 0.",
        labels=["worker"],
    )
    for index, pid in sorted(pids.items()):
        info.add_metric([str(index), "" if pid is None else str(pid)], 0 if pid is None else 1)
        scraped.add_metric([str(index)], 1 if answered.get(index) else 0)
    # The supervisor's own code, which an upgrade does not change (its workers' is in their
    # twisted_novnc_build_info, labelled by worker).
    built = GaugeMetricFamily(
        "twisted_novnc_supervisor_build_info", "The version the supervisor process runs.",
        labels=["version"],
    )
    built.add_metric([__version__], 1)
    return [workers, running, restarted, info, scraped, built]


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def exposition(families: Iterable[Metric]) -> bytes:
    """Metric families as the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
