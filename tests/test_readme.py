"""README.rst is the newcomer's page and docs/close-codes.rst the browser's contract: both must
render, and keep the public contract."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import docutils.utils

from twisted_novnc.errors import Refusal

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
CLOSE_CODES = ROOT / "docs" / "close-codes.rst"


def test_readme_renders_without_warnings():
    """docutils parses README.rst with no warning or error."""
    docutils.core.publish_doctree(
        README.read_text(encoding="utf-8"),
        settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False},
    )


def test_docs_document_every_close_code():
    """Every close code and reason of the refusal table appears in docs/close-codes.rst."""
    text = CLOSE_CODES.read_text(encoding="utf-8")
    for refusal in Refusal:
        assert str(refusal.close_code) in text, refusal
    for refusal in [Refusal.BAD_PATH, Refusal.NOT_FOUND, Refusal.ENDED, Refusal.VM_UNREACHABLE,
                    Refusal.DATABASE_UNAVAILABLE, Refusal.NOT_READY, Refusal.VM_LOST,
                    Refusal.AT_CAPACITY]:
        assert f"``{refusal.reason}``" in text, refusal


def test_readme_names_the_two_commands():
    """The two commands a new user needs are in the README."""
    text = README.read_text(encoding="utf-8")
    assert "make run" in text and "make test" in text


def test_readme_opens_with_what_it_is_and_the_two_commands():
    """The newcomer's path comes first: one paragraph, then the two commands, the URL that
    make run prints, and make demo; the reference lives in docs/."""
    text = README.read_text(encoding="utf-8")
    commands = text.index("make run     #")
    assert commands < text.index("make test    #") < text.index("How it works")
    assert text.index("make demo") < text.index("How it works")
    assert "then open http://127.0.0.1:6080/vnc/" in text
    assert len(text.splitlines()) < 150
    for page in sorted(Path(ROOT, "docs").glob("*.rst")):
        if page.name == "index.rst":
            continue
        assert f"<docs/{page.name}>`_" in text, page.name
