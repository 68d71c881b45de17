"""The errors of the request path, each carrying what the client and the metrics need.

Every step of the pipeline (url codec, destination policy, rate limiter, upstream fetch, sniffer,
relay) fails by raising one of these; the web front turns it into a short plain-text response.
``kind`` is a fixed, low-cardinality label for metrics and logs, never a host or URL.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A request that cannot be served: ``status`` and a short ``reason`` go to the client."""

    status: int = 502
    kind: str = "error"
    default_reason: str = "Bad Gateway"

    def __init__(self, reason: str | None = None, *, kind: str | None = None) -> None:
        self.reason = reason or self.default_reason
        if kind is not None:
            self.kind = kind
        super().__init__(self.reason)


class BadRequest(ProxyError):
    """Malformed proxy path, undecodable or non-absolute URL, userinfo in the URL."""

    status = 400
    kind = "bad-request"
    default_reason = "Bad Request"


class BadSignature(ProxyError):
    """The digest does not match the URL under any configured key."""

    status = 403
    kind = "bad-signature"
    default_reason = "Bad signature"


class DestinationRefused(ProxyError):
    """The network policy refuses the destination (also on a redirect hop)."""

    status = 403
    kind = "refused-destination"
    default_reason = "Destination refused"


class NotFound(ProxyError):
    """Unknown route, or the origin said 404/410."""

    status = 404
    kind = "not-found"
    default_reason = "Not Found"


class MethodNotAllowed(ProxyError):
    """Only GET and HEAD are served."""

    status = 405
    kind = "method"
    default_reason = "Method Not Allowed"


class UpstreamError(ProxyError):
    """The origin could not give a usable answer: unreachable, reset, bad HTTP, 5xx, ..."""

    status = 502
    kind = "upstream"
    default_reason = "Bad Gateway"


class NotAnImage(UpstreamError):
    """The body is not an allowed image format."""

    kind = "not-image"
    default_reason = "Not an image"


class TooLarge(UpstreamError):
    """The body is larger than ``--max-size`` (declared or counted while streaming)."""

    kind = "too-large"
    default_reason = "Image too large"


class UpstreamTimeout(ProxyError):
    """The origin did not answer within the time budget."""

    status = 504
    kind = "timeout"
    default_reason = "Gateway Timeout"


class Unavailable(ProxyError):
    """Rate-limit wait exceeded, queue full or overload: retry after ``retry_after`` seconds."""

    status = 503
    kind = "rate-limited"
    default_reason = "Service Unavailable"

    def __init__(
        self, reason: str | None = None, *, retry_after: float = 1.0, kind: str | None = None
    ) -> None:
        super().__init__(reason, kind=kind)
        self.retry_after = retry_after
