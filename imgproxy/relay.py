"""The body relay: upstream body -> sniffer -> client, with backpressure and limits.

The relay buffers the first bytes until the sniffer decides (a bounded window), then calls
``start`` so the web front writes the response headers, writes the buffered bytes and registers
the upstream body transport as a *streaming producer* of the client request: from then on a client
that does not read pauses the upstream socket, and memory is bounded by socket buffers, never by
the image size. Any failure on either side tears down both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request

from imgproxy.errors import ProxyError, TooLarge, UpstreamError, UpstreamTimeout
from imgproxy.sniff import Sniffed, Sniffer

# Bytes the client's socket transport may buffer before it pauses the upstream (Twisted's
# default is 64 KiB). A paused relay holds about one upstream socket read (64 KiB at most) plus
# this; 8 KiB measured 13-46 KiB held per slow client, against 116 KiB with the default.
CLIENT_BUFFER = 8192


class ClientGone(Exception):
    """The client went away."""


class Relay(Protocol):
    """Moves one upstream body to one client request.

    ``done`` fires with the number of body bytes written to the client, or fails with a
    :class:`ProxyError` (or :class:`ClientGone`) when nothing was sent yet, so the caller can
    still answer with an error, or with :class:`Cut` when the response had started.
    """

    transport: Any  # the response body's transport: a push producer (pause/resume/stop)

    def __init__(
        self,
        clock: IReactorTime,
        request: Request,
        sniffer: Sniffer,
        start: Callable[[Sniffed], None],
        *,
        max_size: int,
        deadline: float,
        idle_timeout: float,
        tee: Callable[[bytes], None] | None = None,
        keep_going: Callable[[], bool] | None = None,
    ) -> None:
        self._clock = clock
        self._request = request
        self._sniffer = sniffer
        self._start: Callable[[Sniffed], None] | None = start
        self._max_size = max_size
        self._idle_timeout = idle_timeout
        self._tee: Callable[[bytes], None] | None = tee
        # Asked when the client leaves: do others (coalesced followers) still need the body?
        self._keep_going: Callable[[], bool] | None = keep_going
        self._headless = False
        self._pending: list[bytes] | None = []  # chunks held until the sniffer decides
        self._received = 0
        self.sent = 0
        self._last_progress = clock.seconds()
        self._finished = False
        # Why the relay failed, as a metrics kind (not the exception: its traceback would hold
        # this relay's frames in a reference cycle).
        self.error_kind: str | None = None
        self.done: Deferred[int] = Deferred()
        self._timer: IDelayedCall | None = clock.callLater(
            max(deadline - clock.seconds(), 0), self._on_timer
        )

    # -- upstream side -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._received += len(data)
        if self._received > self._max_size:
            self._fail(TooLarge())
            return
        if self._tee is not None:
            self._tee(data)
        pending = self._pending
        if pending is None:
            self._last_progress = self._clock.seconds()
            if not self._headless:
                self.sent += len(data)
                self._request.write(data)
            return
        pending.append(data)
        try:
            sniffed = self._sniffer.feed(data)
        except ProxyError as e:
            self._fail(e)
            return
        if sniffed is not None:
            self._begin(sniffed)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._finished:
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self._fail(UpstreamError("Bad Gateway: upstream connection lost", kind="reset"),
                       abort_upstream=False)
            return
        if self._pending is not None:
            try:
                sniffed = self._sniffer.finish()
            except ProxyError as e:
                self._fail(e, abort_upstream=False)
                return
            self._begin(sniffed)
            if self._finished:
                return
        self._finish()

    # -- client side ---------------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client disconnected: stop the upstream body at once, unless others share it."""
        if self._finished or self._headless:
            return
        if self._keep_going is not None and self._keep_going():
            # Coalesced followers still read this body: go on reading without a client.
            self._headless = True
            if self._pending is None and self.transport is not None:
                self.transport.resumeProducing()
            return
        self._fail(ClientGone("client disconnected"), abort_client=False)

    def go_headless(self) -> None:
        """Stop writing to this relay's own client: the body goes only to ``tee`` (shared)."""
        self._headless = True

    def abandon(self) -> None:
        """Nobody needs the body any more: stop the upstream."""
        self._fail(ClientGone("all clients left"), abort_client=False)

    # -- internals -----------------------------------------------------------------------------

    def _begin(self, sniffed: Sniffed) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        start, self._start = self._start, None  # (the callback may hold this relay: no cycle)
        assert start is not None
        try:
            start(sniffed)
        except ProxyError as e:
            self._pending = pending
            self._fail(e)
            return
        self._last_progress = self._clock.seconds()
        self._rearm(self._idle_timeout)
        if self._headless:
            return
        limit_write_buffer(self._request)
        self._request.registerProducer(self.transport, True)
        for chunk in pending:
            self.sent += len(chunk)
            self._request.write(chunk)

    def _finish(self) -> None:
        self._finished = True
        self._cancel_timer()
        if not self._headless:
            self._request.unregisterProducer()
            self._request.finish()
        self._release()
        self.done.callback(self.sent)

    def _release(self) -> None:
        """Drop references that would keep this relay and its buffers in reference cycles."""
        self.transport = None
        self._tee = self._keep_going = self._start = None

    def _fail(
        self, error: Exception, abort_upstream: bool = True, abort_client: bool = True
    ) -> None:
        if self._finished:
            return
        self._finished = True
        self.error_kind = getattr(error, "kind", "client-gone")
        self._cancel_timer()
        if abort_upstream and self.transport is not None:
            self.transport.stopProducing()
        if self._pending is None or self._headless:
            # Headers (and maybe bytes) are out: the client must see a cut, never a short 200.
            if self._request.channel is not None and not self._headless:
                self._request.unregisterProducer()
            if abort_client:
                abort_connection(self._request)
            error = Cut(error, self.sent)
        self._release()
        self.done.errback(Failure(error))

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending is not None:
            self._fail(UpstreamTimeout())
            return
        idle = self._clock.seconds() - self._last_progress
        if idle >= self._idle_timeout:
            self._fail(UpstreamTimeout("relay idle"))
        else:
            self._rearm(self._idle_timeout - idle)

    def _rearm(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class Cut(Exception):
    """A relay cut after the headers went out: ``cause`` says why, ``sent`` how much went."""

    def __init__(self, cause: Exception, sent: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.sent = sent


def limit_write_buffer(request: Request) -> None:
    """Make the client's socket transport pause its producer at :data:`CLIENT_BUFFER`."""
    transport: Any = request.channel.transport if request.channel is not None else None
    if transport is not None and hasattr(transport, "socket"):
        transport.bufferSize = CLIENT_BUFFER


def abort_connection(request: Request) -> None:
    """Abort the client connection (RST), so a cut response cannot pass as complete."""
    channel = request.channel
    transport: Any = channel.transport if channel is not None else None
    if transport is not None:
        transport.abortConnection()
