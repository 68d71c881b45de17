"""Prometheus metrics for the proxy, served on their own listener without threads.

Everything lives in a private :class:`~prometheus_client.CollectorRegistry` (never the global
one), so several instances (tests, workers) do not clash. Label values come only from small fixed
sets: a status class, a failure kind clamped to :data:`REQUEST_KINDS` or
:data:`UPSTREAM_ERROR_KINDS`, the build version. No label ever carries a URL, a host name or a
client address, so the number of series stays bounded whatever clients send.

Counters and histograms are exposed without the ``_created`` series: prometheus_client can only
turn those off globally (``disable_created_metrics()``), so the exposition drops them instead.
"""

from __future__ import annotations

import copy
import platform
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from imgproxy.logs import QuietSite

__all__ = [
    "DURATION_BUCKETS",
    "REQUEST_KINDS",
    "UPSTREAM_ERROR_KINDS",
    "Metrics",
    "MetricsResource",
    "code_class",
    "metrics_site",
]

log = Logger()

PREFIX = "imageproxy_"

#: Why an upstream fetch failed: the ``kind`` label of ``imageproxy_upstream_errors_total``.
UPSTREAM_ERROR_KINDS: frozenset[str] = frozenset(
    {
        "dns",  # the name did not resolve (or resolved only to refused addresses)
        "refused-destination",  # the network policy refused the address (also on a redirect)
        "connect",  # TCP connection refused or unreachable
        "reset",  # the connection was lost before or during the answer
        "tls",  # handshake or certificate verification failed
        "timeout",  # connect, headers, first byte or idle deadline passed
        "too-large",  # declared or streamed body over --max-size
        "too-many-pixels",  # image dimensions over the limit
        "not-image",  # the sniffer refused the body
        "status",  # the origin answered with an unusable status (5xx, 4xx other than 404/410)
        "redirects",  # too many redirects
        "bad-redirect",  # a redirect without a usable Location
        "loop",  # the request came back through this proxy (Via)
        "bad-http",  # malformed HTTP from the origin
        "upstream",  # any other upstream failure
        "other",  # a kind not in this set (clamped)
    }
)

#: Why a request ended the way it did: the ``reason`` label of ``imageproxy_requests_total``.
REQUEST_KINDS: frozenset[str] = UPSTREAM_ERROR_KINDS | frozenset(
    {
        "ok",
        "not-modified",
        "bad-request",
        "bad-signature",
        "not-found",
        "method",
        "rate-limited",
        "overload",
        "draining",
        "client-gone",
        "error",
    }
)

#: Histogram buckets in seconds, from a cached tiny image to the longest allowed wait.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
)

_CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_MAX_WARNED_KINDS = 32


def code_class(status: int) -> str:
    """Map an HTTP status to its class label (``"2xx"``), or ``"other"`` outside 100..599."""
    try:
        index = int(status) // 100 - 1
    except (TypeError, ValueError, OverflowError):
        return "other"
    return _CODE_CLASSES[index] if 0 <= index < len(_CODE_CLASSES) else "other"


