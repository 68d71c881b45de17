"""Operations through the real daemon: metrics, manhole, socket activation, sd_notify, logs.

Each test starts ``twistd -n imageproxy`` (or systemd-socket-activate running it) as a child
process on loopback and talks to it only from outside: HTTP, OpenSSH, a datagram socket, stdout.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.server import NOT_DONE_YET

from imgproxy import __version__
from imgproxy.logs import url_hash
from imgproxy.urls import Signer
from tests.conftest import JPEG, PNG, free_port, image, sleep
from tests.test_daemon import ENV, TWISTD, TWISTD_BIN, Daemon, start_daemon

KEY = b"ops-key"
SIGNER = Signer((KEY,))
LOOPBACK_ARGS = ["--allow-network", "127.0.0.1/32"]
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


# -- helpers ------------------------------------------------------------------------------------


class Child(Daemon):
    """A child process whose stdout and stderr are also kept apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout = b""
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        self.output += data


def listen_arg(port: int) -> str:
    """A loopback TCP endpoint string for ``port``."""
    return f"tcp:{port}:interface=127.0.0.1"


def launch(argv: list[str], env: dict[str, str]) -> Child:
    """Spawn ``argv`` (argv[0] is the executable) with ``env``, in the repository directory."""
    child = Child()
    reactor.spawnProcess(child, argv[0], argv, env=env, path=os.getcwd())
    return child


async def wait_healthy(child: Daemon, port: int, pool: Any, attempts: int = 200) -> None:
    """Poll /healthz on ``port`` until it answers 200; fail with the child's output if not."""
    for _ in range(attempts):
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/healthz", pool=pool)
            await treq.content(response)
            if response.code == 200:
                return
        except Exception:
            pass
        if child.ended.called:
            break
        await sleep(0.05)
    raise AssertionError(f"daemon did not start: {child.output.decode(errors='replace')}")


async def stop(child: Daemon) -> None:
    """SIGTERM the child (if still running) and wait, boundedly, for it to end."""
    if not child.ended.called:
        child.transport.signalProcess("TERM")
    await child.ended.addTimeout(15, reactor)


async def get(url: str, pool: Any) -> tuple[int, Any, bytes]:
    """GET ``url``: status, headers and body."""
    response = await treq.get(url, pool=pool)
    return response.code, response.headers, await treq.content(response)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """The daemon's HMAC key file."""
    path = tmp_path / "keys"
    path.write_bytes(KEY + b"\n")
    return path


def daemon_args(key_file: Path, port: int, *extra: str) -> list[str]:
    """Arguments for a daemon on loopback ``port`` that may fetch from loopback origins."""
    return ["--key-file", str(key_file), "--listen", listen_arg(port), *LOOPBACK_ARGS, *extra]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, keyed by name and label set."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(table: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """One sample's value (0 when absent, as Prometheus treats a missing series)."""
    return table.get((name, frozenset(labels.items())), 0.0)


