"""Upstream fetch: one Agent over a shared pool, our header policy, redirects and timeouts.

Each hop (the first request and every redirect) is checked by the destination policy (URL text
here, resolved addresses at connect time in the endpoint factory) and takes a rate-limit permit
for the host it goes to. The caller gets an :class:`Upstream`: the response with its headers, the
permit to release when the body is done, and the deadline for the first body bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import attrs
from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse

from imgproxy.errors import (
    BadRequest,
    DestinationRefused,
    NotFound,
    ProxyError,
    TooLarge,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from imgproxy.netpolicy import HostPolicy
from imgproxy.ratelimit import HostLimiter, Permit, host_key

log = Logger()

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DRAIN_LIMIT = 65536  # error bodies up to this size are read (keeps the connection pooled)


class UpstreamClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per upstream connection."""

    noisy = False


@attrs.define
class Upstream:
    """A response ready to relay: headers received, body not yet read."""

    response: IResponse
    url: bytes
    host: str
    permit: Permit
    deadline: float  # clock time by which the first body bytes must have been judged

    @property
    def status(self) -> int:
        return self.response.code


class _Discard(Protocol):
    """Reads a small body to its end (so the connection returns to the pool), or aborts."""

    transport: Any  # the response body's transport (a push producer)

    def __init__(self, abort: bool) -> None:
        self._abort = abort

    def connectionMade(self) -> None:
        if self._abort:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pass


def discard(response: IResponse, abort: bool = False) -> None:
    """Dispose of a body we will not relay, keeping the connection when it is cheap to."""
    small = response.length is not UNKNOWN_LENGTH and response.length <= _DRAIN_LIMIT
    response.deliverBody(_Discard(abort=abort or not small))


def translate_failure(failure: Failure) -> ProxyError:
    """Map a connection or protocol failure to the client-facing error."""
    exc = failure.value
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, ierror.TimeoutError):
        return UpstreamTimeout("Gateway Timeout: connect")
    if isinstance(exc, (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)):
        reasons = getattr(exc, "reasons", [])
        for reason in reasons:
            if reason.check(SSL.Error):
                log.warn("upstream TLS failure: {error}", error=reason.getErrorMessage())
                return UpstreamError("Bad Gateway: TLS failure", kind="tls")
        if any(r.check(ierror.ConnectionLost, ierror.ConnectionDone) for r in reasons):
            return UpstreamError("Bad Gateway: connection reset", kind="reset")
        return UpstreamError("Bad Gateway: bad HTTP response", kind="bad-http")
    if isinstance(exc, SSL.Error):
        return UpstreamError("Bad Gateway: TLS failure", kind="tls")
    if isinstance(exc, (ierror.DNSLookupError,)):
        return UpstreamError("Bad Gateway: name not resolved", kind="dns")
    if isinstance(exc, (ierror.ConnectError, ConnectionError, OSError)):
        return UpstreamError("Bad Gateway: origin unreachable", kind="connect")
    log.failure("unexpected upstream failure", failure)
    return UpstreamError("Bad Gateway", kind="upstream")


def _log_refusal(url: bytes, hop: int, error: DestinationRefused) -> None:
    """One line per refused destination: the host and the reason, never the (signed) URL."""
    try:
        host = urlsplit(url.decode("utf-8", "replace")).hostname or "?"
    except ValueError:
        host = "?"
    log.info("refused destination {host} (hop {hop}): {reason}", host=host, hop=hop,
             reason=error.reason)


def _cancelled(exc: BaseException) -> bool:
    """Whether a request failed because we cancelled it (the Agent wraps CancelledError)."""
    if isinstance(exc, CancelledError):
        return True
    return any(r.check(CancelledError) for r in getattr(exc, "reasons", ()))


@attrs.frozen
class FetchPolicy:
    """What every upstream request carries and how far it may go."""

    user_agent: bytes
    accept: bytes
    via: bytes
    max_redirects: int = 4
    timeout: float = 10.0
    max_size: int = 5242880


