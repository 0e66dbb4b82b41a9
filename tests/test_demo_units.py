"""make demo's launcher without processes: the URL's form, and the clear refusals when it
cannot run (no Xvnc, a config whose URL would need a token)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twisted_novnc import demo
from twisted_novnc.config import parse_config


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:6080/vnc/abc"),
    ("0.0.0.0", "http://127.0.0.1:6080/vnc/abc"),
    ("::", "http://[::1]:6080/vnc/abc"),
    ("::1", "http://[::1]:6080/vnc/abc"),
])
def test_viewer_url_is_printed_in_one_form(host: str, url: str) -> None:
    """http://HOST:PORT/vnc/<session_id>, a wildcard listener reached on loopback."""
    assert demo.viewer_url(host, 6080, "abc") == url


def test_no_xvnc_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Xvnc the demo starts nothing and names the package to install."""
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    reactor = MemoryReactorClock()
    started = demo.Demo(reactor, "x.ini", parse_config("", "x.ini"), out=lambda line: None)
    failure = SynchronousTestCase().failureResultOf(started.start(), demo.DemoError)
    assert "tigervnc-standalone-server" in str(failure.value)
    assert started.xvnc is None and started.daemon is None


def test_a_config_with_tokens_is_refused(tmp_path: Path) -> None:
    """The demo's URL carries no token: a config with [auth] mode = hmac is refused, naming
    the file, before anything starts."""
    config = tmp_path / "hmac.ini"
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o600)
    config.write_text(f"[auth]\nmode = hmac\nsecret_file = {secret}\n")
    reactor = MemoryReactorClock()
    d = demo.main(reactor, ["--config", str(config)])
    failure = SynchronousTestCase().failureResultOf(d, demo.DemoError)
    assert str(config) in str(failure.value) and "mode = hmac" in str(failure.value)
