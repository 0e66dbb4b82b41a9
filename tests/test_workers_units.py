"""The supervisor of [novnc] workers and both ends of its pipes, without real processes:
spawning, restarts with backoff, stopping (drain, then SIGKILL), questions, log events."""

from __future__ import annotations

import gc
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure

from twisted_novnc.config import parse_config, settings_text
from twisted_novnc.operations.admin import WorkersMetrics, WorkersReadyz
from twisted_novnc.operations.logs import event_as_json, event_as_text
from twisted_novnc.operations.metrics import Metrics
from twisted_novnc.processes.ipc import (
    ANSWER,
    ASK,
    INIT,
    LOG,
    MESSAGES_FD,
    STOP,
    STOP_NOW,
    FrameError,
    Frames,
    WorkerInit,
    frame,
    read_frame,
)
from twisted_novnc.processes.launcher import Launcher, worker_count
from twisted_novnc.processes.service import (
    ListenerService,
    WorkerHandles,
    make_service,
    make_worker_service,
)
from twisted_novnc.processes.sharedports import ListeningReactor, SharedSocket
from twisted_novnc.processes.supervisor import (
    ANSWER_TIMEOUT,
    KILL_GRACE,
    STABLE_AFTER,
    SequentialMultiService,
    Supervisor,
    WorkerProcess,
    describe_end,
    restart_backoff,
)
from twisted_novnc.processes.worker import ControlInput, ParentChannel
from twisted_novnc.testing import every_service

# -- fakes -----------------------------------------------------------------------------------------


class FakeProcess:
    """A worker process's transport as the supervisor sees it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[tuple[int, bytes]] = []
        self.signals: list[str] = []
        self.pipe_gone = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        if self.pipe_gone:
            raise KeyError(fd)
        self.written.append((fd, data))

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def frames(self) -> list[tuple[bytes, bytes]]:
        return Frames().feed(b"".join(data for fd, data in self.written if fd == 0))


class Spawner:
    """Starts fake workers; ``fail`` makes the next spawns raise as a failed fork would."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, FakeProcess]] = []
        self.next_pid = 100
        self.fail = 0

    def __call__(self, process: Any) -> FakeProcess:
        if self.fail:
            self.fail -= 1
            raise OSError("Resource temporarily unavailable")
        transport = FakeProcess(self.next_pid)
        self.next_pid += 1
        process.init = b'{"settings": "..."}'
        process.makeConnection(transport)
        self.started.append((process, transport))
        return transport

    def running(self) -> dict[int, tuple[Any, FakeProcess]]:
        """The latest process of each index that has not ended."""
        latest = {}
        for process, transport in self.started:
            if not process.ended:
                latest[process.index] = (process, transport)
        return latest


def killed(signal_number: int = 9) -> Failure:
    return Failure(ProcessTerminated(exitCode=None, signal=signal_number))


def exited(status: int = 0) -> Failure:
    return Failure(ProcessDone(0) if status == 0 else ProcessTerminated(exitCode=status))


def supervisor(
    count: int = 2, backoff: Any = None, drain: float = 10.0
) -> tuple[Supervisor, Spawner, Clock, list[dict[str, Any]]]:
    spawner, clock, published = Spawner(), Clock(), []
    kwargs: dict[str, Any] = {"publisher": published.append}
    if backoff is not None:
        kwargs["backoff"] = backoff
    sup = Supervisor(count, spawner, clock, drain, **kwargs)
    return sup, spawner, clock, published


def steps(*delays: float) -> Any:
    """A backoff factory giving ``delays`` (then the last one for ever)."""

    def backoff() -> Iterator[float]:
        yield from delays
        while True:
            yield delays[-1]

    return backoff


# -- frames and the first message ------------------------------------------------------------------


def test_frames_survive_any_split():
    """Frames cut anywhere (one byte at a time) come out whole and in order."""
    data = frame(LOG, b"one") + frame(ANSWER, b"") + frame(ASK, b"x" * 70000)
    frames, out = Frames(), []
    for i in range(len(data)):
        out += frames.feed(data[i:i + 1])
    assert out == [(LOG, b"one"), (ANSWER, b""), (ASK, b"x" * 70000)]


