"""Request coalescing: concurrent requests for one URL share one upstream fetch.

The first request (the leader) fetches; requests for the same URL arriving before the response
head (followers) wait for it. If followers are waiting and the declared body fits ``limit``, the
leader's relay stops writing to its own client and only fills a :class:`SharedBody` at the
origin's pace; every client, the leader's included, streams it through a
:class:`FollowerProducer` at its own pace, so a slow client never slows the others and memory
stays within ``limit``. Otherwise the shared fetch is closed (:class:`Detached`): followers fetch
on their own and the leader keeps plain backpressure.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from imgproxy.relay import ClientGone, Cut, abort_connection, limit_write_buffer

Header = tuple[bytes, bytes]


@attrs.frozen
class Head:
    """The response head the leader sent, which followers repeat."""

    status: int
    headers: Sequence[Header]


def _untraced(error: Exception) -> Exception:
    """A copy of ``error`` without its traceback, for each reader to raise on its own: one
    shared, raised exception would tie every reader's frames into a reference cycle."""
    return copy.copy(error).with_traceback(None)


class Detached(Exception):
    """The shared fetch cannot serve followers (too large to share): fetch on your own."""


class SharedBody:
    """One upstream body shared between the leader and its followers, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.error: Exception | None = None  # set when the fetch failed or sharing stopped
        self.followers = 0
        self.on_abandoned: Callable[[], None] | None = None  # all readers left mid-body
        self._head: Head | None = None
        self._head_waiters: list[Deferred[Head]] = []
        self._readers: list[Callable[[], None]] = []

    @property
    def joinable(self) -> bool:
        """Whether a new request may still follow this fetch."""
        return self.error is None and not (self.complete and self._head is None)

    def wait_head(self) -> Deferred[Head]:
        """Fires with the head once the leader has one; fails with the leader's error."""
        self.followers += 1
        d: Deferred[Head] = Deferred(lambda _: self._forget(d))
        if self._head is not None:
            d.callback(self._head)
        elif self.error is not None:
            d.errback(Failure(_untraced(self.error)))
        else:
            self._head_waiters.append(d)
        return d

    def join(self) -> None:
        """A reader starts streaming this body (the leader's own client counts too)."""
        self.followers += 1

    def leave(self) -> None:
        """A reader is done or gone; when the last one leaves mid-body, stop the fetch."""
        self.followers -= 1
        if self.followers <= 0 and not self.complete and self.error is None:
            if self.on_abandoned is not None:
                self.on_abandoned()

    def _forget(self, d: Deferred[Head]) -> None:
        if d in self._head_waiters:
            self._head_waiters.remove(d)
            self.leave()

    def set_head(self, head: Head) -> None:
        """The leader's response head is decided (sent to the leader's client)."""
        self._head = head
        waiters, self._head_waiters = self._head_waiters, []
        for d in waiters:
            d.callback(head)

    def append(self, data: bytes) -> None:
        """More body from upstream; past the limit, sharing stops."""
        if self.error is not None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.stop(Detached("body larger than --coalesce-max-size"))
            return
        self.chunks.append(data)
        self._wake()

    def finish(self) -> None:
        """The body is complete."""
        self.complete = True
        self.on_abandoned = None
        self._wake()

    def stop(self, error: Exception) -> None:
        """The fetch failed or cannot be shared: waiting followers get ``error``."""
        if self.error is not None or self.complete:
            return
        self.error = _untraced(error)
        self.chunks = []
        self.on_abandoned = None
        waiters, self._head_waiters = self._head_waiters, []
        for d in waiters:
            d.errback(Failure(_untraced(error)))
        self._wake()

    def on_data(self, reader: Callable[[], None]) -> None:
        self._readers.append(reader)

    def off_data(self, reader: Callable[[], None]) -> None:
        if reader in self._readers:
            self._readers.remove(reader)

    def _wake(self) -> None:
        for reader in list(self._readers):
            reader()


class FollowerProducer:
    """Streams a :class:`SharedBody` to one follower's request at the follower's pace.

    A push producer registered with the request: paused by the client's transport when its
    buffers fill, resumed when they drain. ``done`` fires with the bytes written, or fails with
    :class:`~imgproxy.relay.Cut` when the shared body broke off.
    """

    def __init__(self, request: Request, shared: SharedBody) -> None:
        self._request = request
        self._shared = shared
        self._index = 0
        self._paused = False
        self._stopped = False
        self.sent = 0
        self.error_kind: str | None = None  # why the stream broke off, if it did
        self.done: Deferred[int] = Deferred(lambda _: self.stopProducing())

    def start(self) -> None:
        limit_write_buffer(self._request)
        self._request.registerProducer(self, True)
        self._shared.on_data(self._pump)
        self._pump()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._end(error=Cut(ClientGone("client gone"), self.sent), abort=False)

    def _pump(self) -> None:
        shared = self._shared
        if self._stopped:
            return
        if shared.error is not None:
            self._end(error=Cut(shared.error, self.sent), abort=True)
            return
        chunks = shared.chunks
        while not self._paused and self._index < len(chunks):
            chunk = chunks[self._index]
            self._index += 1
            self.sent += len(chunk)
            self._request.write(chunk)
            if self._stopped:
                return
        if shared.complete and self._index >= len(chunks):
            self._end()

    def _end(self, error: Exception | None = None, abort: bool = False) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._shared.off_data(self._pump)
        self._shared.leave()
        if self._request.channel is not None:
            self._request.unregisterProducer()
        if error is None:
            self._request.finish()
            self.done.callback(self.sent)
            return
        if abort:
            abort_connection(self._request)
        cause = error.cause if isinstance(error, Cut) else error
        self.error_kind = getattr(cause, "kind", "client-gone")
        self.done.errback(Failure(error))
