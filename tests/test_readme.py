"""README.rst is the user's manual: it must render, and it must keep the public contract."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import docutils.utils

from twisted_novnc.errors import Refusal

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_renders_without_warnings():
    """docutils parses README.rst with no warning or error."""
    docutils.core.publish_doctree(
        README.read_text(encoding="utf-8"),
        settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False},
    )


def test_readme_documents_every_close_code():
    """Every close code and reason of the refusal table appears in the README."""
    text = README.read_text(encoding="utf-8")
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