def test_oversized_frame_is_an_error():
    """A length beyond any real message means the stream is garbage."""
    with pytest.raises(FrameError):
        Frames().feed(b"\xff\xff\xff\xffL")


def test_read_frame_takes_exactly_one_frame():
    """The worker's blocking read of its settings leaves whatever follows in the pipe."""
    r, w = os.pipe()
    try:
        os.write(w, frame(INIT, b"settings") + frame(ASK, b"later"))
        assert read_frame(r) == (INIT, b"settings")
        assert os.read(r, 100) == frame(ASK, b"later")
        os.close(w)
        w = -1
        with pytest.raises(EOFError):
            read_frame(r)
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_worker_init_round_trip():
    """A worker gets its index, the exact settings, the secret and its sockets."""
    init = WorkerInit(
        2, "[novnc]\nworkers = 2\n", "a.ini", b"\x00secret\xff",
        (SharedSocket("tcp:0", 4, socket.AF_INET), SharedSocket("unix:/s", 5, socket.AF_UNIX)),
    )
    assert WorkerInit.decode(init.encode()) == init


def test_auto_is_one_worker_per_usable_core():
    """workers = auto (None) is one per core this process may run on; a number is itself."""
    assert worker_count(None) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


# -- starting and restarting -----------------------------------------------------------------------


def test_starts_each_worker_with_its_settings_first(logged):
    """startService starts N workers; each is sent its settings before anything else."""
    sup, spawner, clock, _ = supervisor(3)
    sup.startService()
    assert [p.index for p, _ in spawner.started] == [1, 2, 3]
    for _, transport in spawner.started:
        assert transport.frames()[0] == (INIT, b'{"settings": "..."}')
    assert sup.alive() == 3 and sup.pids() == {1: 100, 2: 101, 3: 102}
    assert ("info", "worker 2 started (pid 101)") in logged


def test_dead_worker_is_restarted_and_logged(logged):
    """A worker killed by SIGKILL is logged with its index, pid and signal, then restarted."""
    sup, spawner, clock, _ = supervisor(2, backoff=steps(0.0, 1.0))
    sup.startService()
    clock.advance(3)
    process, _ = spawner.running()[2]
    process.processEnded(killed(9))
    assert sup.alive() == 1
    assert (
        "warn",
        "worker 2 (pid 101) was killed by signal 9 (SIGKILL) after 3.0s; restarting it in 0.0s",
    ) in logged
    clock.advance(0)
    assert spawner.running()[2][1].pid == 102
    assert sup.alive() == 2 and sup.restarts == 1
    assert ("info", "worker 2 started (pid 102)") in logged


def test_worker_that_ends_before_ready_leaves_no_unhandled_error(logged):
    """A serving worker that dies before it says it accepts is restarted; nobody waits on its
    ``ready``, so its failure must not surface as "Unhandled error in Deferred" when the
    process object is collected (it used to, at the end of a test run)."""
    sup, spawner, clock, _ = supervisor(1, backoff=steps(0.0))
    sup.startService()
    process, _ = spawner.running()[1]
    process.processEnded(exited(1))
    clock.advance(0)
    assert spawner.running()[1][1].pid == 101
    del process
    spawner.started.pop(0)
    gc.collect()
    assert not [text for level, text in logged if "Unhandled error" in text]
    assert ("warn", "worker 1 (pid 100) exited with status 1 after 0.0s; restarting it in 0.0s") \
        in logged


def test_exit_status_is_logged():
    """A worker that exits with a status is described by it."""
    assert describe_end(exited(3)) == "exited with status 3"
    assert describe_end(exited(0)) == "exited with status 0"
    assert describe_end(killed(15)) == "was killed by signal 15 (SIGTERM)"


