"""Tests for imgproxy.cache: RFC 9111 freshness rules and the byte-bounded LRU store."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from imgproxy.cache import (
    DELTA_SECONDS_MAX,
    ENTRY_OVERHEAD,
    Cache,
    Entry,
    Freshness,
    freshness_lifetime,
    is_storable,
    parse_cache_control,
    parse_http_date,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
URL = b"https://images.example.com/cat.png"
HOST = "images.example.com"


def http_date(seconds: float) -> bytes:
    """Format POSIX seconds as an IMF-fixdate."""
    return formatdate(seconds, usegmt=True).encode("ascii")


def make_cache(**options: float) -> tuple[Clock, Cache]:
    """A cache on a task.Clock set to T0."""
    clock = Clock()
    clock.advance(T0)
    return clock, Cache(clock, **options)  # type: ignore[arg-type]


def image_headers(**extra: bytes) -> dict[bytes, bytes]:
    """Typical stored headers of an image fetched at T0, plus ``extra`` (underscores → dashes)."""
    headers = {
        b"content-type": b"image/png",
        b"content-length": b"4",
        b"date": http_date(T0),
        b"etag": b'"v1"',
    }
    for name, value in extra.items():
        headers[name.replace("_", "-").encode("ascii")] = value
    return headers


def store(cache: Cache, url: bytes = URL, body: bytes = b"\x89PNG", **extra: bytes) -> Entry | None:
    """Store an image response received at the clock's current time."""
    now = cache._clock.seconds()
    return cache.store(cache.key(url), url, HOST, 200, image_headers(**extra), body, now, now)


# --- Cache-Control and date parsing -------------------------------------------------------------


def test_parse_cache_control_directives() -> None:
    """Names are lower-cased, quoted arguments unquoted (commas kept), first occurrence wins."""
    parsed = parse_cache_control(
        b'Max-Age=60, no-cache="set-cookie, x-foo", S-MaxAge = "30", max-age=5,, public'
    )
    assert parsed == {
        "max-age": "60",
        "no-cache": "set-cookie, x-foo",
        "s-maxage": "30",
        "public": None,
    }


def test_parse_cache_control_empty() -> None:
    """An absent or empty Cache-Control has no directives."""
    assert parse_cache_control(None) == {}
    assert parse_cache_control(b"") == {}
    assert parse_cache_control(b" , ,") == {}


def test_parse_cache_control_escaped_quote() -> None:
    """A backslash-escaped quote stays inside a quoted argument."""
    assert parse_cache_control(b'ext="a\\"b", max-age=1') == {"ext": 'a"b', "max-age": "1"}


def test_parse_http_date_three_forms() -> None:
    """IMF-fixdate, RFC 850 and asctime forms of the same instant parse equal."""
    expected = 784111777.0
    assert parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == expected
    assert parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == expected
    assert parse_http_date(b"Sun Nov  6 08:49:37 1994") == expected


@pytest.mark.parametrize(
    "value", [None, b"0", b"-1", b"yesterday", b"Sun, 30 Feb 2020 00:00:00 GMT", b"Sun, 06 Nov"]
)
def test_parse_http_date_invalid(value: bytes | None) -> None:
    """Absent, numeric, garbage or impossible dates parse to None."""
    assert parse_http_date(value) is None


# --- freshness lifetime -------------------------------------------------------------------------

DAY = 86400.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 0.0),
        ({b"cache-control": b"max-age=60"}, 60.0),
        ({b"cache-control": b'max-age="60"'}, 60.0),
        ({b"cache-control": b"max-age=60, s-maxage=30"}, 30.0),
        ({b"cache-control": b"s-maxage=120, max-age=60"}, 120.0),
        ({b"cache-control": b"max-age=60", b"expires": http_date(T0 + 600)}, 60.0),
        ({b"cache-control": b"s-maxage=10", b"expires": http_date(T0 + 600)}, 10.0),
        ({b"expires": http_date(T0 + 300)}, 300.0),
        ({b"expires": http_date(T0 - 300)}, 0.0),
        ({b"expires": b"0"}, 0.0),
        ({b"cache-control": b"max-age=abc"}, 0.0),
        ({b"cache-control": b"max-age=-5"}, 0.0),
        ({b"cache-control": b"max-age="}, 0.0),
        ({b"cache-control": b"max-age=99999999999"}, float(DELTA_SECONDS_MAX)),
        ({b"cache-control": b"max-age=60, max-age=10"}, 60.0),
        ({b"cache-control": b"no-cache, max-age=60"}, 0.0),
        ({b"cache-control": b'no-cache="set-cookie", max-age=60'}, 0.0),
        ({b"cache-control": b"no-store, max-age=60"}, None),
        ({b"cache-control": b"private, max-age=60"}, None),
        ({b"cache-control": b'private="x-user", max-age=60'}, None),
        ({b"cache-control": b"public, max-age=60"}, 60.0),
        ({b"cache-control": b"no-store, must-understand, max-age=60"}, 60.0),
        ({b"cache-control": b"private, must-understand, max-age=60"}, None),
        ({b"Cache-Control": b"max-age=42"}, 42.0),
        ({b"pragma": b"no-cache", b"cache-control": b"max-age=60"}, 60.0),
    ],
)
def test_freshness_lifetime_explicit(headers: dict[bytes, bytes], expected: float | None) -> None:
    """Cache-Control and Expires give the lifetime in RFC 9111's order for a shared cache."""
    headers = {b"date": http_date(T0), **headers}
    assert freshness_lifetime(headers, T0) == expected


