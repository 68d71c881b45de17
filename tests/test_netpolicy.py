"""Tests for imgproxy.netpolicy: address table, embedded IPv4, host rules, policed endpoints."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import HostnameAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from imgproxy.errors import BadRequest, DestinationRefused, UpstreamError
from imgproxy.netpolicy import (
    BLOCKED_NETWORKS,
    GLOBAL_EXCEPTIONS,
    AddressPolicy,
    HostPolicy,
    PolicyEndpointFactory,
    _FilteringReactor,
    _FilteringResolver,
    _normalise_host,
    make_tls_policy,
)
from tests.conftest import FakeResolver

DEFAULT = AddressPolicy()
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


def _neighbours(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
    """The addresses just below and just above a network, where they exist."""
    result = []
    if int(network[0]) > 0:
        result.append(str(network[0] - 1))
    if int(network[-1]) < (1 << network.max_prefixlen) - 1:
        result.append(str(network[-1] + 1))
    return result


# --- the address table ---------------------------------------------------------

# The expected table, written independently of the module from the IANA IPv4 and IPv6
# special-purpose registries (rows not globally reachable) plus multicast, class E and site-local.
EXPECTED_BLOCKED = [
    ("0.0.0.0/8", "this-network address"),
    ("10.0.0.0/8", "private address"),
    ("100.64.0.0/10", "shared address"),
    ("127.0.0.0/8", "loopback address"),
    ("169.254.0.0/16", "link-local address"),
    ("172.16.0.0/12", "private address"),
    ("192.0.0.0/24", "IETF protocol address"),
    ("192.0.2.0/24", "documentation address"),
    ("192.88.99.0/24", "6to4 relay anycast address"),
    ("192.168.0.0/16", "private address"),
    ("198.18.0.0/15", "benchmarking address"),
    ("198.51.100.0/24", "documentation address"),
    ("203.0.113.0/24", "documentation address"),
    ("224.0.0.0/4", "multicast address"),
    ("240.0.0.0/4", "reserved address"),
    ("255.255.255.255/32", "broadcast address"),
    ("::/128", "unspecified address"),
    ("::1/128", "loopback address"),
    ("64:ff9b:1::/48", "local-use NAT64 address"),
    ("100::/64", "discard-only address"),
    ("2001::/23", "IETF protocol address"),
    ("2001:2::/48", "benchmarking address"),
    ("2001:10::/28", "deprecated ORCHID address"),
    ("2001:db8::/32", "documentation address"),
    ("3fff::/20", "documentation address"),
    ("5f00::/16", "segment routing address"),
    ("fc00::/7", "unique-local address"),
    ("fe80::/10", "link-local address"),
    ("fec0::/10", "site-local address"),
    ("ff00::/8", "multicast address"),
]
# Globally reachable rows inside blocked ones (Teredo is judged by its embedded addresses).
EXPECTED_GLOBAL = [
    "192.0.0.9/32",
    "192.0.0.10/32",
    "2001:1::1/128",
    "2001:1::2/128",
    "2001:1::3/128",
    "2001:3::/32",
    "2001:4:112::/48",
    "2001:20::/28",
    "2001:30::/28",
]
TEREDO = "2001::/32"


def test_module_tables_match_the_expected_tables() -> None:
    """BLOCKED_NETWORKS and GLOBAL_EXCEPTIONS hold exactly the expected rows."""
    assert sorted((str(net), reason) for net, reason in BLOCKED_NETWORKS) == sorted(
        EXPECTED_BLOCKED
    )
    assert sorted(str(net) for net, _ in GLOBAL_EXCEPTIONS) == sorted(EXPECTED_GLOBAL + [TEREDO])


@pytest.mark.parametrize(("cidr", "reason"), EXPECTED_BLOCKED)
def test_row_refuses_its_inside_with_its_reason(cidr: str, reason: str) -> None:
    """An address in the middle of each blocked row is refused with that row's reason."""
    network = ipaddress.ip_network(cidr)
    assert DEFAULT.refusal(network[network.num_addresses // 2]) == reason


@pytest.mark.parametrize(("cidr", "reason"), EXPECTED_BLOCKED)
def test_row_refuses_both_edges(cidr: str, reason: str) -> None:
    """The first and the last address of each blocked row are refused."""
    network = ipaddress.ip_network(cidr)
    assert DEFAULT.refusal(str(network[0])) is not None
    assert DEFAULT.refusal(str(network[-1])) is not None


@pytest.mark.parametrize(("cidr", "reason"), EXPECTED_BLOCKED)
def test_row_ends_at_its_edges(cidr: str, reason: str) -> None:
    """The addresses just outside each blocked row do not get that row's reason."""
    for outside in _neighbours(ipaddress.ip_network(cidr)):
        assert DEFAULT.refusal(outside) != reason, outside


@pytest.mark.parametrize(
    "address",
    ["1.1.1.1", "8.8.8.8", PUBLIC_V4, "100.128.0.0", "172.32.0.1", "2001:200::1", PUBLIC_V6],
)
def test_public_addresses_pass(address: str) -> None:
    """Ordinary globally reachable addresses may be dialled."""
    assert DEFAULT.refusal(address) is None


@pytest.mark.parametrize("cidr", EXPECTED_GLOBAL)
def test_global_exceptions_pass_and_end_at_their_edges(cidr: str) -> None:
    """Globally reachable rows inside a blocked row pass; their neighbours stay refused."""
    network = ipaddress.ip_network(cidr)
    assert DEFAULT.refusal(str(network[0])) is None
    assert DEFAULT.refusal(str(network[-1])) is None
    others = [ipaddress.ip_network(other) for other in EXPECTED_GLOBAL if other != cidr]
    for outside in _neighbours(network):
        address = ipaddress.ip_address(outside)
        if not any(address in other for other in others):
            assert DEFAULT.refusal(outside) is not None, outside


def test_registry_examples() -> None:
    """Spot checks against the registries: cloud metadata, CGN, ULA, NAT64 local use."""
    assert DEFAULT.refusal("169.254.169.254") == "link-local address"
    assert DEFAULT.refusal("100.100.100.200") == "shared address"
    assert DEFAULT.refusal("fd00:ec2::254") == "unique-local address"
    assert DEFAULT.refusal("192.0.0.8") == "IETF protocol address"
    assert DEFAULT.refusal("2001:1::4") == "IETF protocol address"


def test_refusal_accepts_ipaddress_values() -> None:
    """``refusal`` takes ipaddress objects as well as text."""
    assert DEFAULT.refusal(ipaddress.ip_address("10.1.2.3")) == "private address"
    assert DEFAULT.refusal(ipaddress.ip_address(PUBLIC_V6)) is None


@pytest.mark.parametrize("text", ["localhost", "127.1", "2130706433", "0x7f.0.0.1", "", "::g"])
def test_refusal_of_text_that_is_not_a_strict_address(text: str) -> None:
    """Text that is not a strict IP address is refused, never guessed at."""
    assert DEFAULT.refusal(text) == "invalid address"


def test_refusal_ignores_the_zone_of_a_scoped_address() -> None:
    """A scoped link-local address is judged by its address."""
    assert DEFAULT.refusal("fe80::1%eth0") == "link-local address"


# --- IPv4 embedded in IPv6 -----------------------------------------------------


def _teredo(server: str, client: str) -> str:
    """A Teredo address (RFC 4380): server in bits 32-63, client inverted in the last 32 bits."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= ~int(ipaddress.IPv4Address(client)) & 0xFFFFFFFF
    return str(ipaddress.IPv6Address(value))


def test_teredo_helper_agrees_with_ipaddress() -> None:
    """The Teredo test addresses are built the way the standard library decodes them."""
    built = ipaddress.IPv6Address(_teredo("65.54.227.120", "192.0.2.45"))
    assert built.teredo == (
        ipaddress.IPv4Address("65.54.227.120"),
        ipaddress.IPv4Address("192.0.2.45"),
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("::ffff:127.0.0.1", "embedded loopback address"),
        ("::ffff:10.1.2.3", "embedded private address"),
        ("::ffff:169.254.169.254", "embedded link-local address"),
        ("::ffff:8.8.8.8", None),
        ("::127.0.0.1", "embedded loopback address"),
        ("::2", "embedded this-network address"),
        ("::8.8.8.8", None),
        ("64:ff9b::a00:1", "embedded private address"),
        ("64:ff9b::7f00:1", "embedded loopback address"),
        ("64:ff9b::808:808", None),
        ("64:ff9b:1::808:808", "local-use NAT64 address"),
        ("2002:7f00:1::", "embedded loopback address"),
        ("2002:a9fe:a9fe::1", "embedded link-local address"),
        ("2002:808:808::1", None),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "embedded documentation address"),
        (_teredo("8.8.8.8", "127.0.0.1"), "embedded loopback address"),
        (_teredo("10.0.0.1", "8.8.4.4"), "embedded private address"),
        (_teredo("8.8.8.8", "8.8.4.4"), None),
    ],
)
def test_embedded_ipv4_is_judged(address: str, expected: str | None) -> None:
    """Mapped, compatible, NAT64, 6to4 and Teredo addresses are judged by their IPv4 too."""
    assert DEFAULT.refusal(address) == expected


def test_teredo_client_is_the_inverted_last_32_bits() -> None:
    """The Teredo client is decoded inverted: plain 127.0.0.1 bits there are not loopback."""
    assert DEFAULT.refusal("2001:0:808:808::7f00:1") is None
    assert DEFAULT.refusal("2001:0:808:808::80ff:fffe") == "embedded loopback address"


def test_local_nat64_allowed_by_operator_still_judges_embedded_address() -> None:
    """Allowing 64:ff9b:1::/48 lets public embedded addresses through, not private ones."""
    policy = AddressPolicy(allow_networks=("64:ff9b:1::/48",))
    assert policy.refusal("64:ff9b:1::808:808") is None
    assert policy.refusal("64:ff9b:1::a00:1") == "embedded private address"


# --- operator lists ------------------------------------------------------------


def test_allow_network_exempts_from_default_block() -> None:
    """An allowed network passes, its neighbours stay refused."""
    policy = AddressPolicy(allow_networks=(ipaddress.ip_network("10.1.2.0/24"),))
    assert policy.refusal("10.1.2.3") is None
    assert policy.refusal("10.1.3.1") == "private address"


def test_allowed_ipv4_network_also_allows_its_ipv6_forms() -> None:
    """Allowing an IPv4 network allows its mapped and 6to4 forms, which embed it."""
    policy = AddressPolicy(allow_networks=("10.1.2.0/24",))
    assert policy.refusal("::ffff:10.1.2.3") is None
    assert policy.refusal("2002:a01:203::1") is None


def test_allow_on_outer_address_does_not_skip_embedded_check() -> None:
    """Allowing 2002::/16 does not let a 6to4 address embedding loopback through."""
    policy = AddressPolicy(allow_networks=("2002::/16",))
    assert policy.refusal("2002:7f00:1::") == "embedded loopback address"


def test_allow_ipv6_loopback() -> None:
    """Allowing ::1/128 exempts ::1 (it is not read as an IPv4-compatible address)."""
    policy = AddressPolicy(allow_networks=("::1/128",))
    assert policy.refusal("::1") is None
    assert policy.refusal("::") == "unspecified address"
    assert DEFAULT.refusal("::1") == "loopback address"


def test_allow_ipv4_loopback_does_not_allow_ipv6_loopback() -> None:
    """Allowing 127.0.0.0/8 allows ::ffff:127.0.0.1 but not ::1."""
    policy = AddressPolicy(allow_networks=("127.0.0.0/8",))
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None
    assert policy.refusal("::1") == "loopback address"


def test_deny_network_blocks_public_addresses_and_their_ipv6_forms() -> None:
    """A denied network is refused, also when embedded in IPv6."""
    policy = AddressPolicy(deny_networks=("8.8.8.0/24",))
    assert policy.refusal("8.8.8.8") == "denied network"
    assert policy.refusal("::ffff:8.8.8.8") == "embedded denied network"
    assert policy.refusal("8.8.9.1") is None


def test_deny_network_beats_global_exception() -> None:
    """The operator's deny list also covers rows the registries call global."""
    assert AddressPolicy(deny_networks=("192.0.0.9/32",)).refusal("192.0.0.9") == "denied network"


def test_more_specific_allow_wins_over_deny() -> None:
    """Deny 10/8 with allow 10.1/16: 10.1.x passes, the rest of 10/8 is denied."""
    policy = AddressPolicy(allow_networks=("10.1.0.0/16",), deny_networks=("10.0.0.0/8",))
    assert policy.refusal("10.1.0.1") is None
    assert policy.refusal("10.2.0.1") == "denied network"


def test_more_specific_deny_wins_over_allow() -> None:
    """Allow 10/8 with deny 10.9/16: 10.9.x is denied, the rest of 10/8 passes."""
    policy = AddressPolicy(allow_networks=("10.0.0.0/8",), deny_networks=("10.9.0.0/16",))
    assert policy.refusal("10.9.0.1") == "denied network"
    assert policy.refusal("10.8.0.1") is None


def test_equal_prefix_deny_wins() -> None:
    """The same network in both lists is denied."""
    policy = AddressPolicy(allow_networks=("10.0.0.0/8",), deny_networks=("10.0.0.0/8",))
    assert policy.refusal("10.0.0.1") == "denied network"


def test_operator_allow_overrides_the_whole_default_table() -> None:
    """Operator lists win over the default table: allowing 0.0.0.0/0 allows loopback."""
    policy = AddressPolicy(allow_networks=("0.0.0.0/0",))
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::1") == "loopback address"


def test_network_lists_are_converted_from_text() -> None:
    """CIDR strings in the lists are parsed into networks; one bare string is a type error."""
    policy = AddressPolicy(allow_networks=["10.0.0.0/8"], deny_networks=("fd00::/8",))
    assert policy.allow_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert policy.deny_networks == (ipaddress.ip_network("fd00::/8"),)
    with pytest.raises(TypeError):
        AddressPolicy(allow_networks="10.0.0.0/8")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.0/24", ipaddress.ip_network("10.1.2.0/24")),
        (" fd00::/8 ", ipaddress.ip_network("fd00::/8")),
        ("203.0.113.7", ipaddress.ip_network("203.0.113.7/32")),
        ("::1", ipaddress.ip_network("::1/128")),
    ],
)
def test_parse_network(text: str, expected: object) -> None:
    """CIDR text parses to a network; a bare address is a host network."""
    assert AddressPolicy.parse_network(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.1.2.3/24", r"invalid network '10\.1\.2\.3/24': .*host bits set"),
        ("10.0.0.0/33", r"invalid network '10\.0\.0\.0/33'"),
        ("intranet", r"invalid network 'intranet'"),
        ("", r"invalid network ''"),
    ],
)
def test_parse_network_errors_name_the_text(text: str, message: str) -> None:
    """A bad CIDR raises ValueError naming the text and the problem."""
    with pytest.raises(ValueError, match=message):
        AddressPolicy.parse_network(text)


