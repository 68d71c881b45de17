"""Tests for imgproxy.logs: levels, text and JSON lines, and the access log's privacy."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel
from twisted.python.failure import Failure

from imgproxy.logs import ACCESS_NAMESPACE, AccessLog, make_observer, parse_level, url_hash

NOON = datetime(2026, 12, 4, 10, 0, 0, 250_000, tzinfo=UTC).timestamp()


def event(fmt: str = "hello {who}", level: LogLevel = LogLevel.info, **fields: Any) -> LogEvent:
    """A log event as a Logger would emit it, at a fixed time."""
    base: dict[str, Any] = {
        "log_format": fmt,
        "log_level": level,
        "log_namespace": "imgproxy.test",
        "log_time": NOON,
        "who": "world",
    }
    base.update(fields)
    return base


def emit(observer: ILogObserver, *events: LogEvent) -> None:
    """Send events to an observer."""
    for item in events:
        observer(item)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Parse one strict JSON object per line (NaN and Infinity refused)."""

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("debug", LogLevel.debug),
        ("info", LogLevel.info),
        ("WARN", LogLevel.warn),
        ("warning", LogLevel.warn),
        (" error ", LogLevel.error),
        ("critical", LogLevel.critical),
    ],
)
def test_parse_level(text: str, level: LogLevel) -> None:
    """Level names parse case-insensitively, with 'warning' as an alias of 'warn'."""
    assert parse_level(text) is level


@pytest.mark.parametrize("text", ["", "verbose", "10", "inf"])
def test_parse_level_rejects(text: str) -> None:
    """An unknown level raises ValueError naming every valid value."""
    with pytest.raises(ValueError) as caught:
        parse_level(text)
    for name in ("debug", "info", "warn", "error", "critical"):
        assert name in str(caught.value)


def test_unknown_format_rejected() -> None:
    """make_observer refuses a format other than text and json."""
    with pytest.raises(ValueError, match="text, json"):
        make_observer(LogLevel.info, "xml", io.StringIO())


def test_text_line() -> None:
    """The text format is one line: UTC time with Z, [namespace#level], the formatted message."""
    out = io.StringIO()
    emit(make_observer(LogLevel.info, "text", out), event())
    assert out.getvalue() == "2026-12-04T10:00:00Z [imgproxy.test#info] hello world\n"


def test_text_multiline_stays_one_record() -> None:
    """Continuation lines of a message are tab-indented, so each record starts with a time."""
    out = io.StringIO()
    emit(make_observer(LogLevel.info, "text", out), event("a\nb"))
    assert out.getvalue() == "2026-12-04T10:00:00Z [imgproxy.test#info] a\n\tb\n"


