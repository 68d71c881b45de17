"""Tests for imgproxy.ratelimit: deterministic, driven by twisted.internet.task.Clock."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgproxy import ratelimit
from imgproxy.errors import Unavailable
from imgproxy.ratelimit import (
    HostLimiter,
    HostOverride,
    Limits,
    Permit,
    host_key,
    parse_retry_after,
)

A = "a.example.com:443"
B = "b.example.org:443"
C = "c.example.net:443"
D = "d.example.io:443"


def make(rate: float = 1.0, burst: int = 1, **kwargs: Any) -> tuple[Clock, HostLimiter]:
    """A limiter on a fresh Clock."""
    clock = Clock()
    return clock, HostLimiter(clock, Limits(rate, burst), **kwargs)


_PENDING = object()


def outcome(d: Deferred[Permit]) -> Any:
    """The result (Permit or Failure) of a Deferred, or _PENDING; keeps the Deferred usable."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    if not box:
        return _PENDING
    result = box[0]
    if isinstance(result, Failure):
        d.addErrback(lambda f: None)
    return result


def permit(d: Deferred[Permit]) -> Permit:
    """The Permit a Deferred has fired with (fails the test otherwise)."""
    result = outcome(d)
    assert isinstance(result, Permit), result
    return result


def refusal(d: Deferred[Permit]) -> Unavailable:
    """The Unavailable error a Deferred has failed with (fails the test otherwise)."""
    result = outcome(d)
    assert isinstance(result, Failure), result
    assert isinstance(result.value, Unavailable), result
    return result.value


def pending(d: Deferred[Permit]) -> bool:
    """True if the Deferred has not fired."""
    return outcome(d) is _PENDING


# -- keys, limits, overrides -------------------------------------------------------------------


def test_host_key_normalises_case_idna_trailing_dot_and_ipv6() -> None:
    """Keys are lower-cased IDNA host plus port; IPv6 literals are bracketed and canonical."""
    assert host_key("Images.Example.COM", 443) == "images.example.com:443"
    assert host_key(b"images.example.com.", 80) == "images.example.com:80"
    assert host_key("Bücher.Example", 443) == "xn--bcher-kva.example:443"
    assert host_key("bücher.example".encode(), 443) == "xn--bcher-kva.example:443"
    assert host_key("::1", 8080) == "[::1]:8080"
    assert host_key("[0:0::1]", 8080) == "[::1]:8080"
    assert host_key("127.0.0.1", 80) == "127.0.0.1:80"
    assert host_key("_dmarc.example.com", 443) == "_dmarc.example.com:443"


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("", 443),
        ("a..b", 443),
        ("[nope]", 443),
        ("1:2:3", 443),
        ("example.com", 0),
        ("example.com", 65536),
        ("example.com", True),
    ],
)
def test_host_key_rejects_invalid_hosts_and_ports(host: str, port: int) -> None:
    """An empty or malformed host, or a port outside 1-65535, raises ValueError."""
    with pytest.raises(ValueError):
        host_key(host, port)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(-1, 5), (float("nan"), 5), (float("inf"), 5), (1, 0), (1, True), (1, 2.5)],
)
def test_limits_reject_invalid_values(rate: float, burst: int) -> None:
    """Negative, NaN or infinite rates and a burst that is not an integer >= 1 raise."""
    with pytest.raises(ValueError):
        Limits(rate, burst)


def test_limits_rate_zero_means_unlimited() -> None:
    """rate=0 is the documented way to disable the rate limit of a host."""
    assert Limits(0, 1).unlimited
    assert not Limits(0.5, 1).unlimited


def test_override_precedence_exact_then_longest_suffix() -> None:
    """host:port beats host beats the longest wildcard; a wildcard also matches its bare domain."""
    by_port = HostOverride("img.example.com:8443", Limits(1, 1))
    exact = HostOverride("IMG.example.com", Limits(2, 2))
    deep = HostOverride("*.cdn.example.com", Limits(3, 3))
    wide = HostOverride("*.example.com", Limits(4, 4))
    table = [wide, deep, exact, by_port]
    assert HostOverride.pick(table, "img.example.com:8443") is by_port
    assert HostOverride.pick(table, "img.example.com:443") is exact
    assert HostOverride.pick(table, "a.b.cdn.example.com:443") is deep
    assert HostOverride.pick(table, "cdn.example.com:443") is deep
    assert HostOverride.pick(table, "other.example.com:443") is wide
    assert HostOverride.pick(table, "example.com:443") is wide
    assert HostOverride.pick(table, "example.org:443") is None
    assert HostOverride.pick(table, "notexample.com:443") is None