class Fetcher:
    """Fetches a target URL through the destination policy and the per-host limiter."""

    def __init__(
        self,
        clock: IReactorTime,
        agent: IAgent,
        host_policy: HostPolicy,
        limiter: HostLimiter,
        policy: FetchPolicy,
    ) -> None:
        self._clock = clock
        self._agent = agent
        self._host_policy = host_policy
        self._limiter = limiter
        self._policy = policy
        self._base_headers = {
            b"user-agent": [policy.user_agent],
            b"accept": [policy.accept],
            b"accept-encoding": [b"identity"],
            b"via": [policy.via],
        }
        self._plain_headers = Headers(self._base_headers)  # the Agent copies what it is given

    def headers(self, conditional: dict[bytes, bytes]) -> Headers:
        """Request headers: only our own, plus the client's validators."""
        if not conditional:
            return self._plain_headers
        raw = dict(self._base_headers)
        for name, value in conditional.items():
            raw[name] = [value]
        return Headers(raw)

    async def fetch(
        self, url: bytes, method: bytes, conditional: dict[bytes, bytes],
        on_hop: Callable[[str], None] | None = None,
    ) -> Upstream:
        """Fetch ``url``, following redirects; return the final response, headers only.

        :raises ProxyError: any refusal or failure, already mapped to its client status.
        """
        deadline = self._clock.seconds() + self._policy.timeout
        headers = self.headers(conditional)
        for hop in range(self._policy.max_redirects + 1):
            try:
                url, key = _hop_target(self._host_policy, url)
            except BadRequest as e:
                if hop == 0:
                    raise
                raise UpstreamError(f"Bad Gateway: bad redirect ({e.reason})", kind="bad-redirect")
            except DestinationRefused as e:
                _log_refusal(url, hop, e)
                raise
            if on_hop is not None:
                on_hop(key)
            permit = await self._limiter.acquire(key)
            try:
                response = await self._request(method, url, headers, deadline)
            except DestinationRefused as e:  # at connect time, on the resolved addresses
                permit.release()
                _log_refusal(url, hop, e)
                raise
            except BaseException:
                permit.release()
                raise
            status = response.code
            if status in REDIRECTS:
                location = response.headers.getRawHeaders(b"location")
                discard(response)
                permit.release()
                if not location:
                    raise UpstreamError("Bad Gateway: redirect without Location", kind="status")
                url = _join(url, location[-1])
                continue
            try:
                self._check_response(response, key, bool(conditional))
            except ProxyError:
                permit.release()
                raise
            return Upstream(response, url, key, permit, deadline)
        raise UpstreamError("Bad Gateway: too many redirects", kind="redirects")

    def _request(
        self, method: bytes, url: bytes, headers: Headers, deadline: float
    ) -> Deferred[IResponse]:
        """One upstream request, bounded by ``deadline``, failures mapped to ProxyError."""
        remaining = deadline - self._clock.seconds()
        if remaining <= 0:
            raise UpstreamTimeout()
        d: Deferred[IResponse] = self._agent.request(method, url, headers)
        timed_out = []

        def on_timeout() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(remaining, on_timeout)

        def failed(failure: Failure) -> Failure:
            if timed_out:
                raise UpstreamTimeout()
            if failure.check(ProxyError):
                return failure
            if _cancelled(failure.value):
                raise CancelledError()
            raise translate_failure(failure)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addErrback(failed).addBoth(finished)

    def _check_response(self, response: IResponse, key: str, conditional: bool) -> None:
        status = response.code
        if status in (200, 203) or (status == 304 and conditional):
            length = response.length
            if length is not UNKNOWN_LENGTH and length > self._policy.max_size:
                discard(response, abort=True)
                raise TooLarge()
            return
        retry_after = response.headers.getRawHeaders(b"retry-after")
        discard(response)
        if status in (404, 410):
            raise NotFound()
        if status in (429, 503):
            pause = self._limiter.backoff(key, retry_after[-1] if retry_after else None)
            if status == 429:
                raise Unavailable("Service Unavailable: origin rate limit", retry_after=pause,
                                  kind="status")
        raise UpstreamError(f"Bad Gateway: upstream status {status}", kind="status")


# Characters left as they are when percent-encoding a URL: RFC 3986 reserved and unreserved,
# and "%" so that existing escapes survive. Everything else (controls, space, non-ASCII) is escaped.
_URL_SAFE = "!#$%&'()*+,-./:;=?@[]~_"


@functools.lru_cache(maxsize=4096)
def _hop_target(host_policy: HostPolicy, url: bytes) -> tuple[bytes, str]:
    """The URL checked by the name policy and rebuilt for the wire, and its limiter key.

    Memoised: popular images are asked for again and again (refusals raise, and are not kept).
    """
    _, host, port = host_policy.check_url(url)
    return request_url(url, host, port), host_key(host, port)


def request_url(url: bytes, host: bytes, port: int) -> bytes:
    """Rebuild ``url`` for the wire: IDNA host from the policy check, escaped path, no fragment."""
    parts = urlsplit(quote(url, safe=_URL_SAFE))
    netloc = b"[" + host + b"]" if b":" in host else host
    if port != {"http": 80, "https": 443}[parts.scheme.lower()]:
        netloc += b":%d" % port
    path = parts.path or "/"
    query = "?" + parts.query if parts.query else ""
    return b"%s://%s%s" % (parts.scheme.lower().encode(), netloc, (path + query).encode("ascii"))


def _join(base: bytes, location: bytes) -> bytes:
    """Resolve a redirect's Location against the current URL.

    Path and query are percent-escaped; the host is left as sent (an international name is
    converted, or refused, by the policy check of the next hop).
    """
    text = location.strip().decode("utf-8", "surrogateescape")
    parts = urlsplit(text)
    escaped = parts._replace(
        path=quote(parts.path, safe=_URL_SAFE, errors="surrogateescape"),
        query=quote(parts.query, safe=_URL_SAFE, errors="surrogateescape"),
        fragment="",
    ).geturl()
    joined = urljoin(base.decode("utf-8", "surrogateescape"), escaped)
    return joined.encode("utf-8", "surrogateescape")
