"""The web front: routes, the proxy pipeline per request, response headers and error responses.

The pipeline for one request: decode and verify the signed URL (urls) -> fetch with the
destination policy and the per-host limiter (upstream) -> sniff and relay the body (relay).
Every failure is a :class:`~imgproxy.errors.ProxyError` answered as short plain text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imgproxy.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    Unavailable,
    UpstreamError,
)
from imgproxy.logs import AccessLog
from imgproxy.metrics import Metrics
from imgproxy.relay import ClientGone, Cut, Relay, abort_connection
from imgproxy.sniff import Sniffed, SniffPolicy
from imgproxy.upstream import Fetcher, Upstream, discard
from imgproxy.urls import Signer, decode, is_proxy_path

log = Logger()

VIA_TOKEN = b"imageproxy"
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
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
_OK_KINDS = {200: "ok", 304: "not-modified"}


@attrs.frozen
class ResponsePolicy:
    """Static parts of the responses."""

    default_cache_control: bytes = b"public, max-age=31536000"


@attrs.define(eq=False)
class Exchange:
    """One client request in flight: what the manhole shows and what drain waits for."""

    request: Request
    started: float
    method: bytes
    url: bytes | None = None
    host: str | None = None
    relay: Relay | None = None
    task: Deferred[None] | None = None
    status: int = 0  # 0 until a response status is chosen; 499 in the log if none ever was
    kind: str = "ok"
    sent: int = 0


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
        self._metrics = metrics
        self._access_log = access_log
        self.inflight: set[Exchange] = set()
        self.draining = False
        self._drained: list[Deferred[None]] = []

    # -- entry ---------------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
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
        if url is None:  # /healthz
            exchange.status = 200
            self._respond_text(request, 200, b"ok\n", no_store=True)
            return NOT_DONE_YET
        exchange.url = url
        exchange.task = ensureDeferred(self._serve(exchange))
        exchange.task.addErrback(self._unexpected, exchange)
        return NOT_DONE_YET

    def _route(self, request: Request) -> bytes | None:
        path = request.path
        if path == b"/healthz":
            if self.draining:
                raise Unavailable("Service Unavailable: shutting down", kind="draining")
            return None
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
        assert exchange.url is not None
        conditional = {
            name: values[-1]
            for name in CONDITIONAL_HEADERS
            if (values := request.requestHeaders.getRawHeaders(name))
        }

        def on_hop(host: str) -> None:
            exchange.host = host

        try:
            upstream = await self._fetcher.fetch(
                exchange.url, exchange.method, conditional, on_hop=on_hop
            )
        except ProxyError as e:
            self._count_error(e)
            self._respond_error(exchange, e)
            return
        except CancelledError:
            return  # the client went away while we waited
        if self._metrics is not None:
            self._metrics.upstream_fetched(self._clock.seconds() - exchange.started)
        try:
            await self._relay(exchange, upstream)
        finally:
            upstream.permit.release()

    async def _relay(self, exchange: Exchange, upstream: Upstream) -> None:
        request = exchange.request
        if upstream.status == 304 or exchange.method == b"HEAD":
            discard(upstream.response)
            try:
                content_type = (
                    None if upstream.status == 304
                    else self._sniff_policy.judge_declared(_text(upstream.header(b"content-type")))
                )
            except ProxyError as e:
                self._count_error(e)
                self._respond_error(exchange, e)
                return
            self._write_head(exchange, upstream, content_type, upstream.header(b"content-length"))
            request.finish()
            return
        length = upstream.response.length

        def start(sniffed: Sniffed) -> None:
            self._write_head(
                exchange, upstream, sniffed.content_type,
                None if not isinstance(length, int) else b"%d" % length,
            )
            if self._metrics is not None:
                self._metrics.first_byte(self._clock.seconds() - exchange.started)

        relay = Relay(
            self._clock, request, self._sniff_policy.sniffer(), start,
            max_size=self._max_size, deadline=upstream.deadline, idle_timeout=self._idle_timeout,
        )
        exchange.relay = relay
        upstream.response.deliverBody(relay)
        try:
            await relay.done
        except ProxyError as e:
            self._count_error(e)
            self._respond_error(exchange, e)
        except Cut as e:
            if isinstance(e.cause, ProxyError):
                self._count_error(e.cause)
        except ClientGone:
            pass

    def _write_head(
        self, exchange: Exchange, upstream: Upstream, content_type: str | None,
        content_length: bytes | None,
    ) -> None:
        request = exchange.request
        status = 304 if upstream.status == 304 else 200
        exchange.status = status
        exchange.kind = _OK_KINDS[status]
        request.setResponseCode(status)
        headers = request.responseHeaders
        if content_type is not None:
            headers.setRawHeaders(b"content-type", [content_type.encode("ascii")])
        if content_length is not None and content_length.isdigit() and status == 200:
            headers.setRawHeaders(b"content-length", [content_length])
        for name in RELAYED_HEADERS:
            value = upstream.header(name)
            if value is not None:
                headers.setRawHeaders(name, [value])
        cache_control = upstream.header(b"cache-control")
        headers.setRawHeaders(
            b"cache-control", [cache_control or self._response_policy.default_cache_control]
        )
        for name, value in SECURITY_HEADERS:
            headers.setRawHeaders(name, [value])
        if self.draining:
            headers.setRawHeaders(b"connection", [b"close"])

    # -- completion ----------------------------------------------------------------------------

    def _finished(self, result: None | Failure, exchange: Exchange) -> None:
        """The response is complete, or the client connection is gone (``result`` a failure)."""
        if isinstance(result, Failure):
            if exchange.relay is not None:
                exchange.relay.client_gone()
            elif exchange.task is not None:
                exchange.task.cancel()
        self._done(exchange, gone=isinstance(result, Failure))

    def _unexpected(self, failure: Failure, exchange: Exchange) -> None:
        log.failure("unexpected error serving a request", failure)
        if not exchange.request.startedWriting and not exchange.request.finished:
            self._respond_error(exchange, UpstreamError("Bad Gateway: internal error"))
        elif not exchange.request.finished:
            abort_connection(exchange.request)

    def _count_error(self, error: ProxyError) -> None:
        if self._metrics is not None and error.status >= 500:
            self._metrics.upstream_error(error.kind)

    def _respond_error(self, exchange: Exchange, error: ProxyError) -> None:
        request = exchange.request
        exchange.status = error.status
        exchange.kind = error.kind
        if request.finished or request.startedWriting or request.channel is None:
            return
        extra: list[tuple[bytes, bytes]] = []
        if isinstance(error, Unavailable):
            extra.append((b"retry-after", b"%d" % max(1, math.ceil(error.retry_after))))
        if isinstance(error, MethodNotAllowed):
            extra.append((b"allow", b"GET, HEAD"))
        self._respond_text(
            request, error.status, error.reason.encode("utf-8", "replace") + b"\n",
            no_store=True, extra=extra,
        )

    def _respond_text(
        self, request: Request, status: int, body: bytes, *, no_store: bool,
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        request.setResponseCode(status)
        headers = request.responseHeaders
        for name in list(dict(headers.getAllRawHeaders())):
            headers.removeHeader(name)
        headers.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if no_store:
            headers.setRawHeaders(b"cache-control", [b"no-store"])
        for name, value in SECURITY_HEADERS:
            headers.setRawHeaders(name, [value])
        for name, value in extra:
            headers.setRawHeaders(name, [value])
        if self.draining:
            headers.setRawHeaders(b"connection", [b"close"])
        request.write(body)
        request.finish()

    def _done(self, exchange: Exchange, gone: bool) -> None:
        """Count and log a request once, when its outcome is known."""
        self.inflight.discard(exchange)
        duration = self._clock.seconds() - exchange.started
        relay = exchange.relay
        if relay is not None:
            exchange.sent = relay.sent
            if relay.error is not None:
                exchange.kind = getattr(relay.error, "kind", "client-gone")
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
            )
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


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _client_ip(request: Request) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


__all__ = ["BadRequest", "ProxyResource", "ResponsePolicy"]
