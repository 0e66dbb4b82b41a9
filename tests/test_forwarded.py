"""Finding the real client address behind trusted proxies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twisted_novnc.front.forwarded import client_address, parse_networks

TRUSTED = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])


def test_untrusted_peer_cannot_name_another_address():
    """A header from a peer that is not a trusted proxy is ignored."""
    headers = {"x-forwarded-for": "203.0.113.7"}
    assert client_address("192.0.2.1", headers, TRUSTED) == "192.0.2.1"


def test_no_trusted_proxies_means_the_peer():
    """With no trusted proxies configured, the peer is the client."""
    assert client_address("127.0.0.1", {"x-forwarded-for": "203.0.113.7"}, ()) == "127.0.0.1"


def test_x_forwarded_for_rightmost_untrusted():
    """The right-most address not itself trusted is the client; earlier ones may be spoofed."""
    headers = {"x-forwarded-for": "6.6.6.6, 203.0.113.7, 10.1.2.3"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "203.0.113.7"


def test_forwarded_header():
    """RFC 7239 Forwarded: for= elements, quoted IPv6 with port, take precedence."""
    headers = {
        "forwarded": 'for=6.6.6.6, for="[2001:db8::7]:4711";proto=https',
        "x-forwarded-for": "198.51.100.1",
    }
    assert client_address("10.0.0.5", headers, TRUSTED) == "2001:db8::7"


def test_malformed_chain_falls_back_to_peer():
    """A chain with garbage in it proves nothing: the peer is used."""
    headers = {"x-forwarded-for": "203.0.113.7, not-an-ip"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "127.0.0.1"


def test_all_trusted_chain_gives_leftmost():
    """When every hop is trusted, the left-most is the client."""
    headers = {"x-forwarded-for": "10.9.9.9, 10.1.1.1"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "10.9.9.9"


def test_ipv4_mapped_peer_is_trusted_as_ipv4():
    """A dual-stack listener's ::ffff:127.0.0.1 peer counts as 127.0.0.1."""
    headers = {"x-forwarded-for": "203.0.113.9"}
    assert client_address("::ffff:127.0.0.1", headers, TRUSTED) == "203.0.113.9"


@given(st.text(max_size=200), st.text(max_size=200))
def test_never_raises(xff, forwarded):
    """Arbitrary header values never raise and always give an address-like string."""
    headers = {"x-forwarded-for": xff, "forwarded": forwarded}
    assert client_address("127.0.0.1", headers, TRUSTED)
