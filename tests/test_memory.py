"""Requests leave no reference cycles of ours behind: bodies are freed at once, not by the GC."""

from __future__ import annotations

import gc

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import ResponseFailed

from imgproxy.coalesce import FollowerProducer, SharedBody
from imgproxy.relay import Relay
from imgproxy.sniff import Sniffer
from imgproxy.web import Exchange
from tests.conftest import JPEG, PNG, chunked, image
from tests.test_proxy import get

OURS = (Relay, Exchange, SharedBody, FollowerProducer, Sniffer)


@pytest_twisted.ensureDeferred
async def test_no_cyclic_garbage_per_request(origin, make_proxy, client_pool):
    """After cached, uncached, chunked, refused, cut, missing and coalesced requests, the
    collector finds none of the pipeline's objects in cycles."""
    proxy = make_proxy(cache_size=2**20, max_size=100_000)
    urls = [
        origin.route("/a.jpg", image(JPEG, cache_control=b"no-store")),
        origin.route("/b.png", image(PNG, b"image/png", cache_control=b"max-age=60")),
        origin.route("/c.jpg", chunked(JPEG, chunk=1000)),
        origin.route("/page", image(b"<html></html>", b"text/html")),
        origin.route("/huge.jpg", chunked(JPEG + bytes(200_000), chunk=16384)),  # cut mid-body
        origin.base + "/missing.jpg",
    ]
    await get(client_pool, proxy.url(urls[0]))  # warm the pool and the caches of the code
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            for url in urls:
                try:
                    await get(client_pool, proxy.url(url))
                except ResponseFailed:
                    pass  # the cut transfer
        await gatherResults(
            [Deferred.fromCoroutine(get(client_pool, proxy.url(urls[0]))) for _ in range(5)])
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage if isinstance(o, OURS)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []
