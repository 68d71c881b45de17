"""Destination policy: which hosts and addresses a proxied request may reach.

Three layers, all fail-closed:

* :class:`HostPolicy` checks a URL before each hop (scheme, userinfo, port, host syntax, special
  names such as ``localhost``, odd IPv4 notations, the operator's host lists).
* :class:`AddressPolicy` judges an IP address against the IANA special-purpose registries
  (:data:`BLOCKED_NETWORKS`), the IPv4 address embedded in an IPv6 one, and the operator's CIDR
  lists.
* :class:`PolicyEndpointFactory` applies :class:`AddressPolicy` to the *resolved* addresses at
  connect time: the endpoint resolves the name once, through a filtering resolver, and dials only
  addresses that passed. There is no second lookup, hence no DNS-rebinding window.

:func:`make_tls_policy` builds the certificate-verifying TLS policy for HTTPS origins.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import idna
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet._sslverify import IOpenSSLTrustRoot  # the trust-root hook; not re-exported
from twisted.internet.address import IPv4Address as TCPv4Address
from twisted.internet.address import IPv6Address as TCPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, HostnameCachingHTTPSPolicy
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import directlyProvides, implementer, providedBy

from imgproxy.errors import BadRequest, DestinationRefused, UpstreamError

__all__ = [
    "BLOCKED_NETWORKS",
    "GLOBAL_EXCEPTIONS",
    "AddressPolicy",
    "HostPolicy",
    "PolicyEndpointFactory",
    "make_tls_policy",
]

log = Logger()

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_net = ipaddress.ip_network

# Refused by default: the rows of the IANA IPv4 Special-Purpose Address Registry
# (https://www.iana.org/assignments/iana-ipv4-special-registry/) and the IANA IPv6 Special-Purpose
# Address Registry (https://www.iana.org/assignments/iana-ipv6-special-registry/) whose "Globally
# Reachable" column is False, plus IPv4 multicast and class E (RFC 5771, RFC 1112), IPv6 multicast
# (RFC 4291) and the deprecated IPv6 site-local block (RFC 3879). Registry rows that only mark an
# IPv4-in-IPv6 encoding (::ffff:0:0/96, 64:ff9b::/96, 2002::/16, Teredo 2001::/32) are not refused
# whole: the IPv4 address inside them is judged instead (see _EMBEDDED_IPV4). Reasons are short,
# client-visible and shared between rows of the same kind. The most specific matching row wins.
BLOCKED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = (
    (_net("0.0.0.0/8"), "this-network address"),  # RFC 791
    (_net("10.0.0.0/8"), "private address"),  # RFC 1918
    (_net("100.64.0.0/10"), "shared address"),  # RFC 6598 (carrier-grade NAT)
    (_net("127.0.0.0/8"), "loopback address"),  # RFC 1122
    (_net("169.254.0.0/16"), "link-local address"),  # RFC 3927
    (_net("172.16.0.0/12"), "private address"),  # RFC 1918
    (_net("192.0.0.0/24"), "IETF protocol address"),  # RFC 6890
    (_net("192.0.2.0/24"), "documentation address"),  # RFC 5737 TEST-NET-1
    (_net("192.88.99.0/24"), "6to4 relay anycast address"),  # RFC 7526 (deprecated)
    (_net("192.168.0.0/16"), "private address"),  # RFC 1918
    (_net("198.18.0.0/15"), "benchmarking address"),  # RFC 2544
    (_net("198.51.100.0/24"), "documentation address"),  # RFC 5737 TEST-NET-2
    (_net("203.0.113.0/24"), "documentation address"),  # RFC 5737 TEST-NET-3
    (_net("224.0.0.0/4"), "multicast address"),  # RFC 5771
    (_net("240.0.0.0/4"), "reserved address"),  # RFC 1112
    (_net("255.255.255.255/32"), "broadcast address"),  # RFC 919
    (_net("::/128"), "unspecified address"),  # RFC 4291
    (_net("::1/128"), "loopback address"),  # RFC 4291
    (_net("64:ff9b:1::/48"), "local-use NAT64 address"),  # RFC 8215
    (_net("100::/64"), "discard-only address"),  # RFC 6666
    (_net("2001::/23"), "IETF protocol address"),  # RFC 2928
    (_net("2001:2::/48"), "benchmarking address"),  # RFC 5180
    (_net("2001:10::/28"), "deprecated ORCHID address"),  # RFC 4843
    (_net("2001:db8::/32"), "documentation address"),  # RFC 3849
    (_net("3fff::/20"), "documentation address"),  # RFC 9637
    (_net("5f00::/16"), "segment routing address"),  # RFC 9602
    (_net("fc00::/7"), "unique-local address"),  # RFC 4193
    (_net("fe80::/10"), "link-local address"),  # RFC 4291
    (_net("fec0::/10"), "site-local address"),  # RFC 3879 (deprecated)
    (_net("ff00::/8"), "multicast address"),  # RFC 4291
)

# Rows of the same registries that lie inside a refused row but are globally reachable (or, for
# Teredo, "N/A": judged by the IPv4 addresses it embeds). A more specific row wins, so these pass.
GLOBAL_EXCEPTIONS: tuple[tuple[IPNetwork, str], ...] = (
    (_net("192.0.0.9/32"), "Port Control Protocol anycast"),  # RFC 7723
    (_net("192.0.0.10/32"), "TURN anycast"),  # RFC 8155
    (_net("2001::/32"), "Teredo"),  # RFC 4380
    (_net("2001:1::1/128"), "Port Control Protocol anycast"),  # RFC 7723
    (_net("2001:1::2/128"), "TURN anycast"),  # RFC 8155
    (_net("2001:1::3/128"), "DNS-SD service registration anycast"),  # RFC 9665
    (_net("2001:3::/32"), "AMT"),  # RFC 7450
    (_net("2001:4:112::/48"), "AS112-v6"),  # RFC 7535
    (_net("2001:20::/28"), "ORCHIDv2"),  # RFC 7343
    (_net("2001:30::/28"), "drone remote ID"),  # RFC 9374
)


def _default_table(version: int) -> tuple[tuple[IPNetwork, str | None], ...]:
    """One IP version's blocked rows (reason) and exceptions (``None``), most specific first."""
    rows: list[tuple[IPNetwork, str | None]] = [
        (network, reason) for network, reason in BLOCKED_NETWORKS if network.version == version
    ]
    rows += [(network, None) for network, _ in GLOBAL_EXCEPTIONS if network.version == version]
    return tuple(sorted(rows, key=lambda row: row[0].prefixlen, reverse=True))


