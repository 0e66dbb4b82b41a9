"""The benchmark command (``bench/run.py``) runs end to end in its quickest mode.

It builds its own load client (``npm ci`` from bench/package-lock.json) and C target (gcc),
starts its own PostgreSQL cluster and a real ``twistd -n novnc``, and must produce a report
whose figures and targets parse.  socat and websockify are left out to keep it short; the
full command runs all three.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from required_tools import require

#: The same variable tests/conftest.py reads for an external PostgreSQL.
TEST_DSN_ENV = "TWISTED_NOVNC_TEST_DSN"

pytestmark = [pytest.mark.bench, pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"
TOOLS = ("node", "npm", "gcc")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
LIMIT = 180  # seconds; it takes about 15 here, most of it npm ci and starting PostgreSQL


def quick_bench(tmp_path: Path, scenarios: str, *extra: str, dsn: bool = True,
                limit: int = LIMIT) -> tuple[dict, str]:
    """``bench/run.py --quick --rounds 1`` on twisted_novnc alone: the summary and the
    report, once it has exited 0 (on the suite's own database when one is named and ``dsn``)."""
    summary, report = tmp_path / "summary.json", tmp_path / "report.md"
    command = [sys.executable, str(RUN), "--quick", "--rounds", "1", "--proxies",
               "twisted_novnc", "--scenarios", scenarios, *extra,
               "--out", str(tmp_path), "--json", str(summary), "--md", str(report)]
    if dsn and os.environ.get(TEST_DSN_ENV):
        command += ["--dsn", os.environ[TEST_DSN_ENV]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (json.loads(summary.read_text(encoding="utf-8")),
            report.read_text(encoding="utf-8"))


def test_quick_bench_measures_twisted_novnc(tmp_path: Path) -> None:
    """echo, ready, upgrade, conc, and down beside down-vnc (the VM login on), with down, echo
    and conc again recording (issue 14) against the real daemon: no failed run, every
    recording whole, and the report parses."""
    require([f"{tool} (Debian: apt-get install nodejs npm gcc)" for tool in MISSING], "the bench")
    data, text = quick_bench(
        tmp_path, "down,down-vnc,down-rec,echo,echo-rec,conc,conc-rec,ready,upgrade")
    runs = data["runs"]
    scenarios = ["conc", "conc-rec", "down", "down-rec", "down-vnc", "echo", "echo-rec",
                 "ready", "upgrade"]
    assert sorted((r["scenario"], r["proxy"]) for r in runs) == [
        (s, "twisted_novnc") for s in scenarios]
    assert [r.get("error") for r in runs] == [None] * len(scenarios)
    down, down_vnc = (next(r for r in runs if r["scenario"] == s) for s in ("down", "down-vnc"))
    for run in (down, down_vnc):
        assert run["received"] >= data["sizes"]["down"] and run["mib_s"] > 0
    # The proxy's greeting (18 bytes) was the browser's part, not counted as relayed data.
    assert down_vnc["greeting_bytes"] == 18
    assert down_vnc["received"] == data["sizes"]["down"]
    vnc = {t["name"]: t for t in data["vnc_targets"]}
    assert isinstance(vnc["down-vnc ≥ 0.95 x down (same build)"]["met"], bool)
    assert data["vnc_ratios"]["twisted_novnc"] > 0
    # Recording on: every relay recorded, whole (none stopped early), the browser's side too.
    recorded = {r["scenario"]: r for r in runs if r["scenario"].endswith("-rec")}
    assert recorded["down-rec"]["recordings"] == 1
    assert recorded["down-rec"]["recorded_bytes"] >= data["sizes"]["down"]
    assert recorded["echo-rec"]["recordings"] == 1
    assert recorded["echo-rec"]["recorded_bytes"] >= 2 * 64 * data["sizes"]["echo"]
    assert recorded["conc-rec"]["recordings"] == data["sizes"]["conc"]
    assert not any(r.get("recordings_stopped") for r in recorded.values())
    record_targets = {t["name"]: t for t in data["record_targets"]}
    assert isinstance(record_targets["down-rec ≥ 0.8 x down (same build)"]["met"], bool)
    assert isinstance(record_targets["echo-rec p99 ≤ 1.2 x echo p99 (same build)"]["met"], bool)
    assert "KB" in record_targets[
        "memory per recorded relay (conc-rec minus conc PSS per connection; reported)"][
        "measured"]
    echo = next(r for r in runs if r["scenario"] == "echo")
    assert echo["bufferutil"] is True  # the client masks natively: it is not the bottleneck
    assert 0 < data["medians"]["echo"]["p50_us"]["twisted_novnc"] <= echo["p99_us"]
    ready = next(r for r in runs if r["scenario"] == "ready")
    n = data["sizes"]["ready"]
    assert (ready["ready_ok"], ready["burst_ok"]) == (n, n)
    assert (ready["ready_early"], ready["burst_early"]) == (0, 0)  # no 101 before its COMMIT
    assert 0 < ready["ready_p50_ms"] <= ready["ready_p99_ms"] <= ready["ready_max_ms"]
    assert ready["burst_last_ms"] > 0
    # The burst's CPU (clock ticks: 0 is possible at --quick's size) and the machine's share.
    assert ready["burst_daemon_cpu_ms"] >= 0 and 0 < ready["burst_machine_busy"] <= 1
    upgrade = next(r for r in runs if r["scenario"] == "upgrade")
    relays = data["sizes"]["upgrade"]["relays"]
    assert upgrade["upgrade_moved"] == relays  # every relay left the old generation
    assert (upgrade["relays_closed"], upgrade["lost"], upgrade["duplicated"],
            upgrade["reordered"]) == (0, 0, 0, 0)
    assert 0 <= upgrade["pause_p50_ms"] <= upgrade["pause_p99_ms"] <= upgrade["pause_max_ms"]
    assert upgrade["upgrade_seconds"] > 0
    assert {t["name"] for t in data["upgrade_targets"]} >= {
        "workers = 1: pause p99 ≤ 1000 ms"}
    targets = {t["name"]: t for t in data["targets"]}
    assert isinstance(targets["ready p50 ≤ 2 ms (COMMIT → 101)"]["met"], bool)
    assert targets["down ≥ 1.0 x socat"]["met"] is None  # not measured in this run

    assert "the daemon's CPU from the COMMIT to the last 101" in text
    assert "| down-vnc ≥ 0.95 x down (same build) |" in text
    assert "| down-rec ≥ 0.8 x down (same build) |" in text
    header = next(line for line in text.splitlines() if line.startswith("| scenario |"))
    assert header.split("|")[3].strip() == "twisted_novnc"
    row = next(line for line in text.splitlines() if line.startswith("| echo | p50"))
    assert re.fullmatch(r"\d+(\.\d+)?", row.split("|")[3].strip())


def test_quick_scale_and_soak(tmp_path: Path) -> None:
    """scale (issue 18, point 4: daemons on one database, COMMIT→101, the NOTIFYs each one
    discards) and soak (point 6: a run of short relays through a database restart, every
    connection accounted for) at their quick sizes: no failed run, and the figures parse.

    Both run on the bench's own cluster (its CPU is measured, and the soak restarts it), so
    no --dsn.  The soak's restarts come every 1.5 s: its 2,000 connections take a few."""
    require([f"{tool} (Debian: apt-get install nodejs npm gcc)" for tool in MISSING], "the bench")
    # Scale runs each K and rate twice: on the one shared channel, then on 1,024 shards.
    data, text = quick_bench(tmp_path, "scale,soak", "--soak-db-restart", "1.5",
                             "--soak-malloc-trim", dsn=False, limit=2 * LIMIT)
    runs = {r["scenario"]: r for r in data["runs"]}
    scale, soak = runs["scale"], runs["soak"]
    phases = [p for p in scale["scale"] if "rate" in p]
    assert [(p["shards"], p["k"], p["rate"]) for p in phases] == [
        (shards, k, rate) for shards in (0, 1024) for k in (1, 2) for rate in (200, 500)]
    for p in phases:
        assert (p["ok"], p["early"], p["all_held_before_commit"]) == (p["n"], 0, True)
        assert 0 < p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        # Every daemon reads the sessions it holds and discards the others' NOTIFYs; the
        # observer, holding none, gets every one.  With shards a daemon gets only its shards'
        # (those of the others' sessions that share them), and the observer none.
        held = p["n"] // p["k"]
        if p["shards"]:
            assert [d["needed"] for d in p["daemons"]] == [held] * p["k"]
            assert all(d["discarded"] < p["n"] - held for d in p["daemons"] if p["k"] > 1)
            assert all(1 <= d["channels"] <= p["shards"] for d in p["daemons"])
            assert p["observer_notifications"] == 0
        else:
            assert [(d["needed"], d["discarded"]) for d in p["daemons"]] == [
                (held, p["n"] - held)] * p["k"]
            assert p["observer_notifications"] == p["n"]
        assert p["db_connections"] > 0 and p["db_cpu_us_per_commit"] >= 0

    n = soak["soak_n"]
    # Class by class: a VM's reset is a cut (4502) there too, never a clean close.
    assert soak["soak_daemon"] == soak["soak_client"]
    client = soak["soak_client"]
    # A served session may be refused (4503) if the database stays down past the deadline.
    assert (client["served"] + client["refused"], client["cut"], client["other"]) == (
        n * 9 // 10, n // 10, 0)
    assert client["refused"] >= n // 10
    assert soak["soak_restarts_ok"] >= 1
    assert (soak["soak_waiting_end"], soak["soak_watched_end"]) == (0, 0)
    assert soak["soak_delayed_calls_end"] <= soak["idle_delayed_calls"]
    assert isinstance(soak["soak_rss_change_pct"], float)
    # --soak-malloc-trim: the daemon's heap at both idle samples, and its RSS once trimmed.
    for sample in (soak["soak_first"], soak["soak_samples"][-1]):
        heap = sample["malloc"]
        assert 0 < heap["heap_used_kb"] <= heap["heap_kb"] and heap["pymalloc_arenas"] > 0
        assert heap["rss_trimmed_kb"] > 0 and heap["rss_kb"] > 0
    assert isinstance(soak["soak_rss_trimmed_change_pct"], float)

    assert "| K = 8, 1,000 commits/s: COMMIT→101 p99 ≤ 10 ms | 0 | not measured | — |" in text
    assert "| no 101 before its COMMIT | all | 0 | yes |" in text
    assert "| waiters / watched relays / open connections at the end |" in text
    assert "| RSS after malloc_trim(0), idle after 1,000 → idle at the end |" in text


def test_lookup_from_memory_measures_setup_without_the_round_trip(tmp_path: Path) -> None:
    """The experiment behind issue 18's point 1 (bench/RESULTS.md, history 27): setup with
    every lookup after the first answered from memory runs, says so in the daemon's log and
    the report, and is refused with any other scenario (its rows would open sessions not
    committed yet)."""
    require([f"{tool} (Debian: apt-get install nodejs npm gcc)" for tool in MISSING], "the bench")
    refused = subprocess.run(
        [sys.executable, str(RUN), "--lookup-from-memory", "--scenarios", "setup,ready"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL,
        check=False)
    assert refused.returncode == 2
    assert "--lookup-from-memory: only with --scenarios setup" in refused.stderr
    data, text = quick_bench(tmp_path, "setup", "--lookup-from-memory")
    [run] = data["runs"]
    assert run["scenario"] == "setup" and run.get("error") is None and run["conn_per_s"] > 0
    [log] = tmp_path.glob("run-*/r1-setup-twisted_novnc-proxy.log")
    assert "lookups after the first are answered from memory" in log.read_text()
    assert "**Experiment, not the product:**" in text