# -- 1. metrics ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_endpoint_counts_requests_without_hosts_or_urls(origin, key_file,
                                                                      client_pool):
    """--metrics serves Prometheus text: request counters by class and reason, the duration
    histogram, limiter counters, build and process info, and no host or URL in any label."""
    port, metrics_port = free_port(), free_port()
    url = origin.route("/cat.jpg", image(JPEG))
    origin_port = str(origin.port.getHost().port)
    daemon = await start_daemon(
        daemon_args(key_file, port, "--metrics", listen_arg(metrics_port)), port, client_pool)
    try:
        scrape_url = f"http://127.0.0.1:{metrics_port}/metrics"
        code, headers, before_text = await get(scrape_url, client_pool)
        assert code == 200
        assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=")
        before = samples(before_text.decode())

        good = f"http://127.0.0.1:{port}{SIGNER.hex_path(url.encode())}"
        code, _, body = await get(good, client_pool)
        assert (code, body) == (200, JPEG)
        forged = f"http://127.0.0.1:{port}{Signer((b'not-the-key',)).hex_path(url.encode())}"
        code, _, _ = await get(forged, client_pool)
        assert code == 403
        code, _, _ = await get(f"http://127.0.0.1:{port}/metrics", client_pool)
        assert code == 404  # metrics only on their own listener

        code, _, after_text = await get(scrape_url, client_pool)
        assert code == 200
        text = after_text.decode()
        after = samples(text)
    finally:
        await stop(daemon)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "imageproxy_requests_total"
    assert delta(requests, code_class="2xx", reason="ok") == 1
    assert delta(requests, code_class="4xx", reason="bad-signature") == 1
    duration = "imageproxy_request_duration_seconds"
    assert delta(duration + "_count", code_class="2xx") == 1
    assert delta(requests, code_class="4xx", reason="not-found") == 1  # /metrics on the proxy
    assert delta(duration + "_count", code_class="4xx") == 2
    assert value(after, duration + "_bucket", code_class="4xx", le="+Inf") >= 1
    assert delta("imageproxy_response_bytes_total") == len(JPEG)
    assert delta("imageproxy_ratelimit_admitted_total") == 1  # the forgery never got that far
    assert value(after, "imageproxy_ratelimit_refused_total") == 0
    assert ("imageproxy_ratelimit_delayed_total", frozenset()) in after
    assert ("imageproxy_ratelimit_tracked_hosts", frozenset()) in after
    assert value(after, "imageproxy_upstream_errors_total", kind="dns") == 0
    builds = [(dict(labels), v) for (name, labels), v in after.items()
              if name == "imageproxy_build_info"]
    assert len(builds) == 1 and builds[0][1] == 1
    assert builds[0][0]["version"] == __version__
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in after)
    assert not any(name.endswith("_created") for name, _ in after)
    for (name, labels) in after:
        for label, label_value in labels:
            for secret in ("127.0.0.1", origin_port, "cat.jpg", url, url.encode().hex()):
                assert secret not in label_value, (name, label, label_value)
    assert url.encode().hex() not in text and "cat.jpg" not in text


# -- shared helpers for the tests below ---------------------------------------------------------


