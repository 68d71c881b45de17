"""Coalescing and the memory cache, end to end against an origin that counts its requests."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.server import NOT_DONE_YET

from tests.conftest import JPEG, PNG, image, sleep
from tests.test_proxy import get, header, raw_client


def gated(body: bytes, gate: Deferred, content_type: bytes = b"image/jpeg", **headers: bytes):
    """A route that answers only when ``gate`` fires, so requests pile up meanwhile."""

    def handler(request):
        def answer(_):
            if request._disconnected:
                return
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"content-length", b"%d" % len(body))
            for name, value in headers.items():
                request.setHeader(name.replace("_", "-").encode(), value)
            request.write(body)
            request.finish()

        gate.addCallback(answer)
        return NOT_DONE_YET

    return handler


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_coalesced(origin, proxy, client_pool):
    """50 concurrent requests for one URL reach the origin once and all get the image."""
    gate: Deferred[None] = Deferred()
    url = origin.route("/hot.jpg", gated(JPEG, gate, cache_control=b"no-store"))
    pending = [get(client_pool, proxy.url(url)) for _ in range(50)]
    await sleep(0.3)
    gate.callback(None)
    results = await gatherResults([Deferred.fromCoroutine(p) for p in pending])
    assert all(response.code == 200 and body == JPEG for response, body in results)
    assert len(origin.resource.seen) == 1
    statuses = sorted(header(response, "x-cache") for response, _ in results)
    assert statuses.count("COALESCED") == 49 and statuses.count("MISS") == 1


@pytest_twisted.ensureDeferred
async def test_sequential_requests_cached(origin, proxy, client_pool):
    """200 sequential requests within max-age reach the origin once; hits carry Age."""
    url = origin.route("/a.jpg", image(JPEG, cache_control=b"max-age=600", etag=b'"e1"'))
    for i in range(200):
        response, body = await get(client_pool, proxy.url(url))
        assert (response.code, body) == (200, JPEG)
        assert header(response, "x-cache") == ("MISS" if i == 0 else "HIT")
    assert len(origin.resource.seen) == 1
    assert header(response, "age") is not None
    assert header(response, "etag") == '"e1"'
    assert header(response, "content-type") == "image/jpeg"


@pytest_twisted.ensureDeferred
async def test_no_store_not_cached(origin, proxy, client_pool):
    """no-store responses reach the origin every time."""
    url = origin.route("/a.jpg", image(JPEG, cache_control=b"no-store"))
    for _ in range(5):
        response, body = await get(client_pool, proxy.url(url))
        assert (response.code, body, header(response, "x-cache")) == (200, JPEG, "MISS")
    assert len(origin.resource.seen) == 5


@pytest_twisted.ensureDeferred
async def test_conditional_answered_from_cache(origin, proxy, client_pool):
    """A client's If-None-Match matching a cached entry gets a 304 without the origin."""
    url = origin.route("/a.jpg", image(JPEG, cache_control=b"max-age=600", etag=b'"e1"'))
    await get(client_pool, proxy.url(url))
    response, body = await get(client_pool, proxy.url(url), headers={"If-None-Match": '"e1"'})
    assert (response.code, body, header(response, "x-cache")) == (304, b"", "HIT")
    assert len(origin.resource.seen) == 1


@pytest_twisted.ensureDeferred
async def test_stale_entry_revalidated(origin, proxy, client_pool):
    """A stale entry is revalidated with its ETag; the origin's 304 refreshes it."""

    def handler(request):
        if request.getHeader(b"if-none-match") == b'"e1"':
            request.setResponseCode(304)
            request.setHeader(b"etag", b'"e1"')
            request.setHeader(b"cache-control", b"max-age=600")
            return b""
        return image(JPEG, cache_control=b"max-age=0", etag=b'"e1"')(request)

    url = origin.route("/a.jpg", handler)
    first, _ = await get(client_pool, proxy.url(url))
    second, body = await get(client_pool, proxy.url(url))
    third, _ = await get(client_pool, proxy.url(url))
    assert header(first, "x-cache") == "MISS"
    assert (second.code, body, header(second, "x-cache")) == (200, JPEG, "REVALIDATED")
    assert header(third, "x-cache") == "HIT"
    assert [s.headers.get(b"If-None-Match") for s in origin.resource.seen] == [None, [b'"e1"']]


