"""Zero-downtime upgrades: a new generation of processes takes the live relays over.

An upgrade (SIGUSR2 to the main process, or ``POST /upgrade`` on the admin listener, which
``python -m twisted_novnc upgrade`` sends) goes in four steps, all driven by the main process
(:class:`Upgrader`):

1. the config file is read again; one that does not validate, or that changes what only a
   restart can change (the listening sockets, the database, the log), refuses the upgrade;
2. a new generation of workers starts (``python -m twisted_novnc worker``: the code installed
   now) on the same listening sockets, and each says when it accepts; one that does not
   refuses the upgrade, and the old generation never knew;
3. each process of the old generation stops accepting (the shared kernel socket's queue is the
   new generation's from then on) and hands every live relay that can move to the new
   generation (:class:`RelayMover`): its two sockets as descriptors and its state
   (:mod:`twisted_novnc.relay.handoff`), through the main process (:class:`Router`), which
   forwards each to a new worker (:class:`RelayAdopter`) and the answer back;
4. what could not move (browsers still waiting for readiness, TLS, relays in the middle of a
   frame past ``MOVE_RETRY_FOR``) stays where it is until it ends, or until ``[novnc]
   upgrade_drain_timeout`` closes it with 1001 (:class:`Retirement`); an old worker then exits.

With ``[novnc] workers = 1`` the main process relays itself: its first upgrade makes it the
supervisor of the new generation (:mod:`twisted_novnc.processes.supervisor`), and its own
relays are handed on as a worker's are.  The main process's own code is never replaced (it is
the one process a service manager knows): it supervises, it does not relay, once upgraded.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from twisted_novnc.config import ConfigError, Settings, read_config
from twisted_novnc.front.protocol import NoVNCServerFactory, NoVNCServerProtocol
from twisted_novnc.reactors import IDaemonReactor
from twisted_novnc.relay.handoff import (
    ADOPTED,
    DECLINED,
    RELAY,
    MovedRelay,
    answer,
    close_all,
    read_answer,
)

_log = Logger()

#: Relays handed on and not yet answered, at most: each relay's pause is from its hand-off to
#: its adoption, so it waits behind at most this many others, never behind the whole lot.
MOVE_WINDOW = 32
#: Relays a second the whole old generation hands on, at most (each of its processes its
#: share): moving one costs each process on its way some CPU, and at full speed the move
#: alone would take the host's CPU from the relays that stream meanwhile (bench/RESULTS.md).
MOVE_RATE = 500.0
#: Relays handed on at once when the pace allows, at most.
MOVE_BURST = 8.0
#: How long relays that cannot move yet (in the middle of a frame) are tried again.
MOVE_RETRY_FOR = 2.0
MOVE_RETRY_EVERY = 0.01
#: How long a new worker has to say it accepts before the upgrade is refused.
READY_TIMEOUT = 60.0

_IDENT = struct.Struct("!Q")


class UpgradeRefused(Exception):
    """The upgrade did not happen: the old generation serves everything, as before."""


# -- The old generation's side: hand relays on -----------------------------------------------

class Sender(Protocol):
    """Where a mover's relays go: ``send(payload, fds)``, False when that is impossible."""

    def __call__(self, payload: bytes, fds: list[int]) -> bool: ...


def relay_message(moved: MovedRelay) -> bytes:
    """A RELAY payload: the relay's ident (the router reads only that), then its state."""
    return _IDENT.pack(moved.ident) + moved.encode()


def relay_ident(payload: bytes) -> int:
    return int(_IDENT.unpack_from(payload)[0])


def relay_state(payload: bytes) -> MovedRelay:
    return MovedRelay.decode(payload[_IDENT.size:])


