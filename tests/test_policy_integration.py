"""SSRF defences end to end, on real loopback sockets.

A *canary* server listens on 127.0.0.1 (and on ::1 when the host has IPv6 loopback) and records
every connection and request it gets; an allowed origin listens on 127.0.0.2, on the same port as
the canary, so that any address mix-up (a name re-resolved, an odd notation read as 127.0.0.1)
would land on the canary. The proxy runs with ``--allow-network 127.0.0.2/32`` only. Every refused
case asserts the status, a short plain-text body, and that the canary saw nothing at all.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from imgproxy.logs import QuietSite
from tests.conftest import JPEG, FakeResolver, OriginResource, image

ALLOWED = (ipaddress.ip_network("127.0.0.2/32"),)


# -- the canary and the allowed origin ---------------------------------------------------------


class CanaryResource(Resource):
    """Records every request and answers with a valid image (so a leak would even look fine)."""

    isLeaf = True

    def __init__(self, hits: list[str]) -> None:
        super().__init__()
        self.hits = hits

    def render(self, request: Request) -> bytes:
        self.hits.append(f"request {request.method!r} {request.uri!r}")
        request.setHeader(b"content-type", b"image/jpeg")
        return JPEG


class CanarySite(Site):
    """A Site that also records every connection, before any byte is read."""

    noisy = False

    def __init__(self, hits: list[str]) -> None:
        super().__init__(CanaryResource(hits))
        self.hits = hits

    def buildProtocol(self, addr: Any) -> Any:
        self.hits.append(f"connection from {addr}")
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:
        pass


@attrs.define
class Net:
    """The allowed origin on 127.0.0.2:port and the canaries on 127.0.0.1:port and [::1]:port."""

    port: int
    origin: OriginResource
    hits: list[str]  # everything the canaries saw
    ipv6: bool  # whether a canary listens on [::1]:port
    listeners: list[Any]

    @property
    def base(self) -> str:
        return f"http://127.0.0.2:{self.port}"

    def route(self, path: str, handler: Any) -> str:
        self.origin.routes[path.encode()] = handler
        return self.base + path


def _start_net() -> Net:
    """Bind the origin on an ephemeral port, then the canaries on that same port."""
    for _ in range(20):
        hits: list[str] = []
        origin = OriginResource()
        first = reactor.listenTCP(0, QuietSite(origin), interface="127.0.0.2")
        port = first.getHost().port
        listeners = [first]
        try:
            listeners.append(reactor.listenTCP(port, CanarySite(hits), interface="127.0.0.1"))
        except CannotListenError:
            first.stopListening()
            continue
        ipv6 = socket.has_ipv6
        if ipv6:
            try:
                listeners.append(reactor.listenTCP(port, CanarySite(hits), interface="::1"))
            except CannotListenError:
                ipv6 = False
        return Net(port, origin, hits, ipv6, listeners)
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.fixture
def net() -> Iterator[Net]:
    started = _start_net()
    yield started
    for listener in started.listeners:
        pytest_twisted.blockon(listener.stopListening())


def names(net: Net) -> FakeResolver:
    """The table most tests use: one allowed name, one canary name, and some mixed answers."""
    return FakeResolver({
        "allowed.example.test": ["127.0.0.2"],
        "other.example.test": ["127.0.0.2"],
        "denied.example.test": ["127.0.0.2"],
        "canary.example.test": ["127.0.0.1"],
        "both.example.test": ["127.0.0.2", "127.0.0.1"],
        "both-reversed.example.test": ["127.0.0.1", "127.0.0.2"],
        "mapped.example.test": ["::ffff:127.0.0.1"],
        "v6.example.test": ["::1"],
        "any.example.test": ["0.0.0.0"],
    })


async def get(client_pool: Any, url: str) -> tuple[Any, bytes]:
    response = await treq.get(url, pool=client_pool)
    return response, await treq.content(response)


def assert_short_refusal(response: Any, body: bytes, net: Net, status: int) -> None:
    """The status, and a short plain-text body that names no address, port or host."""
    assert response.code == status, body
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert len(body) <= 80, body
    text = body.decode("ascii")
    assert text.endswith("\n") and text.count("\n") == 1, body
    for secret in ("127.", "::", "0x", str(net.port), "example", "canary", "ip6-",
                   "Traceback", "<"):
        assert secret not in text, body


# -- the cases ---------------------------------------------------------------------------------

# Targets that must be refused (403) before any connection to the canary. "{port}" is the
# canary's port (also the origin's, on 127.0.0.2).
REFUSED_LITERALS = [
    "http://127.0.0.1:{port}/plain.jpg",
    "http://0.0.0.0:{port}/any.jpg",  # Linux connects 0.0.0.0 to 127.0.0.1
    "http://2130706433:{port}/decimal.jpg",
    "http://0x7f.1:{port}/hex-short.jpg",
    "http://0177.0.0.1:{port}/octal.jpg",
    "http://127.1:{port}/short.jpg",
    "http://0x7f000001:{port}/hex.jpg",
    "http://0:{port}/zero.jpg",
    "http://127.000.000.001:{port}/padded.jpg",
    "http://0x7f.0x0.0x0.0x1:{port}/hex-quad.jpg",
    "http://127.0.0.1.:{port}/trailing-dot.jpg",
    "http://[::ffff:127.0.0.1]:{port}/mapped.jpg",
    "http://[::ffff:7f00:1]:{port}/mapped-hex.jpg",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/mapped-long.jpg",
    "http://[::127.0.0.1]:{port}/compatible.jpg",
    "http://[64:ff9b::7f00:1]:{port}/nat64.jpg",
    "http://[::]:{port}/unspecified.jpg",
]
# Non-ASCII spellings that IDNA (UTS 46) maps to a refused host.
REFUSED_UNICODE = [
    "http://127\u30020\u30020\u30021:{port}/ideographic-dots.jpg",
    "http://\uff11\uff12\uff17.0.0.1:{port}/fullwidth-digits.jpg",
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{port}/fullwidth.jpg",
]
IPV6_LOOPBACK = [
    "http://[::1]:{port}/v6.jpg",
    "http://[0:0:0:0:0:0:0:1]:{port}/v6-long.jpg",
]
REFUSED_NAMES = [
    "http://localhost:{port}/a.jpg",
    "http://LOCALHOST:{port}/b.jpg",
    "http://localhost.:{port}/c.jpg",
    "http://foo.localhost:{port}/d.jpg",
    "http://canary:{port}/e.jpg",  # dotless
    "http://ip6-localhost:{port}/f.jpg",  # dotless, in /etc/hosts on Debian
]
BAD_REQUESTS = [
    "http://user@127.0.0.2:{port}/userinfo.jpg",
    "http://user:pw@127.0.0.1:{port}/userinfo-canary.jpg",
    "http://127.0.0.2:{port}@127.0.0.1:{port}/confusion.jpg",
    "http://127.0.0.2:{port}\\@127.0.0.1:{port}/backslash.jpg",
    "ftp://127.0.0.1:{port}/a.jpg",
    "gopher://127.0.0.1:{port}/_GET%20/",
    "dict://127.0.0.1:{port}/info",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "data:image/png;base64,iVBORw0KGgo=",
    "//127.0.0.1:{port}/scheme-relative.jpg",
    "http://127.0.0.%31:{port}/percent.jpg",
    "http://127.0.0.1\t:{port}/tab.jpg",
    "http://[::1%25lo]:{port}/zone.jpg",
    "http://127.0.0.1:{port}:{port}/two-ports.jpg",
    "http://127.0.0.1:-1/negative-port.jpg",
    "http:/127.0.0.1:{port}/one-slash.jpg",
]


def _id(target: str) -> str:
    """A readable test id: the authority of a URL, or the URL itself."""
    parts = target.split("/")
    return parts[2] if len(parts) > 3 and parts[2] else target


def _cases(*groups: tuple[list[str], int, str]) -> list[Any]:
    return [
        pytest.param(target, status, id=f"{kind}:{_id(target)}")
        for targets, status, kind in groups
        for target in targets
    ]


@pytest.fixture(params=["system-resolver", "static-resolver"])
def guarded(request: Any, make_proxy: Any, net: Net) -> Any:
    """The proxy under test, allowing only 127.0.0.2, with the system or the static resolver."""
    resolver = names(net) if request.param == "static-resolver" else None
    return make_proxy(resolver=resolver, allow_network=ALLOWED)


@pytest.mark.parametrize(
    "template,status",
    _cases((REFUSED_LITERALS, 403, "literal"), (REFUSED_NAMES, 403, "name"),
           (REFUSED_UNICODE, 403, "unicode"), (BAD_REQUESTS, 400, "bad")),
)
@pytest_twisted.ensureDeferred
async def test_direct_target_never_reaches_canary(net, guarded, client_pool, template, status):
    """A signed URL naming the canary in any notation is refused and the canary sees nothing."""
    response, body = await get(client_pool, guarded.url(template.format(port=net.port)))
    assert_short_refusal(response, body, net, status)
    assert net.hits == []
    assert net.origin.seen == []


@pytest.mark.parametrize("template", IPV6_LOOPBACK)
@pytest_twisted.ensureDeferred
async def test_ipv6_loopback_never_reaches_canary(net, guarded, client_pool, template):
    """[::1] is refused while a canary really listens on [::1] at that port."""
    if not net.ipv6:
        pytest.skip("no IPv6 loopback on this host")
    response, body = await get(client_pool, guarded.url(template.format(port=net.port)))
    assert_short_refusal(response, body, net, 403)
    assert net.hits == []


@pytest_twisted.ensureDeferred
async def test_canary_is_reachable_without_the_proxy(net, client_pool):
    """The canaries really listen where the refused URLs point (so the tests above can fail)."""
    targets = ["http://127.0.0.1:{port}/x", "http://[::ffff:127.0.0.1]:{port}/y",
               "http://0.0.0.0:{port}/z"]
    if net.ipv6:
        targets.append("http://[::1]:{port}/w")
    agent = Agent(reactor, pool=client_pool)  # treq's URL parser rejects mapped literals
    for template in targets:
        response = await agent.request(b"GET", template.format(port=net.port).encode())
        assert (response.code, await treq.content(response)) == (200, JPEG)
    assert len([hit for hit in net.hits if hit.startswith("request")]) == len(targets)


@pytest_twisted.ensureDeferred
async def test_allowed_literal_works(net, guarded, client_pool):
    """The allowed origin on 127.0.0.2, same port as the canary, is served."""
    url = net.route("/ok.jpg", image(JPEG))
    response, body = await get(client_pool, guarded.url(url))
    assert (response.code, body) == (200, JPEG)
    assert [seen.path for seen in net.origin.seen] == [b"/ok.jpg"]
    assert net.hits == []


# -- names resolved by the injected resolver -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_name_to_allowed_address_works(net, make_proxy, client_pool):
    """A name resolving to 127.0.0.2 reaches the origin, with the name in the Host header."""
    resolver = names(net)
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    net.route("/named.jpg", image(JPEG))
    url = f"http://allowed.example.test:{net.port}/named.jpg"
    response, body = await get(client_pool, proxy.url(url))
    assert (response.code, body) == (200, JPEG)
    assert net.origin.seen[-1].headers[b"Host"] == [f"allowed.example.test:{net.port}".encode()]
    assert resolver.lookups == ["allowed.example.test"]
    assert net.hits == []


@pytest.mark.parametrize(
    "name",
    ["canary.example.test", "both.example.test", "both-reversed.example.test",
     "mapped.example.test", "v6.example.test", "any.example.test"],
)
@pytest_twisted.ensureDeferred
async def test_name_to_refused_address_refused(net, make_proxy, client_pool, name):
    """A name with any refused address among its answers is refused whole; nobody is dialled."""
    resolver = names(net)
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    net.route("/named.jpg", image(JPEG))
    response, body = await get(client_pool, proxy.url(f"http://{name}:{net.port}/named.jpg"))
    assert_short_refusal(response, body, net, 403)
    assert resolver.lookups == [name]  # refused on the answer, not on the name
    assert net.hits == []
    assert net.origin.seen == []


@pytest_twisted.ensureDeferred
async def test_special_names_not_looked_up(net, make_proxy, client_pool):
    """localhost-like and dotless names are refused before any lookup."""
    resolver = names(net)
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    for template in REFUSED_NAMES + REFUSED_UNICODE[2:]:
        response, body = await get(client_pool, proxy.url(template.format(port=net.port)))
        assert_short_refusal(response, body, net, 403)
    assert resolver.lookups == []
    assert net.hits == []


# -- redirects ---------------------------------------------------------------------------------


def redirect(location: str, code: int = 302) -> Any:
    def handler(request: Request) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"location", location.encode())
        return b"moved"

    return handler


@pytest.mark.parametrize(
    "template",
    [pytest.param(t, id=_id(t)) for t in REFUSED_LITERALS + REFUSED_NAMES]
    + [pytest.param("//127.0.0.1:{port}/scheme-relative.jpg", id="scheme-relative"),
       pytest.param("http://canary.example.test:{port}/dns.jpg", id="name-to-canary"),
       pytest.param("http://both.example.test:{port}/dns.jpg", id="name-to-both")],
)
@pytest.mark.parametrize("code", [302, 307])
@pytest_twisted.ensureDeferred
async def test_redirect_never_reaches_canary(net, make_proxy, client_pool, template, code):
    """A redirect from the allowed origin to the canary, in any form, is a 403; canary untouched."""
    resolver = names(net)
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    net.route("/hop", redirect(template.format(port=net.port), code))
    url = f"http://allowed.example.test:{net.port}/hop"
    response, body = await get(client_pool, proxy.url(url))
    assert_short_refusal(response, body, net, 403)
    assert [seen.path for seen in net.origin.seen] == [b"/hop"]
    assert net.hits == []


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest_twisted.ensureDeferred
async def test_redirect_to_ipv6_loopback_refused(net, make_proxy, client_pool, code):
    """A redirect to [::1] is refused while a canary listens there."""
    if not net.ipv6:
        pytest.skip("no IPv6 loopback on this host")
    proxy = make_proxy(allow_network=ALLOWED)
    url = net.route("/hop6", redirect(f"http://[::1]:{net.port}/v6.jpg", code))
    response, body = await get(client_pool, proxy.url(url))
    assert_short_refusal(response, body, net, 403)
    assert net.hits == []


@pytest.mark.parametrize(
    "location",
    ["http://user@127.0.0.1:{port}/", "gopher://127.0.0.1:{port}/_x", "file:///etc/passwd",
     "ftp://127.0.0.1:{port}/a.jpg"],
)
@pytest_twisted.ensureDeferred
async def test_redirect_to_unusable_url_is_bad_gateway(net, guarded, client_pool, location):
    """A redirect to userinfo or another scheme is the origin's fault: 502, canary untouched."""
    url = net.route("/bad-hop", redirect(location.format(port=net.port)))
    response, body = await get(client_pool, guarded.url(url))
    assert response.code == 502
    assert len(body) <= 80 and b"127." not in body
    assert net.hits == []