_DEFAULT_TABLES = {4: _default_table(4), 6: _default_table(6)}

_IPV4_MAPPED = _net("::ffff:0:0/96")  # RFC 4291
_IPV4_COMPATIBLE = _net("::/96")  # RFC 4291 (deprecated); :: and ::1 are not IPv4 addresses
_NAT64 = _net("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL = _net("64:ff9b:1::/48")  # RFC 8215; decoded as the /96 form (last 32 bits)
_SIX_TO_FOUR = _net("2002::/16")  # RFC 3056
_TEREDO = _net("2001::/32")  # RFC 4380
_LOW32 = 0xFFFFFFFF


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo).

    :return: empty when the address embeds none. Teredo yields the server and the client
        (whose bits are stored inverted).
    """
    value = int(address)
    if address in _IPV4_MAPPED or address in _NAT64 or address in _NAT64_LOCAL:
        return [ipaddress.IPv4Address(value & _LOW32)]
    if address in _IPV4_COMPATIBLE and value > 1:
        return [ipaddress.IPv4Address(value & _LOW32)]
    if address in _SIX_TO_FOUR:
        return [ipaddress.IPv4Address((value >> 80) & _LOW32)]
    if address in _TEREDO:
        server = ipaddress.IPv4Address((value >> 64) & _LOW32)
        client = ipaddress.IPv4Address(~value & _LOW32)
        return [server, client]
    return []


def _parse_address(address: str | IPAddress) -> IPAddress:
    """An :mod:`ipaddress` value from strict text or an address (``ValueError`` if bad)."""
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return address
    return ipaddress.ip_address(address)


def _networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """Convert an iterable of networks or CIDR strings to a tuple of networks."""
    if isinstance(values, str):
        raise TypeError("network lists are sequences, not one string")
    return tuple(
        value
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network))
        else AddressPolicy.parse_network(value)
        for value in values
    )


@attrs.frozen
class AddressPolicy:
    """Decide whether an IP address may be dialled.

    Rules, in order: the operator's lists decide when one of their networks contains the address
    (the most specific network wins; at equal prefix length ``deny_networks`` wins); otherwise the
    default table decides (:data:`BLOCKED_NETWORKS` minus :data:`GLOBAL_EXCEPTIONS`). An IPv6
    address that embeds an IPv4 address passes only if the IPv4 address passes as well.
    """

    allow_networks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    deny_networks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Judge one address.

        :return: ``None`` when the address may be dialled, else a short reason such as
            ``"private address"`` (``"invalid address"`` for text that is not a strict IP address).
        """
        try:
            parsed = _parse_address(address)
        except ValueError:
            return "invalid address"
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.scope_id is not None:
            parsed = ipaddress.IPv6Address(int(parsed))
        reason = self._judge(parsed)
        if reason is not None or not isinstance(parsed, ipaddress.IPv6Address):
            return reason
        for inner in _embedded_ipv4(parsed):
            reason = self._judge(inner)
            if reason is not None:
                return f"embedded {reason}"
        return None

    def _judge(self, address: IPAddress) -> str | None:
        """Judge one address without looking inside it."""
        best: tuple[int, bool] | None = None  # (prefix length, is_deny)
        for is_deny, networks in ((False, self.allow_networks), (True, self.deny_networks)):
            for network in networks:
                if network.version == address.version and address in network:
                    candidate = (network.prefixlen, is_deny)
                    if best is None or candidate > best:
                        best = candidate
        if best is not None:
            return "denied network" if best[1] else None
        for network, reason in _DEFAULT_TABLES[address.version]:
            if address in network:
                return reason
        return None

    @staticmethod
    def parse_network(text: str) -> IPNetwork:
        """Parse an operator's CIDR (``10.1.2.0/24``, ``fd00::/8``; a bare address is a host route).

        :raises ValueError: with a message naming the text, e.g. when host bits are set.
        """
        try:
            return ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as error:
            raise ValueError(f"invalid network {text!r}: {error}") from None


