"""End-to-end behaviour of the proxy against real origins on loopback."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET

from tests.conftest import JPEG, PNG, chunked, free_port, image, sleep


async def get(client_pool, url, method="GET", headers=None):
    response = await treq.request(method, url, headers=headers, pool=client_pool)
    body = await treq.content(response)
    return response, body


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


@pytest_twisted.ensureDeferred
async def test_image_relayed(origin, proxy, client_pool):
    """A signed URL to an image answers 200 with the exact bytes and the sniffed type."""
    url = origin.route("/a.jpg", image(JPEG, b"application/octet-stream", etag=b'"v1"'))
    response, body = await get(client_pool, proxy.url(url))
    assert response.code == 200
    assert body == JPEG
    assert header(response, "content-type") == "image/jpeg"
    assert response.length == len(JPEG)  # the client parser moves Content-Length here
    assert header(response, "etag") == '"v1"'


@pytest.mark.parametrize("form", ["hex_path", "query_path", "base64_path"])
@pytest_twisted.ensureDeferred
async def test_all_url_forms(origin, proxy, client_pool, form):
    """The camo hex, camo query and go-camo base64 forms all serve the image."""
    url = origin.route("/a.png", image(PNG, b"image/png"))
    response, body = await get(client_pool, proxy.url(url, form))
    assert (response.code, body) == (200, PNG)


@pytest_twisted.ensureDeferred
async def test_large_chunked_body(origin, proxy, client_pool):
    """A 3 MiB chunked body (no Content-Length) streams through intact."""
    big = JPEG + os.urandom(3 * 2**20)
    url = origin.route("/big.jpg", chunked(big, chunk=65536))
    response, body = await get(client_pool, proxy.url(url))
    assert response.code == 200
    assert response.length == UNKNOWN_LENGTH
    assert body == big


@pytest_twisted.ensureDeferred
async def test_slow_drip(origin, proxy, client_pool):
    """A body dripped in small pieces with pauses still arrives whole."""
    url = origin.route("/drip.jpg", chunked(JPEG, chunk=500, delay=0.02))
    response, body = await get(client_pool, proxy.url(url))
    assert (response.code, body) == (200, JPEG)


@pytest_twisted.ensureDeferred
async def test_upstream_header_policy(origin, proxy, client_pool):
    """Upstream gets only our headers and the client's validators, never the client's others."""
    url = origin.route("/a.jpg", image(JPEG))
    await get(client_pool, proxy.url(url), headers={
        "Cookie": "session=secret", "Authorization": "Bearer x", "Referer": "https://site/",
        "X-Forwarded-For": "203.0.113.9", "If-None-Match": '"abc"', "User-Agent": "browser",
        "Accept-Encoding": "gzip",
    })
    seen = origin.resource.seen[-1].headers
    names = {name.lower() for name in seen}
    assert names <= {b"host", b"user-agent", b"accept", b"accept-encoding", b"via",
                     b"if-none-match", b"if-modified-since", b"connection"}
    assert seen[b"User-Agent"][0].startswith(b"Mozilla/5.0 (compatible; imageproxy/")
    assert seen[b"Accept-Encoding"] == [b"identity"]
    assert seen[b"If-None-Match"] == [b'"abc"']
    assert b"image/" in seen[b"Accept"][0]
    assert b"imageproxy" in seen[b"Via"][0]


@pytest_twisted.ensureDeferred
async def test_response_header_policy(origin, proxy, client_pool):
    """The client gets the allowlisted origin headers and defensive headers, never Set-Cookie."""
    url = origin.route("/a.jpg", image(
        JPEG, set_cookie=b"track=1", last_modified=b"Tue, 01 Dec 2026 10:00:00 GMT",
        expires=b"Wed, 01 Dec 2027 10:00:00 GMT", x_secret=b"internal",
        access_control_allow_origin=b"*"))
    response, _ = await get(client_pool, proxy.url(url))
    assert response.code == 200
    assert header(response, "set-cookie") is None
    assert header(response, "x-secret") is None
    assert header(response, "last-modified") == "Tue, 01 Dec 2026 10:00:00 GMT"
    assert header(response, "expires") == "Wed, 01 Dec 2027 10:00:00 GMT"
    assert header(response, "cache-control") == "public, max-age=31536000"
    assert header(response, "x-content-type-options") == "nosniff"
    assert header(response, "x-frame-options") == "deny"
    assert header(response, "referrer-policy") == "no-referrer"
    assert "sandbox" in header(response, "content-security-policy")


@pytest_twisted.ensureDeferred
async def test_origin_cache_control_kept(origin, proxy, client_pool):
    """An origin's own Cache-Control is relayed instead of the default."""
    url = origin.route("/a.jpg", image(JPEG, cache_control=b"max-age=60"))
    response, _ = await get(client_pool, proxy.url(url))
    assert header(response, "cache-control") == "max-age=60"