def test_fast_deaths_back_off():
    """A worker that keeps dying young waits longer each time: no respawn before its delay."""
    sup, spawner, clock, _ = supervisor(1, backoff=steps(0.0, 1.0, 2.0, 4.0))
    sup.startService()
    for delay in (0.0, 1.0, 2.0, 4.0):
        process, _ = spawner.running()[1]
        process.processEnded(exited(1))
        before = len(spawner.started)
        if delay:
            clock.advance(delay - 0.01)
            assert len(spawner.started) == before
        clock.advance(0.01)
        assert len(spawner.started) == before + 1
    assert sup.restarts == 4


def test_long_lived_worker_restarts_at_once():
    """A worker that ran a while before it died is restarted without the accumulated delay."""
    sup, spawner, clock, _ = supervisor(1, backoff=steps(0.0, 5.0))
    sup.startService()
    spawner.running()[1][0].processEnded(exited(1))
    clock.advance(0)
    spawner.running()[1][0].processEnded(exited(1))  # died young: next delay is 5 s
    clock.advance(5)
    clock.advance(STABLE_AFTER)
    spawner.running()[1][0].processEnded(killed(9))  # lived long: backoff starts over
    before = len(spawner.started)
    clock.advance(0)
    assert len(spawner.started) == before + 1


def test_real_backoff_is_immediate_then_bounded():
    """The default: the first restart at once, then jittered delays of 0.5 s up to 30 s."""
    delays = [next(d) for d in [restart_backoff()] for _ in range(20)]
    assert delays[0] == 0.0
    assert all(0.5 <= delay <= 30.0 for delay in delays[1:])
    assert max(delays) > 4.0  # it grows: a crash loop costs at most a start every 30 s


def test_failed_spawn_is_retried(logged):
    """A spawn that raises (fork failed) is logged and retried after the backoff."""
    sup, spawner, clock, _ = supervisor(1, backoff=steps(0.0, 1.0))
    spawner.fail = 1
    sup.startService()
    assert sup.alive() == 0 and any("could not start worker 1" in t for _, t in logged)
    clock.advance(0)
    assert sup.alive() == 1


# -- stopping --------------------------------------------------------------------------------------


def test_stop_asks_workers_to_drain_and_waits(logged):
    """stopService sends STOP down each pipe (not a signal), restarts nothing, and fires once
    the last worker has exited."""
    sup, spawner, clock, _ = supervisor(2)
    sup.startService()
    d = sup.stopService()
    assert isinstance(d, Deferred) and not d.called
    for _, transport in spawner.started:
        assert transport.frames()[-1] == (STOP, b"") and transport.signals == []
    first, second = (spawner.running()[i][0] for i in (1, 2))
    first.processEnded(exited(0))
    clock.advance(60)
    assert len(spawner.started) == 2 and not d.called
    assert ("info", "worker 1 (pid 100) exited with status 0") in logged
    second.processEnded(exited(0))
    assert d.called and ("info", "all workers stopped") in logged
    assert clock.getDelayedCalls() == []


def test_stop_kills_what_is_left_after_the_drain(logged):
    """A worker still running drain_timeout + grace after STOP gets SIGKILL."""
    sup, spawner, clock, _ = supervisor(2, drain=5.0)
    sup.startService()
    d = sup.stopService()
    spawner.running()[1][0].processEnded(exited(0))
    clock.advance(5.0 + KILL_GRACE - 0.1)
    stuck, transport = spawner.running()[2]
    assert transport.signals == []
    clock.advance(0.1)
    assert transport.signals == ["KILL"]
    assert any("worker 2 (pid 101) is still running" in t for _, t in logged)
    stuck.processEnded(killed(9))
    assert d.called


def test_no_respawn_while_stopping():
    """A restart pending when the stop comes is cancelled."""
    sup, spawner, clock, _ = supervisor(2, backoff=steps(5.0))
    sup.startService()
    spawner.running()[1][0].processEnded(killed(9))
    d = sup.stopService()
    clock.advance(10)
    assert len(spawner.started) == 2
    spawner.running()[2][0].processEnded(exited(0))
    assert d.called


