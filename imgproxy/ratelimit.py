"""Per-origin-host rate limiting: a token bucket, a wait queue and backoff for every origin host.

Why: the proxy must stay polite to each image host (a page full of images from one host must not
turn into a burst of hundreds of requests) and fair under load (one slow or throttling host must
not take the whole upstream pool).

How, per origin host (key ``host:port``, see :func:`host_key`):

- a token bucket of ``burst`` tokens refilled at ``rate`` tokens a second, computed lazily from
  the injected clock whenever the host is touched (no timer per bucket);
- a FIFO queue of waiting requests with a deadline (``queue_timeout``) and a length cap
  (``max_queue``), driven by at most one timer per host (for the head of the queue);
- a cap on the requests in flight to the host (``max_inflight_per_host``);
- a pause when the origin answered 429/503 (:meth:`HostLimiter.backoff`).

A request that cannot be served in time fails at once with
:class:`~imgproxy.errors.Unavailable` carrying an integer ``retry_after`` (seconds, >= 1).
Buckets that carry no information (full, idle, not paused) are dropped, and the number of
tracked hosts is capped with least-recently-used eviction of idle hosts.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import idna
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import stringToDatetime

from imgproxy.errors import Unavailable

__all__ = [
    "HostLimiter",
    "HostOverride",
    "Limits",
    "Permit",
    "host_key",
    "parse_retry_after",
]

log = Logger()

#: Token and time tolerance: absorbs float rounding (reactor time is ~1.7e9 s, so one ulp is
#: ~2e-7 s) so that a timer firing at the computed instant finds its token.
_EPS = 1e-6

#: ``kind`` of the errors: the host's own limits, or the proxy as a whole.
KIND_RATE = "rate-limited"
KIND_OVERLOAD = "overload"


def _check_rate(instance: Limits, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"rate must be a finite number >= 0 (0 disables the limit), got {value!r}")


def _check_burst(instance: Limits, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"burst must be an integer >= 1, got {value!r}")


@attrs.frozen
class Limits:
    """The token bucket of one host: ``rate`` tokens a second, at most ``burst`` stored.

    ``rate = 0`` disables the rate limit for the host (the in-flight caps and origin backoff
    still apply); a negative, infinite or NaN rate is an error, so there is one way to say it.
    """

    rate: float = attrs.field(converter=float, validator=_check_rate)
    burst: int = attrs.field(validator=_check_burst)

    @property
    def unlimited(self) -> bool:
        """True when the rate limit is disabled (``rate == 0``)."""
        return self.rate == 0


def _normalize_host(host: bytes | str) -> str:
    """Lower-cased IDNA (A-label) form of a host name, or the canonical form of an IP literal.

    IPv6 literals come back bracketed (``[::1]``) so that ``host:port`` stays unambiguous.
    """
    if isinstance(host, bytes):
        try:
            text = host.decode("ascii")
        except UnicodeDecodeError:
            text = host.decode("utf-8")
    else:
        text = host
    name = text.strip()
    bracketed = name.startswith("[") and name.endswith("]")
    if bracketed:
        name = name[1:-1]
    elif name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if not name:
        raise ValueError("empty host")
    if bracketed or ":" in name or name[-1:].isdigit():
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            if bracketed or ":" in name:
                raise ValueError(f"invalid host {host!r}") from None
        else:
            return f"[{address.compressed}]" if address.version == 6 else address.compressed
    if name.isascii():
        # ASCII names are already A-labels; lower-casing is all IDNA would do (and strict IDNA
        # would refuse names such as ``_dmarc`` or ``foo_bar`` that exist in the wild).
        result = name.lower()
    else:
        try:
            result = idna.encode(name, uts46=True).decode("ascii")
        except UnicodeError as e:  # idna.IDNAError is a UnicodeError
            raise ValueError(f"invalid host {host!r}: {e}") from None
    if not result or ".." in result or result.startswith("."):
        raise ValueError(f"invalid host {host!r}")
    return result


@functools.lru_cache(maxsize=4096)
def host_key(host: bytes | str, port: int) -> str:
    """Key of an origin host: lower-cased IDNA host and port, e.g. ``images.example.com:443``.

    ``Bücher.Example`` becomes ``xn--bcher-kva.example``, a trailing dot is dropped, and IPv6
    literals are bracketed (``[::1]:8080``).  Raises :class:`ValueError` for an invalid host
    or port.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"invalid port {port!r}")
    return f"{_normalize_host(host)}:{port}"