@attrs.define(eq=False)
class RelayMover:
    """Hands every live relay of one process on, at most ``MOVE_WINDOW`` unanswered at once.

    A relay in the middle of a frame is tried again every ``MOVE_RETRY_EVERY`` seconds for
    ``MOVE_RETRY_FOR``; one that cannot move at all (TLS) stays.  Each relay handed on keeps
    its two descriptors here until the receiver answers: ADOPTED closes them, DECLINED (or a
    lost channel) takes the relay up again here, where it goes on as before.
    ``result`` fires with ``(moved, kept)`` once every relay is decided.
    """

    factory: NoVNCServerFactory
    reactor: IDaemonReactor
    send: Sender
    #: Relays a second at most (0: as fast as the window allows).
    rate: float = MOVE_RATE
    result: Deferred[tuple[int, int]] = attrs.field(factory=Deferred, init=False)
    moved: int = attrs.field(default=0, init=False)
    kept: int = attrs.field(default=0, init=False)
    _candidates: list[NoVNCServerProtocol] = attrs.field(factory=list, init=False)
    _pending: dict[int, tuple[MovedRelay, list[int]]] = attrs.field(factory=dict, init=False)
    _next: int = attrs.field(default=0, init=False)
    #: Until when relays in the middle of a frame are tried again (set once none can move).
    _deadline: float | None = attrs.field(default=None, init=False)
    _tokens: float = attrs.field(default=1.0, init=False)
    _tokens_at: float = attrs.field(default=0.0, init=False)
    _call: IDelayedCall | None = attrs.field(default=None, init=False)
    _scanning: bool = attrs.field(default=False, init=False)
    _in_pass: bool = attrs.field(default=False, init=False)

    def start(self) -> Deferred[tuple[int, int]]:
        # The relays open now: a browser that was waiting and opens later stays here.
        self._candidates = list(self.factory.live)
        self._tokens_at = self.reactor.seconds()
        self._scanning = True
        self._pass()
        return self.result

    def _pass(self) -> None:
        self._call = None
        self._in_pass = True
        try:
            self._hand_some()
        finally:
            self._in_pass = False

    def _hand_some(self) -> None:
        now = self.reactor.seconds()
        if self.rate:
            self._tokens = min(MOVE_BURST, self._tokens + (now - self._tokens_at) * self.rate)
            self._tokens_at = now
        handed = 0
        waiting: list[NoVNCServerProtocol] = []
        candidates, self._candidates = self._candidates, []
        for index, protocol in enumerate(candidates):
            if len(self._pending) >= MOVE_WINDOW or (self.rate and self._tokens < 1):
                waiting.extend(candidates[index:])
                break
            if protocol not in self.factory.live:
                continue  # it ended meanwhile
            why = protocol.unmovable()
            if why is None:
                self._hand(protocol)
                handed += 1
                self._tokens -= 1
            elif "middle" in why:
                waiting.append(protocol)  # between two frames soon
            else:
                self.kept += 1  # TLS, or ending anyway
        self._candidates = waiting
        if handed:
            self._deadline = None
        if not waiting:
            self._scanning = False
            self._maybe_done()
        elif len(self._pending) >= MOVE_WINDOW:
            pass  # each answer makes room and goes on (answered)
        elif self.rate and self._tokens < 1:
            self._call = self.reactor.callLater((1 - self._tokens) / self.rate, self._pass)
        elif handed:
            self._call = self.reactor.callLater(0, self._pass)
        else:
            # Only relays in the middle of a frame are left: try them for a while.
            if self._deadline is None:
                self._deadline = now + MOVE_RETRY_FOR
            if now < self._deadline:
                self._call = self.reactor.callLater(MOVE_RETRY_EVERY, self._pass)
                return
            self.kept += len(waiting)
            _log.info("{n} relays stayed in the middle of a frame for {seconds:g}s: they stay"
                      " in this generation",
                      event="relays_mid_frame", n=len(waiting), seconds=MOVE_RETRY_FOR)
            self._candidates = []
            self._scanning = False
            self._maybe_done()

    def _room(self) -> None:
        """An answer made room in the window: go on handing relays (now, not a turn later:
        the answer's arrival is the moment to send the next)."""
        if (
            self._scanning and not self._in_pass and self._call is None
            and len(self._pending) < MOVE_WINDOW
        ):
            self._pass()

    def _hand(self, protocol: NoVNCServerProtocol) -> None:
        self._next += 1
        ident = (os.getpid() << 32) | self._next
        try:
            moved, fds = protocol.hand_off(ident)
        except OSError as e:  # no descriptor left to duplicate its sockets: it stays
            _log.warn("could not hand {session_id} on ({error}): it stays here",
                      event="relay_hand_off_failed",
                      session_id=protocol.session_id, error=e)
            self.kept += 1
            return
        self._pending[ident] = (moved, fds)
        if not self.send(relay_message(moved), fds):
            self._declined(ident, "the new generation is gone")

    def answered(self, kind: bytes, payload: bytes) -> None:
        """The receiver's answer about one relay (ADOPTED or DECLINED)."""
        try:
            ident, why = read_answer(payload)
        except (ValueError, KeyError, TypeError):
            _log.warn("an unreadable answer about a moved relay: ignored",
                      event="upgrade_bad_answer")
            return
        if kind == ADOPTED:
            entry = self._pending.pop(ident, None)
            if entry is not None:
                close_all(entry[1])
                self.moved += 1
                self._maybe_done()
        elif kind == DECLINED:
            self._declined(ident, why or "declined")
        self._room()

    def channel_lost(self) -> None:
        """The way to the new generation is gone: every relay not yet answered stays here."""
        for ident in list(self._pending):
            self._declined(ident, "the hand-off channel closed")

    def _declined(self, ident: int, why: str) -> None:
        entry = self._pending.pop(ident, None)
        if entry is None:
            return
        moved, fds = entry
        _log.warn("the new generation did not take {session_id} ({why}): it goes on here",
                  event="relay_not_taken",
                  session_id=moved.session_id, why=why)
        try:
            self.factory.adopt(moved, fds[0], fds[1], self.reactor)
        except Exception:
            _log.failure("could not take {session_id} up again",
                         event="relay_take_back_failed", session_id=moved.session_id)
        self.kept += 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not self._scanning and not self._pending and not self.result.called:
            self.result.callback((self.moved, self.kept))


