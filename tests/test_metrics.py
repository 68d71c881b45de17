"""Tests for imgproxy.metrics: names, values and labels as a Prometheus scraper sees them."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from imgproxy import errors
from imgproxy.metrics import (
    REQUEST_KINDS,
    UPSTREAM_ERROR_KINDS,
    Metrics,
    MetricsResource,
    code_class,
    metrics_site,
)

_sync = SynchronousTestCase()
success_result_of = _sync.successResultOf


def scrape(metrics: Metrics, path: str = "/metrics") -> tuple[int, dict[str, str], str]:
    """GET ``path`` from the metrics resource in memory; return status, headers, body."""
    stub = StubTreq(MetricsResource(metrics))
    response = success_result_of(stub.get("http://metrics.test" + path))
    body = success_result_of(stub.content(response))
    headers = {
        name.decode().lower(): values[0].decode()
        for name, values in response.headers.getAllRawHeaders()
    }
    return response.code, headers, body.decode("utf-8")


def families(metrics: Metrics) -> dict[str, Metric]:
    """Scrape and parse the exposition into families by name."""
    code, _, body = scrape(metrics)
    assert code == 200
    return {family.name: family for family in text_string_to_metric_families(body)}


def value(metrics: Metrics, sample_name: str, **labels: str) -> float | None:
    """The scraped value of one sample, or ``None`` if it is absent."""
    for family in families(metrics).values():
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return float(sample.value)
    return None


def test_scrape_is_prometheus_text() -> None:
    """GET /metrics answers 200 with the Prometheus text content type and parseable text."""
    code, headers, body = scrape(Metrics("1.2.3"))
    assert code == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert "imageproxy_requests_in_flight" in {f.name for f in text_string_to_metric_families(body)}


def test_expected_families_and_types() -> None:
    """Every documented imageproxy metric is present with its documented type."""
    metrics = Metrics("1.2.3")
    metrics.request_started()
    metrics.request_finished(200, "ok", 0.2, 10)
    found = {name: family.type for name, family in families(metrics).items()}
    expected = {
        "imageproxy_build_info": "gauge",
        "imageproxy_requests": "counter",
        "imageproxy_request_duration_seconds": "histogram",
        "imageproxy_response_bytes": "counter",
        "imageproxy_requests_in_flight": "gauge",
        "imageproxy_upstream_fetch_duration_seconds": "histogram",
        "imageproxy_time_to_first_byte_seconds": "histogram",
        "imageproxy_upstream_errors": "counter",
    }
    assert {name: found.get(name) for name in expected} == expected


def test_process_and_platform_metrics() -> None:
    """The private registry carries process and Python platform metrics."""
    found = families(Metrics("1.2.3"))
    assert "process_cpu_seconds" in found
    assert "process_resident_memory_bytes" in found
    assert "python_info" in found


def test_private_registry_per_instance() -> None:
    """Two Metrics instances do not share a registry (no duplicate-registration error)."""
    first, second = Metrics("1"), Metrics("1")
    first.upstream_error("dns")
    assert first.registry is not second.registry
    assert value(second, "imageproxy_upstream_errors_total", kind="dns") == 0.0


def test_given_registry_is_used() -> None:
    """A registry passed in receives the metrics."""
    registry = CollectorRegistry()
    metrics = Metrics("1", registry=registry)
    assert metrics.registry is registry
    assert registry.get_sample_value("imageproxy_requests_in_flight") == 0.0


def test_build_info_labels() -> None:
    """imageproxy_build_info is 1 with the version and the Python version as labels."""
    assert (
        value(
            Metrics("9.8.7"),
            "imageproxy_build_info",
            version="9.8.7",
            python=platform.python_version(),
        )
        == 1.0
    )


def test_request_counted_by_class_and_reason() -> None:
    """A finished request increments requests_total under its status class and reason."""
    metrics = Metrics("1")
    for _ in range(2):
        metrics.request_started()
        metrics.request_finished(404, "not-found", 0.01, 9)
    metrics.request_started()
    metrics.request_finished(200, "ok", 0.01, 100)
    assert value(metrics, "imageproxy_requests_total", code_class="4xx", reason="not-found") == 2
    assert value(metrics, "imageproxy_requests_total", code_class="2xx", reason="ok") == 1


def test_in_flight_rises_and_falls() -> None:
    """In-flight counts started requests until they finish."""
    metrics = Metrics("1")
    metrics.request_started()
    metrics.request_started()
    assert value(metrics, "imageproxy_requests_in_flight") == 2
    metrics.request_finished(200, "ok", 0.1, 0)
    assert value(metrics, "imageproxy_requests_in_flight") == 1


def test_duration_histogram_and_bytes() -> None:
    """Durations land in the right buckets of the request histogram and bytes add up."""
    metrics = Metrics("1")
    for duration in (0.003, 0.2, 7.0):
        metrics.request_started()
        metrics.request_finished(200, "ok", duration, 1000)
    name = "imageproxy_request_duration_seconds"
    assert value(metrics, name + "_count", code_class="2xx") == 3
    assert value(metrics, name + "_sum", code_class="2xx") == pytest.approx(7.203)
    assert value(metrics, name + "_bucket", code_class="2xx", le="0.005") == 1
    assert value(metrics, name + "_bucket", code_class="2xx", le="0.25") == 2
    assert value(metrics, name + "_bucket", code_class="2xx", le="5.0") == 2
    assert value(metrics, name + "_bucket", code_class="2xx", le="10.0") == 3
    assert value(metrics, "imageproxy_response_bytes_total") == 3000


def test_upstream_and_first_byte_histograms() -> None:
    """upstream_fetched and first_byte feed their own histograms."""
    metrics = Metrics("1")
    metrics.upstream_fetched(0.04)
    metrics.upstream_fetched(0.06)
    metrics.first_byte(0.5)
    assert value(metrics, "imageproxy_upstream_fetch_duration_seconds_count") == 2
    assert value(metrics, "imageproxy_upstream_fetch_duration_seconds_bucket", le="0.05") == 1
    assert value(metrics, "imageproxy_time_to_first_byte_seconds_count") == 1
    assert value(metrics, "imageproxy_time_to_first_byte_seconds_sum") == 0.5


def test_upstream_error_kinds_start_at_zero() -> None:
    """Every upstream error kind is exposed at 0 before any error, so rates work at once."""
    metrics = Metrics("1")
    metrics.upstream_error("tls")
    for kind in UPSTREAM_ERROR_KINDS:
        expected = 1.0 if kind == "tls" else 0.0
        assert value(metrics, "imageproxy_upstream_errors_total", kind=kind) == expected


def test_issue_kinds_are_known() -> None:
    """The kinds the issue and errors.py name are in the bounded sets, not clamped."""
    assert {
        "dns",
        "refused-destination",
        "tls",
        "timeout",
        "too-large",
        "not-image",
        "status",
    } <= UPSTREAM_ERROR_KINDS
    assert {
        "ok",
        "not-modified",
        "bad-request",
        "bad-signature",
        "not-found",
        "method",
        "upstream",
        "rate-limited",
        "client-gone",
        "error",
    } <= REQUEST_KINDS


def test_error_classes_kinds_are_known() -> None:
    """Every default kind of the errors.py classes is a known request reason."""
    kinds = {
        cls.kind
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ProxyError)
    }
    assert kinds - {"error"} and kinds <= REQUEST_KINDS


def test_unknown_kind_is_other() -> None:
    """An unknown kind is counted as 'other' and does not appear as a label value."""
    metrics = Metrics("1")
    metrics.upstream_error("http://evil.example/x.png")
    metrics.request_started()
    metrics.request_finished(502, "evil.example", 0.1, 0)
    _, _, body = scrape(metrics)
    assert "evil" not in body
    assert value(metrics, "imageproxy_upstream_errors_total", kind="other") == 1
    assert value(metrics, "imageproxy_requests_total", code_class="5xx", reason="other") == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (100, "1xx"),
        (204, "2xx"),
        (304, "3xx"),
        (499, "4xx"),
        (599, "5xx"),
        (600, "other"),
        (99, "other"),
        (0, "other"),
        (-200, "other"),
    ],
)
def test_code_class(status: int, expected: str) -> None:
    """Statuses map to their class; values outside 100..599 map to 'other'."""
    assert code_class(status) == expected


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.integers(min_value=-1000, max_value=10_000),
            st.text(max_size=30),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(min_value=-(2**40), max_value=2**40),
        ),
        max_size=8,
    )
)
def test_label_values_are_bounded(calls: list[tuple[int, str, float, int]]) -> None:
    """Whatever the request path reports, every imageproxy label value is from a fixed set."""
    metrics = Metrics("1.0")
    for status, kind, duration, size in calls:
        metrics.request_started()
        metrics.request_finished(status, kind, duration, size)
        metrics.upstream_error(kind)
        metrics.upstream_fetched(duration)
        metrics.first_byte(duration)
    allowed: dict[str, set[str]] = {
        "code_class": {"1xx", "2xx", "3xx", "4xx", "5xx", "other"},
        "reason": set(REQUEST_KINDS),
        "kind": set(UPSTREAM_ERROR_KINDS),
        "version": {"1.0"},
        "python": {platform.python_version()},
        "le": set(),
    }
    for name, family in families(metrics).items():
        if not name.startswith("imageproxy_"):
            continue
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                assert label in allowed
                if label == "le":
                    float(label_value)
                else:
                    assert label_value in allowed[label]


def test_no_created_series() -> None:
    """No *_created series is exposed for counters or histograms."""
    metrics = Metrics("1")
    metrics.request_started()
    metrics.request_finished(200, "ok", 0.1, 1)
    metrics.watch("things_total", "Things.", lambda: 1.0, kind="counter")
    _, _, body = scrape(metrics)
    assert "imageproxy_requests_total" in body
    assert "_created" not in body


def test_watch_gauge_reads_at_scrape_time() -> None:
    """A watched gauge shows the value its reader returns at each scrape."""
    metrics = Metrics("1")
    hosts = [3]
    metrics.watch("ratelimit_hosts", "Hosts tracked by the rate limiter.", lambda: hosts[0])
    assert value(metrics, "imageproxy_ratelimit_hosts") == 3
    hosts[0] = 5
    assert value(metrics, "imageproxy_ratelimit_hosts") == 5
    assert families(metrics)["imageproxy_ratelimit_hosts"].type == "gauge"


def test_watch_counter_gets_total_suffix() -> None:
    """A watched counter is exposed as a counter named NAME_total, with or without the suffix."""
    metrics = Metrics("1")
    metrics.watch("imageproxy_ratelimit_admitted", "Admitted.", lambda: 7, kind="counter")
    metrics.watch("ratelimit_refused_total", "Refused.", lambda: 2, kind="counter")
    found = families(metrics)
    assert found["imageproxy_ratelimit_admitted"].type == "counter"
    assert value(metrics, "imageproxy_ratelimit_admitted_total") == 7
    assert value(metrics, "imageproxy_ratelimit_refused_total") == 2


def test_watch_failing_reader_is_left_out() -> None:
    """A reader that raises drops only its own metric from the scrape, and is logged."""
    metrics = Metrics("1")
    metrics.watch("broken", "Broken.", lambda: 1 / 0)
    metrics.watch("fine", "Fine.", lambda: 1)
    with capturedLogs() as events:
        found = families(metrics)
    assert "imageproxy_broken" not in found
    assert value(metrics, "imageproxy_fine") == 1
    assert any(e.get("log_failure") is not None for e in events)


@pytest.mark.parametrize(
    ("name", "kind"), [("ok_name", "histogram"), ("bad name", "gauge"), ("a-b", "gauge")]
)
def test_watch_rejects_bad_arguments(name: str, kind: str) -> None:
    """watch refuses an unknown kind or an invalid metric name."""
    with pytest.raises(ValueError):
        Metrics("1").watch(name, "Doc.", lambda: 0.0, kind=kind)


def test_watch_rejects_duplicate_name() -> None:
    """Watching a name twice, or a name the proxy already uses, raises ValueError."""
    metrics = Metrics("1")
    metrics.watch("pool_connections", "Pool.", lambda: 0.0)
    with pytest.raises(ValueError):
        metrics.watch("pool_connections", "Pool.", lambda: 0.0)
    with pytest.raises(ValueError):
        metrics.watch("requests_in_flight", "Clash.", lambda: 0.0)


def test_other_paths_are_404() -> None:
    """Paths other than /metrics answer 404 without metrics."""
    for path in ("/", "/metrics/", "/metricsx", "/foo/metrics"):
        code, _, body = scrape(Metrics("1"), path)
        assert (path, code) == (path, 404)
        assert "imageproxy_" not in body


def test_query_string_ignored() -> None:
    """A query string on /metrics still gets the metrics."""
    code, _, body = scrape(Metrics("1"), "/metrics?name[]=x")
    assert code == 200
    assert "imageproxy_build_info" in body


def test_post_not_allowed() -> None:
    """Only GET and HEAD are served: POST answers a plain-text 405 naming the allowed methods."""
    stub = StubTreq(MetricsResource(Metrics("1")))
    response = success_result_of(stub.post("http://metrics.test/metrics", data=b"x"))
    assert response.code == 405
    assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert success_result_of(stub.content(response)) == b"Method Not Allowed\n"


def test_head_has_no_body() -> None:
    """HEAD /metrics answers 200 with the content type and no body."""
    stub = StubTreq(MetricsResource(Metrics("1")))
    response = success_result_of(stub.head("http://metrics.test/metrics"))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert success_result_of(stub.content(response)) == b""


def test_scrape_needs_no_thread_or_reactor_turn() -> None:
    """A scrape completes synchronously in the calling thread (no deferToThread)."""
    stub = StubTreq(MetricsResource(Metrics("1")))
    result = stub.get("http://metrics.test/metrics")
    assert success_result_of(result).code == 200


def _drive(site: Site, request: bytes) -> bytes:
    """Feed one raw HTTP request to a started site over a string transport; return the reply."""
    site.startFactory()
    try:
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        return transport.value()
    finally:
        site.stopFactory()


def _access_events(events: Sequence[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """Events that look like twisted.web access-log lines (the request line in the text)."""
    return [e for e in events if "GET /metrics HTTP/1.1" in repr(e)]


def test_metrics_site_serves_without_access_log() -> None:
    """metrics_site serves /metrics and writes no access-log line per scrape."""
    site = metrics_site(Metrics("1"), reactor=MemoryReactorClock())
    with capturedLogs() as events:
        reply = _drive(site, b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"imageproxy_build_info" in reply
    assert _access_events(events) == []
    # Control: a plain Site in the same harness does log the request line.
    plain = Site(MetricsResource(Metrics("1")), reactor=MemoryReactorClock())
    with capturedLogs() as events:
        _drive(plain, b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
    assert _access_events(events) != []
