"""The web front and fetcher in memory: StubTreq as the client, an in-memory origin, a Clock.

No sockets and no real time: timeouts and rate-limit waits are driven by ``Clock.advance``.
"""

from __future__ import annotations

from typing import Any

import pytest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET

from imgproxy.netpolicy import HostPolicy
from imgproxy.ratelimit import HostLimiter, Limits
from imgproxy.sniff import SniffPolicy
from imgproxy.upstream import Fetcher, FetchPolicy
from imgproxy.urls import Signer
from imgproxy.web import ProxyResource
from tests.conftest import JPEG, OriginResource, image

KEY = b"unit-key"
ORIGIN = "http://origin.example.com"
PLENTY = Limits(100, 100)


class Harness:
    """A proxy resource whose upstream is an in-memory origin, both driven by one Clock."""

    def __init__(self, limits: Limits = PLENTY, queue_timeout: float = 5.0,
                 timeout: float = 10.0) -> None:
        self.clock = Clock()
        self.origin = OriginResource()
        self.upstream = RequestTraversalAgent(self.origin)
        self.limiter = HostLimiter(self.clock, limits, queue_timeout=queue_timeout)
        fetcher = Fetcher(
            self.clock, self.upstream, HostPolicy(), self.limiter,
            FetchPolicy(user_agent=b"imageproxy-test", accept=b"image/*", via=b"1.1 imageproxy",
                        timeout=timeout),
        )
        self.resource = ProxyResource(self.clock, Signer((KEY,)), fetcher, SniffPolicy())
        self.client = StubTreq(self.resource)

    def url(self, path: str) -> str:
        return "http://proxy.example.com" + Signer((KEY,)).hex_path((ORIGIN + path).encode())

    def settle(self) -> None:
        for _ in range(5):
            self.client.flush()
            self.upstream.flush()

    def get(self, url: str, **kwargs: Any) -> Any:
        d = self.client.request(kwargs.pop("method", "GET"), url, **kwargs)
        self.settle()
        return d


def result(d: Any) -> Any:
    """The result of a Deferred that must have fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the request did not complete"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def body(h: Harness, response: Any) -> bytes:
    d = h.client.content(response)
    h.settle()
    return result(d)


def test_image_relayed_in_memory():
    """A signed URL to an in-memory origin answers 200 with the sniffed type and the body."""
    h = Harness()
    h.origin.routes[b"/a.jpg"] = image(JPEG, b"application/octet-stream")
    response = result(h.get(h.url("/a.jpg")))
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["image/jpeg"]
    assert body(h, response) == JPEG


def test_upstream_headers_only_ours():
    """The origin sees our User-Agent, Accept, identity encoding and Via, not the client's."""
    h = Harness()
    h.origin.routes[b"/a.jpg"] = image(JPEG)
    result(h.get(h.url("/a.jpg"), headers={"Cookie": "s=1", "Referer": "https://x/"}))
    seen = h.origin.seen[-1].headers
    assert seen[b"User-Agent"] == [b"imageproxy-test"]
    assert seen[b"Accept-Encoding"] == [b"identity"]
    assert b"Cookie" not in seen and b"Referer" not in seen


@pytest.mark.parametrize("status,expected", [(404, 404), (410, 404), (500, 502), (418, 502)])
def test_status_mapping(status, expected):
    """Origin statuses map to the contract's statuses."""
    h = Harness()

    def handler(request):
        request.setResponseCode(status)
        return b"nope"

    h.origin.routes[b"/x"] = handler
    response = result(h.get(h.url("/x")))
    assert response.code == expected
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]


def test_timeout_exactly_at_budget():
    """An origin that never answers gives 504 once --timeout has passed, not before."""
    h = Harness(timeout=10.0)
    h.origin.routes[b"/hang"] = lambda request: NOT_DONE_YET
    d = h.get(h.url("/hang"))
    out: list[Any] = []
    d.addBoth(out.append)
    h.clock.advance(9.9)
    h.settle()
    assert out == []
    h.clock.advance(0.2)
    h.settle()
    assert out[0].code == 504


def test_rate_limit_retry_after():
    """With the bucket empty and no time to wait, the answer is 503 with Retry-After."""
    h = Harness(limits=Limits(0.5, 1), queue_timeout=0.0)
    h.origin.routes[b"/a.jpg"] = image(JPEG)
    assert result(h.get(h.url("/a.jpg"))).code == 200
    response = result(h.get(h.url("/a.jpg")))
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["2"]
    h.clock.advance(2)
    assert result(h.get(h.url("/a.jpg"))).code == 200


def test_origin_429_pauses_host():
    """An origin 429 with Retry-After becomes 503 with the same Retry-After, and the host waits."""
    h = Harness(queue_timeout=0.0)

    def busy(request):
        request.setResponseCode(429)
        request.setHeader(b"retry-after", b"7")
        return b""

    h.origin.routes[b"/busy"] = busy
    response = result(h.get(h.url("/busy")))
    assert (response.code, response.headers.getRawHeaders("retry-after")) == (503, ["7"])
    h.origin.routes[b"/a.jpg"] = image(JPEG)
    assert result(h.get(h.url("/a.jpg"))).code == 503  # paused: not sent to the origin
    assert len(h.origin.seen) == 1
    h.clock.advance(7)
    assert result(h.get(h.url("/a.jpg"))).code == 200


@pytest.mark.parametrize(
    "method,path,expected",
    [("POST", None, 405), ("GET", "/nothing/here/at/all", 404), ("GET", "/zz/@@", 400),
     ("GET", "/" + "0" * 40 + "/" + b"http://a.example/".hex(), 403)],
)
def test_front_statuses(method, path, expected):
    """Method, route, encoding and signature errors are answered before any fetch."""
    h = Harness()
    url = h.url("/a.jpg") if path is None else "http://proxy.example.com" + path
    response = result(h.get(url, method=method))
    assert response.code == expected
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert h.origin.seen == []


def test_unsolicited_304_is_bad_gateway():
    """A 304 to a request that sent no validators is an origin error, not passed on."""
    h = Harness()

    def not_modified(request):
        request.setResponseCode(304)
        return b""

    h.origin.routes[b"/a.jpg"] = not_modified
    assert result(h.get(h.url("/a.jpg"))).code == 502
    assert result(h.get(h.url("/a.jpg"), headers={"If-None-Match": '"x"'})).code == 304


def test_refusal_logged_with_host_not_url():
    """A refused destination is logged once with its host and reason, never the URL."""
    from twisted.logger import capturedLogs

    h = Harness()
    url = "http://proxy.example.com" + Signer((KEY,)).hex_path(b"http://localhost/secret.jpg")
    with capturedLogs() as events:
        assert result(h.get(url)).code == 403
    lines = [e for e in events if "refused destination" in e.get("log_format", "")]
    assert len(lines) == 1
    assert lines[0]["host"] == "localhost"
    assert "secret" not in repr(lines[0])
