"""[web] viewer: the page shipped with the package, its messages, its security headers, the
vendored noVNC, and the README's frontend snippet being the file the browser tests run.

The page itself is driven in headless Chromium by tests/browser/test_viewer_page.py.
"""

from __future__ import annotations

import filecmp
import json
import re
import textwrap
from pathlib import Path

import docutils.core
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_front import SID, Wired
from test_http_requests import _count, _requests, logged  # noqa: F401  (fixture)
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from twisted_novnc.config import parse_config
from twisted_novnc.errors import Refusal
from twisted_novnc.front.viewer import CONTENT_SECURITY_POLICY, VIEWER_DIR, Viewer

ROOT = Path(__file__).resolve().parent.parent
VIEWER_JS = VIEWER_DIR / "static" / "viewer.js"
VENDORED = VIEWER_DIR / "static" / "novnc"
NODE_NOVNC = ROOT / "tests" / "browser" / "node_modules" / "@novnc" / "novnc"
FRONTEND = ROOT / "tests" / "browser" / "page"
#: The close codes the proxy sends that are not in the refusal table.
WEBSOCKET_CODES = {1000, 1001, 1003, 1009}


def viewer_messages() -> dict[int, str]:
    """The page's MESSAGES table: close code -> what the user reads."""
    text = VIEWER_JS.read_text(encoding="utf-8")
    block = re.search(r"export const MESSAGES = \{\n(.*?)\n\};", text, re.S)
    assert block is not None, "viewer.js has no MESSAGES table"
    messages: dict[int, str] = {}
    code = None
    for line in block[1].splitlines():
        entry = re.fullmatch(r"\s+(\d{4}): (.*)", line)
        if entry:
            code = int(entry[1])
            messages[code] = entry[2]
        else:
            assert code is not None
            messages[code] += line.strip()
    # Each message is one or more '...' strings joined by +, each ending in ' or ',.
    return {
        code: "".join(re.findall(r"'((?:[^'\\]|\\.)*)'", value)).replace("\\'", "'")
        for code, value in messages.items()
    }


def test_every_close_code_has_a_message():
    """Every close code of the refusal table, and those of the WebSocket layer the proxy
    sends, has a plain-language message in the page (so a new refusal cannot miss one)."""
    messages = viewer_messages()
    codes = {refusal.close_code for refusal in Refusal} | WEBSOCKET_CODES
    assert codes <= set(messages), sorted(codes - set(messages))
    assert all(len(text) > 10 and text.endswith(".") for text in messages.values()), messages
    assert messages[1000] == "The session has ended."