# --- URLs and names ------------------------------------------------------------

HOSTS = HostPolicy()
MAPPED = "::ffff:127.0.0.1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"http://example.com/a.png", (b"http", b"example.com", 80)),
        (b"https://example.com/a.png", (b"https", b"example.com", 443)),
        (b"HTTPS://Example.COM:8443/x?y#z", (b"https", b"example.com", 8443)),
        (b"http://example.com.:81", (b"http", b"example.com", 81)),
        (b"http://example.com?q=@x", (b"http", b"example.com", 80)),
        (b"http://example.com/a@b/c", (b"http", b"example.com", 80)),
        (b"http://1.2.3.4/", (b"http", b"1.2.3.4", 80)),
        (b"http://127.0.0.1/", (b"http", b"127.0.0.1", 80)),
        (b"http://[::1]/", (b"http", b"::1", 80)),
        (b"http://[2001:DB8:0::1]:8080/", (b"http", b"2001:db8::1", 8080)),
        (b"http://[::ffff:127.0.0.1]/", (b"http", str(ipaddress.ip_address(MAPPED)).encode(), 80)),
        ("http://Bücher.example/".encode(), (b"http", b"xn--bcher-kva.example", 80)),
        (b"http://xn--bcher-kva.example/", (b"http", b"xn--bcher-kva.example", 80)),
        ("http://ｅｘａｍｐｌｅ。com/".encode(), (b"http", b"example.com", 80)),
    ],
)
def test_check_url_accepts_and_normalises(url: bytes, expected: tuple) -> None:
    """Absolute http(s) URLs give back scheme, normalised host and port."""
    assert HOSTS.check_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (b"/relative/path", "not an absolute URL"),
        (b"//example.com/x", "not an absolute URL"),
        (b"http:example.com", "not an absolute URL"),
        (b"example.com/x", "not an absolute URL"),
        (b"ftp://example.com/", "scheme"),
        (b"file:///etc/passwd", "scheme"),
        (b"javascript://example.com/%0aalert(1)", "scheme"),
        (b"http://user@example.com/", "userinfo"),
        (b"http://user:secret@example.com/", "userinfo"),
        (b"http://@example.com/", "userinfo"),
        (b"http://example.com\\.evil.example/", "backslash"),
        (b"http://example.com:0/", "port"),
        (b"http://example.com:65536/", "port"),
        (b"http://example.com:/", "port"),
        (b"http://example.com:80a/", "port"),
        (b"http://example.com:+80/", "port"),
        (b"http://example.com:123456/", "port"),
        (b"http:///path", "empty host"),
        (b"http://[::1/", "unclosed"),
        (b"http://[::1]x/", "after IPv6"),
        (b"http://[v1.fe]/", "invalid IPv6"),
        (b"http://[1.2.3.4]/", "invalid IPv6"),
        (b"http://[fe80::1%25eth0]/", "zone"),
        (b"http://::1/", "unbracketed"),
        (b"http://exa mple.com/", "whitespace"),
        (b" http://example.com/", "whitespace"),
        (b"http://example.com/\r\nHost: x", "whitespace"),
        (b"http://example.com\x00.evil/", "control"),
        (b"http://%65xample.com/", "percent"),
        (b"http://\xff.example/", "UTF-8"),
        (b"http://a..b.example/", "empty label"),
        (b"http://-a.example.com/", "invalid host name"),
        (b"http://a_b.example.com/", "invalid host name"),
        (b"http://xn--a.example/", "invalid host name"),
        ("http://a\u200db.example/".encode(), "international"),
    ],
)
def test_check_url_bad_request(url: bytes, message: str) -> None:
    """Malformed, non-http(s), userinfo and bad-host URLs are 400s with a short reason."""
    with pytest.raises(BadRequest, match=message) as info:
        HOSTS.check_url(url)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (b"http://localhost/", "localhost name"),
        (b"http://LOCALHOST./", "localhost name"),
        (b"http://api.localhost:8080/", "localhost name"),
        ("http://ｌｏｃａｌｈｏｓｔ/".encode(), "localhost name"),
        (b"http://localhost.localdomain/", "local domain name"),
        (b"http://db.localdomain/", "local domain name"),
        (b"http://printer.local/", "multicast DNS name"),
        (b"http://router.home.arpa/", "home network name"),
        (b"http://metadata.internal/", "private-use name"),
        (b"http://intranet/", "dotless host name"),
        (b"http://com./", "dotless host name"),
        (b"http://2130706433/", "non-canonical IP address"),
        (b"http://0x7f.1/", "non-canonical IP address"),
        (b"http://0177.0.0.1/", "non-canonical IP address"),
        (b"http://127.1/", "non-canonical IP address"),
        (b"http://0x7f000001/", "non-canonical IP address"),
        (b"http://127.0.0.1./", "non-canonical IP address"),
        (b"http://1.2.3.4.5/", "non-canonical IP address"),
        (b"http://example.0x/", "non-canonical IP address"),
        ("http://１２７.１/".encode(), "non-canonical IP address"),
    ],
)
def test_check_url_refuses_special_names(url: bytes, reason: str) -> None:
    """Local names, dotless names and odd IPv4 notations are refused (403) before any lookup."""
    with pytest.raises(DestinationRefused) as info:
        HOSTS.check_url(url)
    assert info.value.reason == f"Destination refused: {reason}"
    assert info.value.status == 403