@attrs.define(eq=False)
class Retirement:
    """An old generation's process from the upgrade on: it stops accepting, hands its relays
    on (:class:`RelayMover`), and lets what stays run until it ends or ``drain_timeout``
    passes (then 1001).  ``handed`` fires with ``(moved, kept)``; ``drained`` once the process
    holds no connection."""

    factory: NoVNCServerFactory
    reactor: IDaemonReactor
    stop_accepting: Callable[[], None]
    send: Sender
    drain_timeout: float
    close_all: Callable[[], None]
    #: This process's share of MOVE_RATE.
    rate: float = MOVE_RATE
    mover: RelayMover | None = attrs.field(default=None, init=False)
    drained: Deferred[None] = attrs.field(factory=Deferred, init=False)
    _timer: IDelayedCall | None = attrs.field(default=None, init=False)

    def start(self) -> Deferred[tuple[int, int]]:
        self.stop_accepting()
        self.mover = RelayMover(self.factory, self.reactor, self.send, self.rate)
        handed = self.mover.start()
        handed.addCallback(self._handed)
        return handed

    def _handed(self, counts: tuple[int, int]) -> tuple[int, int]:
        moved, kept = counts
        left = len(self.factory.connections)
        _log.info(
            "upgrade: {moved} relays moved to the new generation, {kept} stay here;"
            " {left} connections left to drain (for up to {timeout:g}s)",
            event="upgrade_relays_moved",
            moved=moved, kept=kept, left=left, timeout=self.drain_timeout,
        )
        if not self.factory.connections:
            self.drained.callback(None)
            return counts
        drained: Deferred[None] = Deferred()
        drained.addCallback(self._done)
        self.factory.drained = drained
        self._timer = self.reactor.callLater(self.drain_timeout, self._time_up)
        return counts

    def _time_up(self) -> None:
        self._timer = None
        _log.info("upgrade_drain_timeout: closing what is left of the old generation",
                  event="upgrade_drain_timeout")
        self.close_all()

    def _done(self, _: object) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        _log.info("the old generation's connections have all ended",
                  event="upgrade_old_generation_ended")
        if not self.drained.called:
            self.drained.callback(None)

    def answered(self, kind: bytes, payload: bytes) -> None:
        if self.mover is not None:
            self.mover.answered(kind, payload)

    def channel_lost(self) -> None:
        if self.mover is not None:
            self.mover.channel_lost()


# -- The new generation's side: take relays up -----------------------------------------------

@attrs.define(eq=False)
class RelayAdopter:
    """Takes up each relay that arrives and answers for it (ADOPTED, or DECLINED and why)."""

    factory: NoVNCServerFactory
    reactor: IDaemonReactor
    reply: Callable[[bytes, bytes], object]
    accepting: Callable[[], bool] = lambda: True

    def received(self, payload: bytes, fds: list[int]) -> None:
        try:
            ident = relay_ident(payload)
        except struct.error:
            close_all(fds)
            _log.warn("an unreadable relay hand-off: ignored", event="upgrade_bad_hand_off")
            return
        if not self.accepting():
            close_all(fds)
            self.reply(*answer(ident, "this process is stopping"))
            return
        factory = self.factory
        if len(factory.connections) >= factory.settings.max_connections:
            close_all(fds)
            self.reply(*answer(ident, "this process is at max_connections"))
            return
        try:
            moved = relay_state(payload)
        except (ValueError, KeyError, TypeError) as e:
            close_all(fds)
            self.reply(*answer(ident, f"unreadable state: {e}"))
            return
        try:
            self.factory.adopt(moved, fds[0], fds[1], self.reactor)
        except Exception as e:
            _log.failure("could not take over {session_id}",
                         event="relay_take_over_failed", session_id=moved.session_id)
            self.reply(*answer(ident, str(e) or type(e).__name__))
            return
        self.reply(*answer(ident))


