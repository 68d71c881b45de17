"""Tests for imgproxy.sdnotify: the sd_notify datagrams reach a socket like systemd's."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from imgproxy.sdnotify import Notifier, NotifierService


class Receiver:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def messages(self) -> list[bytes]:
        """Everything received so far, one item per datagram."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096))
            except BlockingIOError:
                return received

    def fields(self) -> dict[str, str]:
        """The single datagram received, parsed into its fields."""
        (message,) = self.messages()
        return dict(line.split("=", 1) for line in message.decode().split("\n"))


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    """A receiving socket bound to a filesystem path or to an abstract ``@name``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    if request.param == "path":
        path = str(tmp_path / "notify")
        sock.bind(path)
        env_value = path
    else:
        name = f"imageproxy-test-{secrets.token_hex(8)}"
        sock.bind("\0" + name)
        env_value = "@" + name
    yield Receiver(sock, env_value)
    sock.close()


def test_ready_with_status(receiver: Receiver) -> None:
    """ready() sends READY=1 and STATUS= in one datagram to $NOTIFY_SOCKET."""
    notifier = Notifier(Clock(), {"NOTIFY_SOCKET": receiver.env_value})
    assert notifier.enabled
    notifier.ready("serving on 127.0.0.1:8080")
    assert receiver.messages() == [b"READY=1\nSTATUS=serving on 127.0.0.1:8080"]
    notifier.close()


def test_ready_without_status(receiver: Receiver) -> None:
    """ready() without a status sends only READY=1."""
    notifier = Notifier(Clock(), {"NOTIFY_SOCKET": receiver.env_value})
    notifier.ready()
    assert receiver.messages() == [b"READY=1"]
    notifier.close()


def test_stopping(receiver: Receiver) -> None:
    """stopping() sends STOPPING=1."""
    notifier = Notifier(Clock(), {"NOTIFY_SOCKET": receiver.env_value})
    notifier.stopping()
    assert receiver.messages() == [b"STOPPING=1"]
    notifier.close()


def test_reloading_carries_monotonic_time(receiver: Receiver) -> None:
    """reloading() sends RELOADING=1 with the current CLOCK_MONOTONIC time in microseconds."""
    notifier = Notifier(Clock(), {"NOTIFY_SOCKET": receiver.env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = receiver.fields()
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    notifier.close()


def test_newline_in_value_cannot_add_a_field(receiver: Receiver) -> None:
    """A newline inside a value is flattened, so a status text cannot inject READY=1."""
    notifier = Notifier(Clock(), {"NOTIFY_SOCKET": receiver.env_value})
    notifier.notify(STATUS="bad\nREADY=1")
    assert receiver.messages() == [b"STATUS=bad READY=1"]
    notifier.close()


def test_disabled_without_notify_socket() -> None:
    """Without $NOTIFY_SOCKET the notifier is disabled and every call is a silent no-op."""
    notifier = Notifier(Clock(), {"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with capturedLogs() as events:
        notifier.ready("x")
        notifier.stopping()
        notifier.reloading()
    assert events == []


def test_unsupported_notify_socket_is_ignored() -> None:
    """A $NOTIFY_SOCKET neither a path nor @abstract disables the notifier with a warning."""
    with capturedLogs() as events:
        notifier = Notifier(Clock(), {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert [e["log_level"] for e in events] == [LogLevel.warn]


def test_send_failure_is_logged_not_raised(tmp_path: Path) -> None:
    """A send to a socket nobody listens on logs an error instead of raising."""
    notifier = Notifier(Clock(), {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with capturedLogs() as events:
        notifier.ready()
    assert [e["log_level"] for e in events] == [LogLevel.error]
    assert "READY" in events[0]["fields"]
    notifier.close()


def test_watchdog_interval_is_half_the_timeout(receiver: Receiver) -> None:
    """WATCHDOG_USEC=30 s gives a ping every 15 s when WATCHDOG_PID is this process."""
    env = {
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    assert Notifier(Clock(), env).watchdog_interval == 15.0


def test_watchdog_for_another_process_is_ignored(receiver: Receiver) -> None:
    """A WATCHDOG_PID naming another process (an inherited variable) turns the pings off."""
    env = {
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    assert Notifier(Clock(), env).watchdog_interval is None


def test_service_lifecycle_with_watchdog(receiver: Receiver) -> None:
    """The service sends READY=1 on start, WATCHDOG=1 every half timeout, STOPPING=1 on stop."""
    clock = Clock()
    env = {"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "4000000"}
    service = NotifierService(Notifier(clock, env), status="serving")
    service.startService()
    assert receiver.messages() == [b"READY=1\nSTATUS=serving"]
    clock.advance(1.9)
    assert receiver.messages() == []
    clock.advance(0.1)
    assert receiver.messages() == [b"WATCHDOG=1"]
    clock.pump([2, 2])
    assert receiver.messages() == [b"WATCHDOG=1", b"WATCHDOG=1"]
    service.stopService()
    assert receiver.messages() == [b"STOPPING=1"]
    clock.advance(10)
    assert receiver.messages() == []
    assert clock.getDelayedCalls() == []


def test_service_without_watchdog_schedules_nothing(receiver: Receiver) -> None:
    """Without WATCHDOG_USEC the service only sends READY=1 and STOPPING=1."""
    clock = Clock()
    service = NotifierService(Notifier(clock, {"NOTIFY_SOCKET": receiver.env_value}))
    service.startService()
    assert clock.getDelayedCalls() == []
    service.stopService()
    assert receiver.messages() == [b"READY=1", b"STOPPING=1"]
