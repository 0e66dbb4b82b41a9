"""Canaries for the Autobahn module globals fenced in twisted_novnc/_compat/lazydebug.py: the
debug-line helpers (hltype, hlval, pformat) are still there, still only build log arguments,
and the lazy stand-ins render exactly Autobahn's text."""

from __future__ import annotations

import re
from pathlib import Path

import autobahn.twisted.websocket as autobahn_twisted
import autobahn.util
import autobahn.websocket.protocol as autobahn_protocol
from canary import broken
from twisted.logger import formatEvent

from twisted_novnc._compat import install_patches, lazydebug

USED_BY = "twisted_novnc._compat.lazydebug (cheaper connections)"
#: The stand-ins are installed by install_patches; without them Autobahn's own helpers run.
FALLBACK = "drop the lazydebug.install() call from _compat.install_patches until adapted"


def test_the_globals_are_where_the_stand_ins_go() -> None:
    """Both Autobahn WebSocket modules still call hltype/hlval by module global, and the
    protocol module pformat; install_patches puts the stand-ins there."""
    for module in lazydebug.MODULES:
        for name in ("hltype", "hlval"):
            assert callable(getattr(module, name, None)), broken(
                "autobahn", f"{module.__name__} has no global {name}", USED_BY, FALLBACK
            )
    assert callable(getattr(autobahn_protocol, "pformat", None)), broken(
        "autobahn", "autobahn.websocket.protocol has no global pformat", USED_BY, FALLBACK
    )
    install_patches()
    for module in lazydebug.MODULES:
        assert module.hltype is lazydebug.lazy_hltype
        assert module.hlval is lazydebug.lazy_hlval


def test_stand_ins_render_autobahns_text() -> None:
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
    ), broken("autobahn", "hltype/hlval render differently", USED_BY, FALLBACK)


def test_lazy_pformat_is_scoped() -> None:
    """pformat is lazy only inside the block: Timings.__str__ needs a real str after it."""
    with lazydebug.lazy_pformat():
        assert str(autobahn_protocol.pformat({"a": 1})) == "{'a': 1}"
    assert isinstance(autobahn_protocol.pformat({"a": 1}), str)


def test_every_call_is_a_log_argument() -> None:
    """Each hltype/hlval call in the two modules is a keyword argument of a log call, the only
    use a stand-in serves; an Autobahn upgrade that uses one otherwise fails here."""
    for module in (autobahn_protocol, autobahn_twisted):
        lines = Path(module.__file__ or "").read_text().splitlines()
        calls = [i for i, line in enumerate(lines) if re.search(r"\bhl(type|val)\(", line)]
        assert calls, broken("autobahn", f"{module.__name__} no longer calls hltype/hlval",
                             USED_BY, FALLBACK)
        for i in calls:
            where = f"{module.__name__}:{i + 1}"
            assert re.search(r"\w+=hl(type|val)\(", lines[i]), broken(
                "autobahn", f"{where} uses hltype/hlval outside a keyword argument: {lines[i]}",
                USED_BY, FALLBACK,
            )
            context = "\n".join(lines[max(0, i - 8):i + 1])
            assert re.search(r"\.log\.\w+\(", context), broken(
                "autobahn", f"{where} uses hltype/hlval outside a log call", USED_BY, FALLBACK
            )


def test_pformat_builds_only_log_arguments_and_timings_text() -> None:
    """Every pformat call in Autobahn's protocol module is a keyword argument (of a log call)
    or Timings.__str__'s result, which lazy_pformat leaves alone by being scoped; another use
    fails here."""
    lines = Path(autobahn_protocol.__file__ or "").read_text().splitlines()
    calls = [i for i, line in enumerate(lines) if re.search(r"\bpformat\(", line)]
    assert calls, broken("autobahn", "autobahn.websocket.protocol no longer calls pformat",
                         USED_BY, FALLBACK)
    for i in calls:
        line = lines[i].strip()
        timings_str = line == "return pformat(self._timings)" and "__str__" in lines[i - 1]
        assert timings_str or re.search(r"\w+=pformat\(", line), broken(
            "autobahn", f"autobahn.websocket.protocol:{i + 1} uses pformat outside a log"
            f" argument: {line}", USED_BY, FALLBACK,
        )
