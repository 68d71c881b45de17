"""An in-memory shared HTTP cache for upstream images: RFC 9111 freshness and a byte-bounded LRU.

This module holds the rules and the store only; the request path decides when to look up, when
to revalidate and what to send. Everything here is synchronous and reads time from an injected
:class:`~twisted.internet.interfaces.IReactorTime`, so tests drive it with ``task.Clock``.

Conventions:

- Header names are lower-case ``bytes``; a field sent on several lines is expected joined with
  ``b", "`` into one value (as twisted.web's ``getRawHeaders`` list joined).
- Times are POSIX seconds (``clock.seconds()``), the same scale as HTTP dates.
- We are a *shared* cache (RFC 9111 section 1): ``s-maxage`` wins over ``max-age``, and
  ``private`` responses are never stored.
- Stale entries are never served without a successful revalidation (no ``stale-while-revalidate``
  and no ``stale-if-error``), so ``must-revalidate``/``proxy-revalidate`` need no extra handling.
"""

from __future__ import annotations

import calendar
import datetime
import re
from collections import OrderedDict
from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

#: Bytes charged to every entry on top of its key, URL, headers and body (object headers, dict
#: slots, the LRU link): keeps a flood of tiny or negative entries inside ``max_bytes`` too.
ENTRY_OVERHEAD = 512

#: Share of (Date - Last-Modified) used as the heuristic lifetime (RFC 9111 section 4.2.2).
HEURISTIC_FRACTION = 0.1

#: ``Vary`` may name only these: we send a fixed Accept and ``Accept-Encoding: identity``
#: upstream, so one URL has exactly one variant.
ALLOWED_VARY = frozenset({b"accept", b"accept-encoding"})

#: delta-seconds larger than this are taken as this (RFC 9111 section 1.2.2).
DELTA_SECONDS_MAX = 2**31

# Fields of a 304 that never replace stored ones: they describe the stored body (its validated
# type, its length, its encoding), which a 304 does not carry (RFC 9111 section 3.2), or are
# connection-specific or never relayed.
_NOT_UPDATED = frozenset(
    {
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"set-cookie",
        b"set-cookie2",
    }
)

# Fields a 304 updates even when the stored response did not have them: they feed freshness,
# validation and Vary.
_FRESHNESS_FIELDS = frozenset(
    {b"cache-control", b"date", b"expires", b"etag", b"last-modified", b"age", b"vary"}
)

# Never kept in an entry (hop-by-hop, or origin state a proxy must not replay).
_NOT_STORED = _NOT_UPDATED - {b"content-length", b"content-type", b"content-encoding"}

_DEFAULT_PORTS = {b"http": 80, b"https": 443}