def test_override_last_duplicate_wins_and_ips_are_not_suffix_matched() -> None:
    """Of two overrides for the same pattern the last applies; IPs never match a wildcard."""
    first = HostOverride("*.0.1", Limits(1, 1))
    second = HostOverride("x.example", Limits(1, 1))
    third = HostOverride("X.Example.", Limits(5, 5))
    assert HostOverride.pick([first, second, third], "x.example:80") is third
    assert HostOverride.pick([first], "127.0.0.1:80") is None
    assert HostOverride("[::1]", Limits(1, 1)).pattern == "[::1]"
    v6 = HostOverride("2001:DB8::1", Limits(1, 1))
    assert v6.pattern == "[2001:db8::1]"
    assert HostOverride.pick([v6], "[2001:db8::1]:443") is v6
    assert HostOverride("[2001:db8::1]:8443", Limits(1, 1)).pattern == "[2001:db8::1]:8443"


@pytest.mark.parametrize("pattern", ["*", "a.*.com", "*example.com", "", "*.[::1]", "x.com:0"])
def test_override_rejects_bad_patterns(pattern: str) -> None:
    """Only a host, host:port or a leading '*.' wildcard is a valid pattern."""
    with pytest.raises(ValueError):
        HostOverride(pattern, Limits(1, 1))


# -- the bucket -----------------------------------------------------------------------------


def test_burst_then_steady_rate() -> None:
    """A full bucket admits `burst` requests at once, then one every 1/rate seconds."""
    clock, limiter = make(rate=2, burst=3)
    for _ in range(3):
        permit(limiter.acquire(A)).release()
    times: list[float] = []
    waiting = [limiter.acquire(A) for _ in range(4)]
    for d in waiting:
        d.addCallback(lambda p: (times.append(clock.seconds()), p.release()))
    assert all(pending(d) for d in waiting)
    clock.advance(0.499)
    assert times == []
    clock.advance(0.001)
    for _ in range(3):
        clock.advance(0.5)
    assert times == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert clock.getDelayedCalls() == []


def test_late_timer_does_not_lose_tokens() -> None:
    """A wake-up that fires late admits every waiter whose token was earned meanwhile."""
    clock, limiter = make(rate=1, burst=1, queue_timeout=5)
    permit(limiter.acquire(A)).release()
    waiting = [limiter.acquire(A) for _ in range(5)]
    clock.advance(5)  # one step: the timer due at 1 s runs at 5 s
    for d in waiting:
        permit(d).release()
    assert clock.getDelayedCalls() == []


def test_refill_arithmetic_with_fractional_tokens() -> None:
    """Tokens refill fractionally; a waiter is admitted exactly when its token is whole."""
    clock, limiter = make(rate=3, burst=2)
    permit(limiter.acquire(A)).release()
    permit(limiter.acquire(A)).release()
    clock.advance(0.2)
    info = limiter.bucket_info(A)
    assert info is not None
    assert info["tokens"] == pytest.approx(0.6)
    d = limiter.acquire(A)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == pytest.approx(1 / 3)
    clock.advance(1 / 3 - 0.2 - 0.001)
    assert pending(d)
    clock.advance(0.001)
    permit(d).release()
    clock.advance(1.0)
    assert limiter.bucket_info(A)["tokens"] == pytest.approx(2.0)  # type: ignore[index]


def test_fifo_order_and_one_timer_per_host() -> None:
    """Waiters of one host are admitted in arrival order, driven by a single timer."""
    clock, limiter = make(rate=1, burst=1)
    permit(limiter.acquire(A)).release()
    order: list[str] = []
    for name in "wxyz":
        limiter.acquire(A).addCallback(lambda p, n=name: (order.append(n), p.release()))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert order == ["w"]
    clock.advance(1)
    clock.advance(1)
    clock.advance(1)
    assert order == ["w", "x", "y", "z"]
    assert clock.getDelayedCalls() == []