def _split_key(key: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (IPv6 bracketed when a port follows) into host and port."""
    head, sep, tail = key.rpartition(":")
    if sep and tail.isdigit() and (":" not in head or head.startswith("[")):
        return head, int(tail)
    return key, None


def normalize_pattern(pattern: str) -> str:
    """Canonical form of an override pattern: ``host``, ``host:port`` or ``*.domain``."""
    if not isinstance(pattern, str):
        raise ValueError(f"host pattern must be a string, got {pattern!r}")
    text = pattern.strip()
    if text.startswith("*."):
        suffix = _normalize_host(text[2:])
        if "*" in suffix or suffix.startswith("["):
            raise ValueError(f"invalid host pattern {pattern!r}")
        return f"*.{suffix}"
    if "*" in text:
        raise ValueError(f"invalid host pattern {pattern!r}: only a leading '*.' is allowed")
    host, port = _split_key(text)
    if port is not None:
        return host_key(host, port)
    return _normalize_host(text)


@attrs.frozen
class HostOverride:
    """Limits for the hosts matching ``pattern`` (from an INI ``[host:PATTERN]`` section).

    ``pattern`` is a host (``images.example.com``, any port), a host and port
    (``images.example.com:8443``), or a wildcard ``*.example.com`` matching ``example.com``
    itself and all its subdomains.  The pattern is normalised like :func:`host_key`.
    Precedence: host and port, then host, then the longest wildcard suffix.
    """

    pattern: str = attrs.field(converter=normalize_pattern)
    limits: Limits

    @classmethod
    def pick(cls, overrides: Iterable[HostOverride], key: str) -> HostOverride | None:
        """Return the override that applies to ``key`` (a :func:`host_key`), or None.

        For several overrides with the same pattern the last one wins.
        """
        return _OverrideTable(overrides).lookup(key)


class _OverrideTable:
    """Override lookup in O(labels): exact keys, exact hosts, then wildcard suffixes."""

    def __init__(self, overrides: Iterable[HostOverride] = ()) -> None:
        self._keys: dict[str, HostOverride] = {}
        self._hosts: dict[str, HostOverride] = {}
        self._suffixes: dict[str, HostOverride] = {}
        for override in overrides:
            self.add(override)

    def add(self, override: HostOverride) -> None:
        """Add or replace the override for its pattern."""
        pattern = override.pattern
        if pattern.startswith("*."):
            self._suffixes[pattern[2:]] = override
        elif _split_key(pattern)[1] is not None:
            self._keys[pattern] = override
        else:
            self._hosts[pattern] = override

    def lookup(self, key: str) -> HostOverride | None:
        """The override for ``key`` (host:port), by precedence."""
        found = self._keys.get(key)
        if found is not None:
            return found
        host, _port = _split_key(key)
        found = self._hosts.get(host)
        if found is not None or not self._suffixes:
            return found
        if host.startswith("[") or host.rpartition(".")[2].isdigit():
            return None  # IP literals have no domain suffixes
        name = host
        while True:
            found = self._suffixes.get(name)
            if found is not None:
                return found
            _label, dot, name = name.partition(".")
            if not dot:
                return None


def parse_retry_after(value: str | bytes | None, now_wall: float) -> float | None:
    """Seconds to wait given a Retry-After header value, or None if absent or malformed.

    Accepts delta-seconds (``120``; a decimal fraction is tolerated) and the three HTTP-date
    forms, converted to a delay against ``now_wall`` (seconds since the epoch).  A date in the
    past gives a zero delay.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = value.encode("latin-1")
        except UnicodeEncodeError:
            return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    if text[:1].isdigit() and text.replace(b".", b"", 1).isdigit():
        return float(text)
    try:
        when = float(stringToDatetime(text))
    except Exception:  # stringToDatetime fails in many ways on malformed input
        return None
    return max(0.0, when - now_wall)


def _ceil_seconds(delay: float) -> int:
    """A Retry-After value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(delay - _EPS))


class Permit:
    """The right to make one upstream request: release it when the request is over.

    Holding a permit occupies one in-flight slot of its host and one global slot.
    """

    __slots__ = ("_limiter", "_host", "_released")

    def __init__(self, limiter: HostLimiter, host: _Host) -> None:
        self._limiter = limiter
        self._host = host
        self._released = False

    @property
    def key(self) -> str:
        """The host key this permit was granted for."""
        return self._host.key

    def release(self) -> None:
        """Free the in-flight slots (host and global) and admit the next waiter if possible.

        Idempotent: only the first call has an effect.
        """
        if not self._released:
            self._released = True
            self._limiter._release(self._host)


class _Waiter:
    """A queued :meth:`HostLimiter.acquire`: its Deferred and its deadline (clock seconds)."""

    __slots__ = ("limiter", "host", "deferred", "deadline", "queued")

    def __init__(self, limiter: HostLimiter, host: _Host, deadline: float) -> None:
        self.limiter = limiter
        self.host = host
        self.deadline = deadline
        self.queued = True
        self.deferred: Deferred[Permit] = Deferred(self.cancel)

    def cancel(self, deferred: Deferred[Permit]) -> None:
        """Canceller of the Deferred: leave the queue without consuming a token."""
        if self.queued:
            self.limiter._cancel(self)


class _Host:
    """State of one tracked origin host.

    The bucket holds ``tokens`` at clock time ``stamp``; ``stamp`` lies in the future while the
    host is paused by a backoff (the bucket restarts with one token when the pause ends).
    """

    __slots__ = (
        "key",
        "limits",
        "tokens",
        "stamp",
        "paused_until",
        "inflight",
        "waiters",
        "timer",
        "throttled",
    )

    def __init__(self, key: str, limits: Limits, now: float) -> None:
        self.key = key
        self.limits = limits
        self.tokens = float(limits.burst)
        self.stamp = now
        self.paused_until = 0.0
        self.inflight = 0
        self.waiters: deque[_Waiter] | None = None  # created on first wait: saves ~600 B/host
        self.timer: IDelayedCall | None = None
        self.throttled = False

    def advance(self, when: float) -> None:
        """Add the tokens earned between ``stamp`` and ``when``, capped at ``burst``."""
        if when > self.stamp:
            rate = self.limits.rate
            if rate:
                self.tokens = min(
                    float(self.limits.burst), self.tokens + (when - self.stamp) * rate
                )
            self.stamp = when

    def refill(self, now: float) -> None:
        """Lazy refill up to ``now``, unless requests wait.

        While requests wait, the bucket advances only as :meth:`HostLimiter._pump` hands each
        token to a waiter at the instant it was earned, so a timer that fires late does not lose
        tokens to the burst cap (and the waits promised at enqueue time hold).
        """
        if not self.waiters:
            self.advance(now)

    def tokens_at(self, now: float) -> float:
        """Tokens available at ``now`` (no state change); 0 while paused."""
        if now < self.stamp:
            return 0.0
        return min(float(self.limits.burst), self.tokens + (now - self.stamp) * self.limits.rate)

    def ready_at(self, count: int, now: float) -> float:
        """Clock time at which the ``count``-th next token is earned and no pause holds.

        Counts from ``stamp`` without the burst cap: the tokens go to waiters as they come.
        """
        ready = max(now, self.paused_until)
        rate = self.limits.rate
        if not rate:
            return ready
        need = count - self.tokens
        start = self.stamp + need / rate if need > _EPS else self.stamp
        return max(ready, start)

    def queued(self) -> int:
        """Number of waiters."""
        return len(self.waiters) if self.waiters else 0

    def busy(self, now: float) -> bool:
        """True if the host has waiters, requests in flight or an active pause."""
        return bool(self.waiters) or self.inflight > 0 or self.paused_until > now

    def carries_no_information(self, now: float) -> bool:
        """True if dropping the host changes nothing: idle, not paused, bucket full."""
        if self.busy(now):
            return False
        return self.limits.unlimited or self.tokens >= self.limits.burst - _EPS


class HostLimiter:
    """Token bucket, wait queue, in-flight caps and backoff for every origin host.

    :param clock: the reactor's time (``IReactorTime``); all waits and pauses use it.
    :param limits: the default limits of a host without an override.
    :param queue_timeout: longest wait for admission, seconds; a request whose expected wait is
        longer fails at once.
    :param max_queue: most waiters per host; beyond that requests fail at once.
    :param max_inflight_per_host: most permits held at once for one host.
    :param max_inflight: most permits held plus requests waiting, over all hosts (overload).
    :param overrides: per-host limits; see :class:`HostOverride`.
    :param max_hosts: most hosts tracked; idle hosts are evicted least-recently-used first.
    :param max_backoff: longest pause applied by :meth:`backoff`, seconds.
    :param default_backoff: pause when the origin gives no usable Retry-After, seconds.
    :param now_wall: wall-clock time (epoch seconds), to turn a Retry-After HTTP date into a
        delay.

    Counters (plain ints for the metrics module): ``admitted`` (permits granted, at once or
    after waiting), ``delayed`` (requests that had to wait), ``refused`` (503s, at once or at
    the deadline), ``cancelled`` (waiters cancelled by their caller).
    """

    def __init__(
        self,
        clock: IReactorTime,
        limits: Limits,
        *,
        queue_timeout: float = 5.0,
        max_queue: int = 100,
        max_inflight_per_host: int = 8,
        max_inflight: int = 1000,
        overrides: Sequence[HostOverride] = (),
        max_hosts: int = 10000,
        max_backoff: float = 600.0,
        default_backoff: float = 1.0,
        now_wall: Callable[[], float] = time.time,
    ) -> None:
        for name, value, low in [
            ("queue_timeout", queue_timeout, 0),
            ("max_queue", max_queue, 0),
            ("max_inflight_per_host", max_inflight_per_host, 1),
            ("max_inflight", max_inflight, 1),
            ("max_hosts", max_hosts, 1),
            ("max_backoff", max_backoff, 0),
            ("default_backoff", default_backoff, 0),
        ]:
            if not (math.isfinite(value) and value >= low):
                raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
        self._clock = clock
        self._default = limits
        self._table = _OverrideTable(overrides)
        self._queue_timeout = float(queue_timeout)
        self._max_queue = int(max_queue)
        self._max_inflight_per_host = int(max_inflight_per_host)
        self._max_inflight = int(max_inflight)
        self._max_hosts = int(max_hosts)
        self._max_backoff = float(max_backoff)
        self._default_backoff = min(float(default_backoff), self._max_backoff)
        self._now_wall = now_wall
        self._hosts: OrderedDict[str, _Host] = OrderedDict()  # least recently used first
        self._inflight = 0
        self._queued = 0
        self._to_fire: deque[tuple[Deferred[Permit], Permit | Failure]] = deque()
        self._firing = False
        self.admitted = 0
        self.delayed = 0
        self.refused = 0
        self.cancelled = 0

    # -- public --------------------------------------------------------------------------

    @property
    def tracked_hosts(self) -> int:
        """Number of hosts with state (bucket not full, waiters, in flight or paused)."""
        return len(self._hosts)

    @property
    def inflight(self) -> int:
        """Permits currently held, over all hosts."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Requests currently waiting, over all hosts."""
        return self._queued

    def acquire(self, key: str) -> Deferred[Permit]:
        """Wait for the right to send one request to host ``key`` (a :func:`host_key`).

        Fires at once with a :class:`Permit` when a token and the in-flight slots are free;
        otherwise the request waits in the host's FIFO queue.  Fails with
        :class:`~imgproxy.errors.Unavailable` at once when the queue is full or the expected
        wait exceeds ``queue_timeout``, or at the deadline if still waiting.  ``cancel()``
        leaves the queue without consuming a token.
        """
        now = self._clock.seconds()
        if self._inflight + self._queued >= self._max_inflight:
            return self._overload()
        self._sweep(now)
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= self._max_hosts and not self._make_room(now):
                return self._overload()
            host = _Host(key, self._limits_for(key), now)
            self._hosts[key] = host
        else:
            self._hosts.move_to_end(key)
            host.refill(now)
        ahead = host.queued()
        if not ahead and host.inflight < self._max_inflight_per_host:
            if host.ready_at(1, now) <= now + _EPS:
                self._check_recovered(host, now)
                self.admitted += 1
                return succeed(self._grant(host, now))
        wait = host.ready_at(ahead + 1, now) - now
        if ahead >= self._max_queue or wait > self._queue_timeout + _EPS:
            full = ahead >= self._max_queue
            self.refused += 1
            self._mark_throttled(host, "queue full" if full else "rate limit")
            reason = "Origin rate limit: " + ("queue full" if full else "wait too long")
            return fail(Unavailable(reason, retry_after=_ceil_seconds(wait), kind=KIND_RATE))
        waiter = _Waiter(self, host, now + self._queue_timeout)
        if host.waiters is None:
            host.waiters = deque()
        host.waiters.append(waiter)
        self._queued += 1
        self.delayed += 1
        self._mark_throttled(
            host, "rate limit" if host.inflight < self._max_inflight_per_host else "in-flight cap"
        )
        if not ahead:
            self._schedule(host, now)
        return waiter.deferred

    def backoff(self, key: str, retry_after: str | bytes | None) -> float:
        """Pause host ``key`` after it answered 429 or 503; return the pause now in force.

        ``retry_after`` is the origin's Retry-After header: delta-seconds, or an HTTP date
        turned into a delay against ``now_wall()`` and applied on the reactor clock.  No header
        or a malformed one gives ``default_backoff``; the pause is clamped to ``max_backoff``.
        A longer pause already in force is kept.  When the pause ends the bucket restarts with
        one token (no burst).  Waiters that cannot be admitted before their deadline fail now.
        Call it before releasing the request's permit.
        """
        now = self._clock.seconds()
        delay = parse_retry_after(retry_after, self._now_wall())
        if delay is None:
            delay = self._default_backoff
        delay = min(max(delay, 0.0), self._max_backoff)
        host = self._hosts.get(key)
        if host is None:
            if delay <= 0 or (len(self._hosts) >= self._max_hosts and not self._make_room(now)):
                return 0.0
            host = _Host(key, self._limits_for(key), now)
            self._hosts[key] = host
        else:
            self._hosts.move_to_end(key)
        until = now + delay
        if until > host.paused_until + _EPS and delay > 0:
            host.refill(now)
            host.paused_until = until
            limits = host.limits
            if not limits.unlimited:
                # Restart with one token at the end of the pause, or fewer if the bucket would
                # not have earned one by then: a backoff never makes us less polite.
                earned = host.tokens + (until - max(now, host.stamp)) * limits.rate
                host.tokens = min(1.0, float(limits.burst), earned)
                host.stamp = until
            self._mark_throttled(host, f"origin asked to back off for {delay:.0f} s")
            self._pump(host)
        paused_for = max(0.0, host.paused_until - now)
        self._maybe_drop(host)
        return paused_for

    def set_limits(self, pattern_or_key: str, limits: Limits) -> None:
        """Change limits at run time (from the manhole).

        ``pattern_or_key`` is an override pattern (``host``, ``host:port``, ``*.domain``; see
        :class:`HostOverride`) that is added or replaced, or ``*`` for the default limits.
        Tracked hosts switch at once, keeping their tokens (capped at the new burst).
        """
        if pattern_or_key.strip() == "*":
            self._default = limits
        else:
            self._table.add(HostOverride(pattern_or_key, limits))
        now = self._clock.seconds()
        for host in list(self._hosts.values()):
            new = self._limits_for(host.key)
            if new == host.limits:
                continue
            host.advance(now)
            if host.limits.unlimited:
                if host.paused_until > now:
                    host.tokens, host.stamp = 1.0, host.paused_until
                else:
                    host.tokens, host.stamp = float(new.burst), now
            host.limits = new
            host.tokens = min(host.tokens, float(new.burst))
            if host.waiters:
                self._pump(host)

    def bucket_info(self, key: str) -> dict[str, Any] | None:
        """State of host ``key`` for the manhole, or None if the host is not tracked."""
        host = self._hosts.get(key)
        if host is None:
            return None
        now = self._clock.seconds()
        paused = host.paused_until > now
        return {
            "key": host.key,
            "rate": host.limits.rate,
            "burst": host.limits.burst,
            "tokens": None if host.limits.unlimited else host.tokens_at(now),
            "queued": host.queued(),
            "inflight": host.inflight,
            "paused_until": host.paused_until if paused else None,
            "paused_for": host.paused_until - now if paused else 0.0,
            "throttled": host.throttled,
        }

    def throttled_hosts(self) -> list[str]:
        """Keys of the hosts with waiters or paused by a backoff."""
        now = self._clock.seconds()
        return [k for k, h in self._hosts.items() if h.waiters or h.paused_until > now]

    def prune(self) -> int:
        """Drop every host that carries no information; return how many were dropped.

        Not needed for correctness (acquire drops a few as it goes, the host cap evicts), but
        gives exact ``tracked_hosts`` numbers, e.g. before a metrics scrape.
        """
        now = self._clock.seconds()
        dropped = 0
        for host in list(self._hosts.values()):
            host.refill(now)
            if host.carries_no_information(now):
                self._drop(host, now)
                dropped += 1
        return dropped

    # -- internals -----------------------------------------------------------------------

    def _limits_for(self, key: str) -> Limits:
        override = self._table.lookup(key)
        return self._default if override is None else override.limits

    def _overload(self) -> Deferred[Permit]:
        self.refused += 1
        return fail(Unavailable("Proxy overloaded", retry_after=1, kind=KIND_OVERLOAD))

    def _grant(self, host: _Host, now: float) -> Permit:
        """Take a token (the bucket is advanced to the admission time) and the in-flight slots."""
        if not host.limits.unlimited:
            host.tokens = max(0.0, host.tokens - 1.0)
        host.inflight += 1
        self._inflight += 1
        return Permit(self, host)

    def _release(self, host: _Host) -> None:
        host.inflight -= 1
        self._inflight -= 1
        if host.waiters:
            self._pump(host)
        self._maybe_drop(host)

    def _cancel(self, waiter: _Waiter) -> None:
        host = waiter.host
        assert host.waiters is not None
        waiter.queued = False
        host.waiters.remove(waiter)
        self._queued -= 1
        self.cancelled += 1
        self._pump(host)
        self._maybe_drop(host)

    def _on_timer(self, host: _Host) -> None:
        host.timer = None
        self._pump(host)
        self._maybe_drop(host)

    def _pump(self, host: _Host) -> None:
        """Admit or expire waiters from the head of the queue, then re-arm the host's timer."""
        now = self._clock.seconds()
        waiters = host.waiters
        while waiters:
            head = waiters[0]
            ready = host.ready_at(1, host.stamp)  # may be in the past: see refill
            if host.inflight < self._max_inflight_per_host and ready <= now + _EPS:
                # Take the token at the instant it was earned (``ready`` is in the past when a
                # timer fires late).  The global cap cannot block here: it counts waiters too.
                host.advance(min(ready, now))
                waiters.popleft()
                head.queued = False
                self._queued -= 1
                self.admitted += 1
                self._to_fire.append((head.deferred, self._grant(host, now)))
            elif head.deadline <= now + _EPS or ready > head.deadline + _EPS:
                waiters.popleft()
                head.queued = False
                self._queued -= 1
                self.refused += 1
                error = Unavailable(
                    "Origin rate limit: wait too long",
                    retry_after=_ceil_seconds(ready - now),
                    kind=KIND_RATE,
                )
                self._to_fire.append((head.deferred, Failure(error)))
            else:
                break
        host.advance(now)
        self._schedule(host, now)
        self._fire()

    def _schedule(self, host: _Host, now: float) -> None:
        """Keep exactly one timer for the head of the queue (none when the queue is empty)."""
        when: float | None = None
        if host.waiters:
            head = host.waiters[0]
            when = head.deadline
            if host.inflight < self._max_inflight_per_host:
                when = min(when, host.ready_at(1, now))
        if not host.waiters:
            host.waiters = None  # an empty deque still costs ~600 bytes
        timer = host.timer
        if timer is not None:
            if when is not None and timer.active() and timer.getTime() == when:
                return
            if timer.active():
                timer.cancel()
            host.timer = None
        if when is not None:
            host.timer = self._clock.callLater(max(0.0, when - now), self._on_timer, host)

    def _fire(self) -> None:
        """Fire decided Deferreds in decision order, also when callbacks re-enter the limiter."""
        if self._firing:
            return
        self._firing = True
        try:
            while self._to_fire:
                deferred, result = self._to_fire.popleft()
                if deferred.called:
                    # Cancelled between the decision and now: give the permit back.
                    if isinstance(result, Permit):
                        result.release()
                elif isinstance(result, Permit):
                    deferred.callback(result)
                else:
                    deferred.errback(result)
        finally:
            self._firing = False

    def _mark_throttled(self, host: _Host, reason: str) -> None:
        if not host.throttled:
            host.throttled = True
            log.info("Throttling origin {host}: {reason}", host=host.key, reason=reason)

    def _check_recovered(self, host: _Host, now: float) -> None:
        if host.throttled and host.carries_no_information(now):
            host.throttled = False
            log.info("Origin {host} no longer throttled", host=host.key)

    def _maybe_drop(self, host: _Host) -> None:
        if self._hosts.get(host.key) is not host:
            return
        now = self._clock.seconds()
        host.refill(now)
        if host.carries_no_information(now):
            self._drop(host, now)

    def _drop(self, host: _Host, now: float) -> None:
        if host.throttled:
            host.throttled = False
            log.info("Origin {host} no longer throttled", host=host.key)
        if host.timer is not None and host.timer.active():
            host.timer.cancel()
        host.timer = None
        del self._hosts[host.key]

    def _sweep(self, now: float, budget: int = 2) -> None:
        """Drop a few least recently used hosts that carry no information (amortised pruning)."""
        hosts = self._hosts
        for _ in range(budget):
            if not hosts:
                return
            key, host = next(iter(hosts.items()))
            host.refill(now)
            if host.carries_no_information(now):
                self._drop(host, now)
            elif host.busy(now):
                hosts.move_to_end(key)  # not evictable now; look at it again later
            else:
                return

    def _make_room(self, now: float) -> bool:
        """Evict the least recently used idle host; False if every tracked host is busy."""
        hosts = self._hosts
        for _ in range(len(hosts)):
            key, host = next(iter(hosts.items()))
            if not host.busy(now):
                log.debug("Host table full: forgetting {host}", host=key)
                self._drop(host, now)
                return True
            hosts.move_to_end(key)
        return False
