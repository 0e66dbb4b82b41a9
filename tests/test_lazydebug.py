"""Autobahn's debug-line arguments are lazy, and render exactly Autobahn's text."""

from __future__ import annotations

import re
from pathlib import Path

import autobahn.twisted.websocket as autobahn_twisted
import autobahn.util
import autobahn.websocket.protocol as autobahn_protocol
from twisted.logger import formatEvent

from twisted_novnc._compat import install_patches, lazydebug
from twisted_novnc.front import protocol as front


def test_installed_in_both_modules():
    """install_patches (a service's start, not an import of the front) puts the stand-ins
    where Autobahn's WebSocket code calls them."""
    assert front is not None
    install_patches()
    for module in lazydebug.MODULES:
        assert module.hltype is lazydebug.lazy_hltype
        assert module.hlval is lazydebug.lazy_hlval


def test_stand_ins_render_autobahns_text():
    """str(), repr() and format() of a stand-in give what Autobahn's own helper returns."""
    method = test_stand_ins_render_autobahns_text
    assert str(lazydebug.lazy_hltype(method)) == autobahn.util.hltype(method)
    assert repr(lazydebug.lazy_hlval(42)) == autobahn.util.hlval(42)
    value = lazydebug.lazy_hlval("peer", color="yellow", bold=False)
    assert f"{value:>40}" == format(autobahn.util.hlval("peer", color="yellow", bold=False), ">40")
    event = {"log_format": "{func} from {peer}", "func": lazydebug.lazy_hltype(method),
             "peer": lazydebug.lazy_hlval("tcp4:127.0.0.1:1")}
    assert formatEvent(event) == (
        f"{autobahn.util.hltype(method)} from {autobahn.util.hlval('tcp4:127.0.0.1:1')}"
    )


def test_lazy_pformat_is_scoped():
    """pformat is lazy only inside the block: Timings.__str__ needs a real str after it."""
    with lazydebug.lazy_pformat():
        assert str(autobahn_protocol.pformat({"a": 1})) == "{'a': 1}"
    assert isinstance(autobahn_protocol.pformat({"a": 1}), str)


def test_every_call_is_a_log_argument():
    """Each hltype/hlval call in the two modules is a keyword argument of a log call, the only
    use a stand-in serves; an Autobahn upgrade that uses one otherwise fails here."""
    for module in (autobahn_protocol, autobahn_twisted):
        lines = Path(module.__file__).read_text().splitlines()
        calls = [i for i, line in enumerate(lines) if re.search(r"\bhl(type|val)\(", line)]
        assert calls, module.__name__
        for i in calls:
            assert re.search(r"\w+=hl(type|val)\(", lines[i]), (module.__name__, i + 1, lines[i])
            context = "\n".join(lines[max(0, i - 8):i + 1])
            assert re.search(r"\.log\.\w+\(", context), (module.__name__, i + 1)
