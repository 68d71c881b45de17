"""Python HTTP/1.1 clients for the benchmark: a fallback load generator, slow readers, idle crowds.

All three use non-blocking sockets and one ``selectors`` loop in the calling thread, so the whole
client side stays on the CPU the harness is pinned to. They speak just enough HTTP/1.1 for the
benchmark: ``GET``, keep-alive, ``Content-Length`` or chunked bodies.
"""

from __future__ import annotations

import errno
import random
import selectors
import socket
import statistics
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT pile-up between runs


def request_bytes(host: str, port: int, path: str) -> bytes:
    """The bytes of one keep-alive ``GET`` request."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: imageproxy-bench\r\n"
        "Accept: image/*\r\n\r\n"
    ).encode("ascii")


class ResponseParser:
    """Incremental parser of one HTTP/1.1 response: status, headers, body length, completion."""

    def __init__(self) -> None:
        self.status = 0
        self.header_bytes = 0
        self.body_bytes = 0
        self.done = False
        self.keep_alive = True
        self._head = b""
        self._length: int | None = None
        self._chunked = False
        self._chunk_left = 0
        self._chunk_state = "size"
        self._chunk_buf = b""
        self._in_headers = True

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return bytes past the end of this response (a pipelined next one)."""
        if self._in_headers:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    raise ValueError("response head too long")
                return b""
            head, data = self._head[: end + 4], self._head[end + 4 :]
            self._head = b""
            self._in_headers = False
            self.header_bytes = len(head)
            self._parse_head(head)
            if self._length == 0 and not self._chunked:
                self.done = True
                return data
        if self._chunked:
            return self._feed_chunked(data)
        if self._length is None:  # delimited by close: everything is body
            self.body_bytes += len(data)
            return b""
        take = min(len(data), self._length - self.body_bytes)
        self.body_bytes += take
        if self.body_bytes >= self._length:
            self.done = True
        return data[take:]

    def eof(self) -> None:
        """The connection closed: a close-delimited body ends here."""
        if not self._in_headers and self._length is None and not self._chunked:
            self.done = True

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError("not an HTTP/1.x response")
        self.status = int(parts[1])
        if parts[0] == b"HTTP/1.0":
            self.keep_alive = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                self._length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"connection":
                self.keep_alive = value.lower() != b"close"
        if self._length is None and not self._chunked:
            self.keep_alive = False

    def _feed_chunked(self, data: bytes) -> bytes:
        buf = self._chunk_buf + data
        self._chunk_buf = b""
        while True:
            if self._chunk_state == "data":
                take = min(len(buf), self._chunk_left)
                self.body_bytes += take
                self._chunk_left -= take
                buf = buf[take:]
                if self._chunk_left:
                    return b""
                self._chunk_state = "crlf"
            end = buf.find(b"\r\n")
            if end < 0:
                self._chunk_buf = buf
                return b""
            line, buf = buf[:end], buf[end + 2 :]
            if self._chunk_state == "crlf":
                if line:
                    raise ValueError("missing CRLF after a chunk")
                self._chunk_state = "size"
            elif self._chunk_state == "size":
                size = int(line.split(b";")[0], 16)
                self._chunk_left = size
                self._chunk_state = "data" if size else "trailer"
            elif not line:  # the empty line that ends the trailers
                self.done = True
                return buf


def _percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class _LoadConn:
    sock: socket.socket | None = None
    parser: ResponseParser | None = None
    started: float = 0.0
    request: bytes = b""


