"""The manual in docs/: Sphinx builds it with warnings as errors, and its troubleshooting page
has an entry for every refusal the daemon can send."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from twisted_novnc.errors import Refusal

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    """sphinx-build -W (as make docs runs it) turns every warning into a failure."""
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "troubleshooting.html").exists()


def troubleshooting_entries() -> set[tuple[int, str]]:
    """(code, reason) of each entry of docs/troubleshooting.rst: a term such as
    ``4403 ``origin not allowed``, ...`` (several refusals may share one entry)."""
    entries = set()
    for line in (DOCS / "troubleshooting.rst").read_text(encoding="utf-8").splitlines():
        if line and not line[0].isspace():
            entries |= {(int(code), reason)
                        for code, reason in re.findall(r"(\d{4}) ``([^`]+)``", line)}
    return entries


def test_troubleshooting_has_an_entry_for_every_refusal() -> None:
    """Every Refusal of twisted_novnc/errors.py (code and reason) has a troubleshooting entry
    of its own: a new refusal without one fails here."""
    entries = troubleshooting_entries()
    missing = [r.name for r in Refusal if (r.close_code, r.reason) not in entries]
    assert missing == []


def test_troubleshooting_covers_the_log_lines_users_meet() -> None:
    """The log lines a newcomer meets first are explained (their fixed wording, as logged)."""
    text = (DOCS / "troubleshooting.rst").read_text(encoding="utf-8")
    for line in ["database unreachable: ...; retrying", "is refusing new connections, not the"
                 " proxy", "embedded database ready; add a session", "Address already in use",
                 "Autobahn NVX native masking: NOT in use", "PostgreSQL server programs not found"]:
        assert line in text, line