@pytest_twisted.ensureDeferred
async def test_redirect_to_allowed_address_followed(net, make_proxy, client_pool):
    """Redirects between allowed names and addresses still work (the guard is not a blanket)."""
    proxy = make_proxy(resolver=names(net), allow_network=ALLOWED)
    net.route("/final.jpg", image(JPEG))
    net.route("/hop", redirect(f"http://127.0.0.2:{net.port}/final.jpg"))
    response, body = await get(client_pool, proxy.url(f"http://other.example.test:{net.port}/hop"))
    assert (response.code, body) == (200, JPEG)
    assert [seen.path for seen in net.origin.seen] == [b"/hop", b"/final.jpg"]
    assert net.hits == []


# -- DNS rebinding -----------------------------------------------------------------------------


def closing_image(request: Request) -> bytes:
    """An image answered with Connection: close, so the next request needs a new connection."""
    request.setHeader(b"connection", b"close")
    return image(JPEG)(request)


@pytest_twisted.ensureDeferred
async def test_rebinding_checked_address_is_dialled(net, make_proxy, client_pool):
    """A name answering 127.0.0.2 first and 127.0.0.1 afterwards: the checked answer is dialled."""
    resolver = FakeResolver(
        {"rebind.example.test": lambda n: ["127.0.0.2"] if n == 1 else ["127.0.0.1"]})
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    net.route("/rebind-1.jpg", closing_image)
    net.route("/rebind-2.jpg", closing_image)
    base = f"http://rebind.example.test:{net.port}"
    response, body = await get(client_pool, proxy.url(base + "/rebind-1.jpg"))
    assert (response.code, body) == (200, JPEG)
    assert net.hits == []  # not dialled with a second, unchecked lookup
    response, body = await get(client_pool, proxy.url(base + "/rebind-2.jpg"))
    assert_short_refusal(response, body, net, 403)
    assert resolver.lookups == ["rebind.example.test"] * 2  # a new connection, a new lookup
    assert [seen.path for seen in net.origin.seen] == [b"/rebind-1.jpg"]
    assert net.hits == []


