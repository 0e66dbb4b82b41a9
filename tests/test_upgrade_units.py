"""An upgrade's parts without real processes: the supervisor's generations, the router, the
relay record and its channel, the frame parser's position, the command's address, the
config reread."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from test_workers_units import Spawner, exited, supervisor
from twisted.internet import defer, reactor

from twisted_novnc.config import parse_config
from twisted_novnc.front.fastpath import BrowserFrames, FramePosition
from twisted_novnc.operations.upgrade_command import NoAdminEndpoint, admin_address
from twisted_novnc.processes.ipc import HANDED, READY, STOP_NOW, UPGRADE, frame
from twisted_novnc.processes.supervisor import NotReadyInTime, WorkerEnded
from twisted_novnc.processes.upgrade import (
    Router,
    UpgradeRefused,
    relay_ident,
    relay_message,
    relay_state,
    reread_settings,
    restart_only_keys,
)
from twisted_novnc.relay.handoff import (
    ADOPTED,
    DECLINED,
    RELAY,
    HandoffChannel,
    MovedRelay,
    answer,
    open_channel,
    read_answer,
)

# -- the supervisor's generations ------------------------------------------------------------


def result_of(d: defer.Deferred[Any]) -> Any:
    """What a Deferred has already fired with (a Failure included)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def say_ready(process: Any, version: str = "9.9") -> None:
    process.childDataReceived(3, frame(READY, json.dumps({"version": version}).encode()))


def test_new_generation_serves_once_every_worker_is_ready():
    """The old generation keeps its slots until every new worker is ready; then the new ones
    take them and the old ones are retired: asked about, never restarted."""
    sup, spawner, clock, _ = supervisor(2)
    sup.startService()
    old = [process for process, _ in spawner.started]
    new_spawner = Spawner()
    new_spawner.next_pid = 500
    ready = sup.start_generation(new_spawner, 2, 60)
    new = [process for process, _ in new_spawner.started]
    assert [p.index for p in new] == [3, 4] and {p.generation for p in new} == {2}
    say_ready(new[0])
    assert not ready.called and [s.process for s in sup.slots] == old
    say_ready(new[1])
    assert result_of(ready) == new
    assert sup.serve(new_spawner, new) == old
    assert [s.process for s in sup.slots] == new and sup.retired == old
    assert sup.pids() == {3: 500, 4: 501, 1: 100, 2: 101}
    old[0].processEnded(exited(0))  # a retired worker that drained: not restarted
    clock.advance(60)
    assert sup.retired == [old[1]] and len(spawner.started) == 2
    new[0].processEnded(exited(1))  # a serving worker that dies: restarted with the new spawn
    clock.advance(1)
    assert len(new_spawner.started) == 3 and new_spawner.started[2][0].generation == 2


def test_generation_that_does_not_start_is_stopped_and_old_one_untouched():
    """A new worker that ends before it is ready fails the generation; the others started
    with it are told to stop at once; the old generation still serves."""
    sup, spawner, clock, _ = supervisor(1)
    sup.startService()
    old = sup.slots[0].process
    new_spawner = Spawner()
    ready = sup.start_generation(new_spawner, 2, 60)
    first, second = (process for process, _ in new_spawner.started)
    say_ready(first)
    second.processEnded(exited(1))
    failure = result_of(ready)
    assert failure.check(WorkerEnded)
    assert "exited with status 1" in str(failure.value)
    assert (STOP_NOW, b"") in new_spawner.started[0][1].frames()
    assert sup.slots[0].process is old and sup.retired == []


def test_generation_that_never_says_ready_times_out():
    """A new generation has a deadline to say it accepts."""
    sup, _, clock, _ = supervisor(1)
    sup.startService()
    ready = sup.start_generation(Spawner(), 1, 60)
    clock.advance(61)
    failure = result_of(ready)
    assert failure.check(NotReadyInTime)


def test_upgrade_message_and_handed_answer():
    """An old worker is sent UPGRADE with the drain timeout; its HANDED counts fire the
    Deferred; one that ends first fires it empty."""
    sup, spawner, _, _ = supervisor(2)
    sup.startService()
    (one, one_transport), (two, _) = spawner.started
    handed = one.upgrade(3600, 250.0)
    assert (UPGRADE, b'{"drain_timeout": 3600, "move_rate": 250.0}') in one_transport.frames()
    one.childDataReceived(3, frame(HANDED, b'{"moved": 5, "kept": 1}'))
    assert result_of(handed) == {"moved": 5, "kept": 1}
    gone = two.upgrade(1, 1.0)
    two.processEnded(exited(0))
    assert result_of(gone) == {}


