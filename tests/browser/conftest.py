"""Fixtures for the real-browser suite: the noVNC page, headless Chromium, and Xvnc.

The tools come from Debian (chromium, tigervnc-standalone-server), npm (``make browser-deps``
runs ``npm ci`` here) and the ``test`` extra (python-xlib). Under CI (``$CI`` set) a missing
tool fails every test loudly; elsewhere the tests are skipped with the missing tools named.

Run them alone with ``make browser-deps && .venv/bin/python -m pytest -m browser``; leave them
out with ``-m "not browser"`` (``make test-fast`` leaves out every e2e test, these included).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from browser_harness import (
    BROWSER_START_LIMIT,
    NODE_MODULES,
    NOVNC_DIR,
    PAGE_DIR,
    Browser,
    Xvnc,
    within,
)
from db_fixtures import pg_factory, sessions_table  # noqa: F401  (fixtures)
from required_tools import require
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

with warnings.catch_warnings():
    # twisted.web.static builds a deprecated error page when it is imported (Twisted >= 22.10).
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web.static import File

# The e2e fixtures import their helpers as top-level modules of tests/e2e, which pytest puts on
# sys.path only once it has loaded that directory's conftest: put it there for them.
_E2E = str(Path(__file__).resolve().parent.parent / "e2e")
if _E2E not in sys.path:
    sys.path.append(_E2E)
# The real twistd, and (autouse) each test run once per [novnc] fast_path mode.
from e2e.conftest import daemon_factory, fast_path  # noqa: E402, F401  (fixtures)

CHROMIUM = os.environ.get("TNOVNC_CHROMIUM", "/usr/bin/chromium")


class NotFoundRoot(Resource):
    """A root whose unknown children are a plain 404 (Resource's default is deprecated)."""

    def getChild(self, path: bytes, request: object) -> Resource:
        return notFound()


def missing_tools() -> list[str]:
    """What the browser tests need and this machine lacks, each with how to get it."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if shutil.which("Xvnc") is None:
        missing.append("Xvnc (apt-get install tigervnc-standalone-server)")
    if shutil.which("node") is None:
        missing.append("node (Node.js 20 or later)")
    for package in ("playwright-core", "@novnc/novnc"):
        if not (NODE_MODULES / package / "package.json").exists():
            missing.append(f"tests/browser/node_modules/{package} (make browser-deps)")
    if importlib.util.find_spec("Xlib") is None:
        missing.append("python-xlib (pip install '.[test]')")
    return missing


@pytest.fixture(scope="session")
def browser_tools() -> None:
    """Fail (under CI) or skip (elsewhere) when a tool the browser tests need is missing."""
    require(missing_tools(), "the browser tests")


@pytest.fixture(autouse=True)
def _require_browser_tools(browser_tools: None) -> None:
    """Every test here needs the tools; checked once, before anything is started."""


@pytest.fixture(scope="module")
def web_root(browser_tools: None) -> Iterator[str]:
    """The test page and noVNC's ES modules over HTTP on 127.0.0.1; the base URL."""
    root = NotFoundRoot()
    root.putChild(b"page", File(str(PAGE_DIR)))
    root.putChild(b"novnc", File(str(NOVNC_DIR)))
    port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    )
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture(scope="module")
def browser(browser_tools: None) -> Iterator[Browser]:
    """Headless Chromium with a fresh profile, driven by ``node driver.mjs``."""
    profile = tempfile.mkdtemp(prefix="tnovnc-chromium-")
    proto = Browser.start(shutil.which("node") or "node", profile, CHROMIUM)
    try:
        pytest_twisted.blockon(within(proto.started, BROWSER_START_LIMIT))
        yield proto
    finally:
        pytest_twisted.blockon(proto.stop())


@pytest.fixture
def xvnc_factory(browser_tools: None) -> Iterator[Callable[..., Deferred[Xvnc]]]:
    """Start Xvnc servers for one test (``Xvnc.start``'s security and options), each a
    Deferred that fires once it listens; all are stopped after the test."""
    started: list[Xvnc] = []

    def start(security: str = "None", options: tuple[str, ...] = ()) -> Deferred[Xvnc]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.pop("DISPLAY", None)
        proto = Xvnc.start(shutil.which("Xvnc") or "Xvnc", env, security, options)
        started.append(proto)
        return within(proto.ready())

    try:
        yield start
    finally:
        for proto in started:
            pytest_twisted.blockon(proto.stop())


@pytest.fixture
def xvnc(xvnc_factory: Callable[..., Deferred[Xvnc]]) -> Xvnc:
    """A fresh Xvnc for one test, on 127.0.0.1 with no password."""
    return pytest_twisted.blockon(xvnc_factory())