# -- The main process: the router between generations ----------------------------------------

class RelaySource(Protocol):
    """Where a relay came from, to which its answer goes."""

    def answered(self, kind: bytes, payload: bytes) -> None: ...


class RelayTarget(Protocol):
    """A new-generation process that takes relays: ``send(kind, payload, fds)``."""

    def send(self, kind: bytes, payload: bytes, fds: Sequence[int] = ()) -> bool: ...


@attrs.define(eq=False)
class _Route:
    source: RelaySource
    target: RelayTarget
    #: The descriptors as this process received them (closed once answered), or none when
    #: the source is this process's own mover (whose they stay).
    fds: list[int]


@attrs.define(eq=False)
class Router:
    """Forwards relays from the old generation to the new one, round robin, and answers back."""

    targets: list[RelayTarget] = attrs.field(factory=list)
    _routes: dict[int, _Route] = attrs.field(factory=dict, init=False)
    _turn: int = attrs.field(default=0, init=False)

    def relay(self, source: RelaySource, payload: bytes, fds: list[int], owned: bool) -> bool:
        """Forward one relay; ``owned``: the descriptors are this process's to close."""
        try:
            ident = relay_ident(payload)
        except struct.error:
            if owned:
                close_all(fds)
            return False
        for _ in range(len(self.targets)):
            self._turn = (self._turn + 1) % len(self.targets)
            target = self.targets[self._turn]
            if target.send(RELAY, payload, fds):
                self._routes[ident] = _Route(source, target, fds if owned else [])
                return True
        if owned:
            close_all(fds)
        source.answered(*answer(ident, "no process of the new generation takes relays"))
        return True

    def answered(self, kind: bytes, payload: bytes) -> None:
        try:
            ident, _ = read_answer(payload)
        except (ValueError, KeyError, TypeError):
            return
        route = self._routes.pop(ident, None)
        if route is None:
            return
        close_all(route.fds)
        route.source.answered(kind, payload)

    def target_lost(self, target: RelayTarget) -> None:
        """A new-generation process is gone: its unanswered relays go back."""
        if target in self.targets:
            self.targets.remove(target)
        for ident, route in list(self._routes.items()):
            if route.target is target:
                del self._routes[ident]
                close_all(route.fds)
                route.source.answered(*answer(ident, "the new process ended"))


def restart_only_keys(old: Settings, new: Settings) -> list[str]:
    """The settings a running daemon cannot change without a restart that ``new`` changes:
    the listening sockets are made once and shared, the database and the log are the main
    process's own."""
    checks = {
        "[novnc] listen": (old.novnc.listen, new.novnc.listen),
        "[admin] listen": (old.admin.listen, new.admin.listen),
        "[database] dsn": (old.database.dsn, new.database.dsn),
        "[database] listen_dsn": (old.database.listen_dsn, new.database.listen_dsn),
        "[database] embedded_dir": (old.database.embedded_dir, new.database.embedded_dir),
        "[log]": (old.log, new.log),
    }
    return [name for name, (before, after) in checks.items() if before != after]


def reread_settings(
    source: str, overrides: Mapping[tuple[str, str], str], running: Settings,
    validate: Callable[[Settings], bytes],
) -> tuple[Settings, bytes]:
    """The config file as it reads now, with the command line's overrides, and the secret it
    names (``validate``); UpgradeRefused when it does not validate or changes what needs a
    restart."""
    try:
        settings = read_config(source, overrides)
        secret = validate(settings)
    except ConfigError as e:
        raise UpgradeRefused(f"the configuration does not validate: {e}") from None
    changed = restart_only_keys(running, settings)
    if changed:
        raise UpgradeRefused(
            f"{', '.join(changed)} changed: only a restart applies that"
        )
    return settings, secret


def upgrade_report(
    generation: int, workers: Sequence[Mapping[str, Any]], moved: int, kept: int,
    seconds: float,
) -> dict[str, Any]:
    """What a completed upgrade reports (the log line, and POST /upgrade's answer)."""
    return {
        "upgraded": True,
        "generation": generation,
        "workers": list(workers),
        "moved": moved,
        "kept": kept,
        "seconds": round(seconds, 3),
    }