@pytest_twisted.ensureDeferred
async def test_head(origin, proxy, client_pool):
    """HEAD is sent upstream as HEAD and answered with the headers only."""
    url = origin.route("/a.jpg", image(JPEG))
    response, body = await get(client_pool, proxy.url(url), method="HEAD")
    assert response.code == 200
    assert body == b""
    assert header(response, "content-type") == "image/jpeg"
    assert origin.resource.seen[-1].method == b"HEAD"


@pytest_twisted.ensureDeferred
async def test_head_judged_on_declared_type(origin, proxy, client_pool):
    """HEAD of a resource declared text/html is refused (no body to sniff)."""
    url = origin.route("/page", image(b"<html>", b"text/html"))
    response, _ = await get(client_pool, proxy.url(url), method="HEAD")
    assert response.code == 502


@pytest_twisted.ensureDeferred
async def test_not_modified(origin, proxy, client_pool):
    """An origin 304 to the client's If-None-Match is passed through as 304."""

    def conditional(request):
        if request.getHeader(b"if-none-match") == b'"v1"':
            request.setResponseCode(304)
            request.setHeader(b"etag", b'"v1"')
            return b""
        return image(JPEG, etag=b'"v1"')(request)

    url = origin.route("/c.jpg", conditional)
    response, body = await get(client_pool, proxy.url(url), headers={"If-None-Match": '"v1"'})
    assert response.code == 304
    assert body == b""
    assert header(response, "etag") == '"v1"'


def redirect(location: bytes, code: int = 302):
    def handler(request):
        request.setResponseCode(code)
        request.setHeader(b"location", location)
        return b"moved"

    return handler


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest_twisted.ensureDeferred
async def test_redirects_followed(origin, proxy, client_pool, code):
    """Every redirect status is followed, with a relative Location resolved."""
    origin.route("/final.jpg", image(JPEG))
    url = origin.route("/start", redirect(b"/final.jpg", code))
    response, body = await get(client_pool, proxy.url(url))
    assert (response.code, body) == (200, JPEG)


@pytest_twisted.ensureDeferred
async def test_too_many_redirects(origin, make_proxy, client_pool):
    """More redirects than --max-redirects is a 502."""
    proxy = make_proxy(max_redirects=2)
    for i in range(4):
        origin.route(f"/r{i}", redirect(f"/r{i + 1}".encode()))
    origin.route("/r4", image(JPEG))
    response, _ = await get(client_pool, proxy.url(origin.base + "/r0"))
    assert response.code == 502
    assert len(origin.resource.seen) == 3


@pytest_twisted.ensureDeferred
async def test_redirect_to_other_scheme_refused(origin, proxy, client_pool):
    """A redirect to a non-http(s) URL is a 502 and is not followed."""
    url = origin.route("/evil", redirect(b"file:///etc/passwd"))
    response, _ = await get(client_pool, proxy.url(url))
    assert response.code == 502