# Special-use names refused before any lookup: (suffix, reason). A name matches when it is the
# suffix or ends with "." + suffix.
_SPECIAL_NAMES: tuple[tuple[str, str], ...] = (
    ("localhost", "localhost name"),  # RFC 6761
    ("localdomain", "local domain name"),  # /etc/hosts convention
    ("local", "multicast DNS name"),  # RFC 6762
    ("home.arpa", "home network name"),  # RFC 8375
    ("internal", "private-use name"),  # ICANN, private-use TLD (2024)
)

_SCHEME = re.compile(r"\A([A-Za-z][A-Za-z0-9+.\-]*):")
_PORT = re.compile(r"\A[0-9]{1,5}\Z")
_NUMERIC_LABEL = re.compile(r"\A(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _OddAddress(ValueError):
    """A host that ends in a number but is not a canonical dotted-quad IPv4 address."""


def _normalise_host(text: str) -> str:
    """Normalise a URL host or host-list entry: IDNA ASCII, lower case, no trailing dot.

    IPv4 literals must be canonical dotted quads; IPv6 literals (with or without brackets) come
    back compressed. A host whose last label is a number (``2130706433``, ``0x7f.1``, ``127.1``)
    but is not a canonical IPv4 address raises :class:`_OddAddress`: such notations are IPv4 to
    the system resolver and are refused rather than guessed at.

    :raises ValueError: with a short message when the host is not valid.
    """
    if text.startswith("[") or ":" in text:
        literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        if "%" in literal:
            raise ValueError("IPv6 zone identifiers are not supported")
        try:
            return str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise ValueError("invalid IPv6 address")
    if not text:
        raise ValueError("empty host")
    if "%" in text:
        raise ValueError("percent-encoded host")
    host = text.lower()
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ValueError("invalid international host name")
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if "" in labels:
        raise ValueError("empty label in host name")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise _OddAddress("non-canonical IP address")
    try:
        idna.decode(name)
    except (idna.IDNAError, UnicodeError):
        raise ValueError("invalid host name")
    return name


@functools.lru_cache(maxsize=4096)
def _checked_host(text: str) -> tuple[str, bool]:
    """:func:`_normalise_host` and whether it is an IP literal, memoised (hot path)."""
    host = _normalise_host(text)
    return host, _is_ip_literal(host)


def _is_ip_literal(host: str) -> bool:
    """Whether a normalised host is an IP address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_pattern(text: str) -> str:
    """Normalise one ``allow_hosts``/``deny_hosts`` entry: an exact host or ``*.suffix``."""
    wildcard = text.startswith("*.")
    try:
        host = _normalise_host(text[2:] if wildcard else text)
    except ValueError as error:
        raise ValueError(f"invalid host pattern {text!r}: {error}") from None
    if wildcard and _is_ip_literal(host):
        raise ValueError(f"invalid host pattern {text!r}: a wildcard needs a domain name")
    return "*." + host if wildcard else host


def _host_patterns(values: Iterable[str]) -> tuple[str, ...]:
    """Convert host-list entries to normalised patterns (``ValueError`` on a bad entry)."""
    if isinstance(values, str):
        raise TypeError("host lists are sequences of strings, not one string")
    return tuple(host_pattern(value) for value in values)


def _matches(host: str, patterns: Sequence[str]) -> bool:
    """Whether a normalised host matches an exact entry or lies below a ``*.suffix`` entry."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def _refused(reason: str) -> DestinationRefused:
    """The error for a refused destination, with the client-visible reason."""
    return DestinationRefused(f"Destination refused: {reason}")


@attrs.frozen
class HostPolicy:
    """Check a URL's syntax and host before it is fetched (called for each hop, redirects too).

    ``allow_hosts`` and ``deny_hosts`` hold exact hosts (names or IP literals) and ``*.suffix``
    wildcards, which match every name below the suffix but not the suffix itself. A host in
    ``deny_hosts`` is refused; when ``allow_hosts`` is non-empty only matching hosts pass.
    """

    allow_hosts: tuple[str, ...] = attrs.field(default=(), converter=_host_patterns)
    deny_hosts: tuple[str, ...] = attrs.field(default=(), converter=_host_patterns)

    def check_url(self, url: bytes) -> tuple[bytes, bytes, int]:
        """Parse an absolute http(s) URL and apply the name rules.

        :return: ``(scheme, host, port)``: lower-case scheme, host as IDNA ASCII lower case
            without a trailing dot (IPv6 literals compressed and without brackets), port.
        :raises BadRequest: not absolute, not http/https, userinfo, bad port, bad host.
        :raises DestinationRefused: special-use or dotless names, odd IPv4 notations, host lists.
        """
        scheme, host_text, port = _split_url(url)
        try:
            host, literal = _checked_host(host_text)
        except _OddAddress as error:
            raise _refused(str(error))
        except ValueError as error:
            raise BadRequest(f"Bad URL: {error}")
        if not literal:
            for suffix, reason in _SPECIAL_NAMES:
                if host == suffix or host.endswith("." + suffix):
                    raise _refused(reason)
            if "." not in host:
                raise _refused("dotless host name")
        if _matches(host, self.deny_hosts):
            raise _refused("host denied")
        if self.allow_hosts and not _matches(host, self.allow_hosts):
            raise _refused("host not allowed")
        return scheme.encode("ascii"), host.encode("ascii"), port


def _split_url(url: bytes) -> tuple[str, str, int]:
    """Split an absolute URL into scheme, raw host text and port, the way Twisted's URI does.

    Stricter than ``URI.fromBytes``: anything it would read differently (userinfo, backslashes,
    whitespace, unbracketed colons, empty ports) is a :class:`BadRequest`.
    """
    try:
        text = url.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Bad URL: not UTF-8")
    if any(char <= " " or "\x7f" <= char <= "\x9f" for char in text):
        raise BadRequest("Bad URL: whitespace or control character")
    match = _SCHEME.match(text)
    rest = text[match.end() :] if match else ""
    if match is None or not rest.startswith("//"):
        raise BadRequest("Bad URL: not an absolute URL")
    scheme = match.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        raise BadRequest("Bad URL: scheme is not http or https")
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if "@" in authority:
        raise BadRequest("Bad URL: userinfo is not allowed")
    if "\\" in authority:
        raise BadRequest("Bad URL: backslash in host")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadRequest("Bad URL: unclosed IPv6 literal")
        host, after = authority[: end + 1], authority[end + 1 :]
        if after and not after.startswith(":"):
            raise BadRequest("Bad URL: text after IPv6 literal")
        port_text = after[1:] if after else None
    elif authority.count(":") > 1:
        raise BadRequest("Bad URL: unbracketed IPv6 literal")
    elif ":" in authority:
        host, port_text = authority.split(":")
    else:
        host, port_text = authority, None
    if port_text is None:
        return scheme, host, _DEFAULT_PORTS[scheme]
    if not _PORT.match(port_text) or not 0 < int(port_text) < 65536:
        raise BadRequest("Bad URL: invalid port")
    return scheme, host, int(port_text)


@implementer(IResolutionReceiver)
class _Judge:
    """Collect one lookup's addresses, then pass all of them or none of them on."""

    def __init__(
        self, receiver: IResolutionReceiver, policy: AddressPolicy, resolver: _FilteringResolver
    ) -> None:
        self._receiver = receiver
        self._policy = policy
        self._resolver = resolver
        self._addresses: list[IAddress] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        self._addresses.append(address)

    def resolutionComplete(self) -> None:
        passed: list[IAddress] = []
        for address in self._addresses:
            judged = self._checked(address)
            if isinstance(judged, str):
                self._resolver.refusal = judged
                passed = []
                break
            passed.append(judged)
        for address in passed:
            self._receiver.addressResolved(address)
        self._receiver.resolutionComplete()

    def _checked(self, address: IAddress) -> IAddress | str:
        """The address to dial, rebuilt from the judged value, or the reason it is refused."""
        if not isinstance(address, (TCPv4Address, TCPv6Address)):
            return "unexpected address type"
        reason = self._policy.refusal(address.host)
        if reason is not None:
            return reason
        parsed = ipaddress.ip_address(address.host)
        if isinstance(parsed, ipaddress.IPv4Address):
            return TCPv4Address(address.type, str(parsed), address.port)
        flow_info = getattr(address, "flowInfo", 0)
        scope_id = getattr(address, "scopeID", 0)
        return TCPv6Address(address.type, str(parsed), address.port, flow_info, scope_id)


def _literal_address(name: str, port: int) -> IAddress | None:
    """The TCP address of an IP-literal host name, or None for a name to look up."""
    try:
        parsed = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv4Address):
        return TCPv4Address("TCP", str(parsed), port)
    return TCPv6Address("TCP", str(parsed), port)