def _non_negative(value: float) -> float:
    """Return ``value`` as a float, or 0.0 if it is negative, NaN or not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if number > 0.0 else 0.0


class Metrics:
    """The proxy's metrics, recorded by the request path and read at scrape time.

    Every recording method is cheap, never raises on odd input (it clamps instead) and so can be
    called from any callback without guarding it.
    """

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        """Register the proxy's metrics, build info and process metrics in ``registry``.

        :param version: the package version, shown in ``imageproxy_build_info``.
        :param registry: where to register; a new private registry when ``None``.
        """
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        self._warned_kinds: set[str] = set()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        reg = self.registry
        build = Gauge(
            PREFIX + "build_info",
            "Always 1; the labels say which imageproxy and Python are running.",
            ["version", "python"],
            registry=reg,
        )
        build.labels(version=version, python=platform.python_version()).set(1)
        self._requests = Counter(
            PREFIX + "requests",
            "Finished proxy requests by status class and reason.",
            ["code_class", "reason"],
            registry=reg,
        )
        self._duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from receiving a proxy request to its last byte sent (or its failure).",
            ["code_class"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._bytes = Counter(
            PREFIX + "response_bytes",
            "Body bytes relayed to clients.",
            registry=reg,
        )
        self._in_flight = Gauge(
            PREFIX + "requests_in_flight",
            "Proxy requests being served now.",
            registry=reg,
        )
        self._upstream = Histogram(
            PREFIX + "upstream_fetch_duration_seconds",
            "Time from sending the upstream request to receiving its response headers.",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._first_byte = Histogram(
            PREFIX + "time_to_first_byte_seconds",
            "Time from receiving a proxy request to sending the first body byte to the client.",
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._upstream_errors = Counter(
            PREFIX + "upstream_errors",
            "Failed upstream fetches by kind.",
            ["kind"],
            registry=reg,
        )
        for kind in sorted(UPSTREAM_ERROR_KINDS):
            self._upstream_errors.labels(kind=kind)
        self._children: dict[tuple[int, str], tuple[Any, Any]] = {}

    def _clamp(self, kind: str, allowed: frozenset[str]) -> str:
        """Return ``kind`` if it is in ``allowed``, else ``"other"`` (warning once per kind)."""
        if kind in allowed:
            return kind
        if len(self._warned_kinds) < _MAX_WARNED_KINDS and isinstance(kind, str):
            if kind not in self._warned_kinds:
                self._warned_kinds.add(kind)
                log.warn("Unknown metrics kind {kind!r} counted as 'other'", kind=kind[:40])
        return "other"

    def request_started(self) -> None:
        """Count a request as in flight; pair with exactly one :meth:`request_finished`."""
        self._in_flight.inc()

    def request_finished(self, status: int, kind: str, duration: float, bytes_sent: int) -> None:
        """Record a finished request: its outcome, duration and body bytes sent.

        :param status: the HTTP status sent (or that would have been sent).
        :param kind: the outcome, one of :data:`REQUEST_KINDS`; anything else counts as
            ``"other"``.
        :param duration: seconds from receipt to the end.
        :param bytes_sent: body bytes written to the client.
        """
        self._in_flight.dec()
        children = self._children.get((status, kind))
        if children is None:  # label lookups are costly: one per (status, kind), then cached
            klass = code_class(status)
            children = (
                self._requests.labels(code_class=klass, reason=self._clamp(kind, REQUEST_KINDS)),
                self._duration.labels(code_class=klass),
            )
            if len(self._children) < 4096:
                self._children[(status, kind)] = children
        children[0].inc()
        children[1].observe(_non_negative(duration))
        self._bytes.inc(_non_negative(bytes_sent))

    def upstream_fetched(self, duration: float) -> None:
        """Record the seconds from sending an upstream request to having its headers."""
        self._upstream.observe(_non_negative(duration))

    def first_byte(self, seconds: float) -> None:
        """Record the seconds from receiving a request to sending its first body byte."""
        self._first_byte.observe(_non_negative(seconds))

    def upstream_error(self, kind: str) -> None:
        """Count a failed upstream fetch; ``kind`` outside :data:`UPSTREAM_ERROR_KINDS` counts as
        ``"other"``."""
        self._upstream_errors.labels(kind=self._clamp(kind, UPSTREAM_ERROR_KINDS)).inc()

    def watch(
        self,
        name: str,
        documentation: str,
        read: Callable[[], float],
        kind: str = "gauge",
    ) -> None:
        """Expose a value that lives elsewhere (limiter, pool, cache), read at each scrape.

        :param name: the metric name; ``imageproxy_`` is prepended unless already there. A
            counter is exposed as ``NAME_total`` (a trailing ``_total`` in ``name`` is fine).
        :param read: returns the current value; called in the reactor thread at scrape time,
            so it must be quick. If it raises, that metric is left out of the scrape and the
            failure is logged.
        :param kind: ``"gauge"`` or ``"counter"`` (a counter must never go down).
        :raises ValueError: on a bad name or kind, or a name already registered.
        """
        if kind not in ("gauge", "counter"):
            raise ValueError(f"metric kind must be 'gauge' or 'counter', not {kind!r}")
        full = name if name.startswith(PREFIX) else PREFIX + name
        if kind == "counter" and full.endswith("_total"):
            full = full[: -len("_total")]
        if not _NAME.match(full):
            raise ValueError(f"invalid metric name {full!r}")
        self.registry.register(_Watch(full, documentation, read, kind))

    def render(self) -> bytes:
        """Return the Prometheus text exposition of the registry, without ``_created`` series."""
        return generate_latest(_WithoutCreated(self.registry))


class _Watch:
    """A collector of one unlabelled value read from a callable at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float], kind: str) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read
        self._kind = kind

    def _family(self, value: float | None) -> Metric:
        if self._kind == "counter":
            return CounterMetricFamily(self._name, self._documentation, value=value)
        return GaugeMetricFamily(self._name, self._documentation, value=value)

    def describe(self) -> Iterable[Metric]:
        """Name the metric without reading it (lets the registry refuse duplicates)."""
        return [self._family(None)]

    def collect(self) -> Iterable[Metric]:
        """Read the value now; leave the metric out if the reader fails."""
        try:
            value = float(self._read())
        except Exception:
            log.failure("Reading metric {name} failed", name=self._name)
            return []
        return [self._family(value)]


class _WithoutCreated:
    """A view of a registry whose counters and histograms carry no ``_created`` samples."""

    _SUFFIXED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        """Yield the registry's metrics, dropping ``NAME_created`` samples."""
        for metric in self._registry.collect():
            if metric.type in self._SUFFIXED:
                created = metric.name + "_created"
                kept = [s for s in metric.samples if s.name != created]
                if len(kept) != len(metric.samples):
                    metric = copy.copy(metric)
                    metric.samples = kept
            yield metric


class MetricsResource(Resource):
    """The metrics listener's whole tree: ``GET /metrics`` renders the registry, in the reactor
    thread (a scrape is a few milliseconds of string building, not worth a thread); any other
    path is 404."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        """Serve ``metrics``."""
        super().__init__()
        self._metrics = metrics

    def render(self, request: Request) -> bytes:
        """Serve GET and HEAD; answer other methods with a plain-text 405, not Twisted's HTML."""
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _plain(request, 405, b"Method Not Allowed\n")
        result: bytes = super().render(request)
        return result

    def render_GET(self, request: Request) -> bytes:
        """Render the exposition at ``/metrics``, a short 404 elsewhere."""
        if request.path != b"/metrics":
            return _plain(request, 404, b"Not Found\n")
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()


def _plain(request: Request, status: int, body: bytes) -> bytes:
    """Set a short plain-text error response and return its body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body


def metrics_site(metrics: Metrics, *, reactor: IReactorTime | None = None) -> Site:
    """Build the Site for the ``--metrics`` endpoint: only ``/metrics``, no access log lines.

    :param reactor: passed to the Site (its timeouts); ``None`` lets Twisted use the global one.
    """
    site = QuietSite(MetricsResource(metrics), reactor=reactor)
    site.displayTracebacks = False
    return site