def test_expires_without_date_counts_from_now() -> None:
    """Without Date, Expires is measured from the time the response was received."""
    assert freshness_lifetime({b"expires": http_date(T0 + 100)}, T0 + 40) == 60.0


def test_expires_uses_date_not_receipt_time() -> None:
    """Expires is measured from the origin's Date, not the (skewed) local receipt time."""
    headers = {b"date": http_date(T0 - 1000), b"expires": http_date(T0 - 900)}
    assert freshness_lifetime(headers, T0) == 100.0


@pytest.mark.parametrize(
    ("since_modified", "heuristic_max", "expected"),
    [
        (5 * DAY, DAY, 0.5 * DAY),
        (100 * DAY, DAY, DAY),
        (5 * DAY, 3600.0, 3600.0),
        (1000.0, DAY, 100.0),
        (5 * DAY, 0.0, 0.0),
        (-60.0, DAY, 0.0),
        (0.0, DAY, 0.0),
    ],
)
def test_heuristic_lifetime(since_modified: float, heuristic_max: float, expected: float) -> None:
    """Last-Modified alone gives 10% of its age at Date, capped by heuristic_max."""
    headers = {b"date": http_date(T0), b"last-modified": http_date(T0 - since_modified)}
    assert freshness_lifetime(headers, T0, heuristic_max) == expected


def test_heuristic_not_used_with_explicit_expiry() -> None:
    """An explicit Expires or max-age wins over the Last-Modified heuristic."""
    base = {b"date": http_date(T0), b"last-modified": http_date(T0 - 100 * DAY)}
    assert freshness_lifetime({**base, b"expires": http_date(T0 + 5)}, T0) == 5.0
    assert freshness_lifetime({**base, b"cache-control": b"max-age=0"}, T0) == 0.0
    assert freshness_lifetime({**base, b"cache-control": b"no-cache"}, T0) == 0.0


def test_freshness_reports_source_and_age_value() -> None:
    """Freshness records which rule applied, the Date used and the Age value."""
    headers = {b"date": http_date(T0 - 5), b"age": b"7", b"cache-control": b"s-maxage=9"}
    assert Freshness.from_headers(headers, T0) == Freshness(9.0, "s-maxage", T0 - 5, 7.0)
    assert Freshness.from_headers({b"age": b"x"}, T0) == Freshness(0.0, "none", T0, 0.0)


# --- storability --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {}, True),
        (200, {b"cache-control": b"max-age=60"}, True),
        (203, {b"cache-control": b"max-age=60"}, False),
        (206, {b"cache-control": b"max-age=60"}, False),
        (301, {b"cache-control": b"max-age=60"}, False),
        (404, {b"cache-control": b"max-age=60"}, False),
        (200, {b"cache-control": b"no-store"}, False),
        (200, {b"cache-control": b"no-store, must-understand"}, True),
        (200, {b"cache-control": b"private"}, False),
        (200, {b"cache-control": b"no-cache"}, True),
        (200, {b"vary": b"Accept-Encoding"}, True),
        (200, {b"vary": b"accept, ACCEPT-ENCODING"}, True),
        (200, {b"vary": b""}, True),
        (200, {b"vary": b"Origin"}, False),
        (200, {b"vary": b"Accept, User-Agent"}, False),
        (200, {b"vary": b"*"}, False),
        (200, {b"vary": b"accept, *"}, False),
    ],
)
def test_is_storable(status: int, headers: dict[bytes, bytes], expected: bool) -> None:
    """Only 200s without no-store/private and with Vary limited to Accept(-Encoding) are stored."""
    assert is_storable(status, headers) is expected


# --- age ----------------------------------------------------------------------------------------