def test_stop_with_no_worker_running_is_immediate():
    """Nothing to wait for: stopService returns no Deferred."""
    sup, spawner, clock, _ = supervisor(1, backoff=steps(5.0))
    sup.startService()
    spawner.running()[1][0].processEnded(killed(9))
    assert sup.stopService() is None
    clock.advance(10)
    assert len(spawner.started) == 1


def test_second_sigterm_closes_everything_now():
    """stop_now (the second SIGTERM) sends STOP_NOW to every running worker."""
    sup, spawner, clock, _ = supervisor(2)
    sup.startService()
    sup.stopService()
    sup.stop_now()
    for _, transport in spawner.started:
        assert transport.frames()[-2:] == [(STOP, b""), (STOP_NOW, b"")]


def test_stop_falls_back_to_sigterm_without_a_pipe():
    """A worker whose pipe is already gone is sent SIGTERM instead."""
    sup, spawner, clock, _ = supervisor(1)
    sup.startService()
    transport = spawner.started[0][1]
    transport.pipe_gone = True
    sup.stopService()
    assert transport.signals == ["TERM"]


# -- questions -------------------------------------------------------------------------------------


def answer(process: Any, transport: FakeProcess, body: Any) -> None:
    """The worker answers the last question it was asked."""
    kind, payload = transport.frames()[-1]
    assert kind == ASK
    ident = json.loads(payload)["id"]
    process.childDataReceived(MESSAGES_FD, frame(ANSWER, json.dumps({"id": ident, "body": body})
                                                 .encode()))


def test_ask_all_gives_up_on_a_silent_worker():
    """A worker that does not answer in time counts as no answer; the others' answers stand."""
    sup, spawner, clock, _ = supervisor(3, backoff=steps(5.0))
    sup.startService()
    spawner.running()[3][0].processEnded(killed(9))
    d = sup.ask_all("status")
    (p1, t1), (p2, t2) = spawner.running()[1], spawner.running()[2]
    assert json.loads(t1.frames()[-1][1])["what"] == "status"
    answer(p1, t1, {"ready": True})
    assert not d.called
    clock.advance(ANSWER_TIMEOUT)
    assert d.result == {1: {"ready": True}, 2: None, 3: None}
    answer(p2, t2, {"ready": True})  # too late: ignored


def test_questions_pending_when_a_worker_dies_are_answered_none():
    """A worker ending with a question open does not leave the asker waiting."""
    sup, spawner, clock, _ = supervisor(1)
    sup.startService()
    d = sup.ask_all("metrics")
    spawner.running()[1][0].processEnded(killed(9))
    assert d.result == {1: None}


def test_garbage_from_a_worker_kills_it(logged):
    """A worker whose pipe carries no frames is broken: it is killed (and then restarted)."""
    sup, spawner, clock, _ = supervisor(1)
    sup.startService()
    process, transport = spawner.running()[1]
    process.childDataReceived(MESSAGES_FD, b"\xff" * 16)
    assert transport.signals == ["KILL"]


# -- log events ------------------------------------------------------------------------------------


def relay_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events logged in a worker, as the supervisor's log receives them."""
    sup, spawner, clock, published = supervisor(1)
    sup.startService()
    process, _ = spawner.running()[1]
    r, w = os.pipe()
    try:
        channel = ParentChannel(w)
        for event in events:
            channel.observe(event)
        os.close(w)
        w = -1
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
    process.childDataReceived(MESSAGES_FD, data)
    return published


