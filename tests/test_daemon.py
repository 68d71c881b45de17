"""The real daemon: `twistd -n imageproxy` as a process, its startup errors and its signals."""

from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.server import NOT_DONE_YET

from imgproxy.urls import Signer
from tests.conftest import JPEG, free_port, image, sleep

TWISTD_BIN = os.path.join(os.path.dirname(sys.executable), "twistd")
TWISTD = [TWISTD_BIN, "--nodaemon", "--pidfile=", "imageproxy"]
ENV = {k: v for k, v in os.environ.items() if k not in ("IMAGEPROXY_KEY", "NOTIFY_SOCKET")}


class Daemon(ProcessProtocol):
    """A twistd child process whose output is collected."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode if reason.value.exitCode is not None
                            else -reason.value.signal)


async def start_daemon(args: list[str], port: int, pool) -> Daemon:
    daemon = Daemon()
    reactor.spawnProcess(daemon, TWISTD_BIN, TWISTD + args, env=ENV, path=os.getcwd())
    for _ in range(200):
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/healthz", pool=pool)
            await treq.content(response)
            if response.code == 200:
                return daemon
        except Exception:
            pass
        if daemon.ended.called:
            break
        await sleep(0.05)
    raise AssertionError(f"daemon did not start: {daemon.output.decode(errors='replace')}")


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes(b"first-key\n")
    return path


@pytest_twisted.ensureDeferred
async def test_daemon_serves_and_stops(origin, key_file, client_pool):
    """`twistd -n imageproxy` serves a signed image and exits cleanly on SIGTERM."""
    port = free_port()
    url = origin.route("/a.jpg", image(JPEG))
    daemon = await start_daemon(
        ["--key-file", str(key_file), "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--allow-network", "127.0.0.1/32"], port, client_pool)
    try:
        path = Signer((b"first-key",)).hex_path(url.encode())
        response = await treq.get(f"http://127.0.0.1:{port}{path}", pool=client_pool)
        assert response.code == 200
        assert await treq.content(response) == JPEG
    finally:
        daemon.transport.signalProcess("TERM")
    await daemon.ended
    assert b"Traceback" not in daemon.output
    assert b"imgproxy.access" in daemon.output  # one access-log line per request


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_keys(origin, key_file, client_pool):
    """SIGHUP re-reads the key file: a new key verifies without a restart."""
    port = free_port()
    url = origin.route("/a.jpg", image(JPEG)).encode()
    daemon = await start_daemon(
        ["--key-file", str(key_file), "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--allow-network", "127.0.0.1/32"], port, client_pool)
    try:
        new_path = Signer((b"second-key",)).hex_path(url)
        response = await treq.get(f"http://127.0.0.1:{port}{new_path}", pool=client_pool)
        await treq.content(response)
        assert response.code == 403
        key_file.write_bytes(b"second-key\nfirst-key\n")
        daemon.transport.signalProcess("HUP")
        for _ in range(100):
            if b"reloaded 2 key(s)" in daemon.output:
                break
            await sleep(0.05)
        response = await treq.get(f"http://127.0.0.1:{port}{new_path}", pool=client_pool)
        await treq.content(response)
        assert response.code == 200
    finally:
        daemon.transport.signalProcess("TERM")
    await daemon.ended


@pytest_twisted.ensureDeferred
async def test_graceful_stop_lets_relay_finish(origin, key_file, client_pool):
    """On SIGTERM the daemon stops accepting but an in-flight relay completes."""
    port = free_port()
    body = JPEG + b"\x00" * 20000
    started: Deferred[None] = Deferred()

    def slow(request):
        request.setHeader(b"content-type", b"image/jpeg")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body[:8000])
        started.callback(None)
        reactor.callLater(1.0, lambda: (request.write(body[8000:]), request.finish()))
        return NOT_DONE_YET

    url = origin.route("/slow.jpg", slow)
    daemon = await start_daemon(
        ["--key-file", str(key_file), "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--allow-network", "127.0.0.1/32", "--drain-timeout", "5"], port, client_pool)
    path = Signer((b"first-key",)).hex_path(url.encode())
    pending = treq.get(f"http://127.0.0.1:{port}{path}", pool=client_pool)
    await started
    await sleep(0.2)
    daemon.transport.signalProcess("TERM")
    response = await pending
    assert response.code == 200
    assert await treq.content(response) == body
    await daemon.ended
    with pytest.raises(Exception):  # noqa: B017 - refused or reset: the port is closed
        await treq.get(f"http://127.0.0.1:{port}/healthz", pool=client_pool)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-size", "lots"], "imageproxy: --max-size: not an integer: 'lots'"),
        (["--timeout", "0"], "imageproxy: --timeout: must be > 0"),
        ([], "imageproxy: --key-file: no HMAC key"),
        (["--key-file", "/nonexistent/keys"], "imageproxy: --key-file: cannot read"),
        (["--listen", "bogus:1"], "imageproxy: --listen: 'bogus:1'"),
        (["--allow-network", "300.0.0.0/8"], "imageproxy: --allow-network: not a CIDR network"),
        (["--ca-file", "/nonexistent/ca.pem"], "imageproxy: --ca-file: cannot read"),
        (["--formats", "jpeg,bogus"], "imageproxy: --formats: unknown image format"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_startup_errors_are_one_line(args, message, tmp_path):
    """A bad option stops startup with one line naming it, and a non-zero exit."""
    if args and args[0] not in ("--key-file",):
        key = tmp_path / "k"
        key.write_bytes(b"k\n")
        args = ["--key-file", str(key), *args]
    out, err, code = await getProcessOutputAndValue(
        TWISTD_BIN, TWISTD[1:] + args, env=ENV, path=os.getcwd())
    assert code != 0
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(message), err.decode()
    assert b"Traceback" not in out + err


@pytest_twisted.ensureDeferred
async def test_help_lists_options():
    """`twistd imageproxy --help` lists the contract's options."""
    out, err, code = await getProcessOutputAndValue(
        TWISTD_BIN, TWISTD[1:] + ["--help"], env=ENV, path=os.getcwd())
    assert code == 0
    for option in ("--config", "--listen", "--key-file", "--allow-network", "--deny-network",
                   "--max-size", "--max-redirects", "--timeout", "--rate", "--burst",
                   "--queue-timeout", "--user-agent", "--metrics", "--manhole",
                   "--manhole-keys"):
        assert option.encode() in out, option
