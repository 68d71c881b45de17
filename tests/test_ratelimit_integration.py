"""The per-origin-host rate limiter end to end: a real origin on loopback counts what it receives.

Two host names (``a.example.test`` and ``b.example.test``) resolve, through an injected static
resolver, to the same origin on 127.0.0.2; the origin records the arrival time of every request
per Host header. The limiter keys on the host name, so the two names are two origin hosts.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.web.resource import Resource
from twisted.web.server import Request

from imgproxy.logs import QuietSite
from tests.conftest import JPEG, FakeResolver, sleep

ALLOWED = (ipaddress.ip_network("127.0.0.2/32"),)
RATE = 5.0
BURST = 5


@attrs.define
class CountingOrigin:
    """An origin on 127.0.0.2 recording ``(Host header, arrival time)`` for every request."""

    port: int
    arrivals: list[tuple[str, float]] = attrs.Factory(list)
    answers: dict[str, Any] = attrs.Factory(dict)  # path -> handler; default: the image

    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.port}{path}"

    def times(self, host: str) -> list[float]:
        """Sorted arrival times for one host name."""
        wanted = f"{host}:{self.port}"
        return sorted(t for h, t in self.arrivals if h == wanted)


class CountingResource(Resource):
    """Records each request in a :class:`CountingOrigin`, then answers the image or a route."""

    isLeaf = True

    def __init__(self, origin: CountingOrigin) -> None:
        super().__init__()
        self.origin = origin

    def render(self, request: Request) -> bytes:
        host = (request.getHeader(b"host") or b"").decode()
        self.origin.arrivals.append((host, reactor.seconds()))
        handler = self.origin.answers.get(request.path.decode())
        if handler is not None:
            return handler(request)
        request.setHeader(b"content-type", b"image/jpeg")
        return JPEG


@pytest.fixture
def counting_origin() -> Iterator[CountingOrigin]:
    origin = CountingOrigin(0)
    site = QuietSite(CountingResource(origin))
    port = reactor.listenTCP(0, site, interface="127.0.0.2")
    origin.port = port.getHost().port
    yield origin
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def limited(make_proxy: Any) -> Any:
    """Make a proxy with the test's limits, the two names, and no cache or coalescing."""

    def make(**limits: Any) -> Any:
        resolver = FakeResolver({"a.example.test": ["127.0.0.2"],
                                   "b.example.test": ["127.0.0.2"]})
        values = {"rate": RATE, "burst": BURST, "queue_timeout": 20.0, "max_queue": 100,
                  "cache_size": 0, "coalesce_max_size": 0}
        values.update(limits)
        return make_proxy(resolver=resolver, allow_network=ALLOWED, **values)

    return make


@attrs.frozen
class Result:
    code: int
    latency: float
    retry_after: list[str] | None
    body: bytes


async def timed_get(client_pool: Any, url: str) -> Result:
    start = reactor.seconds()
    response = await treq.get(url, pool=client_pool)
    body = await treq.content(response)
    return Result(response.code, reactor.seconds() - start,
                  response.headers.getRawHeaders("retry-after"), body)


def burst_violations(times: list[float], rate: float, burst: int, slack: int = 1) -> list[str]:
    """Windows ``[t_i, t_j]`` holding more than ``burst + rate * (t_j - t_i) + slack`` arrivals."""
    bad = []
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            window = times[j] - times[i]
            if j - i + 1 > burst + rate * window + slack:
                bad.append(f"{j - i + 1} in {window:.3f}s (from #{i})")
    return bad


@pytest_twisted.ensureDeferred
async def test_burst_of_50_is_paced_and_other_host_unaffected(
        counting_origin, limited, client_pool):
    """50 concurrent requests to host A reach the origin at burst then rate; host B goes at once."""
    origin = counting_origin
    proxy = limited()
    a_requests = [
        ensureDeferred(timed_get(client_pool, proxy.url(origin.url("a.example.test",
                                                                   f"/a.jpg?n={i}"))))
        for i in range(50)
    ]
    await sleep(1.0)  # A's queue is long now
    a_key = f"a.example.test:{origin.port}"
    queued = proxy.pipeline.limiter.bucket_info(a_key)["queued"]
    assert queued >= 30, queued
    b_sent = reactor.seconds()
    b_results = await gatherResults([
        ensureDeferred(timed_get(client_pool, proxy.url(origin.url("b.example.test",
                                                                   f"/b.jpg?n={i}"))))
        for i in range(3)
    ])
    a_results = await gatherResults(a_requests)

    assert [r.code for r in a_results] == [200] * 50
    assert all(r.body == JPEG for r in a_results)
    times = origin.times("a.example.test")
    assert len(times) == 50
    t0 = times[0]
    per_second = Counter(int(t - t0) for t in times)
    after = times[BURST:]
    measured = (len(after) - 1) / (after[-1] - after[0])
    report = (f"A per second: {sorted(per_second.items())}; admitted after the burst: "
              f"{measured:.2f}/s (configured {RATE}/s)")
    # The burst goes out at once (much sooner than the ~0.8 s four token intervals would take).
    assert times[BURST - 1] - t0 < 0.5, report
    # Token-bucket conformance in every window, with one arrival of slack for timer jitter.
    assert burst_violations(times, RATE, BURST) == [], report
    # Whole seconds after the first: at most one more than the rate.
    assert all(count <= RATE + 1 for second, count in per_second.items() if second >= 1), report
    assert 0.6 * RATE <= measured <= 1.2 * RATE, report
    assert 45 / RATE * 0.8 <= times[-1] - t0 <= 45 / RATE * 1.6, report

    # Host B: served at once while A's queue was long, and counted separately.
    assert [r.code for r in b_results] == [200] * 3
    latencies = [round(r.latency, 3) for r in b_results]
    assert max(latencies) < 1 / RATE, latencies
    b_times = origin.times("b.example.test")
    assert len(b_times) == 3
    assert max(b_times) - b_sent < 1 / RATE
    assert max(b_times) < times[-1] - 3.0  # A still had seconds of queue left