def test_allow_hosts_admits_only_matching_hosts() -> None:
    """With allow_hosts, exact names and names below a ``*.`` suffix pass, others are refused."""
    policy = HostPolicy(allow_hosts=("images.example.com", "*.cdn.example.net"))
    assert policy.check_url(b"http://images.example.com/")[1] == b"images.example.com"
    assert policy.check_url(b"http://a.cdn.example.net/")[1] == b"a.cdn.example.net"
    assert policy.check_url(b"http://a.b.CDN.example.net./")[1] == b"a.b.cdn.example.net"
    for url in (b"http://cdn.example.net/", b"http://evilcdn.example.net/", b"http://example.com/"):
        with pytest.raises(DestinationRefused, match="host not allowed"):
            policy.check_url(url)


def test_deny_hosts_refuses_matching_hosts() -> None:
    """deny_hosts refuses exact names and names below a ``*.`` suffix, in any letter case."""
    policy = HostPolicy(deny_hosts=("bad.example", "*.evil.example"))
    assert policy.check_url(b"http://evil.example/")[1] == b"evil.example"
    for url in (b"http://BAD.example./", b"http://x.evil.example/", b"http://a.b.evil.example/"):
        with pytest.raises(DestinationRefused, match="host denied"):
            policy.check_url(url)