def _get(target: str, method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def _split(answer: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK", lines[0]
    return dict(line.split(": ", 1) for line in lines[1:]), body


def _download(w: Wired) -> bytes:
    while w.transport.producer is not None:
        w.transport.producer.resumeProducing()
    return w.transport.value()


def test_the_page_carries_the_websocket_path_and_a_strict_policy(logged):  # noqa: F811
    """GET /vnc/<id>?token=... is the page: the [novnc] path template written in, scripts from
    this origin only, no inline script, no Referer; logged without its token."""
    with Wired(True) as w:
        w.factory.viewer = Viewer("/desk/{session_id}/ws")
        w.send(_get(f"/vnc/{SID}?token=secret-token"))
        headers, body = _split(_download(w))
        w.leave()
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert headers["Referrer-Policy"] == "no-referrer"
    assert int(headers["Content-Length"]) == len(body)
    page = body.decode()
    assert '<meta name="twisted-novnc-websocket-path" content="/desk/{session_id}/ws">' in page
    # Every script has a src (the policy would block an inline one); no handler attributes.
    assert re.findall(r"<script[^>]*>", page) == [
        '<script type="module" src="/viewer/viewer.js">'
    ]
    assert not re.search(r"\son\w+=", page)
    assert SID not in page and "secret-token" not in page
    [line] = _requests(logged)
    assert (line["path"], line["status"]) == (f"/vnc/{SID}", 200)
    assert "secret" not in repr(logged)
    assert _count(w, "twisted_novnc_http_requests_total", status="200") == 1


def test_the_path_template_is_escaped_in_the_page():
    """Whatever the template holds, it stays one attribute value."""
    page = Viewer('/a"><script>x</script>/{session_id}').page.decode()
    assert "<script>x" not in page and "&quot;&gt;&lt;script&gt;" in page


@pytest.mark.parametrize(
    ("target", "kind"),
    [("/viewer/viewer.js", "text/javascript"), ("/viewer/viewer.css", "text/css"),
     ("/viewer/novnc/core/rfb.js", "text/javascript"),
     ("/viewer/novnc/vendor/pako/lib/zlib/inflate.js", "text/javascript")],
)
def test_the_viewer_files(target, kind):
    """The page's script, its style and noVNC's modules are served under /viewer/."""
    with Wired(True) as w:
        w.factory.viewer = Viewer("/websockify/{session_id}")
        w.send(_get(target))
        headers, body = _split(_download(w))
        w.leave()
    assert headers["Content-Type"] == kind
    assert body == (VIEWER_DIR / "static" / target.removeprefix("/viewer/")).read_bytes()


@pytest.mark.parametrize(
    "target",
    ["/viewer/", "/viewer/../page.html", "/viewer/%2e%2e/page.html", "/viewer/..%2fpage.html",
     "/viewer/novnc/../../../front/viewer.py", "/viewer/nothing.js"],
)
def test_nothing_else_is_served(target):
    """The page's template and the package's code are out of reach: 404."""
    with Wired(True) as w:
        w.factory.viewer = Viewer("/websockify/{session_id}")
        w.send(_get(target))
        assert w.transport.value().startswith(b"HTTP/1.1 404 ")
        w.leave()


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80))
def test_no_target_reaches_past_the_static_files(target):
    """Whatever the request-target, the viewer answers the page, a file under static/, or
    404 (the template and the package's code are never a file it sends)."""
    viewer = Viewer("/websockify/{session_id}")
    target = "/" + target
    if not viewer.claims(target):
        return
    found = viewer.answer(target, "GET")
    if found.file is None:
        assert found.status in (404, 405)
        return
    with found.file as f:
        name = getattr(f, "name", None)
    assert name is None or Path(name).resolve().is_relative_to(VIEWER_DIR / "static")


@pytest.mark.parametrize("target", ["/vnc/", "/vnc/a/b", "/vnc/a%2fb", "/vncx/a", "/vnc.html"])
def test_other_paths_are_not_the_viewers(target):
    """What is no session page or viewer file is answered as without the viewer (426)."""
    with Wired(True) as w:
        w.factory.viewer = Viewer("/websockify/{session_id}")
        w.send(_get(target))
        assert w.transport.value().startswith(b"HTTP/1.1 426 ")
        w.leave()


def test_off_means_no_page():
    """[web] viewer = off: the service builds no viewer, and /vnc/<id> gets the 426."""
    assert parse_config("[web]\nviewer = off\n", "<test>").web.viewer is False
    assert parse_config("", "<test>").web.viewer is True
    with Wired(True) as w:
        w.send(_get(f"/vnc/{SID}"))
        assert w.transport.value().startswith(b"HTTP/1.1 426 ")
        w.leave()


@pytest.mark.parametrize(("method", "status"), [("HEAD", b"200"), ("POST", b"400")])
def test_head_gets_the_head_and_other_methods_nothing(method, status):
    """HEAD gets the page's head without the page; a POST never reaches it."""
    with Wired(True) as w:
        w.factory.viewer = Viewer("/websockify/{session_id}")
        w.send(_get(f"/vnc/{SID}", method))
        answer = w.transport.value()
        assert answer.startswith(b"HTTP/1.1 " + status) and answer.endswith(b"\r\n\r\n")
        assert w.transport.producer is None
        w.leave()


