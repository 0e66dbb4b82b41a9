"""Finding the real client address behind trusted proxies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twisted_novnc.front.forwarded import (
    client_address,
    parse_networks,
    peer_allowed,
    proxied_endpoint,
)

TRUSTED = parse_networks(["127.0.0.1/32", "10.0.0.0/8", "2001:db8:ffff::/48"])


def test_untrusted_peer_cannot_name_another_address():
    """A header from a peer that is not a trusted proxy is ignored."""
    headers = {"x-forwarded-for": "203.0.113.7"}
    assert client_address("192.0.2.1", headers, TRUSTED) == "192.0.2.1"


def test_no_trusted_proxies_means_the_peer():
    """With no trusted proxies configured, the peer is the client."""
    assert client_address("127.0.0.1", {"x-forwarded-for": "203.0.113.7"}, ()) == "127.0.0.1"


def test_no_header_means_the_peer():
    """A trusted proxy that names no one is itself the client."""
    assert client_address("10.0.0.5", {}, TRUSTED) == "10.0.0.5"


def test_x_forwarded_for_rightmost_untrusted():
    """The right-most address not itself trusted is the client; earlier ones may be spoofed."""
    headers = {"x-forwarded-for": "6.6.6.6, 203.0.113.7, 10.1.2.3"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "203.0.113.7"


def test_client_sent_xff_prefix_ignored():
    """What a client put in its own X-Forwarded-For (even a trusted address) is left of what
    the proxy appended, and never read."""
    headers = {"x-forwarded-for": "10.9.9.9, 127.0.0.1, 198.51.100.20"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "198.51.100.20"


def test_client_sent_forwarded_ignored_by_default():
    """With the default forwarded_header, a client's own Forwarded header is not read at all."""
    headers = {"forwarded": "for=1.2.3.4", "x-forwarded-for": "198.51.100.20"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "198.51.100.20"
    assert client_address("127.0.0.1", {"forwarded": "for=1.2.3.4"}, TRUSTED) == "127.0.0.1"


def test_client_sent_xff_ignored_when_forwarded_is_read():
    """With forwarded_header = forwarded, X-Forwarded-For is not read at all."""
    headers = {"forwarded": "for=198.51.100.20", "x-forwarded-for": "1.2.3.4"}
    assert client_address("127.0.0.1", headers, TRUSTED, "forwarded") == "198.51.100.20"
    assert client_address("127.0.0.1", {"x-forwarded-for": "1.2.3.4"}, TRUSTED,
                          "forwarded") == "127.0.0.1"


def test_forwarded_header_elements():
    """RFC 7239 Forwarded: for= of each element, quoted IPv6 with a port, other pairs around."""
    headers = {"forwarded": 'for=6.6.6.6, proto=https;For="[2001:db8::7]:4711";by=x'}
    assert client_address("10.0.0.5", headers, TRUSTED, "forwarded") == "2001:db8::7"


def test_forwarded_element_without_for_is_malformed():
    """A right-most Forwarded element that names no client proves nothing: the peer is used."""
    headers = {"forwarded": "for=203.0.113.7, proto=https"}
    assert client_address("10.0.0.5", headers, TRUSTED, "forwarded") == "10.0.0.5"


def test_forwarded_unclosed_quote_from_client():
    """A client's unclosed quote does not swallow the element the proxy appended."""
    headers = {"forwarded": 'for="1.2.3.4, for=198.51.100.20'}
    assert client_address("10.0.0.5", headers, TRUSTED, "forwarded") == "198.51.100.20"


def test_multiple_header_lines():
    """A client's X-Forwarded-For line and the proxy's added line, joined in order as Autobahn
    joins repeated headers, give the proxy's value."""
    headers = {"x-forwarded-for": "1.2.3.4" + ", " + "198.51.100.20"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "198.51.100.20"
    headers = {"x-forwarded-for": "" + ", " + "198.51.100.21"}  # an empty client line
    assert client_address("127.0.0.1", headers, TRUSTED) == "198.51.100.21"


def test_malformed_rightmost_falls_back_to_peer():
    """A right-most element that is no address proves nothing: the peer is used."""
    for value in ("203.0.113.7, not-an-ip", "203.0.113.7, unknown", "1.2.3.4, [::1",
                  "1.2.3.4, [::1]x", "1.2.3.4, fe80::1%eth0"):
        headers = {"x-forwarded-for": value}
        assert client_address("127.0.0.1", headers, TRUSTED) == "127.0.0.1", value


def test_malformed_left_of_the_client_is_never_read():
    """Garbage left of the first untrusted address is the client's own and does not matter."""
    headers = {"x-forwarded-for": "not-an-ip, 203.0.113.7"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "203.0.113.7"


def test_malformed_behind_trusted_hops_falls_back_to_peer():
    """A malformed element reached while walking past trusted hops gives the peer."""
    headers = {"x-forwarded-for": "garbage, 10.1.1.1"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "127.0.0.1"


def test_trusted_chain():
    """Trusted hops on the right are walked past; when every hop is trusted, the left-most
    is the client."""
    headers = {"x-forwarded-for": "203.0.113.9, 10.9.9.9, 10.1.1.1"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "203.0.113.9"
    headers = {"x-forwarded-for": "10.9.9.9, 10.1.1.1"}
    assert client_address("127.0.0.1", headers, TRUSTED) == "10.9.9.9"


def test_ipv6():
    """IPv6 elements with and without brackets and ports; an IPv6 trusted proxy."""
    for value in ("2001:db8::7", "[2001:db8::7]", "[2001:db8::7]:4711"):
        headers = {"x-forwarded-for": value}
        assert client_address("2001:db8:ffff::1", headers, TRUSTED) == "2001:db8::7", value
    headers = {"x-forwarded-for": "203.0.113.1:5555, 2001:db8:ffff::2"}
    assert client_address("10.0.0.5", headers, TRUSTED) == "203.0.113.1"


def test_ipv4_mapped_peer_is_trusted_as_ipv4():
    """A dual-stack listener's ::ffff:127.0.0.1 peer counts as 127.0.0.1."""
    headers = {"x-forwarded-for": "203.0.113.9"}
    assert client_address("::ffff:127.0.0.1", headers, TRUSTED) == "203.0.113.9"


@given(st.text(max_size=200), st.text(max_size=200),
       st.sampled_from(["x-forwarded-for", "forwarded"]))
def test_never_raises(xff, forwarded, header):
    """Arbitrary header values never raise and always give an address-like string."""
    headers = {"x-forwarded-for": xff, "forwarded": forwarded}
    assert client_address("127.0.0.1", headers, TRUSTED, header)


_UNTRUSTED_V4 = st.ip_addresses(v=4).map(str).filter(lambda a: not a.startswith(("127.", "10.")))


@given(st.text(max_size=200), _UNTRUSTED_V4)
def test_client_prefix_cannot_change_the_answer(prefix, appended):
    """Whatever a client sends, the address the trusted hop appended is the one used."""
    headers = {"x-forwarded-for": f"{prefix}, {appended}"}
    assert client_address("127.0.0.1", headers, TRUSTED) == appended


def test_proxied_endpoint():
    """haproxy: listen strings are recognised, in any case; others are not."""
    assert proxied_endpoint("haproxy:tcp:6080") == "tcp:6080"
    assert proxied_endpoint("HAProxy:unix:/run/x.sock") == "unix:/run/x.sock"
    assert proxied_endpoint("tcp:6080") is None
    assert proxied_endpoint("haproxy") is None


def test_peer_allowed():
    """An IP peer must be in the networks; a unix socket peer (no host) is local."""
    assert peer_allowed("10.2.3.4", TRUSTED)
    assert peer_allowed("::ffff:127.0.0.1", TRUSTED)
    assert not peer_allowed("192.0.2.1", TRUSTED)
    assert not peer_allowed("192.0.2.1", ())
    assert peer_allowed(None, ())