@pytest_twisted.ensureDeferred
async def test_rebinding_flapping_answers(net, make_proxy, client_pool):
    """A name flapping between the origin and the canary never gets the canary dialled."""
    resolver = FakeResolver(
        {"flap.example.test": lambda n: ["127.0.0.2"] if n % 2 else ["127.0.0.1"]})
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    codes = []
    for i in range(8):
        net.route(f"/flap-{i}.jpg", closing_image)
        response, body = await get(
            client_pool, proxy.url(f"http://flap.example.test:{net.port}/flap-{i}.jpg"))
        codes.append(response.code)
        if response.code == 200:
            assert body == JPEG
    assert codes == [200, 403] * 4
    assert len(resolver.lookups) == 8
    assert [seen.path for seen in net.origin.seen] == [b"/flap-%d.jpg" % i for i in (0, 2, 4, 6)]
    assert net.hits == []


# -- the operator's lists ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deny_network_beats_broader_allow(net, make_proxy, client_pool):
    """--deny-network 127.0.0.2/32 wins over --allow-network 127.0.0.0/8; the rest of /8 works."""
    third = OriginResource()
    third.routes[b"/third.jpg"] = image(JPEG)
    port = reactor.listenTCP(0, QuietSite(third), interface="127.0.0.3")
    try:
        proxy = make_proxy(allow_network=(ipaddress.ip_network("127.0.0.0/8"),),
                           deny_network=(ipaddress.ip_network("127.0.0.2/32"),))
        url = net.route("/denied.jpg", image(JPEG))
        response, body = await get(client_pool, proxy.url(url))
        assert_short_refusal(response, body, net, 403)
        assert net.origin.seen == []
        response, body = await get(
            client_pool, proxy.url(f"http://127.0.0.3:{port.getHost().port}/third.jpg"))
        assert (response.code, body) == (200, JPEG)
    finally:
        await port.stopListening()
    assert net.hits == []