def test_expected_wait_over_queue_timeout_is_refused_with_exact_retry_after() -> None:
    """A request whose token is beyond queue_timeout fails at once with Retry-After ceil(wait)."""
    clock, limiter = make(rate=0.4, burst=1, queue_timeout=5)
    permit(limiter.acquire(A)).release()
    first, second = limiter.acquire(A), limiter.acquire(A)  # tokens at 2.5 s and 5.0 s
    third = limiter.acquire(A)  # token at 7.5 s
    assert pending(first) and pending(second)
    error = refusal(third)
    assert error.retry_after == 8
    assert error.status == 503
    assert error.kind == "rate-limited"
    assert (limiter.delayed, limiter.refused, limiter.admitted) == (2, 1, 1)
    clock.advance(5)
    permit(first).release()
    permit(second).release()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(("rate", "retry_after"), [(0.45, 3), (0.4, 3), (0.25, 4), (3, 1)])
def test_retry_after_is_the_wait_rounded_up(rate: float, retry_after: int) -> None:
    """Retry-After is the whole number of seconds until the token, rounded up, at least 1."""
    clock, limiter = make(rate=rate, burst=1, queue_timeout=0)
    permit(limiter.acquire(A)).release()
    assert refusal(limiter.acquire(A)).retry_after == retry_after


def test_queue_timeout_at_deadline_cleans_up_queue_and_timer() -> None:
    """A waiter still blocked at its deadline fails then, leaving no queue entry and no timer."""
    clock, limiter = make(rate=0, burst=1, queue_timeout=5, max_inflight_per_host=1)
    held = permit(limiter.acquire(A))
    d = limiter.acquire(A)
    clock.advance(4.999)
    assert pending(d)
    clock.advance(0.001)
    error = refusal(d)
    assert error.retry_after == 1
    assert limiter.queued == 0
    assert limiter.bucket_info(A)["queued"] == 0  # type: ignore[index]
    assert clock.getDelayedCalls() == []
    held.release()
    assert limiter.tracked_hosts == 0


def test_queue_full_is_refused_with_retry_after() -> None:
    """Beyond max_queue waiters a request fails at once with the wait it would have had."""
    clock, limiter = make(rate=1, burst=1, max_queue=2, queue_timeout=30)
    permit(limiter.acquire(A))
    waiting = [limiter.acquire(A), limiter.acquire(A)]
    error = refusal(limiter.acquire(A))
    assert error.retry_after == 3
    assert error.reason == "Origin rate limit: queue full"
    clock.advance(2)
    assert all(not pending(d) for d in waiting)


def test_cancelled_waiter_leaves_queue_without_token_and_next_is_on_time() -> None:
    """Cancelling the head waiter keeps the next one's admission time and consumes no token."""
    clock, limiter = make(rate=1, burst=1)
    permit(limiter.acquire(A)).release()
    head, second, third = limiter.acquire(A), limiter.acquire(A), limiter.acquire(A)
    head.cancel()
    result = outcome(head)
    assert isinstance(result, Failure) and result.check(CancelledError)
    assert limiter.cancelled == 1
    clock.advance(1)
    permit(second).release()
    assert pending(third)
    clock.advance(1)
    permit(third).release()
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    permit(limiter.acquire(A)).release()  # the cancelled waiter's token was not used up


def test_cancelled_middle_waiter_is_skipped() -> None:
    """Cancelling a waiter in the middle of the queue moves later waiters up by one token."""
    clock, limiter = make(rate=1, burst=1)
    permit(limiter.acquire(A))
    first, middle, last = limiter.acquire(A), limiter.acquire(A), limiter.acquire(A)
    middle.cancel()
    clock.advance(1)
    assert not pending(first) and pending(last)
    clock.advance(1)
    assert not pending(last)
    assert limiter.queued == 0


def test_cancelling_only_waiter_cancels_the_timer() -> None:
    """When the queue empties by cancellation the host's timer is cancelled too."""
    clock, limiter = make(rate=1, burst=1)
    permit(limiter.acquire(A))
    d = limiter.acquire(A)
    assert len(clock.getDelayedCalls()) == 1
    d.cancel()
    outcome(d)
    assert clock.getDelayedCalls() == []


def test_callbacks_that_release_at_once_keep_fifo_order() -> None:
    """A waiter's callback re-entering the limiter (release) does not reorder later waiters."""
    clock, limiter = make(rate=0, burst=1, max_inflight_per_host=1)
    held = permit(limiter.acquire(A))
    order: list[str] = []
    for name in "xyz":
        limiter.acquire(A).addCallback(lambda p, n=name: (order.append(n), p.release()))
    held.release()
    assert order == ["x", "y", "z"]
    assert limiter.inflight == 0
    assert clock.getDelayedCalls() == []