@pytest_twisted.ensureDeferred
async def test_redirect_to_refused_network(origin, make_proxy, client_pool):
    """A redirect to an address outside the allowed networks is a 403."""
    proxy = make_proxy(allow_network=(__import__("ipaddress").ip_network("127.0.0.1/32"),))
    url = origin.route("/evil", redirect(b"http://10.0.0.1/secret.jpg"))
    response, _ = await get(client_pool, proxy.url(url))
    assert response.code == 403


@pytest.mark.parametrize("status,expected", [(404, 404), (410, 404), (500, 502), (503, 502),
                                             (403, 502), (204, 502)])
@pytest_twisted.ensureDeferred
async def test_upstream_status_mapping(origin, proxy, client_pool, status, expected):
    """Upstream statuses map to the contract's client statuses, with a plain-text body."""

    def handler(request):
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html")
        return b"<html>upstream page</html>"

    url = origin.route("/x", handler)
    response, body = await get(client_pool, proxy.url(url))
    assert response.code == expected
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    assert header(response, "cache-control") == "no-store"
    assert b"upstream page" not in body


@pytest_twisted.ensureDeferred
async def test_too_large_declared(origin, make_proxy, client_pool):
    """A Content-Length over --max-size is a 502 before any body is read."""
    proxy = make_proxy(max_size=1000)
    url = origin.route("/big.jpg", image(JPEG))
    response, body = await get(client_pool, proxy.url(url))
    assert response.code == 502
    assert b"too large" in body


@pytest_twisted.ensureDeferred
async def test_too_large_streamed_cut(origin, make_proxy, client_pool):
    """A chunked body passing --max-size mid-stream is cut: never a complete 200."""
    proxy = make_proxy(max_size=200_000)
    url = origin.route("/big.jpg", chunked(JPEG + os.urandom(400_000), chunk=16384))
    response = await treq.get(proxy.url(url), pool=client_pool)
    assert response.code == 200  # headers were out before the limit was passed
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_too_large_within_sniff_window(origin, make_proxy, client_pool):
    """A body over --max-size before the sniffer decided is a clean 502."""
    proxy = make_proxy(max_size=100)
    url = origin.route("/big.jpg", chunked(b"\x00" * 4096, chunk=4096))
    response, _ = await get(client_pool, proxy.url(url))
    assert response.code == 502


@pytest_twisted.ensureDeferred
async def test_upstream_timeout(origin, make_proxy, client_pool):
    """An origin that never answers gives 504 within --timeout."""
    proxy = make_proxy(timeout=0.5)
    url = origin.route("/hang", lambda request: NOT_DONE_YET)
    response, _ = await get(client_pool, proxy.url(url))
    assert response.code == 504


@pytest_twisted.ensureDeferred
async def test_first_bytes_timeout(origin, make_proxy, client_pool):
    """Headers but no body bytes within --timeout is a 504, not a hang."""
    proxy = make_proxy(timeout=0.5)

    def headers_only(request):
        request.setHeader(b"content-type", b"image/jpeg")
        request.setHeader(b"content-length", b"5000")
        request.write(b"")
        return NOT_DONE_YET

    url = origin.route("/stall", headers_only)
    response, _ = await get(client_pool, proxy.url(url))
    assert response.code == 504


@pytest_twisted.ensureDeferred
async def test_idle_mid_body_cut(origin, make_proxy, client_pool):
    """An origin that stalls mid-body for longer than --idle-timeout gets the relay cut."""
    proxy = make_proxy(idle_timeout=0.5)

    def stall(request):
        request.setHeader(b"content-type", b"image/jpeg")
        request.setHeader(b"content-length", b"100000")
        request.write(JPEG)
        return NOT_DONE_YET

    url = origin.route("/stall", stall)
    response = await treq.get(proxy.url(url), pool=client_pool)
    assert response.code == 200
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_unreachable(proxy, client_pool):
    """An origin port with nothing listening is a 502."""
    response, _ = await get(client_pool, proxy.url(f"http://127.0.0.1:{free_port()}/a.jpg"))
    assert response.code == 502


