"""Tests for twisted_novnc.front.origins: allowed_origins patterns and the Origin check."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.front.origins import OriginPolicy

MODEST = settings(max_examples=60)

POLICY = OriginPolicy.from_patterns(
    ["https://*.example.com", "http://localhost:6080", "https://app.example.org"]
)

labels = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


def test_empty_policy_allows_everything():
    """No patterns means no check, even without an Origin header."""
    policy = OriginPolicy.from_patterns([])
    for origin in [None, "", "null", "https://evil.example", "garbage"]:
        assert policy.allows(origin)


def test_exact_origin():
    """A listed origin is allowed; the same host with another scheme or port is not."""
    assert POLICY.allows("http://localhost:6080")
    assert not POLICY.allows("https://localhost:6080")
    assert not POLICY.allows("http://localhost:6081")
    assert not POLICY.allows("http://localhost")


def test_default_ports_are_normalised():
    """``https://h`` and ``https://h:443`` are one origin, in patterns and in headers."""
    assert POLICY.allows("https://app.example.org:443")
    policy = OriginPolicy.from_patterns(["http://h.example:80"])
    assert policy.allows("http://h.example")
    assert not policy.allows("https://h.example")


def test_host_is_case_insensitive():
    """Host and scheme compare without regard to case."""
    assert POLICY.allows("HTTPS://App.Example.ORG")
    assert OriginPolicy.from_patterns(["https://APP.example.org"]).allows("https://app.example.org")


def test_wildcard_matches_exactly_one_label():
    """``*`` is one whole label: not zero labels, not two, not part of one."""
    assert POLICY.allows("https://a.example.com")
    assert POLICY.allows("https://a-b.example.com")
    assert not POLICY.allows("https://example.com")
    assert not POLICY.allows("https://.example.com")
    assert not POLICY.allows("https://a.b.example.com")
    assert not POLICY.allows("https://a.example.com.evil.net")
    assert not POLICY.allows("https://evilexample.com")
    assert not POLICY.allows("https://*.example.com")


def test_null_origin_only_when_listed():
    """The opaque origin ``null`` is refused unless ``null`` itself is listed."""
    assert not POLICY.allows("null")
    assert OriginPolicy.from_patterns(["null"]).allows("null")
    assert not OriginPolicy.from_patterns(["null"]).allows("https://a.example.com")


def test_missing_origin_is_refused_when_patterns_are_set():
    """A request without an Origin cannot prove where it comes from."""
    assert not POLICY.allows(None)
    assert not POLICY.allows("")


def test_malformed_origins_are_refused():
    """Anything that is not a serialised origin is refused, never an error."""
    for origin in [
        "https://a.example.com/",
        "https://a.example.com/path",
        "https://user@a.example.com",
        "https://a.example.com:443:443",
        "https://a.example.com:0",
        "https://a.example.com:99999",
        "https://a.example.com.",
        "https://a..example.com",
        "a.example.com",
        "https://a.example.com, https://b.example.com",
        " https://a.example.com",
        "https://a.exampl\u212a.com",  # Kelvin sign: lower-cases to ASCII "k"
    ]:
        assert not POLICY.allows(origin), origin


def test_ipv6_origins_are_compared_normalised():
    """An IPv6 literal matches however it is written."""
    policy = OriginPolicy.from_patterns(["http://[::1]:6080"])
    assert policy.allows("http://[0:0:0:0:0:0:0:1]:6080")
    assert not policy.allows("http://[::2]:6080")


def test_other_schemes_have_no_default_port():
    """Outside http and https, the port must be written the same way."""
    policy = OriginPolicy.from_patterns(["app://desktop"])
    assert policy.allows("app://desktop")
    assert not policy.allows("app://desktop:80")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("example.com", "scheme://host"),
        ("https://example.com/", "path"),
        ("https://example.com/novnc", "path"),
        ("https://a*.example.com", "whole host label"),
        ("https://**.example.com", "whole host label"),
        ("https://*example.com", "whole host label"),
        ("*", "leave the list empty"),
        ("https://b\u00fccher.example", "punycode"),
        ("https://example.com:0", "1 to 65535"),
        ("https://example.com:65536", "1 to 65535"),
        ("https://exa_mple.com:x", "scheme://host"),
        ("https://a..example.com", "bad host name"),
        ("https://[1:::2]", "bad IPv6 address"),
    ],
)
def test_bad_patterns_are_explained(pattern, message):
    """A bad pattern raises ValueError naming it and saying what is wrong."""
    with pytest.raises(ValueError) as e:
        OriginPolicy.from_patterns([pattern])
    assert repr(pattern) in str(e.value) or pattern == "*"
    assert message in str(e.value)


def test_duplicate_pattern_is_refused():
    """A pattern listed twice is a mistake worth telling."""
    with pytest.raises(ValueError, match="listed twice"):
        OriginPolicy.from_patterns(["https://a.example", "https://a.example"])


def test_text_round_trip():
    """The ini value parses to a policy that shows back as written."""
    text = "https://*.example.com null http://localhost:6080"
    policy = OriginPolicy.from_text(text)
    assert policy.to_text() == text
    assert policy == OriginPolicy.from_text(text)
    assert OriginPolicy.from_text("") == OriginPolicy()


def test_check_refuses_with_4403():
    """``check`` raises the 4403 refusal for a disallowed origin and returns otherwise."""
    POLICY.check("https://a.example.com")
    with pytest.raises(Refused) as e:
        POLICY.check("https://evil.example")
    assert e.value.refusal is Refusal.FORBIDDEN
    assert "evil.example" in e.value.detail


@MODEST
@given(st.one_of(st.none(), st.text(max_size=100), st.text(max_size=2000)))
def test_allows_never_raises(origin):
    """Any Origin header yields a bool."""
    assert isinstance(POLICY.allows(origin), bool)
    assert OriginPolicy.from_patterns(["null"]).allows(origin) == (origin == "null")


@MODEST
@given(st.lists(st.text(max_size=40), max_size=3))
def test_from_patterns_raises_only_value_error(patterns):
    """Any pattern list gives a policy or a ValueError, never another exception."""
    try:
        policy = OriginPolicy.from_patterns(patterns)
    except ValueError:
        return
    assert policy.patterns == tuple(patterns)


@MODEST
@given(label=labels, rest=st.lists(labels, min_size=1, max_size=3), extra=labels)
def test_wildcard_property(label, rest, extra):
    """``https://*.R`` allows ``https://L.R`` and neither ``https://R`` nor ``https://E.L.R``."""
    domain = ".".join(rest)
    policy = OriginPolicy.from_patterns([f"https://*.{domain}"])
    assert policy.allows(f"https://{label}.{domain}")
    assert policy.allows(f"https://{label}.{domain}:443")
    assert not policy.allows(f"https://{domain}")
    assert not policy.allows(f"https://{extra}.{label}.{domain}")
    assert not policy.allows(f"http://{label}.{domain}")