def test_waiter_cancelled_by_an_earlier_waiters_callback_returns_its_permit() -> None:
    """A waiter cancelled after admission was decided, before it fired, gives its slot back."""
    clock, limiter = make(rate=1, burst=1)
    permit(limiter.acquire(A)).release()
    first, second = limiter.acquire(A), limiter.acquire(A)
    first.addCallback(lambda p: (second.cancel(), p)[1])
    clock.advance(2)  # one late wake-up admits both in one go
    permit(first)
    result = outcome(second)
    assert isinstance(result, Failure) and result.check(CancelledError)
    assert limiter.inflight == 1


# -- in-flight caps -------------------------------------------------------------------------


def test_per_host_inflight_cap_queues_until_release() -> None:
    """Beyond max_inflight_per_host a request waits; release admits it; release is idempotent."""
    clock, limiter = make(rate=0, burst=1, max_inflight_per_host=2)
    one, two = permit(limiter.acquire(A)), permit(limiter.acquire(A))
    third = limiter.acquire(A)
    assert pending(third)
    permit(limiter.acquire(B)).release()  # another host is not affected
    one.release()
    one.release()
    assert permit(third).key == A
    assert limiter.inflight == 2
    fourth = limiter.acquire(A)
    assert pending(fourth)
    two.release()
    permit(fourth)
    assert limiter.inflight == 2


def test_global_inflight_cap_refuses_with_overload() -> None:
    """Permits plus waiters over all hosts are capped; beyond it requests fail with 503."""
    clock, limiter = make(rate=1, burst=1, max_inflight=3)
    a = permit(limiter.acquire(A))
    permit(limiter.acquire(B))
    queued = limiter.acquire(A)  # a waiter counts towards the cap as well
    error = refusal(limiter.acquire(C))
    assert (error.kind, error.retry_after, error.status) == ("overload", 1, 503)
    a.release()
    assert pending(queued)
    d = permit(limiter.acquire(D))
    refusal(limiter.acquire(C))
    clock.advance(1)
    permit(queued).release()
    d.release()
    permit(limiter.acquire(C))
    assert limiter.refused == 2


# -- backoff --------------------------------------------------------------------------------


def test_backoff_with_delta_seconds_pauses_then_resumes_with_one_token() -> None:
    """Retry-After seconds pause the host; afterwards one request goes, then the steady rate."""
    clock, limiter = make(rate=1, burst=5, queue_timeout=5)
    p = permit(limiter.acquire(A))
    assert limiter.backoff(A, b"30") == 30.0
    p.release()
    assert refusal(limiter.acquire(A)).retry_after == 30
    assert limiter.throttled_hosts() == [A]
    clock.advance(26)
    first, second = limiter.acquire(A), limiter.acquire(A)
    clock.advance(3.999)
    assert pending(first)
    clock.advance(0.001)
    permit(first).release()
    assert pending(second)
    clock.advance(1)
    permit(second).release()
    assert clock.getDelayedCalls() == []
    assert limiter.throttled_hosts() == []


def test_backoff_with_http_date_uses_wall_clock_delay() -> None:
    """An HTTP-date Retry-After becomes a delay against now_wall, applied on the reactor clock."""
    wall = 1445412480.0 - 42  # 42 s before Wed, 21 Oct 2015 07:28:00 GMT
    clock, limiter = make(rate=1, burst=1, now_wall=lambda: wall)
    clock.advance(1000)
    assert limiter.backoff(A, "Wed, 21 Oct 2015 07:28:00 GMT") == 42.0
    assert limiter.bucket_info(A)["paused_until"] == 1042.0  # type: ignore[index]
    assert refusal(limiter.acquire(A)).retry_after == 42


def test_backoff_refuses_waiters_that_cannot_make_their_deadline() -> None:
    """A pause fails waiters at once when it outlasts their deadline, and delays the others."""
    clock, limiter = make(rate=1, burst=1, queue_timeout=5)
    p = permit(limiter.acquire(A))
    d = limiter.acquire(A)
    limiter.backoff(A, "10")
    assert refusal(d).retry_after == 10
    p.release()
    assert clock.getDelayedCalls() == []
    clock2, limiter2 = make(rate=1, burst=1, queue_timeout=5)
    permit(limiter2.acquire(A)).release()
    d2 = limiter2.acquire(A)
    limiter2.backoff(A, "3")
    clock2.advance(2.999)
    assert pending(d2)
    clock2.advance(0.001)
    permit(d2)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 1.0),
        (b"soon", 1.0),
        ("-5", 1.0),
        ("99999", 600.0),
        ("0", 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ],
)
def test_backoff_defaults_clamps_and_past_dates(header: str | None, expected: float) -> None:
    """No or malformed Retry-After pauses 1 s; pauses clamp at max_backoff; past dates pause 0."""
    clock, limiter = make(rate=1, burst=1, now_wall=lambda: 1_700_000_000.0)
    assert limiter.backoff(A, header) == expected