def test_deny_hosts_wins_over_allow_hosts() -> None:
    """A host in both lists is refused."""
    policy = HostPolicy(allow_hosts=("*.example.com",), deny_hosts=("secret.example.com",))
    assert policy.check_url(b"http://www.example.com/")[1] == b"www.example.com"
    with pytest.raises(DestinationRefused, match="host denied"):
        policy.check_url(b"http://secret.example.com/")


def test_host_lists_are_normalised() -> None:
    """Host list entries are normalised like URL hosts (case, IDNA, trailing dot, IPv6 form)."""
    policy = HostPolicy(allow_hosts=("Bücher.Example.", "[2001:DB8::1]", "*.CDN.example", "::2"))
    assert policy.allow_hosts == ("xn--bcher-kva.example", "2001:db8::1", "*.cdn.example", "::2")
    assert policy.check_url(b"http://xn--bcher-kva.example/")[1] == b"xn--bcher-kva.example"
    assert policy.check_url(b"http://[2001:db8:0:0::1]/")[1] == b"2001:db8::1"


@pytest.mark.parametrize(
    "entry", ["*", "*.", "a..b", "0x7f.1", "*.1.2.3.4", "http://x.example", ""]
)
def test_bad_host_list_entries_are_rejected(entry: str) -> None:
    """An invalid host list entry raises ValueError naming it."""
    with pytest.raises(ValueError, match="invalid host pattern"):
        HostPolicy(allow_hosts=(entry,))


