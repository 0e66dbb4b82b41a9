"""[web] root through the real daemon: noVNC's page beside the WebSocket, nothing else."""

from __future__ import annotations

import pytest
import pytest_twisted
from e2e_support import exchange

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def get(port: int, target: str):
    return exchange(port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


@pytest_twisted.inlineCallbacks
def test_vnc_html_served_and_nothing_outside(daemon_factory, tmp_path):
    """GET /vnc.html?path=websockify/<id> serves the page; traversals never leave the root."""
    root = tmp_path / "novnc"
    root.mkdir()
    (root / "vnc.html").write_text("<title>noVNC</title>")
    (tmp_path / "private.ini").write_text("password=never-served")
    daemon = yield daemon_factory({"web": {"root": str(root)}})
    page = yield get(daemon.port, "/vnc.html?path=websockify/3f1c6a52")
    assert page.startswith(b"HTTP/1.1 200 OK") and page.endswith(b"<title>noVNC</title>")
    for target in ["/../private.ini", "/%2e%2e/private.ini", "/..%2fprivate.ini"]:
        answer = yield get(daemon.port, target)
        assert answer.startswith(b"HTTP/1.1 404 ") and b"never-served" not in answer, target