@implementer(IHostnameResolver)
class _FilteringResolver:
    """An :class:`IHostnameResolver` for one connection attempt that drops refused answers.

    If any address of an answer is refused, no address is delivered (so the endpoint fails with
    ``DNSLookupError``) and the reason is kept in :attr:`refusal`.
    """

    def __init__(self, resolver: IHostnameResolver, policy: AddressPolicy) -> None:
        self._resolver = resolver
        self._policy = policy
        self.refusal: str | None = None

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        name = _ascii_name(hostName)
        if name is None:
            resolution = _Resolution(hostName)
            resolutionReceiver.resolutionBegan(resolution)
            resolutionReceiver.resolutionComplete()
            return resolution
        judge = _Judge(resolutionReceiver, self._policy, self)
        literal = _literal_address(name, portNumber)
        if literal is not None:
            # An IP literal needs no lookup: judge it at once (the system resolver would take a
            # trip through the thread pool to say the same).
            resolution = _Resolution(hostName)
            judge.resolutionBegan(resolution)
            if addressTypes is None or type(literal) in addressTypes:
                judge.addressResolved(literal)
            judge.resolutionComplete()
            return resolution
        return self._resolver.resolveHostName(
            judge, name, portNumber, addressTypes, transportSemantics
        )


@implementer(IHostResolution)
@attrs.frozen
class _Resolution:
    """A finished, empty resolution (for names that cannot be looked up)."""

    name: str

    def cancel(self) -> None:
        """Nothing to cancel."""