async def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` on the reactor until it is true or ``timeout`` seconds have passed."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            return False
        await sleep(0.02)
    return True


async def run_twistd(args: list[str]) -> tuple[bytes, bytes, int]:
    """Run ``twistd -n imageproxy ARGS`` to its end: stdout, stderr and exit status."""
    out, err, code = await getProcessOutputAndValue(
        TWISTD_BIN, TWISTD[1:] + args, env=ENV, path=os.getcwd())
    return out, err, code


def one_stderr_line(out: bytes, err: bytes) -> str:
    """The single non-blank stderr line of a failed start (fails if there are more)."""
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    assert len(lines) == 1, err.decode(errors="replace")
    assert b"Traceback" not in out + err
    return lines[0]


# -- 2. manhole over OpenSSH --------------------------------------------------------------------

needs_openssh = pytest.mark.skipif(SSH is None or SSH_KEYGEN is None,
                                   reason="OpenSSH client or ssh-keygen not installed")


async def ssh_keygen(path: Path) -> Path:
    """Generate an unencrypted ed25519 key pair at ``path`` (and ``path.pub``)."""
    assert SSH_KEYGEN is not None
    out, err, code = await getProcessOutputAndValue(
        SSH_KEYGEN, ["-q", "-t", "ed25519", "-N", "", "-C", "op@test", "-f", str(path)], env=ENV)
    assert code == 0, err
    return path


async def manhole_keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A host key (mode 600), a client key and an authorized_keys file admitting it."""
    host_key = await ssh_keygen(tmp_path / "host_ed25519")
    client_key = await ssh_keygen(tmp_path / "client_ed25519")
    os.chmod(host_key, 0o600)
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes(Path(str(client_key) + ".pub").read_bytes())
    os.chmod(authorized, 0o600)
    return host_key, client_key, authorized


async def ssh_session(port: int, key: Path, script: str, tmp_path: Path) -> tuple[str, str, int]:
    """``ssh -T op@127.0.0.1 < script`` with OpenSSH, without blocking: stdout, stderr, status."""
    assert SSH is not None
    stdin = tmp_path / "stdin.py"
    stdin.write_text(script)
    ssh = [SSH, "-T", "-F", "/dev/null", "-p", str(port), "-i", str(key),
           "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
           "-o", "ConnectTimeout=20", "op@127.0.0.1"]
    # sh runs ssh with its stdin redirected from the script file ($0).
    out, err, code = await getProcessOutputAndValue(
        "/bin/sh", ["-c", 'exec "$@" < "$0"', str(stdin), *ssh], env=ENV)
    return out.decode(errors="replace"), err.decode(errors="replace"), code


@needs_openssh
@pytest_twisted.ensureDeferred
async def test_manhole_inspects_and_tunes_the_live_daemon(origin, key_file, client_pool, tmp_path):
    """Through real OpenSSH the manhole reads the live config and limiter, and a limit set there
    takes effect at once: the next requests to that origin get 503 with Retry-After."""
    host_key, client_key, authorized = await manhole_keys(tmp_path)
    port, ssh_port = free_port(), free_port()
    origin_key = f"127.0.0.1:{origin.port.getHost().port}"
    urls = [origin.route("/a.jpg", image(JPEG)), origin.route("/b.png", image(PNG, b"image/png"))]
    daemon = await start_daemon(daemon_args(
        key_file, port, "--manhole", listen_arg(ssh_port), "--manhole-keys", str(authorized),
        "--manhole-host-key", str(host_key), "--max-size", "123456", "--queue-timeout", "0.2",
    ), port, client_pool)
    try:
        out, err, code = await ssh_session(
            ssh_port, client_key, "config.max_size\nlimiter.tracked_hosts\n", tmp_path)
        assert (out.split(), code) == (["123456", "0"], 0), err

        out, err, code = await ssh_session(
            ssh_port, client_key,
            f"from imgproxy.ratelimit import Limits\n"
            f"limiter.set_limits({origin_key!r}, Limits(1, 1))\n", tmp_path)
        assert (out, code) == ("", 0), err

        # Both at once: the first takes the only token, the second would wait ~1 s > 0.2 s.
        results = await gatherResults([
            ensureDeferred(get(f"http://127.0.0.1:{port}{SIGNER.hex_path(u.encode())}",
                               client_pool)) for u in urls])
        assert sorted(code for code, _, _ in results) == [200, 503]
        refused = next(headers for code, headers, _ in results if code == 503)
        assert refused.getRawHeaders(b"retry-after") == [b"1"]

        out, err, code = await ssh_session(
            ssh_port, client_key, f"limiter.bucket_info({origin_key!r})\nlimiter.refused\n",
            tmp_path)
        assert code == 0, err
        info_line, refused_count = out.strip().splitlines()
        info = ast.literal_eval(info_line)
        assert (info["key"], info["rate"], info["burst"], info["throttled"]) == (
            origin_key, 1.0, 1, True)
        assert refused_count == "1"

        out, err, code = await ssh_session(ssh_port, client_key, "no_such_name\n", tmp_path)
        assert code == 1 and "NameError" in out, (out, err)
    finally:
        await stop(daemon)
    assert b"Traceback" not in daemon.output


@pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen not installed")
@pytest_twisted.ensureDeferred
async def test_manhole_host_key_readable_by_group_stops_startup(key_file, tmp_path):
    """A manhole host key with mode 640 stops startup with one line naming the option."""
    host_key, _, authorized = await manhole_keys(tmp_path)
    os.chmod(host_key, 0o640)
    assert stat.S_IMODE(host_key.stat().st_mode) == 0o640
    out, err, code = await run_twistd(daemon_args(
        key_file, free_port(), "--manhole", listen_arg(free_port()),
        "--manhole-keys", str(authorized), "--manhole-host-key", str(host_key)))
    assert code != 0
    assert one_stderr_line(out, err).startswith("imageproxy: --manhole-host-key:")


# -- 3. socket activation -----------------------------------------------------------------------


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed")
@pytest_twisted.ensureDeferred
async def test_socket_activation_starts_on_first_connection(origin, key_file, client_pool):
    """Under systemd-socket-activate the daemon starts on the first connection, serves on the
    inherited socket (/healthz and a proxied image) and stops cleanly on SIGTERM."""
    assert SOCKET_ACTIVATE is not None
    port = free_port()
    url = origin.route("/a.jpg", image(JPEG))
    child = launch([
        SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=http", TWISTD_BIN, *TWISTD[1:],
        "--listen", "systemd:domain=INET:index=0", "--key-file", str(key_file), *LOOPBACK_ARGS,
    ], ENV)
    try:
        assert await wait_for(lambda: b"Listening on" in child.output or child.ended.called), \
            child.output
        assert b"Execing" not in child.output  # nothing started before a connection came
        await wait_healthy(child, port, client_pool)
        assert b"Execing" in child.output and b"serving on systemd:" in child.output
        code, _, body = await get(f"http://127.0.0.1:{port}{SIGNER.hex_path(url.encode())}",
                                  client_pool)
        assert (code, body) == (200, JPEG)
    finally:
        await stop(child)
    assert b"Traceback" not in child.output
    assert b"Server Shut Down" in child.output


# -- 4. sd_notify -------------------------------------------------------------------------------


class Notifications(DatagramProtocol):
    """Collects sd_notify datagrams; on the first READY=1 it connects to the given ports."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.check_ports: list[int] = []
        self.connects: list[Deferred[Any]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        if fields.get("READY") == "1" and not self.connects:
            # Right now, before anything else runs: READY must mean the ports accept.
            self.connects = [
                TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
                    Factory.forProtocol(Protocol))
                for port in self.check_ports
            ]

    def count(self, key: str) -> int:
        """How many datagrams carried ``key=1``."""
        return sum(1 for m in self.messages if m.get(key) == "1")


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, Notifications]]:
    """A listening AF_UNIX datagram socket standing in for systemd's notify socket."""
    directory = tempfile.mkdtemp(prefix="notify-")  # short: AF_UNIX paths are limited
    path = os.path.join(directory, "notify")
    protocol = Notifications()
    port = reactor.listenUNIXDatagram(path, protocol)
    yield path, protocol
    pytest_twisted.blockon(port.stopListening() or succeed(None))
    shutil.rmtree(directory, ignore_errors=True)


def notify_env(path: str, **extra: str) -> dict[str, str]:
    """The daemon's environment with ``NOTIFY_SOCKET`` (and no inherited watchdog variables)."""
    env = {k: v for k, v in ENV.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    return {**env, "NOTIFY_SOCKET": path, **extra}


@pytest.mark.parametrize("watchdog", [False, True], ids=["plain", "watchdog"])
@pytest_twisted.ensureDeferred
async def test_sd_notify_ready_watchdog_stopping(notify_socket, key_file, client_pool, watchdog):
    """READY=1 comes first, once, when the HTTP and metrics ports already accept; WATCHDOG=1
    follows only when WATCHDOG_USEC asks for it; STOPPING=1 comes on SIGTERM."""
    path, notes = notify_socket
    port, metrics_port = free_port(), free_port()
    notes.check_ports = [port, metrics_port]
    extra = {"WATCHDOG_USEC": "400000"} if watchdog else {}
    child = launch([TWISTD_BIN, *TWISTD[1:], *daemon_args(
        key_file, port, "--metrics", listen_arg(metrics_port))], notify_env(path, **extra))
    try:
        await wait_for(lambda: notes.messages or child.ended.called, 20)
        assert notes.messages, child.output
        assert notes.messages[0].get("READY") == "1", notes.messages
        for connecting in notes.connects:
            protocol = await connecting  # refused would raise: READY came before the listener
            protocol.transport.loseConnection()
        await wait_healthy(child, port, client_pool)
        if watchdog:
            assert await wait_for(lambda: notes.count("WATCHDOG") >= 2), notes.messages
    finally:
        await stop(child)
    assert await wait_for(lambda: notes.count("STOPPING") >= 1, 5), notes.messages
    assert notes.count("READY") == 1
    if not watchdog:
        assert notes.count("WATCHDOG") == 0
    assert b"Traceback" not in child.output


@pytest_twisted.ensureDeferred
async def test_stopping_is_sent_before_the_drain(notify_socket, origin, key_file, client_pool):
    """On SIGTERM, STOPPING=1 goes out while an in-flight relay is still draining, not after it;
    the relay then completes."""
    path, notes = notify_socket
    port = free_port()
    body = JPEG + b"\x00" * 20000
    held: list[Any] = []
    started: Deferred[None] = Deferred()

    def slow(request: Any) -> Any:
        request.setHeader(b"content-type", b"image/jpeg")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body[:8000])
        held.append(request)
        started.callback(None)
        return NOT_DONE_YET

    def release() -> None:
        for request in held:
            if not request.finished and not request._disconnected:
                request.write(body[8000:])
                request.finish()

    url = origin.route("/slow.jpg", slow)
    child = launch([TWISTD_BIN, *TWISTD[1:], *daemon_args(key_file, port, "--drain-timeout", "5")],
                   notify_env(path))
    try:
        await wait_healthy(child, port, client_pool)

        async def fetch() -> tuple[int, bytes]:
            code, _, content = await get(
                f"http://127.0.0.1:{port}{SIGNER.hex_path(url.encode())}", client_pool)
            return code, content

        relay = ensureDeferred(fetch())
        await started.addTimeout(10, reactor)
        child.transport.signalProcess("TERM")
        # Within the 5 s drain bound, while the origin still holds the rest of the body.
        assert await wait_for(lambda: notes.count("STOPPING") >= 1, 4), notes.messages
        assert not relay.called
        release()
        assert await relay == (200, body)
    finally:
        release()
        await stop(child)
    assert b"drain timeout" not in child.output


# -- 5. logs ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_json_logs_at_warn_keep_access_lines(origin, key_file, client_pool):
    """--log-format json --log-level warn: stdout is JSON lines only, stderr is empty, info
    lines are dropped, and each request still gets one access line (host, hash, bytes; no URL,
    no client address)."""
    port = free_port()
    origin_key = f"127.0.0.1:{origin.port.getHost().port}"
    targets = {origin.route("/cat.jpg", image(JPEG)): JPEG,
               origin.route("/dog.png", image(PNG, b"image/png")): PNG}
    child = launch([TWISTD_BIN, *TWISTD[1:], *daemon_args(
        key_file, port, "--log-format", "json", "--log-level", "warn")], ENV)
    try:
        await wait_healthy(child, port, client_pool)
        for target, expected in targets.items():
            code, _, content = await get(
                f"http://127.0.0.1:{port}{SIGNER.hex_path(target.encode())}", client_pool)
            assert (code, content) == (200, expected)
    finally:
        await stop(child)
    assert child.stderr == b""
    records = [json.loads(line) for line in child.stdout.decode().splitlines()]
    assert all(isinstance(r, dict) for r in records)
    access = [r for r in records if r["namespace"] == "imgproxy.access"]
    by_hash = {r["url_hash"]: r for r in access}
    assert len(access) == len(by_hash) == 2
    for target, expected in targets.items():
        record = by_hash[url_hash(target)]
        assert (record["host"], record["bytes_sent"], record["status"]) == (
            origin_key, len(expected), 200)
        assert "client_ip" not in record
    assert not any("serving on" in r["message"] for r in records)
    assert all(r["level"] != "info" for r in records if r["namespace"] != "imgproxy.access")
    for target in targets:
        assert target.encode() not in child.stdout
        assert target.encode().hex().encode() not in child.stdout
    assert b"cat.jpg" not in child.stdout and b"dog.png" not in child.stdout


@pytest_twisted.ensureDeferred
async def test_no_access_log_writes_no_access_line(origin, key_file, client_pool):
    """--no-access-log: a proxied request leaves no access line, while info lines still show."""
    port = free_port()
    url = origin.route("/cat.jpg", image(JPEG))
    child = launch([TWISTD_BIN, *TWISTD[1:], *daemon_args(
        key_file, port, "--log-format", "json", "--no-access-log")], ENV)
    try:
        await wait_healthy(child, port, client_pool)
        code, _, _ = await get(f"http://127.0.0.1:{port}{SIGNER.hex_path(url.encode())}",
                               client_pool)
        assert code == 200
    finally:
        await stop(child)
    records = [json.loads(line) for line in child.stdout.decode().splitlines()]
    assert any("serving on" in r["message"] for r in records)
    assert not any(r["namespace"] == "imgproxy.access" for r in records)


# -- 6. startup failures ------------------------------------------------------------------------

LISTEN_FAILURES = {
    "listen-in-use": "imageproxy: --listen: cannot listen",
    "metrics-in-use": "imageproxy: --metrics: cannot listen",
    "no-inherited-socket": "imageproxy: --listen:",
}


async def listen_failure(key_file: Path, case: str) -> tuple[bytes, bytes, int]:
    """Start the daemon on a port that is taken, or on an inherited socket that is not there."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        args = {
            "listen-in-use": daemon_args(key_file, busy_port),
            "metrics-in-use": daemon_args(key_file, free_port(), "--metrics",
                                          listen_arg(busy_port)),
            "no-inherited-socket": ["--key-file", str(key_file),
                                    "--listen", "systemd:domain=INET:index=0"],
        }[case]
        return await run_twistd(args)


@pytest.mark.parametrize("case", list(LISTEN_FAILURES))
@pytest_twisted.ensureDeferred
async def test_listen_failures_are_one_line(key_file, case):
    """A port already in use (proxy or metrics) or a missing inherited socket stops startup with
    a non-zero exit, no traceback, and one line naming the option (wherever it is written)."""
    out, err, code = await listen_failure(key_file, case)
    assert code != 0
    text = (out + err).decode(errors="replace")
    assert "Traceback" not in text
    lines = [line[line.index("imageproxy: "):] for line in text.splitlines()
             if "imageproxy: " in line]
    assert len(lines) == 1 and lines[0].startswith(LISTEN_FAILURES[case]), text
    if case == "no-inherited-socket":
        assert "no such inherited socket" in lines[0]


@pytest.mark.parametrize("case", ["listen-in-use", "metrics-in-use", "no-inherited-socket"])
@pytest_twisted.ensureDeferred
async def test_listen_failures_are_on_stderr(key_file, case):
    """The one failure line is written to stderr, as for every other startup error, not into
    the log stream on stdout."""
    out, err, code = await listen_failure(key_file, case)
    assert code != 0
    assert one_stderr_line(out, err).startswith(LISTEN_FAILURES[case])


# -- 7. /healthz is not a request ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_is_neither_counted_nor_logged(origin, key_file, client_pool):
    """/healthz probes add no request samples, leave nothing in flight and write no access line,
    while a proxied request is counted and logged."""
    port, metrics_port = free_port(), free_port()
    url = origin.route("/cat.jpg", image(JPEG))
    scrape_url = f"http://127.0.0.1:{metrics_port}/metrics"
    child = launch([TWISTD_BIN, *TWISTD[1:], *daemon_args(
        key_file, port, "--metrics", listen_arg(metrics_port))], ENV)

    def requests(table: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[Any, float]:
        return {k: v for k, v in table.items() if k[0] == "imageproxy_requests_total"}

    try:
        await wait_healthy(child, port, client_pool)
        before = samples((await get(scrape_url, client_pool))[2].decode())
        for _ in range(3):
            code, _, body = await get(f"http://127.0.0.1:{port}/healthz", client_pool)
            assert (code, body) == (200, b"ok\n")
        after = samples((await get(scrape_url, client_pool))[2].decode())
        assert requests(after) == requests(before)
        assert value(after, "imageproxy_requests_in_flight") == 0
        logged_before = child.output.count(b"imgproxy.access")

        code, _, _ = await get(f"http://127.0.0.1:{port}{SIGNER.hex_path(url.encode())}",
                               client_pool)
        assert code == 200
        final = samples((await get(scrape_url, client_pool))[2].decode())
        assert value(final, "imageproxy_requests_total", code_class="2xx", reason="ok") == (
            value(after, "imageproxy_requests_total", code_class="2xx", reason="ok") + 1)
    finally:
        await stop(child)
    assert logged_before == 0
    assert child.output.count(b"imgproxy.access") == 1
