"""[web] root: files under the root are served, nothing outside it ever is."""

from __future__ import annotations

import contextlib
import os

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from test_front import RFB_BANNER, Harness, RawExchange
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from twisted_novnc.front.web import answer, resolve


def response(root: str, target: str, method: str) -> bytes:
    """The whole answer as bytes: the head, then the file (closed after)."""
    found = answer(root, target, method)
    if found.file is None:
        return found.head
    with found.file as f:
        return found.head + f.read()


@pytest.fixture
def root(tmp_path):
    web = tmp_path / "novnc"
    (web / "core").mkdir(parents=True)
    (web / "vnc.html").write_text("<html>noVNC</html>")
    (web / "core" / "rfb.js").write_text("export default class RFB {}")
    (tmp_path / "secret.txt").write_text("do not serve")
    os.symlink(tmp_path / "secret.txt", web / "escape.txt")
    return str(web)


def test_files_under_root(root):
    """vnc.html with noVNC's ?path= query, and nested files, are served with their type."""
    answer = response(root, "/vnc.html?path=websockify/abc", "GET")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"<html>noVNC</html>")
    assert b"Content-Type: text/html" in answer
    assert b"Content-Type: text/javascript" in response(root, "/core/rfb.js", "GET")
    assert response(root, "/vnc.html", "HEAD").endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    "target",
    [
        "/../secret.txt", "/core/../../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt",
        "/core%2f..%2f..%2fsecret.txt", "/escape.txt", "/%00", "/core", "/nothing.html",
        "//etc/passwd", "/%2fetc%2fpasswd", "/..\\\\secret.txt", "/%ff",
    ],
)
def test_nothing_outside_root(root, target):
    """Traversals, encoded slashes, NUL, symlinks out, directories and missing files: 404."""
    assert response(root, target, "GET").startswith(b"HTTP/1.1 404 ")


@pytest.mark.parametrize(
    "target", ["/.env", "/.git/config", "/core/.hidden.js", "/%2eenv", "/.well-known/x"],
)
def test_dotfiles_are_never_served(root, target):
    """A file or folder whose name starts with a dot is not served, even when it exists."""
    os.makedirs(os.path.join(root, ".git"), exist_ok=True)
    for name in (".env", ".git/config", "core/.hidden.js", ".well-known"):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("secret")
    assert response(root, target, "GET").startswith(b"HTTP/1.1 404 ")


def test_only_get_and_head(root):
    """Other methods are refused."""
    assert response(root, "/vnc.html", "POST").startswith(b"HTTP/1.1 405 ")


@given(st.text(max_size=200))
def test_never_outside_root_for_any_path(tmp_path_factory, target):
    """Whatever the path, a served file lies under the root."""
    base = tmp_path_factory.getbasetemp()
    found = None
    with contextlib.suppress(UnicodeDecodeError):
        found = resolve(str(base), "/" + target)
    if found is not None:
        assert os.path.commonpath([os.path.realpath(base), found]) == os.path.realpath(base)


@pytest_twisted.inlineCallbacks
def test_same_listener_serves_files_and_websockets(root):
    """One listener: a plain GET gets the file, an upgrade still gets the relay."""
    h = Harness()
    h.factory.web_root = root
    yield h.start()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", h.proxy_port)
        get = yield connectProtocol(endpoint, RawExchange(
            b"GET /vnc.html?path=websockify/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        ))
        assert (yield get.done).endswith(b"<html>noVNC</html>")
        bad = yield connectProtocol(endpoint, RawExchange(
            b"GET /../secret.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        ))
        answer = yield bad.done
        assert answer.startswith(b"HTTP/1.1 404 ") and b"do not serve" not in answer
        h.ready()
        client = yield h.connect()
        yield client.when_received(len(RFB_BANNER))
        client.sendClose(1000)
        yield client.closed
    finally:
        yield h.stop()


@pytest.mark.parametrize("target", ["//[", "//[::1", "//host/vnc.html", "/a?b#c", "//"])
def test_targets_that_look_like_hosts_are_paths(root, target):
    """A request-target is a path: "//x" is not a host (urlsplit would say so, or raise)."""
    found = resolve(root, target)
    assert found is None or os.path.commonpath([os.path.realpath(root), found]) == \
        os.path.realpath(root)