class Garbage(Protocol):
    def dataReceived(self, data):
        self.transport.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_bad_http(proxy, client_pool):
    """An origin speaking something other than HTTP is a 502."""
    port = reactor.listenTCP(0, Factory.forProtocol(Garbage), interface="127.0.0.1")
    try:
        response, _ = await get(client_pool, proxy.url(f"http://127.0.0.1:{port.getHost().port}/"))
        assert response.code == 502
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    "target,expected",
    [
        ("http://user:pass@127.0.0.1/a.jpg", 400),
        ("/relative/path.jpg", 400),
        ("ftp://127.0.0.1/a.jpg", 400),
        ("javascript:alert(1)", 400),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_targets(proxy, client_pool, target, expected):
    """Signed but unusable target URLs are 400."""
    response, _ = await get(client_pool, proxy.url(target))
    assert response.code == expected


@pytest.mark.parametrize(
    "path,expected",
    [
        ("/", 404),
        ("/favicon.ico", 404),
        ("/a/b/c", 404),
        ("/" + "0" * 40 + "/" + b"http://127.0.0.1/a".hex(), 403),
        ("/zzzz/qqqq!", 400),
        ("/" + "0" * 40 + "/abc", 400),
    ],
)
@pytest_twisted.ensureDeferred
async def test_routes_and_signatures(proxy, client_pool, path, expected):
    """Unknown routes are 404, bad signatures 403, malformed paths 400, as plain text."""
    response, body = await get(client_pool, proxy.base + path)
    assert response.code == expected
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    assert b"Traceback" not in body and b"<html" not in body.lower()


@pytest_twisted.ensureDeferred
async def test_method_not_allowed(proxy, client_pool):
    """Methods other than GET and HEAD are 405 with Allow."""
    response, _ = await get(client_pool, proxy.url("http://127.0.0.1/a.jpg"), method="POST")
    assert response.code == 405
    assert header(response, "allow") == "GET, HEAD"


@pytest_twisted.ensureDeferred
async def test_healthz(proxy, client_pool):
    """/healthz answers 200."""
    response, body = await get(client_pool, proxy.base + "/healthz")
    assert (response.code, body) == (200, b"ok\n")


@pytest_twisted.ensureDeferred
async def test_loop_refused(origin, proxy, client_pool):
    """A request that already went through an imageproxy (Via token) is refused."""
    url = origin.route("/a.jpg", image(JPEG))
    response, _ = await get(client_pool, proxy.url(url), headers={"Via": "1.1 imageproxy"})
    assert response.code == 403
    assert origin.resource.seen == []


# -- streaming: backpressure and disconnects ----------------------------------------------


class CountingBody:
    """An origin route streaming ``total`` bytes as fast as its client reads, counting them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.lost: Deferred[None] = Deferred()

    def __call__(self, request):
        request.setHeader(b"content-type", b"image/jpeg")
        request.setHeader(b"content-length", b"%d" % self.total)
        body = self

        class Producer:
            def resumeProducing(self):
                while not request._disconnected and body.sent < body.total:
                    chunk = JPEG[:8192] if body.sent == 0 else b"\x00" * 65536
                    chunk = chunk[: body.total - body.sent]
                    body.sent += len(chunk)
                    request.write(chunk)
                    if self.paused:
                        return
                if body.sent >= body.total and not request._disconnected:
                    request.unregisterProducer()
                    request.finish()

            paused = False

            def pauseProducing(self):
                self.paused = True

            def stopProducing(self):
                pass

        producer = Producer()

        def resume():
            producer.paused = False
            producer.resumeProducing()

        producer_resume = resume
        request.registerProducer(type("P", (), {
            "pauseProducing": lambda s: producer.pauseProducing(),
            "resumeProducing": lambda s: producer_resume(),
            "stopProducing": lambda s: None,
        })(), True)
        request.notifyFinish().addBoth(lambda _: self.lost.called or self.lost.callback(None))
        reactor.callLater(0, resume)
        return NOT_DONE_YET


class StalledClient(Protocol):
    """Sends one request, reads the first bytes, then stops reading."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.received = 0
        self.first: Deferred[None] = Deferred()

    def connectionMade(self):
        self.transport.write(b"GET " + self.path + b" HTTP/1.1\r\nHost: x\r\n\r\n")

    def dataReceived(self, data):
        self.received += len(data)
        if not self.first.called:
            self.transport.pauseProducing()
            self.first.callback(None)


async def raw_client(proxy, url: str) -> StalledClient:
    """Connect a :class:`StalledClient` that sends one request for ``url`` to ``proxy``."""
    client = StalledClient(url[len(proxy.base):].encode())
    await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port.getHost().port), client)
    return client