def test_host_list_must_not_be_one_string() -> None:
    """A single string is not silently split into one-character entries."""
    with pytest.raises(TypeError):
        HostPolicy(deny_hosts="bad.example")


_AUTHORITY_PIECES = st.sampled_from(
    ["a", "b.example", ".", "-", ":", "80", "0", "[", "]", "::1", "@", "%", "1", "0x", "\\", "é"]
)
_TAILS = st.sampled_from(["", "/", "/p", "?q", "#f", "/@x", "?@x:1", "#@y"])


@given(st.lists(_AUTHORITY_PIECES, max_size=8), _TAILS)
def test_check_url_agrees_with_twisted_uri(pieces: list[str], tail: str) -> None:
    """Every ASCII URL check_url accepts names the same host and port for Twisted's URI parser."""
    url = ("http://" + "".join(pieces) + tail).encode()
    try:
        scheme, host, port = HOSTS.check_url(url)
    except (BadRequest, DestinationRefused):
        return
    if not url.isascii():
        return  # Agent refuses non-ASCII URLs; the fetcher sends the normalised host instead
    parsed = URI.fromBytes(url)
    assert (parsed.scheme, parsed.port) == (scheme, port)
    assert _normalise_host(parsed.host.decode("utf-8")).encode() == host


# --- endpoints -----------------------------------------------------------------


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        raise AssertionError("not cancellable")