def test_age_header_counts_and_entry_goes_stale() -> None:
    """An upstream Age is added to the age, so max-age runs out that much sooner."""
    clock, cache = make_cache()
    entry = store(cache, cache_control=b"max-age=300", age=b"100")
    assert entry is not None
    assert entry.age(clock.seconds()) == 100.0
    clock.advance(199)
    assert entry.is_fresh(clock.seconds())
    clock.advance(1)
    assert entry.age(clock.seconds()) == 300.0
    assert not entry.is_fresh(clock.seconds())


def test_age_apparent_age_from_date() -> None:
    """A Date in the past makes the response that old on arrival (apparent_age)."""
    _clock, cache = make_cache()
    entry = store(cache, cache_control=b"max-age=300", date=http_date(T0 - 50))
    assert entry is not None
    assert entry.age(T0) == 50.0


def test_age_response_delay_added_to_age_value() -> None:
    """The request/response delay is added to Age (corrected_age_value) and the max is taken."""
    _clock, cache = make_cache()
    headers = image_headers(cache_control=b"max-age=300", age=b"10")
    entry = cache.store(cache.key(URL), URL, HOST, 200, headers, b"x", T0 - 4, T0)
    assert entry is not None
    assert entry.age(T0) == 14.0
    assert entry.age(T0 + 6) == 20.0


def test_age_ignores_date_in_the_future() -> None:
    """A Date ahead of our clock gives no negative apparent age."""
    _clock, cache = make_cache()
    entry = store(cache, cache_control=b"max-age=300", date=http_date(T0 + 3600))
    assert entry is not None
    assert entry.age(T0) == 0.0
    assert entry.age(T0 + 30) == 30.0


def test_age_without_date_is_resident_time() -> None:
    """Without Date or Age, the age is the time since the response arrived."""
    clock, cache = make_cache()
    headers = {b"cache-control": b"max-age=60", b"etag": b'"x"'}
    entry = cache.store(b"k", URL, HOST, 200, headers, b"x", T0, T0)
    assert entry is not None
    clock.advance(25)
    assert entry.age(clock.seconds()) == 25.0


# --- validators and client conditionals -----------------------------------------------------------


def conditional_entry(**extra: bytes) -> Entry:
    """A fresh stored entry with the given headers (ETag "v1" unless replaced or removed)."""
    _clock, cache = make_cache()
    entry = store(cache, cache_control=b"max-age=60", **extra)
    assert entry is not None
    return entry


@pytest.mark.parametrize(
    ("if_none_match", "expected"),
    [
        (b'"v1"', True),
        (b'W/"v1"', True),
        (b'"v0", W/"v1"', True),
        (b'"v0" ,  "v1"  ', True),
        (b"*", True),
        (b' "v0"', False),
        (b'"v10"', False),
        (b"v1", True),
        (b"garbage, , ,", False),
    ],
)
def test_if_none_match_weak_comparison(if_none_match: bytes, expected: bool) -> None:
    """If-None-Match matches on any listed tag under weak comparison, or on *."""
    assert conditional_entry().matches_conditional(if_none_match, None) is expected


def test_if_none_match_against_weak_stored_etag() -> None:
    """A weak stored ETag matches the same opaque tag, strong or weak."""
    entry = conditional_entry(etag=b'W/"v1"')
    assert entry.matches_conditional(b'"v1"', None)
    assert entry.matches_conditional(b'W/"v1"', None)
    assert not entry.matches_conditional(b'W/"v2"', None)


def test_if_none_match_etag_with_comma() -> None:
    """A comma inside a quoted entity-tag does not split it."""
    entry = conditional_entry(etag=b'"a,b"')
    assert entry.matches_conditional(b'"x", "a,b"', None)
    assert not entry.matches_conditional(b'"a"', None)


def test_if_none_match_without_stored_etag() -> None:
    """Without a stored ETag only * matches."""
    _clock, cache = make_cache()
    headers = {b"cache-control": b"max-age=60", b"last-modified": http_date(T0 - 10)}
    entry = cache.store(b"k", URL, HOST, 200, headers, b"x", T0, T0)
    assert entry is not None
    assert not entry.matches_conditional(b'"v1"', None)
    assert entry.matches_conditional(b"*", None)


def test_if_none_match_takes_precedence_over_if_modified_since() -> None:
    """With If-None-Match present, a matching If-Modified-Since is ignored."""
    entry = conditional_entry(last_modified=http_date(T0 - 100))
    assert entry.matches_conditional(None, http_date(T0))
    assert not entry.matches_conditional(b'"other"', http_date(T0))
    assert entry.matches_conditional(b'"v1"', http_date(T0 - 1000))


def test_empty_if_none_match_counts_as_absent() -> None:
    """An empty If-None-Match value leaves If-Modified-Since in charge."""
    entry = conditional_entry(last_modified=http_date(T0 - 100))
    assert entry.matches_conditional(b"", http_date(T0))


