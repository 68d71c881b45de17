"""Log output for the daemon: a level filter, text or JSON lines, and the access log.

twistd logs every event, debug included, in its own format; :func:`make_observer` builds the
observer that replaces it (``--log-level``, ``--log-format``). :class:`AccessLog` writes one event
per proxy request in the ``imgproxy.access`` namespace; it names the upstream host and a short
hash of the target URL, never the URL itself, and the client address only when asked to.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, cast

from constantly import NamedConstant
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.server import Site
from zope.interface import implementer

__all__ = [
    "ACCESS_NAMESPACE",
    "FORMATS",
    "LEVELS",
    "AccessLog",
    "QuietSite",
    "make_observer",
    "parse_level",
    "url_hash",
]

#: The namespace of access-log events; ``--log-level`` above info does not hide them.
ACCESS_NAMESPACE = "imgproxy.access"
#: Accepted ``--log-level`` values, most verbose first.
LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error", "critical")
#: Accepted ``--log-format`` values.
FORMATS: tuple[str, ...] = ("text", "json")

_UNFORMATTABLE_PREFIXES = ("Unable to format event ", "MESSAGE LOST:")
# Event keys that are not the event's own fields: Twisted's bookkeeping and the fields of legacy
# twisted.python.log events ("system" may carry a peer address, "message" is an args tuple).
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})
_MAX_DEPTH = 6


def parse_level(text: str) -> LogLevel:
    """Parse a ``--log-level`` value (case-insensitive; ``warning`` means ``warn``).

    :raises ValueError: naming the valid values.
    """
    name = text.strip().lower()
    if name == "warning":
        name = "warn"
    if name not in LEVELS:
        raise ValueError(f"unknown log level {text!r}: use one of {', '.join(LEVELS)}")
    return cast(LogLevel, LogLevel.levelWithName(name))


@implementer(ILogFilterPredicate)
class _LevelPredicate:
    """Drop events below a level; access-log events pass down to info whatever the level.

    Unlike :class:`LogLevelFilterPredicate` alone, events lacking a level or a namespace are
    judged as info in the root namespace rather than dropped.
    """

    def __init__(self, level: LogLevel) -> None:
        self._levels = LogLevelFilterPredicate(defaultLogLevel=level)
        self._levels.setLogLevelForNamespace(ACCESS_NAMESPACE, min(level, LogLevel.info))

    def __call__(self, event: LogEvent) -> NamedConstant:
        level = event.get("log_level")
        namespace = event.get("log_namespace")
        if not isinstance(namespace, str):
            namespace = ""
        threshold = self._levels.logLevelForNamespace(namespace)
        try:
            below = level < threshold
        except TypeError:  # no level, or not a LogLevel
            below = LogLevel.info < threshold
        return PredicateResult.no if below else PredicateResult.maybe


def _event_time(event: LogEvent) -> float:
    """The event's ``log_time``, or now if it has none usable."""
    when = event.get("log_time")
    if isinstance(when, (int, float)) and math.isfinite(when):
        return float(when)
    return time.time()


def _iso(when: float, millis: bool) -> str:
    """Format epoch seconds as UTC ISO 8601 with a ``Z`` (``2026-12-04T10:00:00Z``)."""
    moment = datetime.fromtimestamp(when, UTC)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _level_name(event: LogEvent) -> str:
    """The event's level name, ``info`` when it has none."""
    level = event.get("log_level")
    if isinstance(level, NamedConstant) and level.name in LEVELS:
        return str(level.name)
    return "info"


def _namespace(event: LogEvent) -> str:
    """The event's namespace, ``-`` when it has none."""
    namespace = event.get("log_namespace")
    return namespace if isinstance(namespace, str) and namespace else "-"


def _message(event: LogEvent) -> str:
    """Format the event's message; an unformattable one becomes a generic note that names the
    format string but, unlike Twisted's fallback, not the field values (they may hold URLs)."""
    text = formatEvent(event)
    if text.startswith(_UNFORMATTABLE_PREFIXES):
        source = event.get("log_format")
        shown = source if isinstance(source, str) else type(source).__name__
        return f"(unformattable log event, format {shown[:200]!r})"
    return text


def _traceback(event: LogEvent) -> str | None:
    """The text traceback of the event's failure, if it carries one."""
    failure = event.get("log_failure")
    if not isinstance(failure, Failure):
        return None
    try:
        return failure.getTraceback().rstrip("\n")
    except Exception:
        return f"(traceback unavailable: {getattr(failure.type, '__name__', '?')})"


