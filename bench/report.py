"""From the runs' result rows to medians, same-run ratios, the issue's targets, and markdown.

A row is one (round, scenario, proxy) run: the load client's JSON line plus what the harness
measured.  Ratios are the median of per-round ratios (twisted_novnc ÷ reference in the same
round), which is what stays meaningful on a noisy 2-core machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

Row = dict[str, Any]

SUBJECT = "twisted_novnc"
#: The same daemon with [novnc] workers = 2 (run in streams only).
WORKERS_SUBJECT = "twisted_novnc-2w"
REFERENCES = ("socat", "websockify")


@attrs.frozen
class Metric:
    key: str
    label: str
    higher_is_better: bool


#: The figures of the scenarios that have a ``-rec`` variant (the same figures).
ECHO = [Metric("p50_us", "p50 µs", False), Metric("p99_us", "p99 µs", False)]
CONC = [
    Metric("ok", "held", True),
    Metric("errors", "errors", False),
    Metric("pss_kb_per_conn", "PSS KB/conn", False),
    Metric("rss_kb_per_conn", "RSS KB/conn", False),
    Metric("open_seconds", "s to open all", False),
]

METRICS: dict[str, list[Metric]] = {
    "down": [Metric("mib_s", "MiB/s", True)],
    "down-vnc": [Metric("mib_s", "MiB/s", True)],
    "down-rec": [Metric("mib_s", "MiB/s", True)],
    "up": [Metric("mib_s", "MiB/s", True)],
    "echo": ECHO,
    "echo-rec": ECHO,
    "setup": [
        Metric("conn_per_s", "conn/s", True),
        Metric("setup_p50_ms", "open→first byte p50 ms", False),
        Metric("setup_p99_ms", "open→first byte p99 ms", False),
    ],
    "conc": CONC,
    "conc-rec": CONC,
    "streams": [Metric("agg_mib_s", "MiB/s total", True), Metric("errors", "errors", False)],
    "ready": [
        Metric("ready_p50_ms", "COMMIT→101 p50 ms", False),
        Metric("ready_p99_ms", "COMMIT→101 p99 ms", False),
        Metric("ready_max_ms", "COMMIT→101 max ms", False),
        Metric("ready_errors", "errors", False),
        Metric("burst_first_ms", "burst COMMIT→first 101 ms", False),
        Metric("burst_p50_ms", "burst COMMIT→101 p50 ms", False),
        Metric("burst_last_ms", "burst COMMIT→last 101 ms", False),
        Metric("burst_errors", "burst errors", False),
        Metric("ready_gc_ms", "GC pauses in paced phase ms (--gc-log)", False),
        Metric("burst_gc_ms", "GC pauses in burst ms (--gc-log)", False),
    ],
    "upgrade": [
        Metric("pause_p50_ms", "pause p50 ms", False),
        Metric("pause_p99_ms", "pause p99 ms", False),
        Metric("pause_max_ms", "pause max ms", False),
        Metric("baseline_pause_p99_ms", "pause p99 before the trigger ms", False),
        Metric("upgrade_seconds", "s until the old generation held no movable relay", False),
        Metric("upgrade_moved", "relays moved", True),
        Metric("relays_closed", "relays closed", False),
        Metric("lost", "records lost", False),
        Metric("duplicated", "records duplicated", False),
        Metric("reordered", "records reordered", False),
    ],
}

#: Counts are shown but not divided: a ratio of error counts means nothing.
NO_RATIO = {"ok", "errors", "ready_errors", "burst_errors", "ready_gc_ms", "burst_gc_ms",
            *(m.key for m in METRICS["upgrade"])}
#: Rows shown only when some run measured them.
OPTIONAL = {"ready_gc_ms", "burst_gc_ms"}


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def valid(row: Row) -> bool:
    """A run the harness and the client completed (a proxy's own errors are still counted)."""
    return not row.get("error")


def values(rows: Iterable[Row], scenario: str, proxy: str, key: str) -> list[float]:
    out = []
    for row in rows:
        if row["scenario"] == scenario and row["proxy"] == proxy and valid(row):
            v = number(row.get(key))
            if v is not None:
                out.append(v)
    return out


def median(rows: Sequence[Row], scenario: str, proxy: str, key: str) -> float | None:
    vals = values(rows, scenario, proxy, key)
    return statistics.median(vals) if vals else None


def ratio(rows: Sequence[Row], scenario: str, key: str, ref: str,
          subject: str = SUBJECT) -> float | None:
    """Median over rounds of subject ÷ ref, each pair from the same round."""
    per_round = []
    for row in rows:
        if row["scenario"] != scenario or row["proxy"] != subject or not valid(row):
            continue
        mine = number(row.get(key))
        theirs = [
            number(r.get(key)) for r in rows
            if r["scenario"] == scenario and r["proxy"] == ref and r["round"] == row["round"]
            and valid(r)
        ]
        if mine is not None and theirs and theirs[0]:
            per_round.append(mine / theirs[0])
    return statistics.median(per_round) if per_round else None


def scenario_ratio(rows: Sequence[Row], scenario: str, ref_scenario: str, key: str,
                   proxy: str) -> float | None:
    """Median over rounds of ``proxy``'s ``scenario`` ÷ its ``ref_scenario``, each pair from
    the same round: one build against itself with one thing changed (down-vnc ÷ down)."""
    per_round = []
    for row in rows:
        if row["scenario"] != scenario or row["proxy"] != proxy or not valid(row):
            continue
        mine = number(row.get(key))
        theirs = [
            number(r.get(key)) for r in rows
            if r["scenario"] == ref_scenario and r["proxy"] == proxy
            and r["round"] == row["round"] and valid(r)
        ]
        if mine is not None and theirs and theirs[0]:
            per_round.append(mine / theirs[0])
    return statistics.median(per_round) if per_round else None


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


# -- the issue's targets ------------------------------------------------------------------------


@attrs.frozen
class Target:
    name: str
    measured: str
    met: bool | None  # None: not measured in this run


def _ratio_target(rows: Sequence[Row], name: str, scenario: str, key: str, ref: str,
                  limit: float, at_least: bool, subject: str = SUBJECT) -> Target:
    r = ratio(rows, scenario, key, ref, subject)
    if r is None:
        return Target(name, "not measured", None)
    return Target(name, fmt_ratio(r), r >= limit if at_least else r <= limit)


def _absolute_target(rows: Sequence[Row], name: str, scenario: str, key: str,
                     check: Callable[[float], bool], unit: str) -> Target:
    m = median(rows, scenario, SUBJECT, key)
    if m is None:
        return Target(name, "not measured", None)
    return Target(name, f"{fmt(m)} {unit}", check(m))


def targets(rows: Sequence[Row], conc_n: int) -> list[Target]:
    """Issue 6, point 2: every target, judged on this run's medians and same-run ratios."""
    out = [
        _ratio_target(rows, "down ≥ 1.0 x socat", "down", "mib_s", "socat", 1.0, True),
        _ratio_target(rows, "up ≥ 0.8 x socat", "up", "mib_s", "socat", 0.8, True),
        _ratio_target(rows, "streams (1 worker) ≥ 1.3 x websockify", "streams", "agg_mib_s",
                      "websockify", 1.3, True),
        _ratio_target(rows, "streams (2 workers) ≥ 1.0 x socat", "streams", "agg_mib_s",
                      "socat", 1.0, True, subject=WORKERS_SUBJECT),
        _ratio_target(rows, "echo p50 ≤ websockify p50", "echo", "p50_us", "websockify", 1.0,
                      False),
        _ratio_target(rows, "echo p99 ≤ socat p99", "echo", "p99_us", "socat", 1.0, False),
        _ratio_target(rows, "setup ≥ 0.9 x socat conn/s (with the PostgreSQL lookup)", "setup",
                      "conn_per_s", "socat", 0.9, True),
    ]
    conc_runs = [r for r in rows if r["scenario"] == "conc" and r["proxy"] == SUBJECT]
    if conc_runs:
        held = [int(r.get("ok") or 0) for r in conc_runs if valid(r)]
        errors = [int(r.get("errors") or 0) for r in conc_runs if valid(r)]
        failed = len(conc_runs) - len(held)
        measured = (f"held {min(held) if held else 0}-{max(held) if held else 0}, "
                    f"errors {max(errors) if errors else '—'} (worst round)"
                    + (f", {failed} failed run(s)" if failed else ""))
        met = bool(held) and not failed and min(held) >= conc_n and max(errors) == 0
        out.append(Target(f"conc: {conc_n:,} held with 0 errors, one process", measured, met))
    else:
        out.append(Target(f"conc: {conc_n:,} held with 0 errors, one process", "not measured",
                          None))
    out += [
        _absolute_target(rows, "conc ≤ 10 KB PSS per connection", "conc", "pss_kb_per_conn",
                         lambda v: v <= 10, "KB"),
        _absolute_target(rows, "ready p50 ≤ 2 ms (COMMIT → 101)", "ready", "ready_p50_ms",
                         lambda v: v <= 2, "ms"),
        _absolute_target(rows, "ready p99 ≤ 5 ms (COMMIT → 101)", "ready", "ready_p99_ms",
                         lambda v: v <= 5, "ms"),
        _absolute_target(rows, "burst: last open ≤ 250 ms after COMMIT", "ready",
                         "burst_last_ms", lambda v: v <= 250, "ms"),
    ]
    return out


#: Issue 13, point 2: with credentials on, the relay after the VM login keeps today's speed.
VNC_LIMIT = 0.95


def vnc_targets(rows: Sequence[Row]) -> list[Target]:
    """Issue 13, point 2, per daemon that ran down-vnc: down-vnc ÷ down of the same proxy in
    the same round (median over rounds), and both medians."""
    out = []
    for subject, label in ((SUBJECT, ""), (WORKERS_SUBJECT, ", workers = 2")):
        if not any(r["scenario"] == "down-vnc" and r["proxy"] == subject for r in rows):
            continue
        name = f"down-vnc ≥ {VNC_LIMIT} x down (same build{label})"
        r = scenario_ratio(rows, "down-vnc", "down", "mib_s", subject)
        if r is None:
            out.append(Target(name, "not measured", None))
            continue
        vnc, plain = (median(rows, s, subject, "mib_s") for s in ("down-vnc", "down"))
        out.append(Target(name, f"{fmt_ratio(r)} ({fmt(vnc)} against {fmt(plain)} MiB/s)",
                          r >= VNC_LIMIT))
    return out


#: Issue 14, point 4: what recording may cost (down-rec ÷ down at least, echo-rec's p99 ÷
#: echo's at most), the same build in the same round.
RECORD_DOWN_LIMIT = 0.8
RECORD_ECHO_LIMIT = 1.2


def record_targets(rows: Sequence[Row]) -> list[Target]:
    """Issue 14, point 4: recording on against the same build with it off, per round (median
    over rounds, the medians in brackets), and the memory a recorded relay adds."""
    out = []

    def ran(scenario: str) -> bool:
        return any(r["scenario"] == scenario and r["proxy"] == SUBJECT for r in rows)

    if ran("down-rec"):
        name = f"down-rec ≥ {RECORD_DOWN_LIMIT} x down (same build)"
        r = scenario_ratio(rows, "down-rec", "down", "mib_s", SUBJECT)
        on, off = (median(rows, s, SUBJECT, "mib_s") for s in ("down-rec", "down"))
        out.append(Target(name, "not measured", None) if r is None else Target(
            name, f"{fmt_ratio(r)} ({fmt(on)} against {fmt(off)} MiB/s)", r >= RECORD_DOWN_LIMIT))
    if ran("echo-rec"):
        name = f"echo-rec p99 ≤ {RECORD_ECHO_LIMIT} x echo p99 (same build)"
        r = scenario_ratio(rows, "echo-rec", "echo", "p99_us", SUBJECT)
        on, off = (median(rows, s, SUBJECT, "p99_us") for s in ("echo-rec", "echo"))
        out.append(Target(name, "not measured", None) if r is None else Target(
            name, f"{fmt_ratio(r)} ({fmt(on)} against {fmt(off)} µs)", r <= RECORD_ECHO_LIMIT))
    if ran("conc-rec"):
        extra = [
            on - off
            for row in rows
            if row["scenario"] == "conc-rec" and row["proxy"] == SUBJECT and valid(row)
            for on in [number(row.get("pss_kb_per_conn"))]
            for off in [number(next((
                r.get("pss_kb_per_conn") for r in rows
                if r["scenario"] == "conc" and r["proxy"] == SUBJECT
                and r["round"] == row["round"] and valid(r)), None))]
            if on is not None and off is not None
        ]
        on, off = (median(rows, s, SUBJECT, "pss_kb_per_conn") for s in ("conc-rec", "conc"))
        out.append(Target(
            "memory per recorded relay (conc-rec minus conc PSS per connection; reported)",
            "not measured" if not extra else
            f"{fmt(statistics.median(extra))} KB ({fmt(on)} against {fmt(off)} KB)", None))
    return out


def upgrade_targets(rows: Sequence[Row]) -> list[Target]:
    """Issue 12, point 7, for each worker count: the median of its rounds, and the worst
    round for what must never happen."""
    out = []
    for subject, workers, pause_limit in ((WORKERS_SUBJECT, 2, 100.0), (SUBJECT, 1, 1000.0)):
        runs = [r for r in rows if r["scenario"] == "upgrade" and r["proxy"] == subject]
        if not runs:
            continue
        good = [r for r in runs if valid(r)]
        failed = len(runs) - len(good)
        worst = {key: max((int(r.get(key) or 0) for r in good), default=None)
                 for key in ("relays_closed", "lost", "duplicated", "reordered", "torn")}
        never = [k for k, v in worst.items() if v]
        out.append(Target(
            f"workers = {workers}: 0 relays closed, no record lost, duplicated or reordered",
            ", ".join(f"{k} {v}" for k, v in worst.items()) + " (worst round)"
            + (f", {failed} failed run(s)" if failed else ""),
            bool(good) and not failed and not never))
        for key, name, limit, unit in (
            ("pause_p99_ms", f"workers = {workers}: pause p99 ≤ {fmt(pause_limit)} ms",
             pause_limit, "ms"),
            ("upgrade_seconds", f"workers = {workers}: old generation empty of movable relays"
             " ≤ 5 s", 5.0, "s"),
        ):
            vals = values(rows, "upgrade", subject, key)
            if not vals:
                out.append(Target(name, "not measured", None))
                continue
            m = statistics.median(vals)
            spread = f" ({fmt(min(vals))}-{fmt(max(vals))})" if len(vals) > 1 else ""
            out.append(Target(name, f"{fmt(m)} {unit}{spread}", m <= limit))
    return out


# -- tables -------------------------------------------------------------------------------------


def scenario_order(rows: Sequence[Row]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["scenario"] not in seen:
            seen.append(row["scenario"])
    return [s for s in METRICS if s in seen]


def proxy_order(rows: Sequence[Row]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["proxy"] not in seen:
            seen.append(row["proxy"])
    preferred = ["ceiling-tcp", "ceiling-ws", "socat", "twisted-tcp", "websockify", SUBJECT,
                 WORKERS_SUBJECT]
    return [p for p in preferred if p in seen] + [p for p in seen if p not in preferred]


def summary(rows: Sequence[Row], conc_n: int) -> dict[str, Any]:
    """Everything the tables show, as data (the --json output)."""
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for s in scenario_order(rows):
        medians[s], ratios[s] = {}, {}
        for m in METRICS[s]:
            medians[s][m.key] = {p: median(rows, s, p, m.key) for p in proxy_order(rows)}
            if m.key not in NO_RATIO:
                ratios[s][m.key] = {ref: ratio(rows, s, m.key, ref) for ref in REFERENCES}
    return {
        "medians": medians,
        "ratios": ratios,
        "targets": [attrs.asdict(t) for t in targets(rows, conc_n)],
        "upgrade_targets": [attrs.asdict(t) for t in upgrade_targets(rows)],
        "vnc_targets": [attrs.asdict(t) for t in vnc_targets(rows)],
        "record_targets": [attrs.asdict(t) for t in record_targets(rows)],
        "vnc_ratios": {p: scenario_ratio(rows, "down-vnc", "down", "mib_s", p)
                       for p in proxy_order(rows)
                       if any(r["scenario"] == "down-vnc" and r["proxy"] == p for r in rows)},
    }


def markdown(rows: Sequence[Row], conc_n: int, rounds: int) -> str:
    proxies = proxy_order(rows)
    refs = [r for r in REFERENCES if r in proxies and SUBJECT in proxies]
    head = ["scenario", "metric", *proxies, *(f"tn ÷ {r}" for r in refs)]
    lines = [
        f"Medians of {rounds} round(s); in every round each scenario runs every proxy back to "
        "back, the order rotating. Ratios (tn = twisted_novnc) are medians of per-round "
        "ratios. ↑ higher is better, ↓ lower is better. `ceiling-tcp` (raw TCP) and "
        "`ceiling-ws` (a trivial Node WebSocket server) are the load client's ceilings: no "
        "proxy in between. `twisted-tcp` is Twisted's own TCP relay (portforward: no "
        "WebSocket, no lookup), the floor of the stack.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for s in scenario_order(rows):
        for m in METRICS[s]:
            if m.key in OPTIONAL and not any(values(rows, s, p, m.key) for p in proxies):
                continue
            cells = [s, f"{m.label} {'↑' if m.higher_is_better else '↓'}"]
            cells += [fmt(median(rows, s, p, m.key)) for p in proxies]
            cells += ["" if m.key in NO_RATIO else fmt_ratio(ratio(rows, s, m.key, r))
                      for r in refs]
            lines.append("| " + " | ".join(cells) + " |")
    issue6 = targets(rows, conc_n)
    if any(t.met is not None for t in issue6):
        lines += ["", "Targets (issue 6, point 2):", "", "| target | measured | met |",
                  "|---|---|---|"]
        for t in issue6:
            verdict = {True: "yes", False: "**no**", None: "—"}[t.met]
            lines.append(f"| {t.name} | {t.measured} | {verdict} |")
    upgrade = upgrade_targets(rows)
    if upgrade:
        lines += ["", "Targets (issue 12, point 7: the upgrade; medians over rounds, the range in"
                  " brackets):", "", "| target | measured | met |", "|---|---|---|"]
        for t in upgrade:
            verdict = {True: "yes", False: "**no**", None: "—"}[t.met]
            lines.append(f"| {t.name} | {t.measured} | {verdict} |")
    vnc = vnc_targets(rows)
    if vnc:
        lines += ["", "Targets (issue 13, point 2: the relay after the VM login, `[vnc] "
                  "password_file` set; down-vnc ÷ down of the same proxy, median of per-round "
                  "ratios, the medians in brackets):", "", "| target | measured | met |",
                  "|---|---|---|"]
        for t in vnc:
            verdict = {True: "yes", False: "**no**", None: "—"}[t.met]
            lines.append(f"| {t.name} | {t.measured} | {verdict} |")
    recording = record_targets(rows)
    if recording:
        lines += ["", "Targets (issue 14, point 4: recording on, `[record] dir` set with `input "
                  "= on`, against the same build with it off; median of per-round ratios, the "
                  "medians in brackets):", "", "| target | measured | met |", "|---|---|---|"]
        for t in recording:
            verdict = {True: "yes", False: "**no**", None: "—"}[t.met]
            lines.append(f"| {t.name} | {t.measured} | {verdict} |")
    problems = [r for r in rows if r.get("error") or r.get("recordings_stopped")
                or r.get("errors") or r.get("ready_errors")
                or r.get("burst_errors") or r.get("daemon_log_errors")
                or r.get("relays_closed")
                or r.get("proxy_exited") is not None]
    if problems:
        lines += ["", "Runs with errors:", ""]
        for r in problems:
            lines.append(f"- round {r['round']} {r['scenario']} {r['proxy']}: {describe(r)}")
    return "\n".join(lines) + "\n"


def describe(row: Row) -> str:
    parts = []
    if row.get("error"):
        parts.append(str(row["error"]))
    for key in ("errors", "ready_errors", "burst_errors"):
        if row.get(key):
            kinds = row.get(key.replace("errors", "error_kinds")) or row.get("first_error")
            parts.append(f"{key}={row[key]}" + (f" {kinds}" if kinds else ""))
    if row.get("relays_closed"):
        parts.append(f"relays_closed={row['relays_closed']} {row.get('close_kinds') or ''}")
    if row.get("recordings_stopped"):
        parts.append(f"a recording stopped early: {row['recordings_stopped']}")
    if row.get("proxy_exited") is not None:
        parts.append(f"proxy exited with {row['proxy_exited']} during the run")
    if row.get("daemon_log_errors"):
        parts.append(f"daemon log: {row['daemon_log_errors']} error(s), first: "
                     f"{row.get('daemon_log_first_error', '')!r}")
    return "; ".join(parts)