@pytest_twisted.ensureDeferred
async def test_deny_network_beats_equal_allow(net, make_proxy, client_pool):
    """The same network in --allow-network and --deny-network is denied."""
    proxy = make_proxy(allow_network=ALLOWED, deny_network=ALLOWED)
    url = net.route("/denied.jpg", image(JPEG))
    response, body = await get(client_pool, proxy.url(url))
    assert_short_refusal(response, body, net, 403)
    assert net.origin.seen == []


@pytest_twisted.ensureDeferred
async def test_allow_host(net, make_proxy, client_pool):
    """With --allow-host only that host is fetched: other names, literals and redirects are 403."""
    resolver = names(net)
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED,
                       allow_host=("allowed.example.test",))
    net.route("/a.jpg", image(JPEG))
    net.route("/hop", redirect(f"http://other.example.test:{net.port}/a.jpg"))
    response, body = await get(
        client_pool, proxy.url(f"http://allowed.example.test:{net.port}/a.jpg"))
    assert (response.code, body) == (200, JPEG)
    for target in (f"http://other.example.test:{net.port}/a.jpg", f"{net.base}/a.jpg",
                   f"http://allowed.example.test:{net.port}/hop"):
        response, body = await get(client_pool, proxy.url(target))
        assert_short_refusal(response, body, net, 403)
    assert "other.example.test" not in resolver.lookups  # refused before the lookup
    assert [seen.path for seen in net.origin.seen] == [b"/a.jpg", b"/hop"]
    assert net.hits == []