def test_text_failure_traceback() -> None:
    """A failure's traceback follows the message in the text format."""
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        failure = Failure()
    out = io.StringIO()
    emit(
        make_observer(LogLevel.info, "text", out),
        event("it broke", LogLevel.critical, log_failure=failure),
    )
    lines = out.getvalue().splitlines()
    assert lines[0] == "2026-12-04T10:00:00Z [imgproxy.test#critical] it broke"
    assert all(line.startswith("\t") for line in lines[1:])
    assert "ZeroDivisionError: boom" in lines[-1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_level_filtering(fmt: str) -> None:
    """Events below the chosen level are dropped; that level and above are written."""
    out = io.StringIO()
    observer = make_observer(LogLevel.warn, fmt, out)
    emit(
        observer,
        *(event(f"at {level.name}", level) for level in LogLevel.iterconstants()),
    )
    text = out.getvalue()
    if fmt == "json":
        messages = [record["message"] for record in json_lines(text)]
    else:
        messages = [line.split("] ", 1)[1] for line in text.splitlines()]
    assert messages == ["at warn", "at error", "at critical"]


def test_debug_level_shows_debug() -> None:
    """At debug level, debug events are written."""
    out = io.StringIO()
    emit(make_observer(LogLevel.debug, "text", out), event("deep", LogLevel.debug))
    assert "[imgproxy.test#debug] deep" in out.getvalue()


def test_default_info_hides_debug() -> None:
    """At info level (the default), debug noise is dropped."""
    out = io.StringIO()
    emit(make_observer(LogLevel.info, "text", out), event("deep", LogLevel.debug))
    assert out.getvalue() == ""


def test_access_log_passes_high_level() -> None:
    """Access-log events are written even when --log-level is above info; other info is not."""
    out = io.StringIO()
    observer = make_observer(LogLevel.error, "text", out)
    emit(
        observer,
        event("access line", log_namespace=ACCESS_NAMESPACE),
        event("ordinary info"),
    )
    assert out.getvalue() == "2026-12-04T10:00:00Z [imgproxy.access#info] access line\n"


def test_events_without_level_or_namespace_count_as_info() -> None:
    """An event lacking level or namespace is treated as info: kept at info, dropped at warn."""
    bare = {"log_format": "bare", "log_time": NOON}
    kept, dropped = io.StringIO(), io.StringIO()
    emit(make_observer(LogLevel.info, "text", kept), bare)
    emit(make_observer(LogLevel.warn, "text", dropped), bare)
    assert kept.getvalue() == "2026-12-04T10:00:00Z [-#info] bare\n"
    assert dropped.getvalue() == ""


def test_stream_bound_at_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default stream is sys.stdout as it was when the observer was made, not per event."""
    original = io.StringIO()
    monkeypatch.setattr(sys, "stdout", original)
    observer = make_observer(LogLevel.info)
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", swapped)
    emit(observer, event())
    assert "hello world" in original.getvalue()
    assert swapped.getvalue() == ""


def test_json_line_fields() -> None:
    """JSON lines carry time, level, namespace, the formatted message and the plain fields."""
    out = io.StringIO()
    emit(
        make_observer(LogLevel.info, "json", out),
        event("{n} items", n=3, tags=["a", "b"], info={"k": 1.5}),
        event("second", LogLevel.warn),
    )
    first, second = json_lines(out.getvalue())
    assert first == {
        "time": "2026-12-04T10:00:00.250Z",
        "level": "info",
        "namespace": "imgproxy.test",
        "message": "3 items",
        "who": "world",
        "n": 3,
        "tags": ["a", "b"],
        "info": {"k": 1.5},
    }
    assert (second["level"], second["message"]) == ("warn", "second")


def test_json_leaves_out_odd_values() -> None:
    """Fields JSON cannot carry as they are (objects, bytes, NaN, non-str keys) are left out."""
    out = io.StringIO()
    emit(
        make_observer(LogLevel.info, "json", out),
        event(
            "x",
            obj=object(),
            raw=b"bytes",
            nan=float("nan"),
            inf=float("inf"),
            keyed={1: "a"},
            nested=[[{"deep": object()}]],
            ok=True,
        ),
    )
    (record,) = json_lines(out.getvalue())
    assert not {"obj", "raw", "nan", "inf", "keyed", "nested"} & set(record)
    assert record["ok"] is True


def test_json_failure_is_text() -> None:
    """A failure is carried as its text traceback under 'failure'."""
    try:
        raise KeyError("missing")
    except KeyError:
        failure = Failure()
    out = io.StringIO()
    emit(
        make_observer(LogLevel.info, "json", out),
        event("oops", LogLevel.critical, log_failure=failure),
    )
    (record,) = json_lines(out.getvalue())
    assert record["message"] == "oops"
    assert record["failure"].startswith("Traceback")
    assert "KeyError" in record["failure"]


def test_json_drops_legacy_system() -> None:
    """Legacy 'system' and 'log_system' fields (they may name a peer address) are not copied."""
    out = io.StringIO()
    emit(
        make_observer(LogLevel.info, "json", out),
        event("x", system="HTTPChannel,0,198.51.100.7", log_system="HTTPChannel,0,198.51.100.7"),
    )
    assert "198.51.100.7" not in out.getvalue()


class Hostile:
    """An object whose every string conversion fails."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        raise RuntimeError("no format")


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(
    "odd",
    [
        {"log_format": "{x}", "x": Hostile()},
        {"log_format": "{missing}"},
        {"log_format": 42},
        {"log_format": b"bytes {who}"},
        {"log_level": "loud", "log_namespace": 5, "log_time": "yesterday"},
        {"log_failure": "not a failure"},
        {"log_format": "{a.b}", "a": Hostile()},
        {"time": Hostile(), "message": ("legacy",)},
    ],
)
def test_odd_events_do_not_crash(fmt: str, odd: dict[str, Any]) -> None:
    """Unformattable events and odd values produce one line instead of an exception."""
    out = io.StringIO()
    base = event()
    base.update(odd)
    emit(make_observer(LogLevel.debug, fmt, out), base)
    assert out.getvalue().count("\n") == 1
    if fmt == "json":
        json_lines(out.getvalue())


def test_unformattable_hides_field_values() -> None:
    """An unformattable event's message names its format but not its field values."""
    out = io.StringIO()
    emit(
        make_observer(LogLevel.info, "text", out),
        event("{url.nope}", url="https://secret.example/p.png"),
    )
    assert "secret.example" not in out.getvalue()
    assert "{url.nope}" in out.getvalue()


def test_url_hash() -> None:
    """url_hash is the first 12 hex digits of SHA-256, the same for bytes and str."""
    url = b"https://example.com/cat.png"
    assert url_hash(url) == hashlib.sha256(url).hexdigest()[:12]
    assert url_hash(url.decode()) == url_hash(url)
    assert len(url_hash(b"")) == 12


def access_output(log_client_ip: bool, **overrides: Any) -> tuple[list[LogEvent], str, str]:
    """Log one request through AccessLog; return the events, the text and the JSON output."""
    events: list[LogEvent] = []
    text, js = io.StringIO(), io.StringIO()
    text_observer = make_observer(LogLevel.info, "text", text)
    json_observer = make_observer(LogLevel.info, "json", js)

    def observer(item: LogEvent) -> None:
        events.append(item)
        text_observer(item)
        json_observer(item)

    fields: dict[str, Any] = {
        "method": "GET",
        "status": 200,
        "bytes_sent": 48213,
        "duration": 0.0371,
        "host": "images.example.com",
        "url": b"https://images.example.com/a/cat.png?size=large",
        "client_ip": "203.0.113.9",
        "kind": "ok",
    }
    fields.update(overrides)
    access = AccessLog(Logger(namespace=ACCESS_NAMESPACE, observer=observer), log_client_ip)
    access.log(**fields)
    return events, text.getvalue(), js.getvalue()


def test_access_line() -> None:
    """One info event in imgproxy.access, with method, status, bytes, ms, host, hash and kind."""
    events, text, js = access_output(False)
    (item,) = events
    assert item["log_namespace"] == ACCESS_NAMESPACE
    assert item["log_level"] is LogLevel.info
    digest = url_hash(b"https://images.example.com/a/cat.png?size=large")
    assert text.endswith(
        f"[imgproxy.access#info] GET 200 48213B 37.1ms host=images.example.com url={digest} ok\n"
    )
    (record,) = json_lines(js)
    assert {
        k: record[k]
        for k in (
            "method",
            "status",
            "bytes_sent",
            "duration_ms",
            "host",
            "url_hash",
            "kind",
            "cache",
        )
    } == {
        "method": "GET",
        "status": 200,
        "bytes_sent": 48213,
        "duration_ms": 37.1,
        "host": "images.example.com",
        "url_hash": digest,
        "kind": "ok",
        "cache": None,
    }


def test_access_log_hides_url_and_client_ip() -> None:
    """By default neither the URL nor the client IP is in the event, the text or the JSON."""
    events, text, js = access_output(False)
    for output in (repr(events), text, js):
        assert "cat.png" not in output
        assert "203.0.113.9" not in output
    assert "client_ip" not in events[0]


def test_access_log_client_ip_when_enabled() -> None:
    """With log_client_ip the client address is a field and ends the text line."""
    events, text, js = access_output(True)
    assert events[0]["client_ip"] == "203.0.113.9"
    assert text.endswith(" ok client=203.0.113.9\n")
    assert json_lines(js)[0]["client_ip"] == "203.0.113.9"
    assert "cat.png" not in text + js


def test_access_log_cache_and_missing_values() -> None:
    """A cache outcome is appended; a missing host or URL shows as '-'."""
    _, text, js = access_output(
        False, host=None, url=None, cache="hit", status=400, kind="bad-request"
    )
    assert text.endswith("GET 400 48213B 37.1ms host=- url=- bad-request cache=hit\n")
    assert json_lines(js)[0]["cache"] == "hit"


def test_access_log_neutralises_control_characters() -> None:
    """Spaces and control characters in method, host or kind cannot forge extra fields or lines."""
    _, text, _ = access_output(False, method="GET\nX", host="a b\r\nc", kind="ok\x1b[31m")
    assert text.count("\n") == 1
    assert "host=a?b??c" in text and "GET?X" in text and "ok?[31m" in text


@settings(max_examples=80, deadline=None)
@given(
    path=st.text(min_size=1, max_size=60),
    client=st.one_of(
        st.ip_addresses(network="203.0.113.0/24"), st.ip_addresses(network="2001:db8::/32")
    ),
    enabled=st.booleans(),
)
def test_access_log_never_leaks(path: str, client: Any, enabled: bool) -> None:
    """Whatever the URL, the output never holds it, and holds the client IP only if enabled."""
    url = ("https://leak.example/" + path).encode("utf-8", "surrogatepass")
    events, text, js = access_output(enabled, url=url, host="img.example", client_ip=str(client))
    for output in (text, js, repr(events)):
        assert "leak.example" not in output
        assert (str(client) in output) is enabled
