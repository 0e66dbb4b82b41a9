"""The processes behind the browser tests: Xvnc, the X client, and Chromium driven by Node.

Each is a Twisted ``ProcessProtocol`` whose output lines are events a test can wait on; every
wait is bounded by the caller (``within``), and ``stop`` ends the process (SIGTERM, then SIGKILL)
whatever state the test left it in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE / "page"
NODE_MODULES = HERE / "node_modules"
NOVNC_DIR = NODE_MODULES / "@novnc" / "novnc"
DRIVER = HERE / "driver.mjs"
XCLIENT = HERE / "xclient.py"

#: The bound on every single wait for an event (a page event, a log line, a process exit).
EVENT_LIMIT = 20.0
#: Chromium's first start on a cold machine is the slowest thing here.
BROWSER_START_LIMIT = 60.0
#: How long a process has to exit after SIGTERM before it gets SIGKILL.
STOP_LIMIT = 10.0

#: The framebuffer noVNC draws: small, so every update is cheap.
SCREEN = (320, 240)


def within(d: defer.Deferred, seconds: float = EVENT_LIMIT) -> defer.Deferred:
    """``d``, failed with ``TimeoutError`` (and cancelled) if it has not fired in time."""
    return d.addTimeout(seconds, reactor)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChildProcess(ProcessProtocol):
    """A subprocess whose output lines (on any fd) can be waited for."""

    name = "process"

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self._partial: dict[int, bytes] = {}
        self._watches: list[tuple[Callable[[int, str], bool], defer.Deferred[str]]] = []

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *complete, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append((fd, line))
            self.line_received(fd, line)
            for item in list(self._watches):
                if item[0](fd, line):
                    self._watches.remove(item)
                    item[1].callback(line)

    def line_received(self, fd: int, line: str) -> None:
        """Called for each complete line, before the watches."""

    def when_line(self, matches: Callable[[int, str], bool]) -> defer.Deferred[str]:
        """Fire with the first line (already seen or still to come) that ``matches``."""
        for fd, line in self.lines:
            if matches(fd, line):
                return defer.succeed(line)
        if self.ended.called:
            return defer.fail(RuntimeError(f"{self.name} has exited:\n{self.output}"))
        d: defer.Deferred[str] = defer.Deferred(lambda _: self._watches.remove(item))
        item = (matches, d)
        self._watches.append(item)
        return d

    def processEnded(self, reason: Failure) -> None:
        watches, self._watches = self._watches, []
        for _, d in watches:
            d.errback(RuntimeError(f"{self.name} exited ({reason.value}):\n{self.output}"))
        self.ended.callback(getattr(reason.value, "exitCode", None))

    @defer.inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """End the process: SIGTERM, then SIGKILL if it has not exited within STOP_LIMIT."""
        if self.ended.called or self.transport is None:
            return
        with contextlib.suppress(OSError):
            self.transport.signalProcess(signal.SIGTERM)
        timer = reactor.callLater(STOP_LIMIT, self._kill)
        yield self.ended
        if timer.active():
            timer.cancel()

    def _kill(self) -> None:
        if not self.ended.called:
            with contextlib.suppress(OSError):
                self.transport.signalProcess(signal.SIGKILL)


def spawn(proto: ChildProcess, argv: list[str], **kwargs: Any) -> ChildProcess:
    reactor.spawnProcess(proto, argv[0], argv, **kwargs)
    return proto


class Xvnc(ChildProcess):
    """TigerVNC's X server, listening on 127.0.0.1 only (by default with no password).

    It picks its own free display and writes the number to fd 3 (``-displayfd``) once clients
    may connect; ``ready`` fires when that and its "Listening ... port" line have both arrived.
    """

    name = "Xvnc"

    def __init__(self, rfb_port: int) -> None:
        super().__init__()
        self.rfb_port = rfb_port
        self.display = ""

    @classmethod
    def start(
        cls, executable: str, env: dict[str, str], security: str = "None",
        options: tuple[str, ...] = (),
    ) -> Xvnc:
        """``security`` is Xvnc's ``-SecurityTypes``; ``options`` more of its arguments (a
        ``-PasswordFile``, say)."""
        proto = cls(free_port())
        width, height = SCREEN
        argv = [
            executable,
            "-displayfd", "3",
            "-geometry", f"{width}x{height}",
            "-depth", "24",
            "-desktop", "tnovnc-test",
            "-rfbport", str(proto.rfb_port),
            "-interface", "127.0.0.1",
            "-localhost",
            "-nolisten", "tcp",
            "-SecurityTypes", security,
            *options,
            # Without it the server resets, and forgets the root's colour, when its last
            # X client leaves.
            "-noreset",
        ]  # fmt: skip
        spawn(proto, argv, env=env, childFDs={0: "w", 1: "r", 2: "r", 3: "r"})
        return proto

    @defer.inlineCallbacks
    def ready(self):  # type: ignore[no-untyped-def]
        number = yield self.when_line(lambda fd, line: fd == 3 and line.strip().isdigit())
        self.display = ":" + number.strip()
        yield self.when_line(
            lambda fd, line: "Listening for VNC connections" in line
            and line.rstrip().endswith(f"port {self.rfb_port}")
        )
        return self

    def x_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["DISPLAY"] = self.display
        return env


class XClient(ChildProcess):
    """``xclient.py``: one JSON object a line on stdout."""

    name = "xclient.py"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def line_received(self, fd: int, line: str) -> None:
        if fd == 1 and line.startswith("{"):
            self.events.append(json.loads(line))

    @classmethod
    def run(cls, xvnc: Xvnc, *args: str) -> XClient:
        argv = [sys.executable, str(XCLIENT), *args]
        return spawn(cls(), argv, env=xvnc.x_env())  # type: ignore[return-value]

    def when_event(self, **match: object) -> defer.Deferred[dict[str, Any]]:
        """Fire with the first event whose keys have the values in ``match``."""

        def matches(fd: int, line: str) -> bool:
            if fd != 1 or not line.startswith("{"):
                return False
            event = json.loads(line)
            return all(event.get(k) == v for k, v in match.items())

        return self.when_line(matches).addCallback(json.loads)


def leftover_pids(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (our unique Chromium profile dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


class Browser(ChildProcess):
    """``node driver.mjs``: headless Chromium, one JSON request and answer a line."""

    name = "node driver.mjs"

    def __init__(self, profile_dir: str) -> None:
        super().__init__()
        self.profile_dir = profile_dir
        self.started: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.pages: dict[int, Page] = {}
        self._requests: dict[int, defer.Deferred[Any]] = {}
        self._next_id = 1
        self._next_page = 1

    @classmethod
    def start(cls, node: str, profile_dir: str, chromium: str) -> Browser:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["TNOVNC_CHROMIUM"] = chromium
        env.pop("DISPLAY", None)
        argv = [node, str(DRIVER), profile_dir]
        return spawn(cls(profile_dir), argv, env=env, path=str(HERE))  # type: ignore[return-value]

    def line_received(self, fd: int, line: str) -> None:
        if fd != 1 or not line.startswith("{"):
            return
        message = json.loads(line)
        if "id" in message:
            d = self._requests.pop(message["id"], None)
            if d is None:
                return
            if message["ok"]:
                d.callback(message["value"])
            else:
                d.errback(RuntimeError(f"driver: {message['error']}"))
        elif message.get("event") == "ready":
            self.started.callback(message)
        elif "page" in message and message["page"] in self.pages:
            self.pages[message["page"]].page_event(message)

    def processEnded(self, reason: Failure) -> None:
        requests, self._requests = self._requests, {}
        for d in requests.values():
            d.errback(RuntimeError(f"{self.name} exited:\n{self.output}"))
        if not self.started.called:
            self.started.errback(RuntimeError(f"{self.name} exited:\n{self.output}"))
        super().processEnded(reason)

    def request(self, op: str, **args: Any) -> defer.Deferred[Any]:
        """Send one request; fire with its answer."""
        if self.ended.called:
            return defer.fail(RuntimeError(f"{self.name} has exited:\n{self.output}"))
        request_id, self._next_id = self._next_id, self._next_id + 1
        d: defer.Deferred[Any] = defer.Deferred(lambda _: self._requests.pop(request_id, None))
        self._requests[request_id] = d
        self.transport.write(json.dumps({"id": request_id, "op": op, **args}).encode() + b"\n")
        return d

    @defer.inlineCallbacks
    def open(self, url: str):  # type: ignore[no-untyped-def]
        """Open ``url`` in a new tab; fire with its ``Page`` once the page has loaded.

        The page's console is recorded from its first line: the ``Page`` is registered under
        its number before the driver (which attaches its listener before loading) is asked.
        """
        page = Page(self, self._next_page)
        self._next_page += 1
        yield within(self.request("open", page=page.id, url=url))
        return page

    @defer.inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """Close Chromium (stdin EOF makes the driver close it), then kill whatever is left."""
        if not self.ended.called and self.transport is not None:
            self.transport.closeStdin()
            timer = reactor.callLater(STOP_LIMIT, self._kill)
            yield self.ended
            if timer.active():
                timer.cancel()
        for pid in leftover_pids(self.profile_dir):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.profile_dir, ignore_errors=True)


class Page:
    """One tab showing ``page/index.html``: the real noVNC client on one WebSocket URL."""

    def __init__(self, browser: Browser, page_id: int) -> None:
        self.browser = browser
        self.id = page_id
        self.console: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._watches: list[tuple[dict[str, object], defer.Deferred[dict[str, Any]]]] = []
        browser.pages[page_id] = self

    def page_event(self, message: dict[str, Any]) -> None:
        text = message.get("text", "")
        self.console.append(f"{message.get('type', message['event'])}: {text}")
        if message["event"] != "console" or not text.startswith("tnovnc-event "):
            return
        event = json.loads(text.removeprefix("tnovnc-event "))
        self.events.append(event)
        for item in list(self._watches):
            if all(event.get(k) == v for k, v in item[0].items()):
                self._watches.remove(item)
                item[1].callback(event)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def when_event(self, **match: object) -> defer.Deferred[dict[str, Any]]:
        """Fire with the first page event (connect, wsclose, ...) with these values, bounded."""
        for event in self.events:
            if all(event.get(k) == v for k, v in match.items()):
                return defer.succeed(event)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred(lambda _: self._watches.remove(item))
        item = (dict(match), d)
        self._watches.append(item)
        return within(d).addErrback(self._explain, f"page event {match}")

    def console_line(self, fragment: str) -> str:
        """The first console line so far that holds ``fragment``."""
        for line in self.console:
            if fragment in line:
                return line
        raise AssertionError(f"no console line holds {fragment!r}:\n{self.log()}")

    def evaluate(self, expression: str) -> defer.Deferred[Any]:
        return within(self.browser.request("evaluate", page=self.id, expression=expression))

    def wait_for(self, expression: str, seconds: float = EVENT_LIMIT) -> defer.Deferred[bool]:
        """Fire once ``expression`` is truthy in the page (checked every 50 ms), bounded."""
        d = self.browser.request("wait", page=self.id, expression=expression,
                                 timeout=int(seconds * 1000))
        return within(d, seconds + 5).addErrback(self._explain, f"page condition {expression}")

    def wait_for_colour(self, points: list[tuple[int, int]], rgb: tuple[int, int, int],
                        tolerance: int = 2) -> defer.Deferred[bool]:
        """Fire once noVNC's canvas shows ``rgb`` at every one of ``points``."""
        checks = " && ".join(
            f"tnovnc.pixelIs({x}, {y}, {list(rgb)}, {tolerance})" for x, y in points
        )
        return self.wait_for(checks)

    def click(self, x: int, y: int, button: str = "left") -> defer.Deferred[bool]:
        """Click the framebuffer pixel (x, y) with the real (Playwright) mouse."""
        return within(self.browser.request(
            "click", page=self.id, selector="#screen canvas", x=x, y=y, button=button))

    def press(self, key: str) -> defer.Deferred[bool]:
        """Press a key (Playwright's names: ``q``, ``Shift+A``, ``Enter``) on the focused canvas."""
        return within(self.browser.request("press", page=self.id, key=key))

    def close(self) -> defer.Deferred[bool]:
        return within(self.browser.request("close", page=self.id))

    def log(self) -> str:
        return "\n".join(self.console)

    def _explain(self, failure: Failure, what: str) -> None:
        raise AssertionError(
            f"{failure.getErrorMessage() or failure.type.__name__} waiting for {what};"
            f" the page's events: {self.types()}; its console:\n{self.log()}"
        ) from failure.value