@pytest.mark.parametrize(
    ("since", "expected"),
    [(T0 - 100, True), (T0 - 50, True), (T0 - 101, False), (T0 - 100 * DAY, False)],
)
def test_if_modified_since(since: float, expected: bool) -> None:
    """If-Modified-Since matches when Last-Modified is not after it."""
    entry = conditional_entry(last_modified=http_date(T0 - 100))
    assert entry.matches_conditional(None, http_date(since)) is expected


def test_if_modified_since_invalid_never_matches() -> None:
    """An invalid If-Modified-Since date is ignored, so no 304."""
    entry = conditional_entry(last_modified=http_date(T0 - 100))
    assert not entry.matches_conditional(None, b"not a date")
    assert not entry.matches_conditional(None, None)


def test_if_modified_since_falls_back_to_date_then_receipt_time() -> None:
    """Without Last-Modified the stored Date is used, and without Date the receipt time."""
    entry = conditional_entry(date=http_date(T0 - 30))
    assert entry.matches_conditional(None, http_date(T0 - 30))
    assert not entry.matches_conditional(None, http_date(T0 - 31))
    _clock, cache = make_cache()
    bare = cache.store(b"k", URL, HOST, 200, {b"cache-control": b"max-age=9"}, b"x", T0, T0 + 2)
    assert bare is not None
    assert bare.matches_conditional(None, http_date(T0 + 2))
    assert not bare.matches_conditional(None, http_date(T0 + 1))


def test_validators_for_revalidation() -> None:
    """Revalidation sends the stored ETag and Last-Modified as If-None-Match/If-Modified-Since."""
    entry = conditional_entry(last_modified=http_date(T0 - 100))
    assert entry.validators() == {
        b"if-none-match": b'"v1"',
        b"if-modified-since": http_date(T0 - 100),
    }


def test_negative_entry_has_no_validators_and_never_matches() -> None:
    """A remembered refusal neither revalidates nor answers 304."""
    _clock, cache = make_cache()
    cache.store_negative(b"k", URL, HOST, 404, "not-found", "Not Found")
    entry = cache.get(b"k")
    assert entry is not None
    assert entry.validators() == {}
    assert not entry.matches_conditional(b"*", None)


# --- store and get ------------------------------------------------------------------------------


def test_fresh_hit_then_stale() -> None:
    """A stored response is a hit while fresh and is still returned, as stale, afterwards."""
    clock, cache = make_cache()
    stored = store(cache, cache_control=b"max-age=60")
    assert stored is not None
    assert cache.get(cache.key(URL)) is stored
    assert (cache.hits, cache.stale, cache.misses) == (1, 0, 0)
    clock.advance(60)
    entry = cache.get(cache.key(URL))
    assert entry is stored
    assert not stored.is_fresh(clock.seconds())
    assert (cache.hits, cache.stale, cache.misses) == (1, 1, 0)


def test_miss_counted() -> None:
    """Looking up an unknown key is a miss."""
    _clock, cache = make_cache()
    assert cache.get(b"nothing") is None
    assert cache.misses == 1


def test_stale_entry_without_validators_is_dropped() -> None:
    """A stale entry that cannot be revalidated is dropped on lookup and counted a miss."""
    clock, cache = make_cache()
    headers = {b"cache-control": b"max-age=10", b"content-type": b"image/png"}
    assert cache.store(b"k", URL, HOST, 200, headers, b"x", T0, T0) is not None
    clock.advance(10)
    assert cache.get(b"k") is None
    assert cache.misses == 1
    assert cache.entry_count == 0
    assert cache.bytes_stored == 0


def test_no_cache_response_stored_only_with_validator() -> None:
    """A response stale on arrival is stored only if it has a validator to revalidate with."""
    _clock, cache = make_cache()
    with_etag = {b"cache-control": b"no-cache", b"etag": b'"a"'}
    without = {b"cache-control": b"no-cache"}
    entry = cache.store(b"a", URL, HOST, 200, with_etag, b"x", T0, T0)
    assert entry is not None
    assert not entry.is_fresh(T0)
    assert cache.store(b"b", URL, HOST, 200, without, b"x", T0, T0) is None
    assert cache.store(b"c", URL, HOST, 200, {}, b"x", T0, T0) is None
    assert [e.key for e in cache.entries()] == [b"a"]


@pytest.mark.parametrize(
    ("status", "extra"),
    [
        (404, {}),
        (200, {"cache_control": b"no-store"}),
        (200, {"cache_control": b"private, max-age=60"}),
        (200, {"vary": b"Cookie"}),
        (200, {"vary": b"*"}),
    ],
)
def test_store_refuses_unstorable(status: int, extra: dict[str, bytes]) -> None:
    """Unstorable responses are not stored."""
    _clock, cache = make_cache()
    headers = image_headers(**extra)
    assert cache.store(b"k", URL, HOST, status, headers, b"x", T0, T0) is None
    assert cache.entry_count == 0