def test_worker_events_reach_the_supervisor_log_marked():
    """A worker's event keeps its message, level, time and fields, and gains worker = index
    (a JSON field) and a "worker 1" system (twistd's text lines)."""
    log = Logger(namespace="twisted_novnc.front.protocol")
    events = []
    log.observer = events.append
    log.info("closed {session_id} from {client}: {outcome}", session_id="s1", client="10.0.0.9",
             outcome="1000", up_bytes=3)
    (event,) = relay_events(events)
    assert formatEvent(event) == "closed s1 from 10.0.0.9: 1000"
    assert event["worker"] == 1 and event["log_level"] == LogLevel.info
    assert event["log_time"] == events[0]["log_time"]
    text = event_as_text(event)
    assert "[worker 1: twisted_novnc.front.protocol#info] closed s1 from 10.0.0.9: 1000" in text
    record = json.loads(event_as_json(event))
    assert record["worker"] == 1 and record["session_id"] == "s1" and record["up_bytes"] == 3


def test_worker_failures_keep_their_traceback_and_message():
    """A failure logged in a worker arrives with its whole traceback, message included."""
    log = Logger(namespace="twisted_novnc.front.protocol")
    events = []
    log.observer = events.append
    try:
        raise ValueError("the reason it broke")
    except ValueError:
        log.failure("worker trouble")
    (event,) = relay_events(events)
    assert "ValueError: the reason it broke" in event_as_text(event)
    assert "the reason it broke" in json.loads(event_as_json(event))["traceback"]


# -- the worker's end of the pipe ------------------------------------------------------------------


class FakeDrain:
    def __init__(self) -> None:
        self.closed = 0

    def close_all(self) -> None:
        self.closed += 1


class StoppableReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


@pytest.fixture
def worker_end():
    """A worker's ControlInput on a fake reactor; its pipe to the supervisor read at ``r``."""
    reactor, drain = StoppableReactor(), FakeDrain()
    r, w = os.pipe()
    handles = WorkerHandles(Metrics(), drain)
    yield ControlInput(reactor, ParentChannel(w), handles), reactor, drain, r
    os.close(r)
    os.close(w)


def read_answer(fd: int) -> Any:
    kind, payload = read_frame(fd)
    assert kind == ANSWER
    return json.loads(payload)


def test_worker_stops_once_however_often_asked(worker_end):
    """STOP (or a signal, or the supervisor's pipe closing) stops the reactor exactly once."""
    ctl, reactor, drain, r = worker_end
    ctl.childDataReceived("control", frame(STOP))
    ctl.childDataReceived("control", frame(STOP))
    ctl.childConnectionLost("control", Failure(EOFError()))
    assert reactor.stops == 1 and drain.closed == 0


def test_worker_stop_now_closes_the_relays(worker_end):
    """STOP_NOW closes every relay at once (the drain's second-SIGTERM path)."""
    ctl, reactor, drain, r = worker_end
    ctl.childDataReceived("control", frame(STOP) + frame(STOP_NOW))
    assert reactor.stops == 1 and drain.closed == 1


def test_supervisor_gone_stops_the_worker(logged, worker_end):
    """The end of the supervisor's pipe (whatever killed it) stops the worker: no orphans."""
    ctl, reactor, drain, r = worker_end
    ctl.childConnectionLost("control", Failure(EOFError()))
    assert reactor.stops == 1
    assert any("the supervisor is gone" in text for _, text in logged)


def test_worker_answers_metrics_and_status(worker_end):
    """The worker answers with its Prometheus text and its readiness, under the question's id."""
    ctl, reactor, drain, r = worker_end
    ctl.childDataReceived("control", frame(ASK, b'{"id": 7, "what": "metrics"}'))
    metrics = read_answer(r)
    assert metrics["id"] == 7
    names = {f.name for f in text_string_to_metric_families(metrics["body"])}
    assert "twisted_novnc_connections_open" in names and "process_open_fds" in names
    ctl.childDataReceived("control", frame(ASK, b'{"id": 8, "what": "status"}'))
    assert read_answer(r) == {"id": 8, "body": {
        "ready": False, "database_reachable": False, "listen_connected": False,
        "reason": "database unreachable; not listening for session changes",
    }}


# -- the supervisor's admin answers ----------------------------------------------------------------