@pytest_twisted.ensureDeferred
async def test_negative_cache(origin, proxy, client_pool):
    """An upstream 404 and a non-image are remembered for --negative-ttl."""
    missing = origin.base + "/missing.jpg"
    page = origin.route("/page", image(b"<html></html>", b"text/html"))
    for _ in range(3):
        response, _ = await get(client_pool, proxy.url(missing))
        assert response.code == 404
        response, _ = await get(client_pool, proxy.url(page))
        assert response.code == 502
    assert len(origin.resource.seen) == 2
    assert header(response, "x-cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_cache_disabled(origin, make_proxy, client_pool):
    """--cache-size 0 turns the cache off: every request reaches the origin, no X-Cache."""
    proxy = make_proxy(cache_size=0, coalesce_max_size=0)
    url = origin.route("/a.jpg", image(JPEG, cache_control=b"max-age=600"))
    for _ in range(3):
        response, _ = await get(client_pool, proxy.url(url))
        assert header(response, "x-cache") is None
    assert len(origin.resource.seen) == 3


@pytest_twisted.ensureDeferred
async def test_cache_memory_bound(origin, make_proxy, client_pool):
    """Under a stream of distinct URLs the cache stays within --cache-size."""
    proxy = make_proxy(cache_size=100_000, cache_object_max=40_000)
    body = PNG  # 30 KiB
    cache = proxy.pipeline.resource.cache
    for i in range(12):
        url = origin.route(f"/img{i}.png", image(body, b"image/png", cache_control=b"max-age=600"))
        response, _ = await get(client_pool, proxy.url(url))
        assert response.code == 200
        assert cache.bytes_stored <= 100_000
    assert cache.entry_count == 3
    assert cache.evictions >= 9


@pytest_twisted.ensureDeferred
async def test_custom_cache_status_header(origin, make_proxy, client_pool):
    """--cache-status-header renames X-Cache."""
    proxy = make_proxy(cache_status_header="X-Proxy-Cache")
    url = origin.route("/a.jpg", image(JPEG))
    response, _ = await get(client_pool, proxy.url(url))
    assert header(response, "x-proxy-cache") == "MISS"
    assert header(response, "x-cache") is None


@pytest_twisted.ensureDeferred
async def test_slow_follower_does_not_stall_fast_one(origin, make_proxy, client_pool):
    """A follower that stops reading does not delay the leader or another follower."""
    proxy = make_proxy(coalesce_max_size=4 * 2**20, cache_size=0)
    body = JPEG + os.urandom(3 * 2**20)
    gate: Deferred[None] = Deferred()
    url = origin.route("/big.jpg", gated(body, gate, cache_control=b"no-store"))
    slow = await raw_client(proxy, proxy.url(url))
    await sleep(0.1)
    fast = [Deferred.fromCoroutine(get(client_pool, proxy.url(url))) for _ in range(2)]
    await sleep(0.1)
    gate.callback(None)
    results = await gatherResults(fast)
    assert all(body_ == body for _, body_ in results)
    assert slow.received < len(body)  # still stalled, yet the others finished
    assert len(origin.resource.seen) == 1
    slow.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_leader_leaving_keeps_followers(origin, make_proxy, client_pool):
    """When the first client leaves, followers still get the whole body."""
    proxy = make_proxy(cache_size=0)
    gate: Deferred[None] = Deferred()
    url = origin.route("/a.jpg", gated(JPEG, gate, cache_control=b"no-store"))
    leader = await raw_client(proxy, proxy.url(url))
    await sleep(0.1)
    follower = Deferred.fromCoroutine(get(client_pool, proxy.url(url)))
    await sleep(0.1)
    leader.transport.abortConnection()
    await sleep(0.05)
    gate.callback(None)
    response, body = await follower
    assert (response.code, body) == (200, JPEG)
    assert header(response, "x-cache") == "COALESCED"
    assert len(origin.resource.seen) == 1


@pytest_twisted.ensureDeferred
async def test_mismatched_revalidation_refetches(origin, proxy, client_pool):
    """A 304 whose validators do not match the stale entry leads to a full, unconditional fetch."""

    def handler(request):
        if request.getHeader(b"if-none-match"):
            request.setResponseCode(304)
            request.setHeader(b"etag", b'"other"')
            return b""
        return image(JPEG, cache_control=b"max-age=0", etag=b'"e1"')(request)

    url = origin.route("/a.jpg", handler)
    await get(client_pool, proxy.url(url))
    response, body = await get(client_pool, proxy.url(url))
    assert (response.code, body) == (200, JPEG)
    assert [s.headers.get(b"If-None-Match") for s in origin.resource.seen] == [
        None, [b'"e1"'], None]


@pytest_twisted.ensureDeferred
async def test_follower_leaving_before_head_is_quiet(origin, make_proxy, client_pool):
    """A follower that disconnects while waiting for the shared head logs no error."""
    from twisted.logger import capturedLogs

    proxy = make_proxy(cache_size=0)
    gate: Deferred[None] = Deferred()
    url = origin.route("/a.jpg", gated(JPEG, gate, cache_control=b"no-store"))
    with capturedLogs() as events:
        leader = Deferred.fromCoroutine(get(client_pool, proxy.url(url)))
        await sleep(0.05)
        follower = await raw_client(proxy, proxy.url(url))
        await sleep(0.05)
        follower.transport.abortConnection()
        await sleep(0.05)
        gate.callback(None)
        response, body = await leader
    assert (response.code, body) == (200, JPEG)
    assert not [e for e in events if e.get("log_failure") is not None]