async def stalled_client(proxy, url: str) -> StalledClient:
    """A raw client that has received its first bytes and stopped reading."""
    client = await raw_client(proxy, url)
    await client.first
    return client


@pytest_twisted.ensureDeferred
async def test_backpressure(origin, make_proxy):
    """With a 64 MiB body and a client that stops reading, the proxy pulls only a few MiB."""
    proxy = make_proxy(max_size=128 * 2**20, idle_timeout=30)
    body = CountingBody(64 * 2**20)
    url = origin.route("/huge.jpg", body)
    client = await stalled_client(proxy, proxy.url(url))
    await sleep(1.5)
    pulled = body.sent
    assert pulled < 8 * 2**20, pulled
    client.transport.abortConnection()
    await body.lost  # the client's disconnect reached the origin


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream(origin, make_proxy):
    """A client that disconnects mid-stream makes the proxy close the origin connection."""
    proxy = make_proxy(max_size=128 * 2**20)
    body = CountingBody(64 * 2**20)
    url = origin.route("/huge.jpg", body)
    client = await stalled_client(proxy, proxy.url(url))
    client.transport.abortConnection()
    await body.lost
    await sleep(0.1)
    assert proxy.pipeline.resource.inflight == set()
    assert proxy.pipeline.limiter.inflight == 0


@pytest_twisted.ensureDeferred
async def test_client_disconnect_while_waiting(origin, make_proxy):
    """A client that leaves before the origin answered cancels the upstream request."""
    proxy = make_proxy()
    lost: Deferred[None] = Deferred()

    def hang(request):
        request.notifyFinish().addBoth(lambda _: lost.callback(None))
        return NOT_DONE_YET

    url = origin.route("/hang", hang)
    client = await raw_client(proxy, proxy.url(url))
    await sleep(0.2)
    client.transport.abortConnection()
    await lost
    await sleep(0.05)
    assert proxy.pipeline.limiter.inflight == 0


@pytest_twisted.ensureDeferred
async def test_head_of_oversize_image(origin, make_proxy, client_pool):
    """HEAD of an image declared larger than --max-size is refused like its GET."""
    proxy = make_proxy(max_size=1000)
    url = origin.route("/big.jpg", image(JPEG))
    response, _ = await get(client_pool, proxy.url(url), method="HEAD")
    assert response.code == 502


class ResetMidBody(Protocol):
    """Answers with headers and part of the body, then resets the connection."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                             b"Content-Length: 100000\r\n\r\n" + JPEG[:3000])
        reactor.callLater(0.05, self.transport.abortConnection)


@pytest_twisted.ensureDeferred
async def test_origin_reset_mid_body_cuts_client(proxy, client_pool):
    """An origin that resets after the headers went out makes the client see a cut transfer."""
    port = reactor.listenTCP(0, Factory.forProtocol(ResetMidBody), interface="127.0.0.1")
    try:
        response = await treq.get(
            proxy.url(f"http://127.0.0.1:{port.getHost().port}/a.jpg"), pool=client_pool)
        assert response.code == 200
        with pytest.raises((ResponseFailed, PotentialDataLoss)):
            await treq.content(response)
    finally:
        await port.stopListening()
    await sleep(0.05)
    assert proxy.pipeline.resource.inflight == set()