def test_backoff_keeps_the_longer_pause() -> None:
    """A shorter Retry-After does not cut a pause already in force."""
    clock, limiter = make(rate=1, burst=1, max_backoff=60)
    limiter.backoff(A, "30")
    clock.advance(10)
    assert limiter.backoff(A, "5") == 20.0
    assert limiter.backoff(A, "1000") == 60.0


def test_backoff_applies_to_unlimited_hosts() -> None:
    """Origin backoff is honoured even for a host whose rate limit is disabled."""
    clock, limiter = make(rate=0, burst=1)
    limiter.backoff(A, "2")
    d = limiter.acquire(A)
    clock.advance(1.999)
    assert pending(d)
    clock.advance(0.001)
    permit(d).release()
    assert limiter.tracked_hosts == 0


def test_parse_retry_after_forms() -> None:
    """Delta-seconds and the three HTTP-date forms parse; garbage gives None."""
    wall = 784111777.0 - 10
    assert parse_retry_after("120", wall) == 120.0
    assert parse_retry_after(b" 1.5 ", wall) == 1.5
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", wall) == 10.0
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", wall) == 10.0
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", wall) == 10.0
    for bad in [None, "", "1e3", "Sun, 06 Foo 1994 08:49:37 GMT", "día", "9" * 100]:
        assert parse_retry_after(bad, wall) is None


# -- bounded memory -------------------------------------------------------------------------


def test_full_idle_bucket_is_dropped() -> None:
    """A host whose bucket refilled and has nothing pending is forgotten."""
    clock, limiter = make(rate=10, burst=2)
    permit(limiter.acquire(A)).release()
    assert limiter.tracked_hosts == 1
    clock.advance(0.1)
    permit(limiter.acquire(B)).release()
    assert limiter.bucket_info(A) is None
    assert limiter.tracked_hosts == 1
    clock.advance(0.1)
    assert limiter.prune() == 1
    assert limiter.tracked_hosts == 0


def test_unlimited_host_is_dropped_on_release() -> None:
    """An unlimited host carries no state once its last permit is released."""
    clock, limiter = make(rate=0, burst=1)
    p = permit(limiter.acquire(A))
    assert limiter.tracked_hosts == 1
    p.release()
    assert limiter.tracked_hosts == 0


def test_host_cap_evicts_least_recently_used_idle_host() -> None:
    """At max_hosts the least recently used idle host makes room for a new one."""
    clock, limiter = make(rate=1, burst=5, max_hosts=2)
    permit(limiter.acquire(A)).release()
    permit(limiter.acquire(B)).release()
    permit(limiter.acquire(A)).release()  # A is now more recent than B
    permit(limiter.acquire(C)).release()
    assert limiter.bucket_info(B) is None
    assert limiter.bucket_info(A) is not None
    assert limiter.tracked_hosts == 2


def test_host_cap_with_all_hosts_busy_refuses() -> None:
    """When every tracked host is busy (in flight or paused) a new host gets 503 overload."""
    clock, limiter = make(rate=1, burst=5, max_hosts=2)
    a = permit(limiter.acquire(A))
    limiter.backoff(B, "3")
    error = refusal(limiter.acquire(C))
    assert (error.kind, error.retry_after) == ("overload", 1)
    a.release()
    permit(limiter.acquire(C))
    assert limiter.bucket_info(A) is None
    assert limiter.bucket_info(B) is not None