def _jsonable(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is plain data that strict JSON can carry as it is."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(_jsonable(item, depth + 1) for item in value)
    if isinstance(value, Mapping):
        return all(
            isinstance(key, str) and _jsonable(item, depth + 1) for key, item in value.items()
        )
    return False


def _format_text(event: LogEvent) -> str:
    """One line ``TIME [namespace#level] message``; a traceback follows on tab-indented lines."""
    when = _event_time(event)
    try:
        text = _message(event)
        trace = _traceback(event)
        if trace:
            text = f"{text}\n{trace}"
        text = text.replace("\n", "\n\t")
        return f"{_iso(when, False)} [{_namespace(event)}#{_level_name(event)}] {text}\n"
    except Exception as error:
        return (
            f"{_iso(when, False)} [imgproxy.logs#error] unable to format a log event "
            f"({type(error).__name__})\n"
        )


def _format_json(event: LogEvent) -> str:
    """One JSON object a line: time, level, namespace, message, the event's own plain fields,
    and ``failure`` as a text traceback."""
    when = _event_time(event)
    try:
        record: dict[str, Any] = {
            "time": _iso(when, True),
            "level": _level_name(event),
            "namespace": _namespace(event),
            "message": _message(event),
        }
        for key, value in event.items():
            if (
                isinstance(key, str)
                and not key.startswith("log_")
                and key not in record
                and key not in _LEGACY_KEYS
                and _jsonable(value)
            ):
                record[key] = value
        trace = _traceback(event)
        if trace:
            record["failure"] = trace
        return json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
    except Exception as error:
        fallback = {
            "time": _iso(when, True),
            "level": "error",
            "namespace": "imgproxy.logs",
            "message": f"unable to format a log event ({type(error).__name__})",
        }
        return json.dumps(fallback, separators=(",", ":")) + "\n"


def make_observer(
    level: LogLevel, fmt: str = "text", stream: IO[str] | None = None
) -> ILogObserver:
    """Build the daemon's log observer: events at ``level`` and above, as text or JSON lines.

    The stream is bound now: twistd later replaces ``sys.stdout`` with a logging file, and an
    observer that looked it up per event would write into the log system itself.

    :param level: the lowest level written; access-log events are written down to info.
    :param fmt: ``"text"`` (``2026-12-04T10:00:00Z [namespace#level] message``) or ``"json"``
        (one object a line for log shippers).
    :param stream: where to write; ``sys.stdout`` as it is at this call when ``None``.
    :raises ValueError: on an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stdout
    writer = FileLogObserver(out, _format_text if fmt == "text" else _format_json)
    return FilteringLogObserver(writer, [_LevelPredicate(level)])


def url_hash(url: bytes | str) -> str:
    """A short, stable tag of a target URL for logs: the first 12 hex digits of its SHA-256.

    It lets an operator match log lines about the same image (or check a given URL) without the
    log holding the URL.
    """
    data = url.encode("utf-8", "surrogateescape") if isinstance(url, str) else bytes(url)
    return hashlib.sha256(data).hexdigest()[:12]


def _clean(value: str | None, limit: int) -> str:
    """A log-safe token: ``-`` for nothing, control and space characters replaced, cut to
    ``limit`` characters."""
    if not value:
        return "-"
    text = str(value)[:limit]
    if text.isprintable() and " " not in text:
        return text
    return "".join(c if c.isprintable() and c != " " else "?" for c in text)


class AccessLog:
    """Writes one ``imgproxy.access`` info event per proxy request.

    The event's fields (``method``, ``status``, ``bytes_sent``, ``duration_ms``, ``host``,
    ``url_hash``, ``kind``, ``cache``, and ``client_ip`` only when enabled) are what the JSON log
    format carries; the URL itself is never a field.
    """

    _FORMAT = "{method} {status} {bytes_sent}B {duration_ms}ms host={host} url={url_hash} {kind}"

    def __init__(self, logger: Logger | None = None, log_client_ip: bool = False) -> None:
        """
        :param logger: where events go; a ``Logger`` in ``imgproxy.access`` when ``None``.
        :param log_client_ip: add the client address (``--log-client-ip``); off by default,
            since addresses are personal data.
        """
        self._log = logger if logger is not None else Logger(namespace=ACCESS_NAMESPACE)
        self._log_client_ip = log_client_ip

    def log(
        self,
        *,
        method: str,
        status: int,
        bytes_sent: int,
        duration: float,
        host: str | None,
        url: bytes | None,
        client_ip: str | None,
        kind: str,
        cache: str | None = None,
    ) -> None:
        """Log one finished request.

        :param duration: seconds from receipt to the end, logged as milliseconds.
        :param host: the upstream host (``None`` when the request never got that far).
        :param url: the target URL; only its :func:`url_hash` is logged.
        :param client_ip: logged only when the log was built with ``log_client_ip``.
        :param kind: the outcome, as in the metrics (``ok``, ``not-found``, ...).
        :param cache: a cache outcome (``hit``, ``miss``, ...) if a cache is in use.
        """
        fmt = self._FORMAT
        fields: dict[str, object] = {
            "method": _clean(method, 16),
            "status": status,
            "bytes_sent": bytes_sent,
            "duration_ms": round(max(float(duration), 0.0) * 1000.0, 1),
            "host": _clean(host, 253),
            "url_hash": url_hash(url) if url is not None else "-",
            "kind": _clean(kind, 32),
            "cache": None,
        }
        if cache is not None:
            fmt += " cache={cache}"
            fields["cache"] = _clean(cache, 16)
        if self._log_client_ip:
            fmt += " client={client_ip}"
            fields["client_ip"] = _clean(client_ip, 64)
        self._log.info(fmt, **fields)


class QuietSite(Site):
    """A Site that writes no access-log line of its own (:class:`AccessLog` does, or nothing
    should: a metrics scrape is not worth a line) and no factory start/stop lines."""

    noisy = False

    def log(self, request: Request) -> None:
        """Write nothing."""