@pytest.mark.parametrize("pattern", ["denied.example.test", "*.example.test"])
@pytest_twisted.ensureDeferred
async def test_deny_host(net, make_proxy, client_pool, pattern):
    """A --deny-host name (exact or *.suffix) is a 403 without a lookup, also after a redirect."""
    resolver = names(net)
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED, deny_host=(pattern,))
    net.route("/a.jpg", image(JPEG))
    net.route("/hop", redirect(f"http://denied.example.test:{net.port}/a.jpg"))
    response, body = await get(
        client_pool, proxy.url(f"http://denied.example.test:{net.port}/a.jpg"))
    assert_short_refusal(response, body, net, 403)
    response, body = await get(client_pool, proxy.url(f"{net.base}/hop"))
    assert_short_refusal(response, body, net, 403)
    assert "denied.example.test" not in resolver.lookups
    assert [seen.path for seen in net.origin.seen] == [b"/hop"]


# -- international names -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idn_target_fetched_by_a_label(net, make_proxy, client_pool):
    """A Unicode host is looked up and sent in its IDNA A-label form."""
    resolver = FakeResolver({"xn--bcher-kva.example.test": ["127.0.0.2"]})
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    net.route("/idn.jpg", image(JPEG))
    response, body = await get(
        client_pool, proxy.url(f"http://b\u00fccher.example.test:{net.port}/idn.jpg"))
    assert (response.code, body) == (200, JPEG)
    assert resolver.lookups == ["xn--bcher-kva.example.test"]
    assert net.origin.seen[-1].headers[b"Host"] == [
        f"xn--bcher-kva.example.test:{net.port}".encode()]



@pytest_twisted.ensureDeferred
async def test_redirect_to_idn_host_followed(net, make_proxy, client_pool):
    """A redirect whose Location names a Unicode host is followed like a direct URL to it."""
    resolver = FakeResolver({"xn--bcher-kva.example.test": ["127.0.0.2"]})
    proxy = make_proxy(resolver=resolver, allow_network=ALLOWED)
    net.route("/idn.jpg", image(JPEG))
    net.route("/hop", redirect(f"http://b\u00fccher.example.test:{net.port}/idn.jpg"))
    response, body = await get(client_pool, proxy.url(f"{net.base}/hop"))
    assert (response.code, body) == (200, JPEG), body


@pytest.mark.parametrize("template", REFUSED_UNICODE)
@pytest_twisted.ensureDeferred
async def test_redirect_to_unicode_spelling_never_reaches_canary(
        net, guarded, client_pool, template):
    """A Location spelling the canary in Unicode fails closed (403, or 502 while IDN hosts in a
    Location are not followed) and the canary sees nothing."""
    url = net.route("/hop", redirect(template.format(port=net.port)))
    response, body = await get(client_pool, guarded.url(url))
    assert response.code in (403, 502), body
    assert net.hits == []