def test_new_response_supersedes_stored_one_even_if_unstorable() -> None:
    """Storing a response replaces the old entry, and an unstorable one removes it."""
    _clock, cache = make_cache()
    store(cache, cache_control=b"max-age=60")
    newer = store(cache, body=b"newer", cache_control=b"max-age=60")
    assert newer is not None and newer.body == b"newer"
    assert cache.entry_count == 1
    assert store(cache, cache_control=b"no-store") is None
    assert cache.get(cache.key(URL)) is None
    assert cache.bytes_stored == 0


def test_stored_headers_are_cleaned() -> None:
    """Names are lower-cased and hop-by-hop fields and Set-Cookie are not kept."""
    _clock, cache = make_cache()
    headers = {
        b"Content-Type": b"image/gif",
        b"Cache-Control": b"max-age=5",
        b"Set-Cookie": b"a=b",
        b"Connection": b"close",
        b"Transfer-Encoding": b"chunked",
        b"ETag": b'"e"',
    }
    entry = cache.store(b"k", URL, HOST, 200, headers, b"x", T0, T0)
    assert entry is not None
    assert entry.headers == {
        b"content-type": b"image/gif",
        b"cache-control": b"max-age=5",
        b"etag": b'"e"',
    }


def test_object_cap() -> None:
    """Bodies up to max_object are stored; larger ones are not and evict nothing."""
    _clock, cache = make_cache(max_object=100)
    assert store(cache, url=b"http://a/1", body=b"x" * 100, cache_control=b"max-age=9")
    assert store(cache, url=b"http://a/2", body=b"x" * 101, cache_control=b"max-age=9") is None
    assert [e.url for e in cache.entries()] == [b"http://a/1"]
    assert cache.evictions == 0


def test_entry_larger_than_cache_not_stored() -> None:
    """An entry over max_bytes (headers and overhead included) is refused and evicts nothing."""
    _clock, cache = make_cache(max_bytes=ENTRY_OVERHEAD + 1000, max_object=2000)
    assert store(cache, url=b"http://a/1", body=b"x", cache_control=b"max-age=9")
    assert store(cache, url=b"http://a/2", body=b"x" * 1000, cache_control=b"max-age=9") is None
    assert cache.entry_count == 1
    assert cache.evictions == 0


def test_entry_size_accounts_body_headers_and_overhead() -> None:
    """An entry is charged its body, headers, key, URL, host and the fixed overhead."""
    _clock, cache = make_cache()
    headers = {b"cache-control": b"max-age=5", b"etag": b'"e"'}
    entry = cache.store(b"key", b"url", "host", 200, headers, b"body!", T0, T0)
    assert entry is not None
    expected = ENTRY_OVERHEAD + 3 + 3 + 4 + 5 + len(b"cache-controlmax-age=5etag") + 3
    assert entry.size == expected
    assert cache.bytes_stored == expected


def test_lru_eviction_order() -> None:
    """When full, the least recently used entry goes first; a lookup refreshes recency."""
    _clock, probe = make_cache()
    one = store(probe, url=b"http://h/a", body=b"x" * 100, cache_control=b"max-age=60")
    assert one is not None
    _clock, cache = make_cache(max_bytes=3 * one.size)
    for name in (b"a", b"b", b"c"):
        store(cache, url=b"http://h/" + name, body=b"x" * 100, cache_control=b"max-age=60")
    assert cache.evictions == 0
    cache.get(cache.key(b"http://h/a"))
    store(cache, url=b"http://h/d", body=b"x" * 100, cache_control=b"max-age=60")
    assert [e.url for e in cache.entries()] == [b"http://h/c", b"http://h/a", b"http://h/d"]
    assert cache.evictions == 1
    assert cache.bytes_stored == 3 * one.size