# -- the router ---------------------------------------------------------------------------------


class Target:
    def __init__(self, accepts: bool = True) -> None:
        self.accepts = accepts
        self.sent: list[tuple[bytes, bytes, list[int]]] = []

    def send(self, kind: bytes, payload: bytes, fds: Any = ()) -> bool:
        if self.accepts:
            self.sent.append((kind, payload, list(fds)))
        return self.accepts


class Source:
    def __init__(self) -> None:
        self.answers: list[tuple[bytes, tuple[int, str | None]]] = []

    def answered(self, kind: bytes, payload: bytes) -> None:
        self.answers.append((kind, read_answer(payload)))


def moved(ident: int = 7) -> MovedRelay:
    return MovedRelay(
        ident, "sid", "10.0.0.5", 5900, None, "192.0.2.1", "tcp", "binary", True, 1, 2, 3,
        0.5, 9.5,
    )


def pipe_fds() -> list[int]:
    r, w = os.pipe()
    return [r, w]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_router_forwards_round_robin_and_answers_back():
    """Each relay goes to the next new process that takes it; its answer goes back to its
    source, and the descriptors the router received are closed then (not a local mover's)."""
    a, b, source = Target(), Target(accepts=False), Source()
    c = Target()
    router = Router([a, b, c])
    received = pipe_fds()
    router.relay(source, relay_message(moved(1)), received, owned=True)
    router.relay(source, relay_message(moved(2)), [], owned=False)
    assert [relay_ident(p) for _, p, _ in c.sent + a.sent] == [1, 2]
    assert all(is_open(fd) for fd in received)
    router.answered(*answer(1))
    assert not any(is_open(fd) for fd in received)
    router.answered(*answer(2, "full"))
    assert source.answers == [(ADOPTED, (1, None)), (DECLINED, (2, "full"))]


def test_router_sends_relays_back_when_their_target_ends():
    """A new process that ends with relays unanswered: each goes back to its source."""
    target, source = Target(), Source()
    router = Router([target])
    router.relay(source, relay_message(moved(3)), [], owned=False)
    router.target_lost(target)
    assert source.answers == [(DECLINED, (3, "the new process ended"))]
    router.relay(source, relay_message(moved(4)), [], owned=False)
    assert source.answers[-1] == (
        DECLINED, (4, "no process of the new generation takes relays")
    )


# -- the relay record and its channel ---------------------------------------------------------

blobs = st.binary(max_size=64)


@given(
    unread=blobs, unsent=blobs, vm_unsent=blobs, vm_unread=blobs, held=blobs,
    left=st.integers(0, 2**40), mask=st.binary(min_size=4, max_size=4),
    expires=st.none() | st.floats(0, 2e9), sub=st.none() | st.just("binary"),
)
def test_moved_relay_survives_the_wire(unread, unsent, vm_unsent, vm_unread, held, left, mask,
                                       expires, sub):
    """A relay's record, bytes and all, reads back as it was written."""
    record = MovedRelay(
        2**40 + 5, "sid", "fe80::1", 5901, expires, "198.51.100.7", "websocket", sub, False,
        10**12, 3, 4, 0.25, 100.0, unread, FramePosition(left, mask, True, True, 77, held),
        unsent, vm_unsent, vm_unread, False,
    )
    assert relay_state(relay_message(record)) == record
    assert relay_ident(relay_message(record)) == 2**40 + 5


