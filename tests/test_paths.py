"""Matching request paths against the path template."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twisted_novnc.front.paths import PathMatch, PathTemplate

UUID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"
DEFAULT = PathTemplate("/websockify/{session_id}")


def test_default_template_matches_session():
    """The documented URL form names the session."""
    assert DEFAULT.match(f"/websockify/{UUID}") == PathMatch(UUID, "")


def test_suffix_after_session_segment_is_kept():
    """Whatever follows the session segment is the suffix (forwarded in websocket mode)."""
    assert DEFAULT.match(f"/websockify/{UUID}/websockify") == PathMatch(UUID, "websockify")


def test_template_with_text_after_placeholder():
    """Templates may put fixed text after the placeholder."""
    template = PathTemplate("/vnc/{session_id}/ws")
    assert template.match(f"/vnc/{UUID}/ws") == PathMatch(UUID, "")
    assert template.match(f"/vnc/{UUID}") is None


def test_rejects_other_paths():
    """Paths that do not fit the template, or whose id is unsafe, do not match."""
    for path in [
        "/",
        "/websockify",
        "/websockify/",
        "/other/" + UUID,
        "/websockify/..",
        "/websockify/.",
        "/websockify/a%2Fb",
        "/websockify/'; DROP TABLE auth_sessions; --",
        "/websockify/" + "a" * 129,
        "//websockify/" + UUID,
    ]:
        assert DEFAULT.match(path) is None, path


@given(st.text(max_size=300))
def test_match_never_raises_and_ids_are_safe(path):
    """Any path either fails to match or yields an id of unreserved URL characters."""
    match = DEFAULT.match(path)
    if match is not None:
        assert 1 <= len(match.session_id) <= 128
        assert set(match.session_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-"
        )


@given(st.from_regex(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,127}", fullmatch=True))
def test_every_safe_id_round_trips(session_id):
    """Every id made of unreserved characters is found again in its path."""
    assert DEFAULT.match(f"/websockify/{session_id}") == PathMatch(session_id, "")