def test_the_page_counts_in_max_per_ip():
    """A page download counts under its client's address: beyond max_per_ip, 429."""
    with Wired(True, max_per_ip=1) as w:
        w.factory.viewer = Viewer("/websockify/{session_id}")
        w.send(_get(f"/vnc/{SID}"))
        second = w.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40001))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40001))
        second.makeConnection(transport)
        second.dataReceived(_get("/viewer/viewer.js"))
        assert transport.value().startswith(b"HTTP/1.1 429 ")
        w.leave()


# -- the vendored noVNC ----------------------------------------------------------------------


def test_vendored_novnc_is_1_7_0_with_its_licence():
    """noVNC 1.7.0's core, what it imports, and its licence are in the package."""
    package = json.loads((VENDORED / "package.json").read_text())
    assert (package["name"], package["version"]) == ("@novnc/novnc", "1.7.0")
    assert "MPL 2.0" in (VENDORED / "LICENSE.txt").read_text()
    assert (VENDORED / "vendor" / "pako" / "LICENSE").exists()
    assert "1.7.0" in (VENDORED / "README.vendored").read_text()
    for module in VENDORED.rglob("*.js"):
        for imported in re.findall(r"""^import .* from ["'](.+)["'];""",
                                   module.read_text(), re.M):
            assert (module.parent / imported).resolve().is_file(), (module, imported)


def test_vendored_novnc_is_the_locked_npm_package():
    """The vendored files are byte for byte those of the npm package the tests lock."""
    if not (NODE_NOVNC / "package.json").exists():
        pytest.skip("tests/browser/node_modules is not installed (make browser-deps)")
    for path in VENDORED.rglob("*"):
        if path.is_file() and path.name != "README.vendored":
            relative = path.relative_to(VENDORED)
            assert filecmp.cmp(path, NODE_NOVNC / relative, shallow=False), relative
    for path in [*(NODE_NOVNC / "core").rglob("*"), *(NODE_NOVNC / "vendor").rglob("*")]:
        assert (VENDORED / path.relative_to(NODE_NOVNC)).exists(), path


# -- the frontend contract -------------------------------------------------------------------


def test_the_readme_snippet_is_the_tested_file():
    """README's frontend snippet is tests/browser/page/frontend.js, which the browser tests
    run; any other copy in the docs is whole too."""
    snippet = textwrap.indent((FRONTEND / "frontend.js").read_text(), "    ")
    documents = [ROOT / "README.rst", *sorted((ROOT / "docs").rglob("*.rst"))]
    holding = [d for d in documents if d.exists() and "import RFB from" in d.read_text()]
    assert holding, "no document holds the frontend snippet"
    for document in holding:
        assert snippet in document.read_text(), f"{document.name}: not frontend.js"


def test_the_snippet_imports_what_novnc_exports():
    """The snippet imports the bare package name, and the test page maps it to the module
    noVNC 1.7's package.json exports (as a bundler does)."""
    assert (FRONTEND / "frontend.js").read_text().startswith("import RFB from '@novnc/novnc';")
    exports = json.loads((VENDORED / "package.json").read_text())["exports"]
    target = exports if isinstance(exports, str) else exports["."]
    page = (FRONTEND / "frontend.html").read_text()
    importmap = re.search(r'<script type="importmap">\s*(\{.*?\})\s*</script>', page, re.S)
    assert importmap is not None
    assert json.loads(importmap[1])["imports"] == {"@novnc/novnc": "/novnc/" + target[2:]}


def test_the_viewer_docs_render():
    """docs/viewer.rst is plain reST with one title: docutils reads it without a warning."""
    text = (ROOT / "docs" / "viewer.rst").read_text(encoding="utf-8")
    tree = docutils.core.publish_doctree(
        text, settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False}
    )
    assert tree["title"] == "The viewer page"