def _numeric_getaddrinfo(name: str) -> list[str]:
    """Resolve like the system resolver does for IP literals (inet_aton rules), no network."""
    try:
        infos = socket.getaddrinfo(name, 80, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        return []
    return [info[4][0] for info in infos]


@implementer(IPolicyForHTTPS)
class RecordingTLSPolicy:
    """A TLS policy recording the netlocs it was asked for, backed by the real policy."""

    def __init__(self) -> None:
        self.netlocs: list[tuple[bytes, int]] = []
        self._policy = make_tls_policy()

    def creatorForNetloc(self, hostname: bytes, port: int):  # noqa: N802, ANN201
        self.netlocs.append((hostname, port))
        return self._policy.creatorForNetloc(hostname, port)


def _connect(factory: PolicyEndpointFactory, url: bytes) -> Deferred:
    endpoint = factory.endpointForURI(URI.fromBytes(url))
    return endpoint.connect(Factory.forProtocol(Protocol))


def _failure(deferred: Deferred) -> Failure:
    """The failure a Deferred has already fired with."""
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results and isinstance(results[0], Failure), results
    return results[0]


def _make(
    table: dict[str, Sequence[object]] | Callable[[str], Sequence[object]],
    policy: AddressPolicy = DEFAULT,
    **kwargs: object,
) -> tuple[MemoryReactorClock, FakeResolver, PolicyEndpointFactory]:
    reactor = MemoryReactorClock()  # its own nameResolver answers 127.0.0.1 for every name
    resolver = FakeResolver(table)
    tls = kwargs.pop("tls_policy", None) or make_tls_policy()
    factory = PolicyEndpointFactory(reactor, policy, tls, resolver=resolver, **kwargs)
    return reactor, resolver, factory


def test_factory_provides_agent_endpoint_factory() -> None:
    """The factory implements IAgentEndpointFactory, as Agent.usingEndpointFactory expects."""
    assert IAgentEndpointFactory.providedBy(_make({})[2])


@implementer(IReactorTCP, IReactorTime)
class _ReactorWithoutPluggableResolver:
    """A memory reactor that does not declare IReactorPluggableNameResolver."""

    def __init__(self) -> None:
        self.memory = MemoryReactorClock()

    def __getattr__(self, name: str) -> object:
        return getattr(self.memory, name)


def test_reactor_wrapper_declares_pluggable_name_resolver() -> None:
    """The per-connect wrapper declares IReactorPluggableNameResolver, and mirrors the reactor."""
    reactor = _ReactorWithoutPluggableResolver()
    assert not IReactorPluggableNameResolver.providedBy(reactor)
    resolver = _FilteringResolver(FakeResolver({}), DEFAULT)
    wrapper = _FilteringReactor(reactor, resolver)
    assert IReactorPluggableNameResolver.providedBy(wrapper)
    assert IReactorTCP.providedBy(wrapper)
    assert IReactorTime.providedBy(wrapper)
    assert wrapper.nameResolver is resolver
    assert wrapper.seconds() == reactor.memory.seconds()
    with pytest.raises(TypeError):
        wrapper.installNameResolver(FakeResolver({}))


def test_filter_is_used_with_a_reactor_lacking_a_pluggable_resolver() -> None:
    """HostnameEndpoint uses the filter even when the real reactor has no pluggable resolver."""
    reactor = _ReactorWithoutPluggableResolver()
    table = {"internal.example.com": ["10.0.0.5"], "good.example.com": [PUBLIC_V4]}
    factory = PolicyEndpointFactory(
        reactor, DEFAULT, make_tls_policy(), resolver=FakeResolver(table)
    )
    _failure(_connect(factory, b"http://internal.example.com/")).trap(DestinationRefused)
    _connect(factory, b"http://good.example.com/")
    assert [host for host, *_ in reactor.memory.tcpClients] == [PUBLIC_V4]


def test_refused_name_fails_without_dialling() -> None:
    """A name resolving to a private address fails with DestinationRefused; nothing is dialled."""
    reactor, _, factory = _make({"internal.example.com": ["10.0.0.5"]})
    failure = _failure(_connect(factory, b"http://internal.example.com/"))
    failure.trap(DestinationRefused)
    assert failure.value.reason == "Destination refused: private address"
    assert reactor.tcpClients == []


@pytest.mark.parametrize(
    "addresses", [[PUBLIC_V4, "127.0.0.1"], ["127.0.0.1", PUBLIC_V4], [PUBLIC_V6, "::1"]]
)
def test_mixed_answer_is_refused_whole(addresses: list[str]) -> None:
    """One refused address in an answer refuses the name; the public address is not dialled."""
    reactor, _, factory = _make({"mixed.example.com": addresses})
    failure = _failure(_connect(factory, b"http://mixed.example.com/"))
    failure.trap(DestinationRefused)
    assert failure.value.reason == "Destination refused: loopback address"
    reactor.advance(5)
    assert reactor.tcpClients == []


def test_allowed_name_dials_exactly_the_checked_address() -> None:
    """An allowed name is looked up once and its checked address is the one dialled."""
    reactor, resolver, factory = _make({"good.example.com": [PUBLIC_V4]})
    _connect(factory, b"http://good.example.com:8080/")
    assert resolver.lookups == ["good.example.com"]
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [(PUBLIC_V4, 8080)]


def test_all_dialled_addresses_passed_the_check() -> None:
    """With several allowed addresses, every connection attempt goes to one of them."""
    reactor, _, factory = _make({"dual.example.com": [PUBLIC_V6, PUBLIC_V4]})
    _connect(factory, b"http://dual.example.com/")
    reactor.advance(1)
    assert sorted(host for host, *_ in reactor.tcpClients) == sorted([PUBLIC_V4, PUBLIC_V6])


def test_rebinding_answer_cannot_reach_the_dial() -> None:
    """Each connect judges its own single lookup: a later private answer is refused, not dialled."""
    answers = iter([[PUBLIC_V4], ["127.0.0.1"]])
    reactor, resolver, factory = _make(lambda name: next(answers))
    endpoint = factory.endpointForURI(URI.fromBytes(b"http://rebind.example.com/"))
    endpoint.connect(Factory.forProtocol(Protocol))
    reactor.advance(5)
    assert [host for host, *_ in reactor.tcpClients] == [PUBLIC_V4]
    failure = _failure(endpoint.connect(Factory.forProtocol(Protocol)))
    failure.trap(DestinationRefused)
    assert len(resolver.lookups) == 2
    assert [host for host, *_ in reactor.tcpClients] == [PUBLIC_V4]


def test_dialled_address_is_the_canonical_form_of_the_checked_one() -> None:
    """An answer in a long notation is dialled in the canonical form that was judged."""
    reactor, _, factory = _make({"long.example.com": ["2606:2800:0220:0001:0248:1893:25c8:1946"]})
    _connect(factory, b"http://long.example.com/")
    assert [host for host, *_ in reactor.tcpClients] == [PUBLIC_V6]


def test_non_strict_answer_is_refused() -> None:
    """A resolver answer that is not a strict IP address is refused, not passed to connect."""
    reactor, _, factory = _make({"odd.example.com": ["127.000.000.001"]})
    failure = _failure(_connect(factory, b"http://odd.example.com/"))
    failure.trap(DestinationRefused)
    assert failure.value.reason == "Destination refused: invalid address"
    assert reactor.tcpClients == []


def test_answer_that_is_not_an_ip_address_is_refused() -> None:
    """A resolver answer of another address type refuses the name."""
    answer = HostnameAddress(b"elsewhere.example.com", 80)
    reactor, _, factory = _make({"odd.example.com": [PUBLIC_V4, answer]})
    failure = _failure(_connect(factory, b"http://odd.example.com/"))
    failure.trap(DestinationRefused)
    assert failure.value.reason == "Destination refused: unexpected address type"
    assert reactor.tcpClients == []


@implementer(IHostnameResolver)
class _HangingResolver:
    """A resolver whose lookups never finish."""

    def resolveHostName(  # noqa: N802 - Twisted interface
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        *args: object,  # noqa: N803
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        return resolution


def test_cancel_during_lookup_is_a_cancellation_not_a_dns_error() -> None:
    """Cancelling a connect that waits for its lookup fails with CancelledError."""
    reactor = MemoryReactorClock()
    factory = PolicyEndpointFactory(
        reactor, DEFAULT, make_tls_policy(), resolver=_HangingResolver()
    )
    attempt = _connect(factory, b"http://slow.example.com/")
    attempt.cancel()
    _failure(attempt).trap(CancelledError)
    assert reactor.tcpClients == []


def test_cancel_while_connecting_reaches_the_connection_attempt() -> None:
    """Cancelling after the lookup cancels the TCP attempt (ConnectingCancelledError)."""
    reactor, _, factory = _make({"good.example.com": [PUBLIC_V4]})
    attempt = _connect(factory, b"http://good.example.com/")
    attempt.cancel()
    _failure(attempt).trap(ConnectingCancelledError)
    assert reactor.connectors[0].stoppedConnecting


def test_unresolvable_name_is_a_dns_upstream_error() -> None:
    """A name without addresses fails with UpstreamError of kind "dns"."""
    reactor, _, factory = _make({})
    failure = _failure(_connect(factory, b"http://nowhere.example.com/"))
    failure.trap(UpstreamError)
    assert failure.value.kind == "dns"
    assert failure.value.status == 502
    assert reactor.tcpClients == []


@pytest.mark.parametrize(
    "url",
    [
        b"http://127.0.0.1/",
        b"http://[::1]/",
        b"http://[::ffff:127.0.0.1]/",
        b"http://2130706433/",
        b"http://0x7f.1/",
        b"http://0177.0.0.1/",
        b"http://127.1/",
        b"http://0x7f000001/",
        b"http://169.254.169.254/",
    ],
)
def test_ip_literals_in_any_notation_are_refused_at_connect(url: bytes) -> None:
    """IP literals, odd notations included, are normalised by the resolver and then refused."""
    reactor, _, factory = _make(_numeric_getaddrinfo)
    failure = _failure(_connect(factory, url))
    failure.trap(DestinationRefused)
    assert reactor.tcpClients == []


def test_public_ip_literal_is_dialled() -> None:
    """A public IP literal passes and is dialled as is."""
    reactor, _, factory = _make(_numeric_getaddrinfo)
    _connect(factory, b"http://8.8.8.8/")
    assert [host for host, *_ in reactor.tcpClients] == ["8.8.8.8"]


def test_ip_literal_needs_no_lookup() -> None:
    """Canonical IP literals are judged without asking the resolver (no thread-pool trip)."""
    reactor, resolver, factory = _make({})
    _connect(factory, b"http://8.8.8.8/")
    _connect(factory, b"http://[2001:4860:4860::8888]/")
    failure = _failure(_connect(factory, b"http://127.0.0.1/"))
    failure.trap(DestinationRefused)
    assert resolver.lookups == []
    assert [host for host, *_ in reactor.tcpClients] == ["8.8.8.8", "2001:4860:4860::8888"]


def test_allow_network_lets_internal_origin_through() -> None:
    """An operator-allowed private network is dialled."""
    policy = AddressPolicy(allow_networks=("10.0.0.0/24",))
    reactor, _, factory = _make({"internal.example.com": ["10.0.0.5"]}, policy)
    _connect(factory, b"http://internal.example.com/")
    assert [host for host, *_ in reactor.tcpClients] == ["10.0.0.5"]


def test_default_resolver_is_the_reactors_and_is_filtered() -> None:
    """Without a resolver argument the reactor's nameResolver is used, through the filter."""
    reactor = MemoryReactorClock()  # resolves every name to 127.0.0.1
    factory = PolicyEndpointFactory(reactor, DEFAULT, make_tls_policy())
    failure = _failure(_connect(factory, b"http://example.com/"))
    failure.trap(DestinationRefused)
    assert failure.value.reason == "Destination refused: loopback address"
    assert reactor.tcpClients == []


def test_resolver_gets_the_idna_2008_ascii_name() -> None:
    """The resolver is asked for the ASCII name that was checked, not a re-encoded Unicode one."""
    reactor, resolver, factory = _make({"xn--zca.example": [PUBLIC_V4]})
    _connect(factory, b"http://xn--zca.example/")
    assert resolver.lookups == ["xn--zca.example"]
    assert [host for host, *_ in reactor.tcpClients] == [PUBLIC_V4]


@implementer(IResolutionReceiver)
class _Receiver:
    def __init__(self) -> None:
        self.events: list[object] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N802, N803
        self.events.append("began")

    def addressResolved(self, address: IAddress) -> None:  # noqa: N802
        self.events.append(address)

    def resolutionComplete(self) -> None:  # noqa: N802
        self.events.append("complete")


def test_name_without_idna_form_is_not_looked_up() -> None:
    """A Unicode name with no valid IDNA form resolves to nothing, without asking the resolver."""
    inner = FakeResolver(lambda name: [PUBLIC_V4])
    receiver = _Receiver()
    _FilteringResolver(inner, DEFAULT).resolveHostName(receiver, "a\u200db.example", 80)
    assert receiver.events == ["began", "complete"]
    assert inner.lookups == []


def test_https_wraps_tls_for_the_uri_host() -> None:
    """https endpoints dial the checked address through TLS made for the URI's host and port."""
    tls = RecordingTLSPolicy()
    reactor, _, factory = _make({"good.example.com": [PUBLIC_V4]}, tls_policy=tls)
    _connect(factory, b"https://good.example.com/")
    assert tls.netlocs == [(b"good.example.com", 443)]
    [(host, port, client_factory, *_)] = reactor.tcpClients
    assert (host, port) == (PUBLIC_V4, 443)
    assert isinstance(client_factory._wrappedFactory, TLSMemoryBIOFactory)


def test_https_refused_name_fails_without_dialling() -> None:
    """https to a refused name fails with DestinationRefused before any TCP connection."""
    reactor, _, factory = _make({"internal.example.com": ["192.168.1.1"]})
    failure = _failure(_connect(factory, b"https://internal.example.com/"))
    failure.trap(DestinationRefused)
    assert reactor.tcpClients == []


def test_connect_timeout_is_passed_to_each_attempt() -> None:
    """connect_timeout bounds each TCP connection attempt."""
    reactor, _, factory = _make({"good.example.com": [PUBLIC_V4]}, connect_timeout=2.5)
    _connect(factory, b"http://good.example.com/")
    assert reactor.tcpClients[0][3] == 2.5


def test_other_schemes_are_not_supported() -> None:
    """Only http and https get an endpoint."""
    with pytest.raises(SchemeNotSupported):
        _make({})[2].endpointForURI(URI.fromBytes(b"ftp://example.com/"))
