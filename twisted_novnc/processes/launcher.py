"""How the supervisor starts a worker: its command, its descriptors, its first message."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import cast

import attrs
from twisted.internet.interfaces import IProcessTransport, IReactorFDSet, IReactorProcess

from twisted_novnc.config import Settings, settings_text
from twisted_novnc.processes.ipc import CONTROL_FD, FIRST_SOCKET_FD, MESSAGES_FD, WorkerInit
from twisted_novnc.processes.sharedports import SharedSocket
from twisted_novnc.processes.supervisor import WorkerProcess
from twisted_novnc.processes.upgrade import Router
from twisted_novnc.relay.handoff import ADOPTED, DECLINED, RELAY, HandoffChannel, open_channel


def worker_count(workers: int | None) -> int:
    """``[novnc] workers`` as a number: ``auto`` (None) is one per core this process may use."""
    if workers is not None:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_command(index: int) -> list[str]:
    """The worker's command line; ``-P`` so that a ``twisted_novnc`` directory in the working
    directory can never shadow the installed package the supervisor runs."""
    return [sys.executable, "-P", "-m", "twisted_novnc", "worker", "--index", str(index)]


@attrs.define(eq=False)
class Launcher:
    """How a worker is started: its command, its inherited descriptors, its first message."""

    reactor: IReactorProcess
    #: The supervisor's listening sockets (its descriptors), once it listens.
    sockets: Callable[[], Sequence[SharedSocket]]
    #: The settings the workers run with (the embedded database's DSN filled in).
    settings: Callable[[], Settings]
    secret: bytes = b""
    #: Where relays handed on during an upgrade go (each worker's channel is wired to it).
    router: Router = attrs.field(factory=Router)

    def descriptors(self) -> tuple[dict[int, int | str], tuple[SharedSocket, ...]]:
        """``childFDs`` for spawnProcess, and the sockets as numbered in the worker."""
        child_fds: dict[int, int | str] = {CONTROL_FD: "w", 1: 1, 2: 2, MESSAGES_FD: "r"}
        inherited = []
        for i, shared in enumerate(self.sockets()):
            child_fd = FIRST_SOCKET_FD + i
            child_fds[child_fd] = shared.fd
            inherited.append(attrs.evolve(shared, fd=child_fd))
        return child_fds, tuple(inherited)

    def spawn(self, process: WorkerProcess) -> IProcessTransport:
        child_fds, inherited = self.descriptors()
        settings = self.settings()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff_fd = max(child_fds) + 1
        child_fds[handoff_fd] = theirs.fileno()
        process.init = WorkerInit(
            process.index, settings_text(settings), settings.source, self.secret, inherited,
            handoff_fd,
        ).encode()
        try:
            transport = self.reactor.spawnProcess(
                process, sys.executable, worker_command(process.index), env=dict(os.environ),
                childFDs=child_fds,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        process.channel = self._channel(ours.detach())
        return transport

    def _channel(self, fd: int) -> HandoffChannel:
        """The supervisor's end of a worker's hand-off channel: relays it hands on go to the
        router, its answers about relays it took back to their senders."""
        router = self.router
        channel: HandoffChannel

        def received(kind: bytes, payload: bytes, fds: list[int]) -> None:
            if kind == RELAY:
                router.relay(channel, payload, fds, owned=True)
            elif kind in (ADOPTED, DECLINED):
                router.answered(kind, payload)

        channel = HandoffChannel(received, lost=lambda: router.target_lost(channel))
        return open_channel(cast(IReactorFDSet, self.reactor), fd, channel)
