"""Tests for twisted_novnc.relay.targets: allowed_networks / allowed_ports and the target check."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.relay.targets import (
    ALL_PORTS,
    DEFAULT_NETWORKS,
    TargetPolicy,
    format_networks,
    format_ports,
    parse_networks,
    parse_ports,
)

MODEST = settings(max_examples=60)
DEFAULT = TargetPolicy()


def test_defaults_are_the_private_ranges_and_every_port():
    """The default networks are RFC 1918 and fc00::/7; every port is allowed."""
    assert format_networks(DEFAULT_NETWORKS) == "10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7"
    assert DEFAULT.networks == DEFAULT_NETWORKS
    assert DEFAULT.ports == ALL_PORTS == ((1, 65535),)
    assert TargetPolicy.from_config() == DEFAULT


def test_default_allows_private_addresses():
    """VM addresses in the private ranges are allowed on any port."""
    for ip in ["10.0.3.17", "172.16.0.1", "172.31.255.254", "192.168.1.10", "fd12:3456::1"]:
        assert DEFAULT.allows(ip, 5900), ip
        assert DEFAULT.allows(ip, 1)


def test_default_refuses_loopback_link_local_and_public():
    """The proxy host, metadata services and the internet are not VMs."""
    for ip in [
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "8.8.8.8",
        "172.32.0.1",
        "2001:db8::1",
        "100.64.0.1",
    ]:
        assert not DEFAULT.allows(ip, 5900), ip


def test_ipv4_mapped_addresses_are_judged_as_ipv4():
    """``::ffff:a.b.c.d`` connects to a.b.c.d, so it is judged as a.b.c.d."""
    assert DEFAULT.allows("::ffff:10.0.0.1", 5900)
    assert not DEFAULT.allows("::ffff:127.0.0.1", 5900)
    assert not DEFAULT.allows("::ffff:7f00:1", 5900)
    everything_v6 = TargetPolicy.from_config("::/0", None)
    assert not everything_v6.allows("::ffff:127.0.0.1", 5900)


def test_unspecified_address_is_never_allowed():
    """0.0.0.0 and :: reach the proxy host itself, whatever the networks say."""
    everything = TargetPolicy.from_config("0.0.0.0/0 ::/0", None)
    assert everything.allows("8.8.8.8", 5900)
    for ip in ["0.0.0.0", "::", "::ffff:0.0.0.0"]:
        assert not everything.allows(ip, 5900), ip


def test_names_are_never_resolved():
    """Only IP literals are judged; a name, even ``localhost``, is refused."""
    policy = TargetPolicy.from_config("0.0.0.0/0 ::/0", None)
    for host in ["localhost", "vm1.internal", "10.0.0.1.nip.io", "", " 10.0.0.1", "10.0.0.1/32"]:
        assert not policy.allows(host, 5900), host


def test_ports_and_ranges():
    """Only listed ports and inclusive ranges are allowed."""
    policy = TargetPolicy.from_config(None, "5900-5999 6080")
    assert policy.allows("10.0.0.1", 5900)
    assert policy.allows("10.0.0.1", 5999)
    assert policy.allows("10.0.0.1", 6080)
    for port in [5899, 6000, 22, 6081, 0, 65536, -1]:
        assert not policy.allows("10.0.0.1", port), port


def test_non_integer_ports_are_refused():
    """A port that is not an int (a bool, a float, a string) is refused, not coerced."""
    for port in [True, 5900.0, "5900", None]:
        assert not DEFAULT.allows("10.0.0.1", port), port  # type: ignore[arg-type]


def test_parse_networks():
    """CIDR networks and bare addresses separated by whitespace."""
    assert parse_networks("10.0.0.0/8\n  192.168.1.5 fd00::/8") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.5/32"),
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one network"),
        ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
        ("10/8", "bad network '10/8'"),
        ("vm.example", "bad network 'vm.example'"),
        ("::ffff:10.0.0.0/104", "write the IPv4 network"),
        ("10.0.0.0/8 10.0.0.0/8", "listed twice"),
        ("10.0.0.0/33", "bad network"),
    ],
)
def test_bad_networks_are_explained(text, message):
    """A bad network list raises ValueError saying which entry and why."""
    with pytest.raises(ValueError) as e:
        parse_networks(text)
    assert message in str(e.value)


def test_parse_ports():
    """Single ports and inclusive ranges separated by whitespace."""
    assert parse_ports("5900-5999 6080") == ((5900, 5999), (6080, 6080))
    assert parse_ports("1-65535") == ALL_PORTS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one port"),
        ("0", "from 1 to 65535"),
        ("65536", "from 1 to 65535"),
        ("5999-5900", "first port is above the last"),
        ("5900,5901", "bad port '5900,5901'"),
        ("5900-", "bad port"),
        ("-1", "bad port"),
        ("123456", "bad port"),
        ("\uff15\uff19\uff10\uff10", "bad port"),
    ],
)
def test_bad_ports_are_explained(text, message):
    """A bad port list raises ValueError saying which entry and why."""
    with pytest.raises(ValueError) as e:
        parse_ports(text)
    assert message in str(e.value)


def test_check_refuses_with_4403():
    """``check`` raises the 4403 refusal for a target outside the policy, naming it in the log."""
    DEFAULT.check("10.0.0.1", 5900)
    with pytest.raises(Refused) as e:
        DEFAULT.check("127.0.0.1", 5900)
    assert e.value.refusal is Refusal.FORBIDDEN
    assert "127.0.0.1" in e.value.detail


@MODEST
@given(ip=st.one_of(st.text(max_size=60), st.none(), st.integers()), port=st.integers() | st.none())
def test_allows_never_raises(ip, port):
    """Any address and port give a bool, never an exception."""
    assert isinstance(DEFAULT.allows(ip, port), bool)


@MODEST
@given(st.ip_addresses(network="127.0.0.0/8") | st.just(ipaddress.ip_address("::1")))
def test_loopback_is_never_allowed_by_default(address):
    """No loopback address, however written, passes the default policy."""
    assert not DEFAULT.allows(str(address), 5900)
    if address.version == 4:
        assert not DEFAULT.allows(f"::ffff:{address}", 5900)


@MODEST
@given(address=st.ip_addresses(v=4), networks=st.sampled_from(["10.0.0.0/8", "0.0.0.0/0"]))
def test_mapped_address_is_judged_like_its_ipv4(address, networks):
    """An IPv4 address and its IPv4-mapped form always get the same answer."""
    policy = TargetPolicy.from_config(networks, None)
    assert policy.allows(str(address), 5900) == policy.allows(f"::ffff:{address}", 5900)


@MODEST
@given(st.text(max_size=60))
def test_parsers_raise_only_value_error(text):
    """Any ini text parses or raises ValueError, never another exception."""
    for parse in (parse_networks, parse_ports):
        with contextlib.suppress(ValueError):
            parse(text)


@MODEST
@given(
    st.lists(
        st.tuples(st.integers(1, 65535), st.integers(0, 100)).map(
            lambda t: (t[0], min(65535, t[0] + t[1]))
        ),
        min_size=1,
        max_size=5,
    )
)
def test_ports_round_trip(ranges):
    """Formatting port ranges and parsing them back gives the same ranges."""
    assert parse_ports(format_ports(tuple(ranges))) == tuple(ranges)


@MODEST
@given(st.lists(st.ip_addresses(), min_size=1, max_size=4, unique=True))
def test_networks_round_trip(addresses):
    """Formatting networks and parsing them back gives the same networks."""
    networks = tuple(
        ipaddress.ip_network(a) for a in addresses if not (a.version == 6 and a.ipv4_mapped)
    )
    if networks:
        assert parse_networks(format_networks(networks)) == networks