def _ascii_name(name: str) -> str | None:
    """The IDNA 2008 ASCII form of a name, so the name looked up is the name checked.

    ``HostnameEndpoint`` hands resolvers the Unicode form of ``xn--`` names, and the system resolver
    would re-encode it with IDNA 2003 (``ß`` becomes ``ss``): a different name.
    """
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


@implementer(IReactorPluggableNameResolver)
class _FilteringReactor:
    """The real reactor, except that ``nameResolver`` is a :class:`_FilteringResolver`.

    It *declares* :class:`IReactorPluggableNameResolver` (and whatever the real reactor
    provides): ``HostnameEndpoint`` silently falls back to an unfiltered lookup otherwise.
    """

    def __init__(self, reactor: Any, resolver: _FilteringResolver) -> None:
        self._reactor = reactor
        self._name_resolver = resolver
        directlyProvides(self, providedBy(reactor))

    @property
    def nameResolver(self) -> IHostnameResolver:
        return self._name_resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise TypeError("the filtering name resolver cannot be replaced")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class _PolicyEndpoint:
    """Connect to a host name, dialling only addresses the :class:`AddressPolicy` accepts."""

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver,
        policy: AddressPolicy,
        host: bytes,
        port: int,
        connect_timeout: float | None,
        tls_creator: IOpenSSLClientConnectionCreator | None,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._policy = policy
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self._tls_creator = tls_creator

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Resolve once through a fresh filtering resolver, then connect (with TLS for https).

        Fails with :class:`DestinationRefused` when the name resolved to any refused address, with
        :class:`UpstreamError` (``kind="dns"``) when it did not resolve, and with
        :class:`~twisted.internet.defer.CancelledError` when cancelled during the lookup (so that
        a caller's timeout is not mistaken for a DNS failure).
        """
        resolver = _FilteringResolver(self._resolver, self._policy)
        reactor = _FilteringReactor(self._reactor, resolver)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            reactor, self._host, self._port,
            timeout=30 if self._connect_timeout is None else self._connect_timeout,
        )
        if self._tls_creator is not None:
            endpoint = wrapClientTLS(self._tls_creator, endpoint)
        attempt = endpoint.connect(protocolFactory)
        cancelled = False

        def cancel(result: Deferred[IProtocol]) -> None:
            nonlocal cancelled
            cancelled = True
            attempt.cancel()

        def translate(failure: Failure) -> Failure:
            if not failure.check(DNSLookupError):
                return failure
            if cancelled:
                raise CancelledError()
            if resolver.refusal is not None:
                log.debug(
                    "Refused destination {host}: {reason}",
                    host=self._host.decode("ascii", "replace"),
                    reason=resolver.refusal,
                )
                raise _refused(resolver.refusal)
            raise UpstreamError("Host name does not resolve", kind="dns")

        result: Deferred[IProtocol] = Deferred(cancel)
        attempt.addErrback(translate).chainDeferred(result)
        return result


@implementer(IAgentEndpointFactory)
class PolicyEndpointFactory:
    """The :class:`IAgentEndpointFactory` for ``Agent.usingEndpointFactory``: policed endpoints.

    :param reactor: provides ``IReactorTCP`` and ``IReactorTime`` (and usually ``nameResolver``).
    :param address_policy: judges every resolved address.
    :param tls_policy: makes the TLS connection creator for https origins.
    :param connect_timeout: seconds per connection attempt (``HostnameEndpoint``'s default if None).
    :param resolver: the name resolver to filter; the reactor's ``nameResolver`` by default.
    """

    def __init__(
        self,
        reactor: Any,
        address_policy: AddressPolicy,
        tls_policy: IPolicyForHTTPS,
        connect_timeout: float | None = None,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        self._reactor = reactor
        self._address_policy = address_policy
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._resolver: IHostnameResolver = (
            resolver if resolver is not None else reactor.nameResolver
        )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint for an http or https URI (``SchemeNotSupported`` for any other)."""
        if uri.scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
        elif uri.scheme == b"http":
            creator = None
        else:
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return _PolicyEndpoint(
            self._reactor,
            self._resolver,
            self._address_policy,
            uri.host,
            uri.port,
            self._connect_timeout,
            creator,
        )


@implementer(IOpenSSLTrustRoot)
class _PlatformAndExtraTrust:
    """Trust the platform's default roots and some extra certificates."""

    def __init__(self, extra: Sequence[crypto.X509]) -> None:
        self._extra = tuple(extra)

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None
        for certificate in self._extra:
            store.add_cert(certificate)


def _load_certificates(path: str) -> list[crypto.X509]:
    """Read the PEM certificates of a CA file (at startup).

    :raises ValueError: when the file cannot be read or holds no PEM certificate.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise ValueError(f"cannot read CA file {path!r}: {error.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"CA file {path!r} holds no valid PEM certificate") from None
    return [crypto.X509.from_cryptography(certificate) for certificate in certificates]


def make_tls_policy(ca_file: str | None = None) -> IPolicyForHTTPS:
    """The TLS policy for origins: verified certificates, hostname check, SNI.

    Trusts the platform's roots (OpenSSL default verify paths); ``ca_file`` (PEM, read now) adds
    its certificates as further trust roots, it does not replace the platform's.

    :raises ValueError: when ``ca_file`` cannot be read or holds no certificate.
    """
    trust: IOpenSSLTrustRoot
    if ca_file is None:
        trust = platformTrust()
    else:
        trust = _PlatformAndExtraTrust(_load_certificates(ca_file))
    return HostnameCachingHTTPSPolicy(BrowserLikePolicyForHTTPS(trustRoot=trust))