_MONTHS = {
    name: number
    for number, name in enumerate(
        (b"jan", b"feb", b"mar", b"apr", b"may", b"jun")
        + (b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"),
        start=1,
    )
}
_IMF_FIXDATE = re.compile(
    rb"[a-z]{3}, (\d{1,2}) ([a-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) gmt", re.IGNORECASE
)
_RFC850_DATE = re.compile(
    rb"[a-z]{6,9}, (\d{2})-([a-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) gmt", re.IGNORECASE
)
_ASCTIME_DATE = re.compile(
    rb"[a-z]{3} ([a-z]{3}) ([ \d]?\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})", re.IGNORECASE
)
_ENTITY_TAG = re.compile(rb'\s*(W/)?("[^"]*"|[^",\s]+)\s*(?:,|$)')


def parse_http_date(value: bytes | None) -> float | None:
    """Parse an HTTP-date (IMF-fixdate, RFC 850 or asctime form) to POSIX seconds.

    :return: ``None`` when absent or invalid; callers apply the RFC's rule for invalid values.
    """
    if value is None:
        return None
    text = value.strip()
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850_DATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
        # Two-digit years (RFC 9110 section 5.6.7: "the most recent past year with these digits
        # when more than 50 years ahead"), approximated by a fixed pivot: 70-99 -> 19xx.
        year = b"%d" % (int(year) + (1900 if int(year) >= 70 else 2000))
    elif match := _ASCTIME_DATE.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    month_number = _MONTHS.get(month.lower())
    if month_number is None:
        return None
    try:
        moment = datetime.datetime(
            int(year), month_number, int(day), int(hour), int(minute), min(int(second), 59)
        )
    except ValueError:
        return None
    return float(calendar.timegm(moment.timetuple()))


def parse_cache_control(value: bytes | None) -> dict[str, str | None]:
    """Split a Cache-Control value into ``{directive: argument}``.

    Directive names are lower-cased; quoted arguments are unquoted (commas inside quotes are kept);
    a directive without ``=`` maps to ``None``. When a directive repeats, the first one wins
    (RFC 9111 section 4.2.1). Undecodable bytes are read as Latin-1.
    """
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    text = value.decode("latin-1")
    position, length = 0, len(text)
    while position < length:
        end = position
        while end < length and text[end] not in ",=":
            end += 1
        name = text[position:end].strip().lower()
        argument: str | None = None
        position = end
        if position < length and text[position] == "=":
            position += 1
            while position < length and text[position] in " \t":
                position += 1
            if position < length and text[position] == '"':
                position += 1
                chars: list[str] = []
                while position < length and text[position] != '"':
                    if text[position] == "\\" and position + 1 < length:
                        position += 1
                    chars.append(text[position])
                    position += 1
                argument = "".join(chars)
                position += 1  # the closing quote
                while position < length and text[position] != ",":
                    position += 1
            else:
                end = position
                while end < length and text[end] != ",":
                    end += 1
                argument = text[position:end].strip()
                position = end
        position += 1  # the comma
        if name and name not in directives:
            directives[name] = argument
    return directives


def _delta_seconds(argument: str | None) -> int | None:
    """Read a delta-seconds argument; ``None`` when missing or not a non-negative integer."""
    if argument is None or not argument.isascii() or not argument.isdigit():
        return None
    return min(int(argument), DELTA_SECONDS_MAX)


def _lower(headers: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """Copy ``headers`` with lower-case names (cheap, and tolerant of a caller's casing)."""
    return {name.lower(): value for name, value in headers.items()}


def _forbids_storage(directives: Mapping[str, str | None]) -> bool:
    """Whether Cache-Control forbids a shared cache to store the response.

    ``private`` (qualified or not: we treat ``private="field"`` as unqualified) always does.
    ``no-store`` does unless ``must-understand`` is present, since we only store status 200,
    whose caching rules we implement (RFC 9111 section 5.2.2.3).
    """
    if "private" in directives:
        return True
    return "no-store" in directives and "must-understand" not in directives


def _vary_allowed(value: bytes | None) -> bool:
    """Whether a Vary value names only request fields we send with fixed values."""
    if value is None:
        return True
    names = {name.strip().lower() for name in value.split(b",")} - {b""}
    return names <= ALLOWED_VARY


@attrs.frozen
class Freshness:
    """The freshness facts of one response, as RFC 9111 section 4.2 computes them.

    :ivar lifetime: seconds the response is fresh for, counted from its (corrected) origin time;
        ``None`` when it must not be stored, ``0.0`` when it may be stored but must be
        revalidated before every use.
    :ivar source: which rule gave ``lifetime`` (``no-store``, ``private``, ``no-cache``,
        ``s-maxage``, ``max-age``, ``expires``, ``heuristic`` or ``none``), for the manhole.
    :ivar date: the Date value, or the time the response was received when Date is absent or
        invalid (RFC 9110 section 6.6.1).
    :ivar age_value: the Age value (0 when absent or invalid).
    """

    lifetime: float | None
    source: str
    date: float
    age_value: float

    @classmethod
    def from_headers(
        cls, headers: Mapping[bytes, bytes], now: float, heuristic_max: float = 86400.0
    ) -> Freshness:
        """Compute the freshness of a response received at ``now`` with ``headers``.

        Rules, first match wins:

        1. ``private``, or ``no-store`` without ``must-understand``: ``None`` (not stored).
        2. ``no-cache`` (qualified or not): ``0``.
        3. ``s-maxage``, else ``max-age``: its value; an invalid value means ``0`` (stale).
        4. ``Expires``: ``Expires - Date``, at least 0; an invalid date (``0``) means ``0``.
        5. ``Last-Modified`` before ``Date``: ``10% of (Date - Last-Modified)``, at most
           ``heuristic_max`` seconds (``heuristic_max = 0`` turns the heuristic off).
        6. Otherwise ``0``.

        ``Pragma`` is ignored (RFC 9111 section 5.4 deprecates it).
        """
        fields = _lower(headers)
        directives = parse_cache_control(fields.get(b"cache-control"))
        date = parse_http_date(fields.get(b"date"))
        date_value = now if date is None else date
        age = _delta_seconds(fields.get(b"age", b"").decode("latin-1").strip() or None)
        age_value = float(age or 0)

        def result(lifetime: float | None, source: str) -> Freshness:
            return cls(lifetime=lifetime, source=source, date=date_value, age_value=age_value)

        if "private" in directives:
            return result(None, "private")
        if _forbids_storage(directives):
            return result(None, "no-store")
        if "no-cache" in directives:
            return result(0.0, "no-cache")
        for directive in ("s-maxage", "max-age"):
            if directive in directives:
                seconds = _delta_seconds(directives[directive])
                return result(float(seconds or 0), directive)
        if b"expires" in fields:
            expires = parse_http_date(fields[b"expires"])
            if expires is None:
                return result(0.0, "expires")
            return result(max(0.0, expires - date_value), "expires")
        last_modified = parse_http_date(fields.get(b"last-modified"))
        if last_modified is not None and last_modified < date_value and heuristic_max > 0:
            heuristic = HEURISTIC_FRACTION * (date_value - last_modified)
            return result(min(heuristic, heuristic_max), "heuristic")
        return result(0.0, "none")

    def initial_age(self, request_time: float, response_time: float) -> float:
        """``corrected_initial_age`` of RFC 9111 section 4.2.3 for this response."""
        apparent_age = max(0.0, response_time - self.date)
        response_delay = max(0.0, response_time - request_time)
        corrected_age_value = self.age_value + response_delay
        return max(apparent_age, corrected_age_value)


def freshness_lifetime(
    headers: Mapping[bytes, bytes], now: float, heuristic_max: float = 86400.0
) -> float | None:
    """Freshness lifetime in seconds of a response received at ``now``.

    :return: ``None`` if a shared cache must not store it (``no-store``, ``private``);
        ``0.0`` if it may be stored but is stale at once, so every use needs a revalidation
        (``no-cache``, ``max-age=0``, past or invalid ``Expires``, no explicit expiry and no usable
        ``Last-Modified``); otherwise the positive lifetime. See :meth:`Freshness.from_headers`.
        Whether a response without validators is worth storing is :meth:`Cache.store`'s choice.
    """
    return Freshness.from_headers(headers, now, heuristic_max).lifetime


def is_storable(status: int, headers: Mapping[bytes, bytes]) -> bool:
    """Whether a shared cache may store this upstream response (RFC 9111 section 3).

    Only status 200 is stored (image bodies; redirects are followed, not cached). Refused:
    ``no-store`` (unless with ``must-understand``), ``private``, and a ``Vary`` naming anything
    but Accept and Accept-Encoding (``Vary: *`` included).
    """
    if status != 200:
        return False
    fields = _lower(headers)
    if _forbids_storage(parse_cache_control(fields.get(b"cache-control"))):
        return False
    return _vary_allowed(fields.get(b"vary"))


def _entity_tags(value: bytes) -> list[tuple[bool, bytes]]:
    """Parse a comma-separated list of entity-tags into ``(weak, opaque-tag)`` pairs.

    Unquoted tags (sent by some broken origins and clients) are accepted as their own opaque
    value; parsing stops at the first malformed member.
    """
    tags = []
    position = 0
    while position < len(value):
        match = _ENTITY_TAG.match(value, position)
        if match is None:
            break
        weak, opaque = match.groups()
        tags.append((weak is not None, opaque.strip(b'"')))
        position = match.end()
        while position < len(value) and value[position : position + 1] in b" \t,":
            position += 1
    return tags


@attrs.frozen
class Negative:
    """A remembered refusal: what the client is told again until the negative TTL ends."""

    status: int
    kind: str
    reason: str


@attrs.define(repr=False, eq=False)
class Entry:
    """One stored response (or remembered refusal) for one cache key.

    :ivar headers: the stored response fields, lower-case names, hop-by-hop and Set-Cookie
        removed. ``age`` and ``date`` are the upstream's; the server computes the ``Age`` it
        sends with :meth:`age`.
    :ivar stored_at: clock time the body was stored (a refresh keeps it).
    :ivar request_time: clock time the (last) upstream request was sent.
    :ivar response_time: clock time its response arrived.
    :ivar lifetime: freshness lifetime in seconds (the negative TTL for a negative entry).
    :ivar initial_age: RFC 9111 ``corrected_initial_age`` at ``response_time``.
    :ivar negative: set for a remembered refusal; then ``status`` is the client status and
        ``headers``/``body`` are empty.
    :ivar source: which freshness rule gave ``lifetime`` (``negative`` for a negative entry).
    :ivar key: the cache key it is stored under.
    :ivar size: bytes charged against the cache's bound.
    """

    url: bytes
    host: str
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    stored_at: float
    request_time: float
    response_time: float
    lifetime: float
    initial_age: float = 0.0
    negative: Negative | None = None
    source: str = ""
    key: bytes = b""
    size: int = 0

    def __repr__(self) -> str:
        url = self.url if len(self.url) <= 80 else self.url[:77] + b"..."
        kind = f" {self.negative.kind}" if self.negative is not None else ""
        return (
            f"<Entry {self.status}{kind} {url!r} host={self.host!r} body={len(self.body)}B "
            f"size={self.size}B lifetime={self.lifetime:g}s ({self.source}) "
            f"stored_at={self.stored_at:.0f}>"
        )

    def age(self, now: float) -> float:
        """``current_age`` (RFC 9111 section 4.2.3) at clock time ``now``, in seconds."""
        return max(0.0, self.initial_age + (now - self.response_time))

    def is_fresh(self, now: float) -> bool:
        """Whether the entry may be used at ``now`` without asking the origin."""
        return self.lifetime > self.age(now)

    def validators(self) -> dict[bytes, bytes]:
        """Request fields for revalidating this entry upstream (both when both are known)."""
        if self.negative is not None:
            return {}
        fields = {}
        if (etag := self.headers.get(b"etag")) is not None:
            fields[b"if-none-match"] = etag
        if (last_modified := self.headers.get(b"last-modified")) is not None:
            fields[b"if-modified-since"] = last_modified
        return fields

    def matches_conditional(
        self, if_none_match: bytes | None, if_modified_since: bytes | None
    ) -> bool:
        """Whether a client's conditional GET is answered 304 by this (fresh) entry.

        RFC 9110 section 13.1 and RFC 9111 section 4.3.2: If-None-Match, when present, decides
        alone (``*`` or any listed tag equal to ours under weak comparison) and If-Modified-Since
        is then ignored. Otherwise If-Modified-Since matches when our Last-Modified (else our
        Date, else the time we received the response) is not after it; an invalid date never
        matches. Empty values count as absent. Negative entries never match.
        """
        if self.negative is not None or self.status != 200:
            return False
        if if_none_match is not None and if_none_match.strip():
            if if_none_match.strip() == b"*":
                return True
            stored = self.headers.get(b"etag")
            ours = _entity_tags(stored) if stored is not None else []
            if not ours:
                return False
            return any(opaque == ours[0][1] for _weak, opaque in _entity_tags(if_none_match))
        if if_modified_since is not None:
            since = parse_http_date(if_modified_since)
            if since is None:
                return False
            modified = parse_http_date(self.headers.get(b"last-modified"))
            if modified is None:
                modified = parse_http_date(self.headers.get(b"date"))
            if modified is None:
                modified = self.response_time
            return modified <= since
        return False


def _same_representation(stored: Mapping[bytes, bytes], fresh: Mapping[bytes, bytes]) -> bool:
    """Whether a 304's validators select the stored response (RFC 9111 section 4.3.4).

    A strong ETag in the 304 must equal ours strongly, a weak one weakly; else a Last-Modified
    in the 304 must equal ours. A 304 without validators is taken as ours: it answers the
    conditional request built from this entry's own validators (RFC 9111 would select the
    stored response only if it also had none; many origins omit validators on a 304).
    """
    if (etag := fresh.get(b"etag")) is not None:
        theirs = _entity_tags(etag)
        ours = _entity_tags(stored.get(b"etag", b""))
        if not theirs or not ours:
            return False
        (their_weak, their_tag), (our_weak, our_tag) = theirs[0], ours[0]
        if their_weak:
            return their_tag == our_tag
        return not our_weak and their_tag == our_tag
    if (last_modified := fresh.get(b"last-modified")) is not None:
        theirs_date = parse_http_date(last_modified)
        return theirs_date is not None and theirs_date == parse_http_date(
            stored.get(b"last-modified")
        )
    return True


def _host_form(host: str) -> str:
    """A host name as compared by :meth:`Cache.purge_host`."""
    return host.strip().lower().removeprefix("[").removesuffix("]")


class Cache:
    """A byte-bounded LRU store of upstream responses with RFC 9111 freshness.

    :param clock: time source (the reactor in production, ``task.Clock`` in tests).
    :param max_bytes: bound on the bytes charged for all entries (body + key + URL + headers +
        :data:`ENTRY_OVERHEAD` each); ``0`` disables the cache.
    :param max_object: largest body stored, in bytes.
    :param negative_ttl: seconds a refusal is remembered; ``0`` disables negative caching.
    :param heuristic_max: cap, in seconds, of the Last-Modified heuristic lifetime.

    Counters (plain ints, for the metrics module): ``hits`` (fresh positive lookups),
    ``stale`` (stale positive lookups, to revalidate or refetch), ``misses`` (nothing usable
    stored), ``negative_hits`` (remembered refusals served), ``revalidated`` (304 refreshes),
    ``evictions`` (entries pushed out by the byte bound). Each :meth:`get` counts exactly one
    of hits, stale, misses or negative_hits.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_bytes: int = 64 * 2**20,
        max_object: int = 2**20,
        negative_ttl: float = 30.0,
        heuristic_max: float = 86400.0,
    ) -> None:
        for name, number in (
            ("max_bytes", max_bytes),
            ("max_object", max_object),
            ("negative_ttl", negative_ttl),
            ("heuristic_max", heuristic_max),
        ):
            if number < 0:
                raise ValueError(f"{name} must not be negative")
        self._clock = clock
        self.max_bytes = max_bytes
        self.max_object = max_object
        self.negative_ttl = negative_ttl
        self.heuristic_max = heuristic_max
        self.enabled: bool = max_bytes > 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.stale = 0
        self.misses = 0
        self.negative_hits = 0
        self.revalidated = 0
        self.evictions = 0

    @property
    def bytes_stored(self) -> int:
        """Bytes currently charged against ``max_bytes``."""
        return self._bytes

    @property
    def entry_count(self) -> int:
        """Entries currently stored (positive and negative)."""
        return len(self._entries)

    def key(self, url: bytes, accept: bytes | None = None) -> bytes:
        """The cache key of ``url``: the URL normalised, nothing else.

        Scheme and host are lower-cased, a default port (80 for http, 443 for https) and the
        fragment are dropped, an empty path becomes ``/``; path and query are kept byte for
        byte (decoding them could merge distinct resources). ``accept`` is ignored: upstream
        always gets our fixed Accept and ``Accept-Encoding: identity``, and Vary other than
        those is not stored, so one URL has one variant. A URL without ``://`` is returned
        unchanged.
        """
        url = url.partition(b"#")[0]
        scheme, separator, rest = url.partition(b"://")
        if not separator:
            return url
        scheme = scheme.lower()
        authority_end = len(rest)
        for delimiter in (b"/", b"?"):
            found = rest.find(delimiter)
            if found != -1:
                authority_end = min(authority_end, found)
        authority, tail = rest[:authority_end], rest[authority_end:]
        userinfo, at, host_port = authority.rpartition(b"@")
        if host_port.startswith(b"["):
            host, bracket, after = host_port.partition(b"]")
            host += bracket
            port = after[1:] if after.startswith(b":") else b""
        else:
            host, _colon, port = host_port.partition(b":")
        host = host.lower()
        if port.isdigit() and int(port) != _DEFAULT_PORTS.get(scheme):
            host += b":%d" % int(port)
        elif port and not port.isdigit():
            host += b":" + port
        if not tail.startswith(b"/"):
            tail = b"/" + tail
        return scheme + b"://" + userinfo + at + host + tail

    def peek(self, key: bytes) -> Entry | None:
        """The entry stored under ``key``, with no effect on LRU order or counters (manhole)."""
        return self._entries.get(key)

    def get(self, key: bytes) -> Entry | None:
        """Look ``key`` up for a request and mark the entry most recently used.

        Stale positive entries are returned too: the caller checks :meth:`Entry.is_fresh` and
        revalidates with :meth:`Entry.validators`, then calls :meth:`refresh` (304) or
        :meth:`store` (a full response). Expired negative entries, and stale entries without
        validators (they cannot be revalidated), are dropped and give ``None``.
        """
        if not self.enabled:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        now = self._clock.seconds()
        fresh = entry.is_fresh(now)
        if not fresh and (entry.negative is not None or not entry.validators()):
            self._discard(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        if entry.negative is not None:
            self.negative_hits += 1
        elif fresh:
            self.hits += 1
        else:
            self.stale += 1
        return entry

    def store(
        self,
        key: bytes,
        url: bytes,
        host: str,
        status: int,
        headers: Mapping[bytes, bytes],
        body: bytes,
        request_time: float,
        response_time: float,
    ) -> Entry | None:
        """Store a complete upstream response that passed the sniffer.

        Whatever was stored under ``key`` is dropped first: the new response supersedes it,
        stored or not. It is not stored (``None``) when the cache is disabled, when
        :func:`is_storable` refuses it, when the body is over ``max_object`` or the entry over
        ``max_bytes``, or when it is stale on arrival and has no ETag or Last-Modified to
        revalidate it with. Least recently used entries are then evicted until the total is
        within ``max_bytes``.
        """
        if not self.enabled:
            return None
        self._discard(key)
        fields = {name: value for name, value in _lower(headers).items() if name not in _NOT_STORED}
        if not is_storable(status, fields) or len(body) > self.max_object:
            return None
        freshness = Freshness.from_headers(fields, response_time, self.heuristic_max)
        if freshness.lifetime is None:
            return None
        entry = Entry(
            url=url,
            host=host,
            status=status,
            headers=fields,
            body=body,
            stored_at=self._clock.seconds(),
            request_time=request_time,
            response_time=response_time,
            lifetime=freshness.lifetime,
            initial_age=freshness.initial_age(request_time, response_time),
            source=freshness.source,
            key=key,
        )
        if not entry.is_fresh(response_time) and not entry.validators():
            return None
        return self._insert(entry)

    def store_negative(
        self, key: bytes, url: bytes, host: str, status: int, kind: str, reason: str
    ) -> None:
        """Remember a refusal (upstream 404/410, not an image, too large, destination refused).

        Kept ``negative_ttl`` seconds, without headers or body; replaces a stored entry.
        """
        if not self.enabled or self.negative_ttl <= 0:
            return
        now = self._clock.seconds()
        self._discard(key)
        self._insert(
            Entry(
                url=url,
                host=host,
                status=status,
                headers={},
                body=b"",
                stored_at=now,
                request_time=now,
                response_time=now,
                lifetime=self.negative_ttl,
                negative=Negative(status=status, kind=kind, reason=reason),
                source="negative",
                key=key,
            )
        )

    def refresh(
        self,
        key: bytes,
        headers_304: Mapping[bytes, bytes],
        request_time: float,
        response_time: float,
    ) -> Entry | None:
        """Freshen the entry under ``key`` with a 304 answer to its revalidation.

        The 304's fields replace the stored ones (RFC 9111 sections 3.2 and 4.3.4) except
        those describing the body (Content-Type, Content-Length, Content-Encoding,
        Content-Range) and hop-by-hop ones; fields the entry did not keep are added only if
        they bear on freshness or validation (Cache-Control, Date, Expires, ETag,
        Last-Modified, Age, Vary). The stored Age and Date are dropped first, since they belong
        to the old response. Freshness and age are then recomputed from the new request and
        response times.

        :return: the refreshed entry; ``None`` (and the entry dropped) when nothing is stored,
            the entry is negative, the 304's validators select another representation, or the
            merged fields make it unstorable (``no-store``, ``private``, Vary). Then the caller
            fetches unconditionally.
        """
        entry = self._entries.get(key)
        if entry is None or entry.negative is not None:
            return None
        fields = _lower(headers_304)
        if not _same_representation(entry.headers, fields):
            self._discard(key)
            return None
        merged = dict(entry.headers)
        merged.pop(b"age", None)
        merged.pop(b"date", None)
        for name, value in fields.items():
            if name in _NOT_UPDATED:
                continue
            if name in entry.headers or name in _FRESHNESS_FIELDS:
                merged[name] = value
        if not is_storable(entry.status, merged):
            self._discard(key)
            return None
        freshness = Freshness.from_headers(merged, response_time, self.heuristic_max)
        assert freshness.lifetime is not None  # is_storable refused the None cases
        entry.headers = merged
        entry.request_time = request_time
        entry.response_time = response_time
        entry.lifetime = freshness.lifetime
        entry.initial_age = freshness.initial_age(request_time, response_time)
        entry.source = freshness.source
        self._resize(entry)
        self._entries.move_to_end(key)
        self.revalidated += 1
        self._evict()
        return self._entries.get(key)

    def purge_url(self, url: bytes) -> int:
        """Drop the entry of ``url`` (takedown); return how many entries were removed."""
        wanted = self.key(url)
        doomed = [
            key
            for key, entry in self._entries.items()
            if key == wanted or entry.url == url or self.key(entry.url) == wanted
        ]
        for key in doomed:
            self._discard(key)
        log.info("cache purge by URL removed {count} entries", count=len(doomed))
        return len(doomed)

    def purge_host(self, host: str) -> int:
        """Drop every entry of origin ``host`` (exact name, case-insensitive; no subdomains).

        :return: how many entries were removed.
        """
        wanted = _host_form(host)
        doomed = [key for key, entry in self._entries.items() if _host_form(entry.host) == wanted]
        for key in doomed:
            self._discard(key)
        log.info(
            "cache purge of host {host} removed {count} entries", host=wanted, count=len(doomed)
        )
        return len(doomed)

    def clear(self) -> int:
        """Drop every entry; return how many were removed."""
        count = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return count

    def entries(self) -> list[Entry]:
        """All entries, least recently used first (for the manhole)."""
        return list(self._entries.values())

    def _charge(self, entry: Entry) -> int:
        """Bytes an entry costs against ``max_bytes``."""
        size = ENTRY_OVERHEAD + len(entry.key) + len(entry.url) + len(entry.host)
        size += len(entry.body) + sum(
            len(name) + len(value) for name, value in entry.headers.items()
        )
        if entry.negative is not None:
            size += len(entry.negative.kind) + len(entry.negative.reason)
        return size

    def _insert(self, entry: Entry) -> Entry | None:
        """Add ``entry`` as most recently used and evict down to the bound."""
        entry.size = self._charge(entry)
        if entry.size > self.max_bytes:
            return None
        self._entries[entry.key] = entry
        self._bytes += entry.size
        self._evict()
        return entry

    def _resize(self, entry: Entry) -> None:
        """Recharge an entry whose headers changed."""
        size = self._charge(entry)
        self._bytes += size - entry.size
        entry.size = size

    def _evict(self) -> None:
        """Drop least recently used entries until the total is within ``max_bytes``."""
        while self._bytes > self.max_bytes and self._entries:
            _key, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size
            self.evictions += 1

    def _discard(self, key: bytes) -> None:
        """Remove ``key`` if stored (not an eviction)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