def python_load(
    host: str,
    port: int,
    paths: Sequence[str],
    connections: int,
    duration: float,
    timeout: float = 10.0,
    start: int | None = None,
) -> dict[str, float]:
    """A keep-alive closed-loop load generator, used when ``wrk`` is missing.

    Requests go round-robin over ``paths`` from index ``start`` (default: a random one).
    Returns the same fields as the harness's wrk Lua ``done()`` hook: requests, bytes (whole
    responses), duration_us, error counts and latency percentiles in microseconds.
    """
    sel = selectors.DefaultSelector()
    requests = [request_bytes(host, port, p) for p in paths]
    next_index = (random.randrange(len(requests)) if start is None else start - 1) \
        % len(requests)
    latencies: list[float] = []
    stats = {"requests": 0, "bytes": 0, "connect": 0, "read": 0, "write": 0, "status": 0,
             "timeout": 0}

    def open_conn(conn: _LoadConn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            stats["connect"] += 1
            sock.close()
            conn.sock = None
            return
        conn.sock = sock
        conn.parser = None
        sel.register(sock, selectors.EVENT_WRITE, conn)

    def send_next(conn: _LoadConn) -> None:
        nonlocal next_index
        assert conn.sock is not None
        next_index = (next_index + 1) % len(requests)
        conn.request = requests[next_index]
        conn.parser = ResponseParser()
        conn.started = time.perf_counter()
        try:
            conn.sock.send(conn.request)
        except OSError:
            stats["write"] += 1
            drop(conn)
            return
        sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def drop(conn: _LoadConn) -> None:
        if conn.sock is not None:
            sel.unregister(conn.sock)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            conn.sock.close()
            conn.sock = None

    conns = [_LoadConn() for _ in range(connections)]
    for conn in conns:
        open_conn(conn)
    start = time.perf_counter()
    end = start + duration
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        for key, _events in sel.select(timeout=min(0.05, end - now)):
            conn = key.data
            if conn.parser is None:  # connect finished
                if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    stats["connect"] += 1
                    drop(conn)
                    continue
                send_next(conn)
                continue
            try:
                data = conn.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                conn.parser.eof()
                if not conn.parser.done:
                    stats["read"] += 1
                drop(conn)
                continue
            stats["bytes"] += len(data)
            try:
                conn.parser.feed(data)
            except ValueError:
                stats["read"] += 1
                drop(conn)
                continue
            if conn.parser.done:
                latencies.append(time.perf_counter() - conn.started)
                stats["requests"] += 1
                if conn.parser.status >= 400:
                    stats["status"] += 1
                if conn.parser.keep_alive:
                    send_next(conn)
                else:
                    drop(conn)
        now = time.perf_counter()
        for conn in conns:
            if conn.sock is None and now < end:
                open_conn(conn)
            elif conn.parser is not None and not conn.parser.done and now - conn.started > timeout:
                stats["timeout"] += 1
                drop(conn)
    elapsed = time.perf_counter() - start
    for conn in conns:
        drop(conn)
    sel.close()
    latencies.sort()
    result: dict[str, float] = dict(stats)
    result["duration_us"] = elapsed * 1e6
    result["p50"] = _percentile(latencies, 50) * 1e6
    result["p90"] = _percentile(latencies, 90) * 1e6
    result["p99"] = _percentile(latencies, 99) * 1e6
    result["max"] = (latencies[-1] if latencies else 0.0) * 1e6
    result["mean"] = (statistics.fmean(latencies) if latencies else 0.0) * 1e6
    return result


@dataclass
class _SlowClient:
    sock: socket.socket
    parser: ResponseParser = field(default_factory=ResponseParser)
    received: int = 0
    budget: float = 0.0
    closed: bool = False


class SlowClients:
    """Clients that each fetch one URL but read it slowly through a small receive buffer.

    ``SO_RCVBUF`` is set before ``connect`` so that the advertised window stays small; each client
    then reads at most ``rate`` bytes per second. The harness reads :attr:`delivered` (response
    bytes that reached the application) and compares it with what the origin sent.
    """

    def __init__(self, host: str, port: int, paths: Sequence[str], rcvbuf: int, rate: float,
                 mss: int = 1460):
        self._mss = mss
        self._host = host
        self._port = port
        self._paths = list(paths)
        self._rcvbuf = rcvbuf
        self._rate = rate
        self.clients: list[_SlowClient] = []
        self.connect_errors = 0

    def start(self, timeout: float = 10.0) -> None:
        """Connect every client and send its request."""
        for path in self._paths:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            if self._mss:
                # Loopback's 64 KiB segments would let the server's send buffer autotune to
                # megabytes; a WAN-sized MSS keeps the kernel's share realistic.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self._mss)
            sock.settimeout(timeout)
            try:
                sock.connect((self._host, self._port))
                sock.sendall(request_bytes(self._host, self._port, path))
            except OSError:
                self.connect_errors += 1
                sock.close()
                continue
            sock.setblocking(False)
            self.clients.append(_SlowClient(sock))

    def read_for(self, seconds: float, tick: float = 0.05) -> None:
        """Read at the configured rate for ``seconds``."""
        deadline = time.monotonic() + seconds
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            allowance = self._rate * (now - last)
            last = now
            for client in self.clients:
                if client.closed:
                    continue
                # A client never banks more than two ticks of reading.
                client.budget = min(client.budget + allowance, 2 * tick * self._rate)
                want = int(client.budget)
                if want <= 0:
                    continue
                try:
                    data = client.sock.recv(want)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    client.closed = True
                    continue
                client.budget -= len(data)
                client.received += len(data)
                if client.parser.status == 0 or client.parser.header_bytes == 0:
                    try:
                        client.parser.feed(data)
                    except ValueError:
                        client.closed = True
            time.sleep(max(0.0, min(tick, deadline - time.monotonic())))

    @property
    def delivered(self) -> int:
        """Response bytes (head and body) that reached the clients."""
        return sum(c.received for c in self.clients)

    @property
    def delivered_body(self) -> int:
        """Body bytes that reached the clients."""
        return sum(max(0, c.received - c.parser.header_bytes) for c in self.clients)

    def statuses(self) -> dict[int, int]:
        """How many clients saw each response status (0: no complete head yet)."""
        counts: dict[int, int] = {}
        for c in self.clients:
            counts[c.parser.status] = counts.get(c.parser.status, 0) + 1
        return counts

    def closed_early(self) -> int:
        """Clients whose connection the server closed before the end."""
        return sum(1 for c in self.clients if c.closed)

    def close(self) -> None:
        """Drop every connection (a reset: unread data is discarded)."""
        for c in self.clients:
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            c.sock.close()
        self.clients = []


class IdleCrowd:
    """Many concurrent connections that first sit idle, then each make one request."""

    def __init__(self, host: str, port: int, count: int):
        self._host = host
        self._port = port
        self._count = count
        self.socks: list[socket.socket] = []
        self.connect_errors = 0

    def connect(self, deadline_s: float, in_flight: int = 256) -> int:
        """Open the connections, at most ``in_flight`` handshakes at a time; return how many."""
        sel = selectors.DefaultSelector()
        pending = 0
        started = 0
        deadline = time.monotonic() + deadline_s
        while (started < self._count or pending) and time.monotonic() < deadline:
            while started < self._count and pending < in_flight:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                started += 1
                err = sock.connect_ex((self._host, self._port))
                if err == 0:
                    self.socks.append(sock)
                elif err == errno.EINPROGRESS:
                    sel.register(sock, selectors.EVENT_WRITE)
                    pending += 1
                else:
                    self.connect_errors += 1
                    sock.close()
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                sel.unregister(sock)
                pending -= 1
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.connect_errors += 1
                    sock.close()
                else:
                    self.socks.append(sock)
        for key in list(sel.get_map().values()):
            key.fileobj.close()
            self.connect_errors += 1
        sel.close()
        return len(self.socks)

    def request_all(self, path: str, expected_body: int, deadline_s: float) -> dict[str, float]:
        """Send one request on every open connection and read all responses.

        :returns: counts of complete ``200`` responses with the expected body length (``ok``),
            other statuses, failures, and the seconds until the last response.
        """
        sel = selectors.DefaultSelector()
        req = request_bytes(self._host, self._port, path)
        parsers: dict[socket.socket, ResponseParser] = {}
        result = {"ok": 0, "bad_status": 0, "bad_length": 0, "failed": 0, "unfinished": 0}
        start = time.monotonic()
        for sock in self.socks:
            try:
                sock.send(req)
            except OSError:
                result["failed"] += 1
                continue
            parsers[sock] = ResponseParser()
            sel.register(sock, selectors.EVENT_READ)
        deadline = start + deadline_s
        last = start
        while parsers and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                sock = key.fileobj
                parser = parsers[sock]
                try:
                    data = sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                try:
                    if data:
                        parser.feed(data)
                    else:
                        parser.eof()
                except ValueError:
                    data = b""
                if parser.done or not data:
                    sel.unregister(sock)
                    del parsers[sock]
                    last = time.monotonic()
                    if not parser.done:
                        result["failed"] += 1
                    elif parser.status != 200:
                        result["bad_status"] += 1
                        key = f"status_{parser.status}"
                        result[key] = result.get(key, 0) + 1
                    elif parser.body_bytes != expected_body:
                        result["bad_length"] += 1
                    else:
                        result["ok"] += 1
        result["unfinished"] = len(parsers)
        sel.close()
        out: dict[str, float] = dict(result)
        out["seconds"] = last - start
        return out

    def close(self) -> None:
        """Reset every connection."""
        for sock in self.socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            sock.close()
        self.socks = []