def test_peek_changes_neither_order_nor_counters() -> None:
    """peek (for the manhole) leaves LRU order and counters alone."""
    _clock, cache = make_cache()
    store(cache, url=b"http://h/a", cache_control=b"max-age=60")
    store(cache, url=b"http://h/b", cache_control=b"max-age=60")
    assert cache.peek(cache.key(b"http://h/a")) is not None
    assert [e.url for e in cache.entries()] == [b"http://h/a", b"http://h/b"]
    assert (cache.hits, cache.misses, cache.stale) == (0, 0, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["store", "negative", "get", "refresh", "advance", "purge"]),
            st.integers(min_value=0, max_value=40),
            st.integers(min_value=0, max_value=3000),
        ),
        max_size=120,
    )
)
def test_byte_bound_holds_under_any_sequence(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the operations, bytes stored stay within max_bytes and match the entries."""
    clock, cache = make_cache(max_bytes=8000, max_object=2500, negative_ttl=5)
    for op, number, size in ops:
        url = b"http://h%d.example/%d" % (number % 3, number)
        key = cache.key(url)
        if op == "store":
            store(cache, url=url, body=b"x" * size, cache_control=b"max-age=%d" % (size % 20))
        elif op == "negative":
            cache.store_negative(key, url, HOST, 404, "not-found", "n" * (size % 50))
        elif op == "get":
            cache.get(key)
        elif op == "refresh":
            now = clock.seconds()
            cache.refresh(key, {b"x-pad": b"p" * size, b"cache-control": b"max-age=9"}, now, now)
        elif op == "advance":
            clock.advance(size % 15)
        else:
            cache.purge_host(f"h{number % 3}.example")
        assert cache.bytes_stored <= cache.max_bytes
        assert cache.bytes_stored == sum(e.size for e in cache.entries())
        assert cache.entry_count == len(cache.entries())


def test_stream_of_distinct_keys_stays_bounded() -> None:
    """A long stream of distinct images keeps memory within max_bytes, evicting the oldest."""
    _clock, cache = make_cache(max_bytes=50_000, max_object=4000)
    for number in range(2000):
        url = b"http://h.example/%d" % number
        assert store(cache, url=url, body=b"x" * (number % 4000), cache_control=b"max-age=60")
        assert cache.bytes_stored <= 50_000
    assert cache.evictions == 2000 - cache.entry_count
    assert cache.entries()[-1].url == b"http://h.example/1999"


# --- revalidation -------------------------------------------------------------------------------


def test_refresh_on_304_updates_headers_and_freshness() -> None:
    """A 304 replaces stored fields (not the body's type or length) and makes the entry fresh."""
    clock, cache = make_cache()
    entry = store(cache, cache_control=b"max-age=60", age=b"30", expires=http_date(T0 + 60))
    assert entry is not None
    clock.advance(100)
    now = clock.seconds()
    stale = cache.get(cache.key(URL))
    assert stale is entry and not stale.is_fresh(now)
    headers_304 = {
        b"Date": http_date(now),
        b"Cache-Control": b"max-age=600",
        b"ETag": b'"v1"',
        b"Content-Type": b"text/html",
        b"Content-Length": b"0",
        b"X-Unrelated": b"1",
    }
    refreshed = cache.refresh(cache.key(URL), headers_304, now - 1, now)
    assert refreshed is entry
    assert refreshed.is_fresh(now)
    assert refreshed.age(now) == 1.0  # the old Age: 30 is gone; only the 1 s round trip counts
    assert refreshed.lifetime == 600.0
    assert refreshed.headers == {
        b"content-type": b"image/png",
        b"content-length": b"4",
        b"date": http_date(now),
        b"etag": b'"v1"',
        b"cache-control": b"max-age=600",
        b"expires": http_date(T0 + 60),
    }
    assert refreshed.stored_at == T0
    assert cache.revalidated == 1
    assert cache.bytes_stored == refreshed.size


def test_refresh_without_date_uses_receipt_time() -> None:
    """A 304 without Date does not inherit the old Date (which would leave it stale)."""
    clock, cache = make_cache()
    store(cache, cache_control=b"max-age=60")
    clock.advance(3600)
    now = clock.seconds()
    refreshed = cache.refresh(cache.key(URL), {}, now, now)
    assert refreshed is not None
    assert b"date" not in refreshed.headers
    assert refreshed.age(now) == 0.0
    assert refreshed.is_fresh(now + 59)
    assert not refreshed.is_fresh(now + 60)


def test_refresh_takes_the_304_age() -> None:
    """The Age of the 304 (not the stored one) starts the refreshed entry's age."""
    clock, cache = make_cache()
    store(cache, cache_control=b"max-age=60", age=b"50")
    clock.advance(20)
    now = clock.seconds()
    refreshed = cache.refresh(cache.key(URL), {b"date": http_date(now), b"age": b"5"}, now, now)
    assert refreshed is not None
    assert refreshed.age(now) == 5.0


@pytest.mark.parametrize(
    ("stored_etag", "etag_304", "selected"),
    [
        (b'"v1"', b'"v1"', True),
        (b'"v1"', b'W/"v1"', True),
        (b'W/"v1"', b'W/"v1"', True),
        (b'W/"v1"', b'"v1"', False),
        (b'"v1"', b'"v2"', False),
    ],
)
def test_refresh_selects_by_etag(stored_etag: bytes, etag_304: bytes, selected: bool) -> None:
    """A strong ETag in the 304 must match strongly, a weak one weakly; else the entry goes."""
    clock, cache = make_cache()
    store(cache, cache_control=b"max-age=1", etag=stored_etag)
    clock.advance(5)
    now = clock.seconds()
    result = cache.refresh(cache.key(URL), {b"etag": etag_304}, now, now)
    assert (result is not None) is selected
    assert (cache.peek(cache.key(URL)) is not None) is selected
    assert cache.revalidated == int(selected)


def test_refresh_selects_by_last_modified() -> None:
    """Without an ETag in the 304, its Last-Modified must equal the stored one."""
    clock, cache = make_cache()
    store(cache, cache_control=b"max-age=1", last_modified=http_date(T0 - 100))
    clock.advance(5)
    now = clock.seconds()
    key = cache.key(URL)
    assert cache.refresh(key, {b"last-modified": http_date(T0 - 100)}, now, now) is not None
    assert cache.refresh(key, {b"last-modified": http_date(T0 - 99)}, now, now) is None
    assert cache.peek(key) is None


@pytest.mark.parametrize(
    "headers_304",
    [{b"cache-control": b"no-store"}, {b"cache-control": b"private"}, {b"vary": b"*"}],
)
def test_refresh_that_forbids_storage_drops_entry(headers_304: dict[bytes, bytes]) -> None:
    """A 304 whose fields make the response unstorable removes the entry."""
    clock, cache = make_cache()
    store(cache, cache_control=b"max-age=1")
    clock.advance(5)
    assert cache.refresh(cache.key(URL), headers_304, T0 + 5, T0 + 5) is None
    assert cache.entry_count == 0
    assert cache.bytes_stored == 0


def test_refresh_missing_or_negative_entry() -> None:
    """Nothing to refresh for an unknown key or a remembered refusal."""
    _clock, cache = make_cache()
    assert cache.refresh(b"nothing", {}, T0, T0) is None
    cache.store_negative(b"k", URL, HOST, 404, "not-found", "Not Found")
    assert cache.refresh(b"k", {b"cache-control": b"max-age=60"}, T0, T0) is None
    assert cache.revalidated == 0


# --- negative caching ---------------------------------------------------------------------------


def test_negative_entry_expires_after_ttl() -> None:
    """A refusal is served for negative_ttl seconds, then dropped."""
    clock, cache = make_cache(negative_ttl=30)
    cache.store_negative(b"k", URL, HOST, 502, "not-image", "Not an image")
    clock.advance(29)
    entry = cache.get(b"k")
    assert entry is not None and entry.negative is not None
    assert (entry.status, entry.negative.kind, entry.negative.reason) == (
        502,
        "not-image",
        "Not an image",
    )
    assert entry.body == b"" and entry.headers == {}
    assert cache.negative_hits == 1
    clock.advance(1)
    assert cache.get(b"k") is None
    assert cache.misses == 1
    assert cache.entry_count == 0 and cache.bytes_stored == 0


def test_negative_ttl_zero_disables_negative_caching() -> None:
    """negative_ttl=0 stores no refusals."""
    _clock, cache = make_cache(negative_ttl=0)
    cache.store_negative(b"k", URL, HOST, 404, "not-found", "Not Found")
    assert cache.entry_count == 0


def test_negative_replaces_positive_and_back() -> None:
    """A refusal replaces a stored image under the same key, and a new image replaces it."""
    _clock, cache = make_cache()
    store(cache, cache_control=b"max-age=60")
    key = cache.key(URL)
    cache.store_negative(key, URL, HOST, 404, "not-found", "Not Found")
    assert cache.peek(key).negative is not None  # type: ignore[union-attr]
    assert cache.entry_count == 1
    store(cache, cache_control=b"max-age=60")
    assert cache.peek(key).negative is None  # type: ignore[union-attr]
    assert cache.bytes_stored == cache.peek(key).size  # type: ignore[union-attr]


# --- keys and purges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"HTTPS://Images.Example.COM/Cat.PNG", b"https://images.example.com/Cat.PNG"),
        (b"http://example.com:80/a", b"http://example.com/a"),
        (b"https://example.com:443/a", b"https://example.com/a"),
        (b"https://example.com:80/a", b"https://example.com:80/a"),
        (b"http://example.com:0080/a", b"http://example.com/a"),
        (b"http://example.com:8080/a?b=C#frag", b"http://example.com:8080/a?b=C"),
        (b"http://example.com", b"http://example.com/"),
        (b"http://example.com:", b"http://example.com/"),
        (b"http://example.com?q=1", b"http://example.com/?q=1"),
        (b"http://[::1]:80/x", b"http://[::1]/x"),
        (b"http://[2001:DB8::1]:8080/x", b"http://[2001:db8::1]:8080/x"),
        (b"http://example.com/a%2Fb/../c", b"http://example.com/a%2Fb/../c"),
        (b"not a url", b"not a url"),
    ],
)
def test_key_normalisation(url: bytes, expected: bytes) -> None:
    """Keys lower-case scheme and host, drop default ports and fragments, keep path and query."""
    _clock, cache = make_cache()
    assert cache.key(url) == expected