@attrs.define
class FakePool:
    answers: dict[int, Any]
    count: int = 2
    restarts: int = 1

    def alive(self) -> int:
        return sum(1 for a in self.answers.values() if a is not None)

    def pids(self) -> dict[int, int | None]:
        return {i: 100 + i if a is not None else None for i, a in self.answers.items()}

    def ask_all(self, what: str) -> Deferred[dict[int, Any]]:
        d: Deferred[dict[int, Any]] = Deferred()
        d.callback(dict(self.answers))
        return d


def worker_metrics_text(connections: int) -> str:
    from prometheus_client import generate_latest

    metrics = Metrics()
    metrics.connections.labels("1000").inc(connections)
    return generate_latest(metrics.registry).decode()


def samples(body: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_metrics_carry_a_worker_label():
    """/metrics merges every worker's families, each sample labelled with its worker, beside
    the supervisor's own; a worker that did not answer is marked unscraped."""
    pool = FakePool({1: worker_metrics_text(3), 2: worker_metrics_text(5), 3: None}, count=3)
    code, content_type, body = WorkersMetrics(pool).answer().result
    values = samples(body)
    assert code == 200 and content_type.startswith(b"text/plain")
    assert values["twisted_novnc_connections_total", (("outcome", "1000"), ("worker", "1"))] == 3
    assert values["twisted_novnc_connections_total", (("outcome", "1000"), ("worker", "2"))] == 5
    assert values["twisted_novnc_workers", ()] == 3
    assert values["twisted_novnc_workers_alive", ()] == 2
    assert values["twisted_novnc_worker_restarts_total", ()] == 1
    assert values["twisted_novnc_worker_info", (("pid", "101"), ("worker", "1"))] == 1
    assert values["twisted_novnc_worker_scraped", (("worker", "3"),)] == 0
    assert values["twisted_novnc_worker_scraped", (("worker", "2"),)] == 1


def test_readyz_needs_every_worker_ready():
    """/readyz is 200 only when every worker runs and is ready; else 503 naming who is not."""
    ready = {"ready": True, "database_reachable": True, "listen_connected": True}
    code, _, body = WorkersReadyz(FakePool({1: ready, 2: ready})).answer().result
    assert code == 200 and json.loads(body)["ready"] is True
    unready = {"ready": False, "reason": "database unreachable"}
    code, _, body = WorkersReadyz(FakePool({1: ready, 2: unready})).answer().result
    assert code == 503 and json.loads(body)["reason"] == "worker 2: database unreachable"
    code, _, body = WorkersReadyz(FakePool({1: None, 2: ready})).answer().result
    assert code == 503 and "worker 1 is not running" in json.loads(body)["reason"]


# -- the service trees -----------------------------------------------------------------------------


def config(text: str = "") -> Any:
    return parse_config(
        "[database]\ndsn = host=/nonexistent\n[admin]\nlisten = tcp:0:interface=127.0.0.1\n"
        + text
    )


def test_one_worker_is_one_process_as_before():
    """workers = 1 (the default) builds today's tree: no supervisor, the proxy in-process; what
    serves stops before the embedded database (a sequential tree, serving last)."""
    top = make_service(config(), MemoryReactorClock())
    names = {type(s).__name__ for s in every_service(top)}
    assert {"DrainService", "SessionDatabaseService", "Upgrader"} <= names
    assert not [s for s in every_service(top) if isinstance(s, Supervisor)]
    assert isinstance(top, SequentialMultiService)


def test_more_workers_make_a_supervisor():
    """workers = 2: the tree is the supervisor's (listeners made here, the proxy elsewhere)."""
    top = make_service(config("[novnc]\nworkers = 2\n"), MemoryReactorClock())
    (sup,) = [s for s in top if isinstance(s, Supervisor)]
    assert sup.count == 2
    names = {type(s).__name__ for s in top}
    assert "DrainService" not in names and "SessionDatabaseService" not in names
    listeners = [s for s in top if isinstance(s, ListenerService) and not s.role]
    assert len(listeners) == 1 and isinstance(listeners[0].endpoint._reactor, ListeningReactor)


def test_launcher_hands_over_sockets_and_exact_settings():
    """spawnProcess gets the worker command, the pipes and each socket at its own number,
    and the first message carries the settings (the embedded DSN filled in) and the secret."""
    calls = []

    class Reactor:
        def spawnProcess(self, process, executable, args, env, childFDs):
            calls.append((executable, args, childFDs))
            return "transport"

        def addReader(self, reader):
            channels.append(reader)

    channels = []

    settings = config("[novnc]\nworkers = 2\n")
    sockets = [SharedSocket("tcp:0", 11, socket.AF_INET), SharedSocket("unix:/s", 12, 1)]
    filled = attrs.evolve(settings, database=attrs.evolve(settings.database, dsn="host=/x"))
    launcher = Launcher(Reactor(), lambda: sockets, lambda: filled, b"key")
    process = WorkerProcess(Supervisor(2, launcher.spawn, Clock(), 10), 2)
    assert launcher.spawn(process) == "transport"
    ((executable, args, child_fds),) = calls
    assert args[1:] == ["-P", "-m", "twisted_novnc", "worker", "--index", "2"]
    handoff = child_fds.pop(6)  # the worker's end of its relay hand-off channel
    assert child_fds == {0: "w", 1: 1, 2: 2, 3: "r", 4: 11, 5: 12}
    assert isinstance(handoff, int)
    assert channels == [process.channel]
    process.channel._socket.close()
    init = WorkerInit.decode(process.init)
    assert init.index == 2 and init.secret == b"key" and init.handoff_fd == 6
    assert init.sockets == (SharedSocket("tcp:0", 4, socket.AF_INET), SharedSocket("unix:/s", 5, 1))
    assert parse_config(init.settings, init.source) == filled
    assert init.settings == settings_text(filled)


def test_worker_tree_adopts_the_sockets():
    """A worker's tree adopts each shared socket, with the proxy behind it and no admin."""
    reactor = MemoryReactorClock()
    sock = socket.socket()
    fd = os.dup(sock.fileno())
    sock.close()
    settings = config("[novnc]\nworkers = 2\n")
    top, handles = make_worker_service(
        settings, reactor, b"", [SharedSocket("tcp:0:interface=127.0.0.1", fd, socket.AF_INET)]
    )
    top.privilegedStartService()
    assert [port[:2] for port in reactor.adoptedPorts] == [(fd, socket.AF_INET)]
    assert reactor.tcpServers == []  # no admin listener in a worker
    assert isinstance(handles.metrics, Metrics)
    with pytest.raises(OSError):
        os.fstat(fd)  # the inherited descriptor was closed once adopted


def test_supervisor_tree_stops_in_order():
    """Children stop last-first, each after the one before has finished: the embedded database
    outlives the workers' drain."""
    from twisted.application.service import Service

    from twisted_novnc.processes.supervisor import SequentialMultiService

    order: list[str] = []
    draining: Deferred[None] = Deferred()

    class Named(Service):
        def __init__(self, label: str, result: Any = None) -> None:
            self.label, self.result = label, result

        def stopService(self) -> Any:
            order.append(self.label)
            return self.result

    top = SequentialMultiService()
    for service in (Named("database"), Named("workers", draining), Named("sockets")):
        service.setServiceParent(top)
    top.startService()
    stopped: list[object] = []
    top.stopService().addCallback(stopped.append)
    assert order == ["sockets", "workers"] and not stopped
    draining.callback(None)
    assert order == ["sockets", "workers", "database"] and stopped


def test_worker_ignores_an_unreadable_question(logged, worker_end):
    """A malformed question is logged and ignored; the worker neither stops nor answers."""
    ctl, reactor, drain, r = worker_end
    ctl.childDataReceived("control", frame(ASK, b"not json") + frame(ASK, b"[1]"))
    assert reactor.stops == 0
    assert [t for _, t in logged].count("an unreadable question from the supervisor: ignored") == 2
    ctl.childDataReceived("control", frame(ASK, b'{"id": 1, "what": "status"}'))
    assert read_answer(r)["id"] == 1
