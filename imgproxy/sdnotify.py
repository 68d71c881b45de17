"""systemd readiness and watchdog notifications (``Type=notify``) without libsystemd.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` names the abstract namespace). Twisted has no client for it,
and it is small enough not to warrant a dependency. Outside systemd (no ``$NOTIFY_SOCKET``) every
call is a no-op, so the same code runs under ``twistd -n`` in a terminal.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["Notifier", "NotifierService"]

log = Logger()


def _notify_address(value: str) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into an ``AF_UNIX`` address, or ``None`` if unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or ``None`` if not asked for.

    systemd sets ``$WATCHDOG_PID`` to the process it watches; if that is another process (a
    variable inherited by a child), the watchdog is not ours to feed.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


class Notifier:
    """Sends sd_notify(3) messages to the service manager, if there is one.

    :param reactor: the clock the watchdog pings are scheduled on (used by
        :class:`NotifierService`).
    :param environ: where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read.
    """

    enabled: bool
    watchdog_interval: float | None

    def __init__(self, reactor: IReactorTime, environ: Mapping[str, str] = os.environ) -> None:
        self.reactor = reactor
        raw = environ.get("NOTIFY_SOCKET", "")
        self._address = _notify_address(raw)
        if raw and self._address is None:
            log.warn("Ignoring unsupported NOTIFY_SOCKET {socket!r}", socket=raw)
        self.enabled = self._address is not None
        self.watchdog_interval = _watchdog_interval(environ) if self.enabled else None
        self._socket: socket.socket | None = None

    def notify(self, **fields: str) -> None:
        """Send ``KEY=VALUE`` fields as one datagram; never blocks and never raises.

        A newline inside a value would start a new field, so it is replaced by a space.
        """
        if self._address is None:
            return
        message = "\n".join(
            f"{key}={value.replace(chr(10), ' ')}" for key, value in fields.items()
        ).encode("utf-8")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(message, self._address)
        except OSError as e:
            log.error(
                "sd_notify {fields} failed: {error}", fields=",".join(fields), error=e.strerror
            )

    def ready(self, status: str = "") -> None:
        """Tell systemd the listeners are up (``READY=1``), with an optional status line."""
        if status:
            self.notify(READY="1", STATUS=status)
        else:
            self.notify(READY="1")

    def stopping(self) -> None:
        """Tell systemd a clean shutdown has begun (``STOPPING=1``)."""
        self.notify(STOPPING="1")

    def reloading(self) -> None:
        """Tell systemd a reload has begun (``RELOADING=1`` stamped with ``CLOCK_MONOTONIC``)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING="1", MONOTONIC_USEC=str(usec))

    def watchdog(self) -> None:
        """Feed the watchdog (``WATCHDOG=1``): proof that the reactor loop still turns."""
        self.notify(WATCHDOG="1")

    def close(self) -> None:
        """Release the datagram socket (a later :meth:`notify` opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class NotifierService(Service):
    """Reports readiness when started, feeds the watchdog, and reports stopping.

    Add it to the application's ``MultiService`` *after* the listening services: a
    ``MultiService`` starts its children in order, so ``READY=1`` then means the sockets are
    bound. It stops first (reverse order), so ``STOPPING=1`` goes out before the listeners close.

    :param notifier: the :class:`Notifier`; its reactor schedules the watchdog pings.
    :param status: the ``STATUS=`` text sent with ``READY=1`` (shown by ``systemctl status``).
    """

    def __init__(self, notifier: Notifier, status: str = "") -> None:
        self.notifier = notifier
        self.status = status
        self._watchdog: LoopingCall | None = None

    def startService(self) -> None:
        """Send ``READY=1`` and start the watchdog pings if systemd asked for them."""
        super().startService()
        self.notifier.ready(self.status)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            self._watchdog = LoopingCall(self.notifier.watchdog)
            self._watchdog.clock = self.notifier.reactor
            self._watchdog.start(interval, now=False)

    def stopService(self) -> None:
        """Stop the watchdog pings and send ``STOPPING=1``."""
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        self.notifier.stopping()
        self.notifier.close()