def test_key_ignores_accept() -> None:
    """The client's Accept does not split the cache: one variant per URL."""
    _clock, cache = make_cache()
    assert cache.key(URL, b"image/webp,*/*") == cache.key(URL) == cache.key(URL, None)


def test_purge_url() -> None:
    """Purging a URL, in any equivalent spelling, removes just its entry."""
    _clock, cache = make_cache()
    store(cache, url=b"https://images.example.com/a.png", cache_control=b"max-age=60")
    store(cache, url=b"https://images.example.com/b.png", cache_control=b"max-age=60")
    removed = cache.purge_url(b"HTTPS://IMAGES.example.com:443/a.png#x")
    assert removed == 1
    assert [e.url for e in cache.entries()] == [b"https://images.example.com/b.png"]
    assert cache.purge_url(b"https://images.example.com/a.png") == 0
    assert cache.bytes_stored == cache.entries()[0].size


def test_purge_host() -> None:
    """Purging a host removes all its entries, negative ones too, and no other host's."""
    _clock, cache = make_cache()
    for path in (b"/1", b"/2"):
        url = b"https://images.example.com" + path
        cache.store(cache.key(url), url, "Images.Example.com", 200, image_headers(), b"x", T0, T0)
    cache.store_negative(b"n", b"https://images.example.com/3", HOST, 404, "not-found", "x")
    other = b"https://cdn.images.example.com/1"
    cache.store(b"o", other, "cdn.images.example.com", 200, image_headers(), b"x", T0, T0)
    assert cache.purge_host("IMAGES.EXAMPLE.COM") == 3
    assert [e.host for e in cache.entries()] == ["cdn.images.example.com"]
    assert cache.purge_host("images.example.com") == 0
    assert cache.bytes_stored == cache.entries()[0].size