@pytest_twisted.inlineCallbacks
def test_channel_carries_descriptors_with_their_message():
    """Over a real socket pair, each message arrives with the descriptors sent with it, in
    order, however the bytes are cut."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: list[tuple[bytes, bytes, list[int]]] = []
    arrived: defer.Deferred[None] = defer.Deferred()

    def received(kind: bytes, payload: bytes, fds: list[int]) -> None:
        got.append((kind, payload, fds))
        if len(got) == 3:
            arrived.callback(None)

    sender = open_channel(reactor, ours.detach(), HandoffChannel(lambda *a: None))
    receiver = open_channel(reactor, theirs.detach(), HandoffChannel(received))
    first, second = pipe_fds(), pipe_fds()
    sender.send(RELAY, b"a" * 200_000, first)
    sender.send(ADOPTED, b"{}")
    sender.send(RELAY, b"b", second)
    yield arrived
    assert [(k, len(p), len(f)) for k, p, f in got] == [
        (RELAY, 200_000, 2), (ADOPTED, 2, 0), (RELAY, 1, 2)
    ]
    os.write(got[0][2][1], b"x")  # the received write end is the sent one's pipe
    assert os.read(first[0], 1) == b"x"
    for fd in first + second + got[0][2] + got[2][2]:
        os.close(fd)
    sender.close()
    receiver.close()


# -- the browser's frame parser, stopped in one process and resumed in another -----------------

def masked_frame(payload: bytes, mask: bytes, fin: bool = True, opcode: int = 2) -> bytes:
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    short = n < 126
    head = bytes((first, 0x80 | (n if short else 126))) + (b"" if short else n.to_bytes(2, "big"))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class Events:
    def __init__(self) -> None:
        self.inside = False

    def message_begun(self) -> None:
        self.inside = True

    def frame_ended(self, fin: bool) -> bool:
        if fin:
            self.inside = False
        return True

    def message_too_big(self, size: int, limit: int) -> None:
        raise AssertionError("too big")


@given(
    payloads=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4),
    masks=st.lists(st.binary(min_size=4, max_size=4), min_size=4, max_size=4),
    cut=st.integers(0, 2000),
)
def test_parser_resumed_elsewhere_goes_on_where_it_stopped(payloads, masks, cut):
    """A parser stopped at any byte (mid-header, mid-payload, mid-message) and a new one
    resumed from its position deliver together exactly what one parser would."""
    stream = b"".join(
        masked_frame(p, masks[i], fin=(i == len(payloads) - 1), opcode=2 if i == 0 else 0)
        for i, p in enumerate(payloads)
    )
    cut = min(cut, len(stream))
    whole = bytearray()
    BrowserFrames(whole.extend, Events(), 0).feed(stream, False)
    assert bytes(whole) == b"".join(payloads)

    out = bytearray()
    events = Events()
    before = BrowserFrames(out.extend, events, 0)
    assert before.feed(stream[:cut], False) is None
    position = before.position()
    after = BrowserFrames(out.extend, events, 0)
    after.resume(position)
    assert after.feed(stream[cut:], events.inside) is None
    assert bytes(out) == bytes(whole)


# -- the command's address, the config reread ------------------------------------------------

def test_admin_address_from_the_listen_setting():
    """The first tcp:, tcp6: or unix: admin endpoint, a wildcard interface reached on
    loopback; none is an error that says what to do instead."""
    assert admin_address(("tcp:9090",)) == ("tcp", ("127.0.0.1", 9090))
    assert admin_address(("tcp:port=9091:interface=10.0.0.1",)) == ("tcp", ("10.0.0.1", 9091))
    assert admin_address(("tcp6:9092:interface=\\:\\:",)) == ("tcp", ("::1", 9092))
    assert admin_address(("ssl:1:privateKey=k", "unix:/run/tn.sock")) == (
        "unix", "/run/tn.sock"
    )
    with pytest.raises(NoAdminEndpoint, match="SIGUSR2"):
        admin_address(())


def test_restart_only_keys_are_named():
    """Changing a listener, the database or the log needs a restart; the rest upgrades."""
    old = parse_config("[novnc]\nlisten = tcp:6080\n")
    same = parse_config("[novnc]\nlisten = tcp:6080\nworkers = 3\nidle_timeout = 60\n")
    moved_listener = parse_config("[novnc]\nlisten = tcp:6081\n[log]\nformat = json\n")
    assert restart_only_keys(old, same) == []
    assert restart_only_keys(old, moved_listener) == ["[novnc] listen", "[log]"]
    direct = parse_config("[novnc]\nlisten = tcp:6080\n[database]\nlisten_dsn = embedded\n")
    assert restart_only_keys(old, direct) == ["[database] listen_dsn"]


def test_reread_refuses_an_invalid_or_restart_only_config(tmp_path: Path):
    """The file as it reads now: invalid names the file and key; a restart-only change is
    refused with its name; the overrides of the command line still apply."""
    path = tmp_path / "tn.ini"
    running = parse_config("[novnc]\nlisten = tcp:6080\n")
    path.write_text("[novnc]\nlisten = tcp:6080\nmax_per_ip = many\n")
    with pytest.raises(UpgradeRefused, match=r"does not validate: .*tn\.ini.*max_per_ip"):
        reread_settings(str(path), {}, running, lambda s: b"")
    path.write_text("[novnc]\nlisten = tcp:7000\n")
    with pytest.raises(UpgradeRefused, match=r"\[novnc\] listen changed"):
        reread_settings(str(path), {}, running, lambda s: b"")
    settings, secret = reread_settings(
        str(path), {("novnc", "listen"): "tcp:6080"}, running, lambda s: b"key"
    )
    assert settings.novnc.listen == ("tcp:6080",) and secret == b"key"
