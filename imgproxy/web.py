"""The web front: routes, the proxy pipeline per request, response headers and error responses.

The pipeline for one request: decode and verify the signed URL (urls) -> answer from the cache,
or follow a fetch of the same URL already under way (coalesce) -> fetch with the destination
policy and the per-host limiter (upstream) -> sniff and relay the body (relay). Every failure is
a :class:`~imgproxy.errors.ProxyError` answered as short plain text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imgproxy.cache import Cache, Entry
from imgproxy.coalesce import Detached, FollowerProducer, Head, SharedBody
from imgproxy.errors import (
    MethodNotAllowed,
    NotFound,
    ProxyError,
    TooLarge,
    Unavailable,
    UpstreamError,
)
from imgproxy.logs import AccessLog
from imgproxy.metrics import UPSTREAM_ERROR_KINDS, Metrics
from imgproxy.relay import ClientGone, Cut, Relay, abort_connection
from imgproxy.sniff import Sniffed, SniffPolicy
from imgproxy.upstream import Fetcher, Upstream, discard
from imgproxy.urls import Signer, decode, is_proxy_path

log = Logger()

Header = tuple[bytes, bytes]
VIA_TOKEN = b"imageproxy"
SECURITY_HEADERS: tuple[Header, ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                 b"sandbox"),
    (b"x-frame-options", b"deny"),
    (b"referrer-policy", b"no-referrer"),
    (b"server", b"imageproxy"),
)
# Origin response headers passed to the client (besides the ones we compute).
RELAYED_HEADERS = (b"etag", b"last-modified", b"expires")
CONDITIONAL_HEADERS = (b"if-none-match", b"if-modified-since")
# Refusals worth remembering for --negative-ttl: they will not change on a retry soon.
NEGATIVE_KINDS = frozenset(
    {"not-found", "not-image", "too-large", "too-many-pixels", "refused-destination"}
)
_OK_KINDS = {200: "ok", 304: "not-modified"}


@attrs.frozen
class ResponsePolicy:
    """Static parts of the responses."""

    default_cache_control: bytes = b"public, max-age=31536000"
    cache_status_header: bytes = b"x-cache"


@attrs.define(eq=False)
class Exchange:
    """One client request in flight: what the manhole shows and what drain waits for."""

    request: Request
    started: float
    method: bytes
    url: bytes | None = None
    host: str | None = None
    relay: Relay | None = None
    follower: FollowerProducer | None = None  # reads a shared body (coalesced requests)
    shared: SharedBody | None = None  # the body this request's fetch shares with followers
    task: Deferred[None] | None = None
    status: int = 0  # 0 until a response status is chosen; 499 in the log if none ever was
    kind: str = "ok"
    sent: int = 0
    cache: str | None = None


class ProxyResource(Resource):
    """The whole HTTP surface of the proxy: proxy routes, ``/healthz`` and errors."""

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        signer: Signer,
        fetcher: Fetcher,
        sniff_policy: SniffPolicy,
        *,
        response_policy: ResponsePolicy = ResponsePolicy(),
        max_size: int = 5242880,
        idle_timeout: float = 10.0,
        cache: Cache | None = None,
        coalesce_max_size: int = 0,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__()
        self._clock = clock
        self.signer = signer  # replaced on key reload
        self._fetcher = fetcher
        self._sniff_policy = sniff_policy
        self._response_policy = response_policy
        self._max_size = max_size
        self._idle_timeout = idle_timeout
        self.cache = cache if cache is not None and cache.enabled else None
        self._coalesce_max_size = coalesce_max_size
        self._shared: dict[bytes, SharedBody] = {}
        self._metrics = metrics
        self._access_log = access_log
        self.inflight: set[Exchange] = set()
        self.draining = False
        self._drained: list[Deferred[None]] = []

    # -- entry ---------------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        if request.path == b"/healthz" and not self.draining:
            # Probes are neither counted nor logged: they would hide the real request rates.
            self._respond_text(request, 200, b"ok\n")
            return NOT_DONE_YET
        exchange = Exchange(request, self._clock.seconds(), request.method)
        if self._metrics is not None:
            self._metrics.request_started()
        self.inflight.add(exchange)
        request.notifyFinish().addBoth(self._finished, exchange)
        try:
            url = self._route(request)
        except ProxyError as e:
            self._respond_error(exchange, e)
            return NOT_DONE_YET
        exchange.url = url
        exchange.task = ensureDeferred(self._serve(exchange))
        exchange.task.addErrback(self._unexpected, exchange)
        return NOT_DONE_YET

    def _route(self, request: Request) -> bytes:
        path = request.path
        if request.method not in (b"GET", b"HEAD"):
            raise MethodNotAllowed()
        if self.draining:
            raise Unavailable("Service Unavailable: shutting down", kind="draining")
        via = request.requestHeaders.getRawHeaders(b"via")
        if via and any(VIA_TOKEN in v.lower() for v in via):
            raise LoopDetected()
        query = request.args.get(b"url") if request.args else None
        query_url = query[0] if query else None
        if not is_proxy_path(path, query_url is not None):
            raise NotFound()
        return decode(path, query_url, self.signer)

    # -- the pipeline --------------------------------------------------------------------------

    async def _serve(self, exchange: Exchange) -> None:
        request = exchange.request
        url = exchange.url
        assert url is not None
        conditional = {
            name: values[-1]
            for name in CONDITIONAL_HEADERS
            if (values := request.requestHeaders.getRawHeaders(name))
        }
        cache = self.cache
        key = cache.key(url) if cache is not None else url
        entry = cache.get(key) if cache is not None else None
        if entry is not None:
            if entry.negative is not None:
                exchange.cache = "HIT"
                self._respond_error(exchange, _negative_error(entry))
                return
            if entry.is_fresh(self._clock.seconds()):
                self._serve_entry(exchange, entry, "HIT", conditional)
                return
        shareable = (
            self._coalesce_max_size > 0 and exchange.method == b"GET" and not conditional
            and entry is None
        )
        if shareable:
            shared = self._shared.get(key)
            if shared is not None and shared.joinable:
                try:
                    await self._follow(exchange, shared)
                    return
                except Detached:
                    pass  # too large to share: fetch on our own
        shared = SharedBody(self._coalesce_max_size) if shareable else None
        if shared is not None:
            self._shared[key] = shared
            exchange.shared = shared
        try:
            await self._fetch_and_relay(exchange, key, entry, conditional, shared)
        finally:
            if shared is not None:
                if self._shared.get(key) is shared:
                    del self._shared[key]
                shared.stop(Detached("fetch over"))  # no-op when finished normally

    async def _fetch_and_relay(
        self, exchange: Exchange, key: bytes, entry: Entry | None,
        conditional: dict[bytes, bytes], shared: SharedBody | None,
    ) -> None:
        url = exchange.url
        assert url is not None

        def on_hop(host: str) -> None:
            exchange.host = host

        request_time = self._clock.seconds()
        try:
            upstream = await self._fetcher.fetch(
                url, exchange.method, entry.validators() if entry is not None else conditional,
                on_hop=on_hop,
            )
        except ProxyError as e:
            if self.cache is not None and e.kind in NEGATIVE_KINDS:
                self.cache.store_negative(key, url, _hostname(url), e.status, e.kind, e.reason)
            if shared is not None:
                shared.stop(e)
            self._count_error(e)
            self._respond_error(exchange, e)
            return
        except CancelledError:
            return  # the client went away while we waited
        if self._metrics is not None:
            self._metrics.upstream_fetched(self._clock.seconds() - request_time)
        try:
            if entry is not None and upstream.status == 304:
                discard(upstream.response)
                assert self.cache is not None
                refreshed = self.cache.refresh(
                    key, _flat_headers(upstream), request_time, self._clock.seconds())
                if refreshed is not None:
                    self._serve_entry(exchange, refreshed, "REVALIDATED", conditional)
                    return
                # The entry went away (evicted) or the 304 did not match it: ask in full.
                await self._fetch_and_relay(exchange, key, None, conditional, shared)
                return
            await self._relay(exchange, upstream, key, request_time, shared)
        except ProxyError as e:
            self._count_error(e)
            self._respond_error(exchange, e)
        finally:
            upstream.permit.release()

    async def _relay(
        self, exchange: Exchange, upstream: Upstream, key: bytes, request_time: float,
        shared: SharedBody | None,
    ) -> None:
        request = exchange.request
        exchange.cache = "MISS" if self.cache is not None else None
        if upstream.status == 304 or exchange.method == b"HEAD":
            discard(upstream.response)
            source = _flat_headers(upstream)
            status, content_type = 304, None
            if upstream.status != 304:  # HEAD: no body to sniff, the declared type is judged
                status = 200
                content_type = self._sniff_policy.judge_declared(
                    _text(source.get(b"content-type")))
                declared = source.get(b"content-length", b"")
                if declared.isdigit() and int(declared) > self._max_size:
                    raise TooLarge()  # as a GET of it would be
            self._send_head(exchange, status, self._client_headers(
                source, content_type, source.get(b"content-length")))
            request.finish()
            return
        length = upstream.response.length
        source = _flat_headers(upstream)
        capture = _Capture(self.cache.max_object) if self.cache is not None else None

        own_reader: list[FollowerProducer | None] = [None]  # this client's reader when shared

        def start(sniffed: Sniffed) -> None:
            headers = self._client_headers(
                source, sniffed.content_type,
                b"%d" % length if isinstance(length, int) else None,
            )
            source[b"content-type"] = sniffed.content_type.encode("ascii")
            if shared is not None:
                if shared.followers and isinstance(length, int) and length <= shared.limit:
                    # Shared: the upstream fills the bounded buffer at its own pace and every
                    # client, this one included, reads it at theirs. Without followers the
                    # leader keeps plain backpressure (no whole body in memory).
                    shared.set_head(Head(200, headers))
                    relay.go_headless()
                    if request.channel is not None:
                        shared.join()
                        exchange.follower = own_reader[0] = FollowerProducer(request, shared)
                else:
                    shared.stop(Detached("not shared"))
            if request.channel is not None:
                self._send_head(exchange, 200, headers)
                if self._metrics is not None:
                    self._metrics.first_byte(self._clock.seconds() - exchange.started)
                if own_reader[0] is not None:
                    own_reader[0].start()

        tee = None
        if shared is not None or capture is not None:
            def tee(data: bytes) -> None:
                if shared is not None:
                    shared.append(data)
                if capture is not None:
                    capture.add(data)

        relay = Relay(
            self._clock, request, self._sniff_policy.sniffer(), start,
            max_size=self._max_size, deadline=upstream.deadline, idle_timeout=self._idle_timeout,
            tee=tee,
            keep_going=(lambda: shared.followers > 0 and shared.error is None)
            if shared is not None else None,
        )
        exchange.relay = relay
        if shared is not None:
            shared.on_abandoned = relay.abandon
        upstream.response.deliverBody(relay)
        try:
            await relay.done
        except ProxyError as e:
            if shared is not None:
                shared.stop(e)
            if self.cache is not None and e.kind in NEGATIVE_KINDS:
                self.cache.store_negative(key, upstream.url, _hostname(upstream.url), e.status,
                                          e.kind, e.reason)
            raise
        except Cut as e:
            if shared is not None:
                shared.stop(e.cause)
            if isinstance(e.cause, ProxyError):
                self._count_error(e.cause)
            if own_reader[0] is not None:
                await self._stream_shared(own_reader[0])
            return
        except ClientGone:
            return
        if shared is not None:
            shared.finish()
        if capture is not None and capture.chunks is not None and self.cache is not None:
            self.cache.store(
                key, upstream.url, _hostname(upstream.url), 200, source,
                b"".join(capture.chunks), request_time, self._clock.seconds(),
            )
        if own_reader[0] is not None:
            await self._stream_shared(own_reader[0])

    async def _stream_shared(self, producer: FollowerProducer) -> None:
        try:
            await producer.done
        except Cut:
            pass  # counted in _done from producer.error_kind

    async def _follow(self, exchange: Exchange, shared: SharedBody) -> None:
        """Serve a request from a fetch of the same URL already under way."""
        try:
            head = await shared.wait_head()  # Detached propagates: the caller fetches alone
        except ProxyError as e:
            exchange.cache = "COALESCED"
            self._respond_error(exchange, e)
            return
        exchange.cache = "COALESCED"
        self._send_head(exchange, head.status, head.headers)
        exchange.follower = producer = FollowerProducer(exchange.request, shared)
        producer.start()
        await self._stream_shared(producer)

    def _serve_entry(
        self, exchange: Exchange, entry: Entry, cache_status: str,
        conditional: Mapping[bytes, bytes],
    ) -> None:
        """Answer from a fresh cache entry: 304 when the client's validators match."""
        request = exchange.request
        exchange.cache = cache_status
        stored = entry.headers
        age = [(b"age", b"%d" % int(entry.age(self._clock.seconds())))]
        if conditional and entry.matches_conditional(
            conditional.get(b"if-none-match"), conditional.get(b"if-modified-since")
        ):
            self._send_head(exchange, 304, self._client_headers(stored, None, None) + age)
            request.finish()
            return
        body = entry.body
        self._send_head(exchange, 200, self._client_headers(
            stored, stored[b"content-type"].decode("ascii"), b"%d" % len(body)) + age)
        if exchange.method != b"HEAD":
            request.write(body)
            exchange.sent = len(body)
        request.finish()

    # -- responses -----------------------------------------------------------------------------

    def _client_headers(
        self, source: Mapping[bytes, bytes], content_type: str | None,
        content_length: bytes | None,
    ) -> list[Header]:
        """The headers a client gets: validated type, allowlisted origin headers, ours."""
        headers: list[Header] = []
        if content_type is not None:
            headers.append((b"content-type", content_type.encode("ascii")))
        if content_length is not None and content_length.isdigit():
            headers.append((b"content-length", content_length))
        for name in RELAYED_HEADERS:
            value = source.get(name)
            if value is not None:
                headers.append((name, value))
        headers.append(
            (b"cache-control",
             source.get(b"cache-control") or self._response_policy.default_cache_control))
        headers.extend(SECURITY_HEADERS)
        return headers

    def _send_head(self, exchange: Exchange, status: int, headers: Sequence[Header]) -> None:
        request = exchange.request
        exchange.status = status
        exchange.kind = _OK_KINDS.get(status, "ok")
        request.setResponseCode(status)
        raw = request.responseHeaders
        for name, value in headers:
            raw.setRawHeaders(name, [value])
        if status == 304:
            raw.removeHeader(b"content-length")
        self._common_headers(exchange, raw)

    def _common_headers(self, exchange: Exchange, raw: Any) -> None:
        if exchange.cache is not None:
            raw.setRawHeaders(self._response_policy.cache_status_header,
                              [exchange.cache.encode("ascii")])
        if self.draining:
            raw.setRawHeaders(b"connection", [b"close"])

    def _respond_error(self, exchange: Exchange, error: ProxyError) -> None:
        request = exchange.request
        exchange.status = error.status
        exchange.kind = error.kind
        if request.finished or request.startedWriting or request.channel is None:
            return
        extra: list[Header] = []
        if isinstance(error, Unavailable):
            extra.append((b"retry-after", b"%d" % max(1, math.ceil(error.retry_after))))
        if isinstance(error, MethodNotAllowed):
            extra.append((b"allow", b"GET, HEAD"))
        self._respond_text(
            request, error.status, error.reason.encode("utf-8", "replace") + b"\n", extra=extra,
            exchange=exchange,
        )

    def _respond_text(
        self, request: Request, status: int, body: bytes, *,
        extra: Iterable[Header] = (), exchange: Exchange | None = None,
    ) -> None:
        request.setResponseCode(status)
        headers = request.responseHeaders
        for name in list(dict(headers.getAllRawHeaders())):
            headers.removeHeader(name)
        headers.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        for name, value in (*SECURITY_HEADERS, *extra):
            headers.setRawHeaders(name, [value])
        if exchange is not None:
            self._common_headers(exchange, headers)
        request.write(body)
        request.finish()

    # -- completion ----------------------------------------------------------------------------

    def _finished(self, result: None | Failure, exchange: Exchange) -> None:
        """The response is complete, or the client connection is gone (``result`` a failure)."""
        gone = isinstance(result, Failure)
        if gone:
            if exchange.relay is not None:
                exchange.relay.client_gone()
            elif exchange.task is not None and not (
                exchange.shared is not None and exchange.shared.followers > 0
            ):
                exchange.task.cancel()  # else the fetch goes on for the followers
        self._done(exchange, gone)

    def _unexpected(self, failure: Failure, exchange: Exchange) -> None:
        if failure.check(CancelledError):
            return  # the client left while the request waited (a fetch, a shared head)
        log.failure("unexpected error serving a request", failure)
        if not exchange.request.startedWriting and not exchange.request.finished:
            self._respond_error(exchange, UpstreamError("Bad Gateway: internal error"))
        elif not exchange.request.finished:
            abort_connection(exchange.request)

    def _count_error(self, error: ProxyError) -> None:
        if self._metrics is not None and error.kind in UPSTREAM_ERROR_KINDS:
            self._metrics.upstream_error(error.kind)

    def _done(self, exchange: Exchange, gone: bool) -> None:
        """Count and log a request once, when its outcome is known."""
        self.inflight.discard(exchange)
        duration = self._clock.seconds() - exchange.started
        source = exchange.follower or exchange.relay
        if source is not None:
            exchange.sent = source.sent
            if source.error_kind is not None:
                exchange.kind = source.error_kind
        if gone and exchange.kind in _OK_KINDS.values():
            exchange.kind = "client-gone"
        status = exchange.status or 499
        if self._metrics is not None:
            self._metrics.request_finished(status, exchange.kind, duration, exchange.sent)
        if self._access_log is not None:
            self._access_log.log(
                method=exchange.method.decode("ascii", "replace"), status=status,
                bytes_sent=exchange.sent, duration=duration, host=exchange.host,
                url=exchange.url, client_ip=_client_ip(exchange.request), kind=exchange.kind,
                cache=exchange.cache,
            )
        # Break the exchange's reference cycles now rather than leave them to the collector.
        exchange.relay = exchange.follower = exchange.shared = exchange.task = None
        if self.draining and not self.inflight:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    # -- graceful stop -------------------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """Refuse new requests (503) and fire when the ones in flight are done."""
        self.draining = True
        d: Deferred[None] = Deferred()
        if not self.inflight:
            d.callback(None)
        else:
            self._drained.append(d)
        return d

    def abort_all(self) -> None:
        """Cut every request still in flight (drain timeout)."""
        for exchange in list(self.inflight):
            abort_connection(exchange.request)


class LoopDetected(ProxyError):
    """The request came through an imageproxy already (our Via token): refuse the loop."""

    status = 403
    kind = "loop"
    default_reason = "Loop detected"


class _Capture:
    """Collects a body for the cache while it stays under the per-object cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] | None = []

    def add(self, data: bytes) -> None:
        if self.chunks is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.chunks = None
        else:
            self.chunks.append(data)


def _negative_error(entry: Entry) -> ProxyError:
    negative = entry.negative
    assert negative is not None
    error = ProxyError(negative.reason, kind=negative.kind)
    error.status = negative.status
    return error


def _flat_headers(upstream: Upstream) -> dict[bytes, bytes]:
    """Upstream response headers as lower-case names, repeated fields joined."""
    return {
        name.lower(): b", ".join(values)
        for name, values in upstream.response.headers.getAllRawHeaders()
    }


def _hostname(url: bytes) -> str:
    return urlsplit(url.decode("ascii", "replace")).hostname or ""


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _client_ip(request: Request) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)