def test_purge_host_ipv6_brackets() -> None:
    """An IPv6 host purges with or without brackets."""
    _clock, cache = make_cache()
    cache.store(b"k", b"http://[::1]/x", "::1", 200, image_headers(), b"x", T0, T0)
    assert cache.purge_host("[::1]") == 1


def test_clear() -> None:
    """clear drops everything and returns the count."""
    _clock, cache = make_cache()
    store(cache, url=b"http://a/1")
    cache.store_negative(b"n", URL, HOST, 404, "not-found", "x")
    assert cache.clear() == 2
    assert cache.entry_count == 0 and cache.bytes_stored == 0


# --- configuration, repr ------------------------------------------------------------------------


def test_zero_size_disables_cache() -> None:
    """max_bytes=0 disables the cache: nothing stored, nothing found, nothing counted."""
    _clock, cache = make_cache(max_bytes=0)
    assert not cache.enabled
    assert store(cache, cache_control=b"max-age=60") is None
    cache.store_negative(b"k", URL, HOST, 404, "not-found", "x")
    assert cache.get(cache.key(URL)) is None
    assert cache.get(b"k") is None
    assert cache.entry_count == 0
    assert (cache.hits, cache.misses, cache.negative_hits) == (0, 0, 0)


def test_default_enabled() -> None:
    """The default cache is enabled with the documented bounds."""
    _clock, cache = make_cache()
    assert cache.enabled
    assert (cache.max_bytes, cache.max_object, cache.negative_ttl) == (64 * 2**20, 2**20, 30.0)
    assert cache.heuristic_max == 86400.0


@pytest.mark.parametrize("option", ["max_bytes", "max_object", "negative_ttl", "heuristic_max"])
def test_negative_options_rejected(option: str) -> None:
    """Negative sizes and durations are configuration errors."""
    with pytest.raises(ValueError, match=option):
        Cache(Clock(), **{option: -1})  # type: ignore[arg-type]


def test_entry_repr_is_short_and_bodyless() -> None:
    """An entry's repr names status, URL and size but never dumps the body."""
    _clock, cache = make_cache()
    entry = store(cache, url=b"https://h/" + b"p" * 200, body=b"SECRETBODY" * 100)
    assert entry is not None
    text = repr(entry)
    assert "SECRETBODY" not in text
    assert text.startswith("<Entry 200 b'https://h/ppp")
    assert "body=1000B" in text
    assert len(text) < 250