def test_memory_per_tracked_host_is_small() -> None:
    """A tracked idle host costs well under 512 bytes (bucket, key and table entry)."""
    clock, limiter = make(rate=1, burst=5, max_hosts=100_000)
    keys = [host_key(f"host{i}.example.com", 443) for i in range(4000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for key in keys:
            permit(limiter.acquire(key)).release()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert limiter.tracked_hosts == len(keys)
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown / len(keys) < 512


# -- overrides and runtime changes -----------------------------------------------------------


def test_per_host_overrides_apply() -> None:
    """Hosts get their override's limits; other hosts get the defaults."""
    overrides = [
        HostOverride("*.example.com", Limits(1, 1)),
        HostOverride("fast.example.com", Limits(0, 1)),
    ]
    clock, limiter = make(rate=1, burst=3, overrides=overrides, max_inflight_per_host=100)
    for _ in range(20):
        permit(limiter.acquire("fast.example.com:443")).release()
    permit(limiter.acquire("img.example.com:443")).release()
    assert pending(limiter.acquire("img.example.com:443"))
    for _ in range(3):
        permit(limiter.acquire(B)).release()
    assert pending(limiter.acquire(B))
    assert limiter.bucket_info("img.example.com:443")["burst"] == 1  # type: ignore[index]


def test_set_limits_changes_tracked_and_future_hosts() -> None:
    """set_limits changes the buckets of matching hosts at once; '*' changes the default."""
    clock, limiter = make(rate=1, burst=10)
    permit(limiter.acquire(A)).release()
    limiter.set_limits("*.example.com", Limits(1, 2))
    info = limiter.bucket_info(A)
    assert info is not None and (info["burst"], info["tokens"]) == (2, 2.0)
    limiter.set_limits("*", Limits(5, 1))
    permit(limiter.acquire(B)).release()
    assert pending(limiter.acquire(B))
    clock.advance(0.2)
    assert limiter.queued == 0


def test_set_limits_to_unlimited_admits_waiters() -> None:
    """Lifting a host's rate limit at run time admits its waiters at once."""
    clock, limiter = make(rate=1, burst=1)
    permit(limiter.acquire(A)).release()
    d = limiter.acquire(A)
    limiter.set_limits(A, Limits(0, 1))
    permit(d).release()
    assert clock.getDelayedCalls() == []


# -- observability --------------------------------------------------------------------------


def test_counters_and_gauges() -> None:
    """admitted, delayed, refused, cancelled, inflight and tracked_hosts count what happened."""
    clock, limiter = make(rate=1, burst=1, queue_timeout=1)
    p = permit(limiter.acquire(A))
    waiting = limiter.acquire(A)
    refusal(limiter.acquire(A))
    cancelled = limiter.acquire(B)
    permit(cancelled).release()
    assert (limiter.admitted, limiter.delayed, limiter.refused) == (2, 1, 1)
    assert (limiter.inflight, limiter.queued, limiter.tracked_hosts) == (1, 1, 2)
    clock.advance(1)
    permit(waiting).release()
    p.release()
    assert (limiter.admitted, limiter.inflight, limiter.queued) == (3, 0, 0)


def test_one_log_line_when_throttled_and_one_when_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Throttling is logged once when it starts and once when the host recovers."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(ratelimit, "log", Logger(observer=events.append))
    clock, limiter = make(rate=1, burst=1, queue_timeout=2)
    for _ in range(10):
        d = limiter.acquire(A)
        d.addCallback(lambda p: p.release())
        d.addErrback(lambda f: None)
    clock.advance(2)
    assert [e["log_format"] for e in events] == ["Throttling origin {host}: {reason}"]
    clock.advance(5)
    permit(limiter.acquire(B)).release()  # the sweep notices that A has recovered
    assert [e.get("host") for e in events] == [A, A]
    assert events[1]["log_format"] == "Origin {host} no longer throttled"
    assert limiter.bucket_info(A) is None


def test_bucket_info_and_throttled_hosts() -> None:
    """bucket_info reports a host's state; throttled_hosts lists hosts with waiters or a pause."""
    clock, limiter = make(rate=2, burst=4)
    assert limiter.bucket_info(A) is None
    p = permit(limiter.acquire(A))
    limiter.backoff(B, "7")
    info = limiter.bucket_info(A)
    assert info == {
        "key": A,
        "rate": 2.0,
        "burst": 4,
        "tokens": 3.0,
        "queued": 0,
        "inflight": 1,
        "paused_until": None,
        "paused_for": 0.0,
        "throttled": False,
    }
    paused = limiter.bucket_info(B)
    assert paused is not None and (paused["paused_for"], paused["tokens"]) == (7.0, 0.0)
    assert limiter.throttled_hosts() == [B]
    p.release()


def test_constructor_rejects_bad_options() -> None:
    """Out-of-range options fail at construction with the option's name."""
    with pytest.raises(ValueError, match="max_inflight_per_host"):
        make(max_inflight_per_host=0)
    with pytest.raises(ValueError, match="queue_timeout"):
        make(queue_timeout=-1)