@pytest_twisted.ensureDeferred
async def test_queue_full_is_immediate_503(counting_origin, limited, client_pool):
    """Beyond burst + max_queue, requests get 503 with an integer Retry-After at once."""
    origin = counting_origin
    proxy = limited(max_queue=3, queue_timeout=3.0)
    results = await gatherResults([
        ensureDeferred(timed_get(client_pool, proxy.url(origin.url("a.example.test",
                                                                   f"/q.jpg?n={i}"))))
        for i in range(20)
    ])
    codes = Counter(r.code for r in results)
    assert set(codes) == {200, 503}, codes
    assert BURST <= codes[200] <= BURST + 3 + 1, codes
    assert len(origin.times("a.example.test")) == codes[200]
    refused = [r for r in results if r.code == 503]
    for r in refused:
        assert r.retry_after is not None and len(r.retry_after) == 1
        assert re.fullmatch(r"[1-9][0-9]*", r.retry_after[0]), r.retry_after
        assert r.body.endswith(b"\n") and len(r.body) < 80 and b"example" not in r.body
    slowest = max(r.latency for r in refused)
    assert slowest < 1.0, f"503 after {slowest:.2f}s: waited instead of refusing"
    waited = [r.latency for r in results if r.code == 200]
    assert max(waited) >= 0.15, waited  # the queued ones really waited for tokens


def throttle_once(retry_after: bytes) -> Any:
    """A route answering 429 with Retry-After the first time, then the image."""
    calls = []

    def handler(request: Request) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            request.setResponseCode(429)
            request.setHeader(b"retry-after", retry_after)
            request.setHeader(b"content-type", b"text/plain")
            return b"slow down"
        request.setHeader(b"content-type", b"image/jpeg")
        return JPEG

    return handler


@pytest_twisted.ensureDeferred
async def test_origin_429_pauses_host_then_waits(counting_origin, limited, client_pool):
    """After a 429 with Retry-After: 2 the next request waits out the pause, other hosts do not."""
    origin = counting_origin
    proxy = limited(queue_timeout=5.0)
    origin.answers["/slow.jpg"] = throttle_once(b"2")
    first = await timed_get(client_pool, proxy.url(origin.url("a.example.test", "/slow.jpg?n=0")))
    assert (first.code, first.retry_after) == (503, ["2"])
    paused_at = origin.times("a.example.test")[0]
    second = ensureDeferred(
        timed_get(client_pool, proxy.url(origin.url("a.example.test", "/slow.jpg?n=1"))))
    other = await timed_get(client_pool, proxy.url(origin.url("b.example.test", "/b.jpg")))
    assert other.code == 200 and other.latency < 0.5, other.latency
    assert len(origin.times("a.example.test")) == 1  # the second is held back
    result = await second
    assert result.code == 200
    times = origin.times("a.example.test")
    assert len(times) == 2
    assert times[1] - paused_at >= 1.9, times[1] - paused_at
    assert times[1] - paused_at < 3.5, times[1] - paused_at


@pytest_twisted.ensureDeferred
async def test_origin_429_pause_refuses_short_waiters(counting_origin, limited, client_pool):
    """During a 2 s origin pause a request that may wait only 0.5 s gets 503 at once, unsent."""
    origin = counting_origin
    proxy = limited(queue_timeout=0.5)
    origin.answers["/slow.jpg"] = throttle_once(b"2")
    first = await timed_get(client_pool, proxy.url(origin.url("a.example.test", "/slow.jpg?n=0")))
    assert first.code == 503
    paused_at = origin.times("a.example.test")[0]
    second = await timed_get(client_pool, proxy.url(origin.url("a.example.test", "/slow.jpg?n=1")))
    assert second.code == 503
    assert second.retry_after in (["1"], ["2"]), second.retry_after
    assert second.latency < 0.4, second.latency
    assert len(origin.times("a.example.test")) == 1
    await sleep(max(0.0, paused_at + 2.1 - reactor.seconds()))
    third = await timed_get(client_pool, proxy.url(origin.url("a.example.test", "/slow.jpg?n=2")))
    assert third.code == 200
    assert len(origin.times("a.example.test")) == 2
