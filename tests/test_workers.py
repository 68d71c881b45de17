"""Tests for imgproxy.workers: shared listening sockets, the worker side, and the supervisor.

The supervisor's policy (restarts, backoff, giving up, stopping, signals, watchdog) is tested on a
fake process reactor with a Clock; real worker processes on 127.0.0.1 check the whole thing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from imgproxy.config import Config, HostLimit
from imgproxy.workers import (
    LISTEN_FDS_ENV,
    SUPERVISOR_ENV,
    WORKER_ENV,
    ParentWatch,
    Supervisor,
    _hard_exit,
    check_shareable,
    listen_shared,
    options_argv,
    share_limits,
    shared_endpoint,
    supervisor_pid,
    worker_argv,
    worker_endpoint,
    worker_index,
)

REPO = Path(__file__).resolve().parent.parent
SERVER_PEM = Path(sys.modules["twisted"].__file__ or "").parent / "test" / "server.pem"


# -- small functions ---------------------------------------------------------------------------


def test_worker_index() -> None:
    """The worker index comes from $IMAGEPROXY_WORKER; absent or malformed means not a worker."""
    assert worker_index({WORKER_ENV: "3"}) == 3
    assert worker_index({WORKER_ENV: "0"}) == 0
    assert worker_index({}) is None
    assert worker_index({WORKER_ENV: ""}) is None
    assert worker_index({WORKER_ENV: "-1"}) is None
    assert supervisor_pid({SUPERVISOR_ENV: "1234"}) == 1234
    assert supervisor_pid({}) is None


def test_worker_argv_runs_twistd_in_the_foreground() -> None:
    """A worker runs this Python's twistd, never daemonized and without a pid file."""
    argv = worker_argv(["--listen=tcp:8080", "--allow-svg"])
    assert argv[0] == sys.executable
    assert argv[1:3] == ["-c", "from twisted.scripts.twistd import run; run()"]
    assert argv[3:] == ["--nodaemon", "--pidfile=", "imageproxy", "--listen=tcp:8080",
                        "--allow-svg"]


def test_options_argv_rebuilds_the_command_line() -> None:
    """Given (name, value) pairs become --name=value, flags --name, in order."""
    given = [("listen", "tcp:80"), ("allow-svg", None), ("listen", "tcp:81"), ("rate", "-x")]
    assert options_argv(given) == ["--listen=tcp:80", "--allow-svg", "--listen=tcp:81",
                                   "--rate=-x"]


@pytest.mark.parametrize("description", [
    "tcp:8080", "TCP:8080:interface=127.0.0.1", "tcp6:8080:interface=\\:\\:1",
    "ssl:443:privateKey=k.pem", "systemd:domain=INET:index=0",
])
def test_check_shareable_accepts(description: str) -> None:
    """tcp:, tcp6:, ssl: and systemd: endpoints can be shared by workers."""
    check_shareable(description)


@pytest.mark.parametrize("description", ["unix:/run/x.sock", "onion:80", "le:/srv:tcp:443"])
def test_check_shareable_refuses(description: str) -> None:
    """Other endpoint types are refused with a one-line error naming --workers."""
    with pytest.raises(ValueError, match="^--workers: cannot share"):
        check_shareable(description)
    with pytest.raises(ValueError):
        shared_endpoint(MemoryReactorClock(), description)


@pytest.mark.parametrize(("description", "index", "expected"), [
    ("tcp:9100:interface=127.0.0.1", 0, "tcp:9100:interface=127.0.0.1"),
    ("tcp:9100:interface=127.0.0.1", 2, "tcp:9102:interface=127.0.0.1"),
    ("tcp:interface=127.0.0.1:port=9100", 1, "tcp:interface=127.0.0.1:port=9101"),
    ("tcp6:9100:interface=\\:\\:1", 1, "tcp6:9101:interface=\\:\\:1"),
    ("tcp:0:interface=127.0.0.1", 3, "tcp:0:interface=127.0.0.1"),
    ("unix:/run/imageproxy/mh.sock:mode=600", 1, "unix:/run/imageproxy/mh.sock.1:mode=600"),
    ("unix:address=/run/m\\:x:lockfile=1", 2, "unix:address=/run/m\\:x.2:lockfile=1"),
])
def test_worker_endpoint(description: str, index: int, expected: str) -> None:
    """Worker i gets port + i or path.i; worker 0 and port 0 are unchanged."""
    assert worker_endpoint(description, index) == expected


@pytest.mark.parametrize("description", ["systemd:domain=INET:index=0", "tcp:http", "tcp:"])
def test_worker_endpoint_refuses(description: str) -> None:
    """An endpoint that cannot be made per worker is refused."""
    with pytest.raises(ValueError):
        worker_endpoint(description, 1)


def test_share_limits_divides_the_per_origin_limits() -> None:
    """Each of N workers gets 1/N of rate, burst, per-host concurrency and overrides."""
    config = Config(rate=10.0, burst=20, max_inflight_per_host=8, max_inflight=1000,
                    host_limits=(HostLimit("*.example.com", 3.0, 5),))
    shared = share_limits(config, 3)
    assert shared.rate == pytest.approx(10 / 3)
    assert shared.burst == 7
    assert shared.max_inflight_per_host == 3
    assert shared.max_inflight == 1000
    assert shared.host_limits == (HostLimit("*.example.com", 1.0, 2),)
    assert share_limits(config, 1) is config
    assert share_limits(Config(rate=0.0, burst=1), 4).rate == 0.0
    assert share_limits(Config(rate=0.0, burst=1), 4).burst == 1


# -- shared endpoints --------------------------------------------------------------------------


def test_shared_tcp_endpoint_binds_with_so_reuseport() -> None:
    """A tcp: endpoint listens through a binding with SO_REUSEPORT on the given interface."""
    memory = MemoryReactorClock()
    factory = Factory.forProtocol(Protocol)
    shared_endpoint(memory, "tcp:8080:interface=127.0.0.1:backlog=7").listen(factory)
    ((binding, got_factory, backlog, interface),) = memory.tcpServers
    assert (binding._address, binding._port) == ("127.0.0.1", 8080)
    assert binding._reusePort and binding._reuseAddress
    assert (got_factory, backlog, interface) == (factory, 7, "127.0.0.1")


def test_shared_ssl_endpoint_wraps_tls_over_a_reuseport_binding() -> None:
    """An ssl: endpoint becomes TLS over a SO_REUSEPORT TCP listener."""
    memory = MemoryReactorClock()
    factory = Factory.forProtocol(Protocol)
    listen_shared(memory, f"ssl:8443:privateKey={SERVER_PEM}:interface=127.0.0.1", factory)
    ((binding, tls_factory, _, _),) = memory.tcpServers
    assert binding._reusePort and binding._port == 8443
    assert isinstance(tls_factory, TLSMemoryBIOFactory)
    assert tls_factory.wrappedFactory is factory


@pytest.mark.parametrize(("kind", "host", "interface"), [
    ("tcp", "127.0.0.1", "127.0.0.1"), ("tcp6", "::1", "\\:\\:1"),
])
@pytest_twisted.ensureDeferred
async def test_two_shared_listeners_on_one_port(kind: str, host: str, interface: str) -> None:
    """Two shared listeners bind the same port, where a plain listener is refused."""
    factory = Factory.forProtocol(Protocol)
    first = await listen_shared(reactor, f"{kind}:0:interface={interface}", factory)
    port = first.getHost().port
    try:
        second = await listen_shared(reactor, f"{kind}:{port}:interface={interface}", factory)
        assert (second.getHost().host, second.getHost().port) == (host, port)
        await second.stopListening()
        with pytest.raises(CannotListenError):
            reactor.listenTCP(port, factory, interface=host)
    finally:
        await first.stopListening()


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A listening TCP socket on 127.0.0.1, like one systemd passes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    yield sock
    sock.close()


@pytest_twisted.ensureDeferred
async def test_systemd_endpoint_adopts_the_passed_socket(listening_socket: socket.socket) -> None:
    """systemd:name=... in a worker adopts the socket the supervisor passed down."""
    fd = os.dup(listening_socket.fileno())  # adopting closes it
    environ = {LISTEN_FDS_ENV: f"1000,{fd}", "LISTEN_FDNAMES": "a:http"}
    factory = Factory.forProtocol(Protocol)
    port = await listen_shared(reactor, "systemd:domain=INET:name=http", factory, environ)
    try:
        assert port.getHost().port == listening_socket.getsockname()[1]
    finally:
        await port.stopListening()


@pytest.mark.parametrize(("description", "environ", "message"), [
    ("systemd:domain=INET:index=0", {}, "no socket was passed"),
    ("systemd:domain=IPX:index=0", {LISTEN_FDS_ENV: "3"}, "domain="),
    ("systemd:domain=INET:index=1", {LISTEN_FDS_ENV: "3"}, "out of range"),
    ("systemd:domain=INET:name=web", {LISTEN_FDS_ENV: "3", "LISTEN_FDNAMES": "http"}, "web"),
    ("systemd:domain=INET", {LISTEN_FDS_ENV: "3"}, "index=N or name="),
])
def test_systemd_endpoint_errors(description: str, environ: dict[str, str], message: str) -> None:
    """A systemd: endpoint that names no passed socket is refused at startup."""
    with pytest.raises(ValueError, match=message):
        shared_endpoint(MemoryReactorClock(), description, environ)


# -- ParentWatch -------------------------------------------------------------------------------


def test_parent_watch_stops_an_orphaned_worker() -> None:
    """When the parent pid changes (supervisor gone), on_orphaned runs once and polling stops."""
    clock = MemoryReactorClock()
    parent = [4242]
    calls: list[None] = []
    watch = ParentWatch(clock, 4242, lambda: calls.append(None), interval=1.0,
                        getppid=lambda: parent[0])
    watch.startService()
    clock.advance(5)
    assert calls == []
    parent[0] = 1
    clock.advance(1)
    clock.advance(1)
    assert calls == [None]
    watch.stopService()
    assert not clock.getDelayedCalls()


# -- the supervisor on a fake reactor ----------------------------------------------------------


class FakeProcess:
    """An IProcessTransport that records signals."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(name)


@attrs.define
class Spawned:
    """One spawnProcess call."""

    protocol: Any
    executable: str
    args: list[str]
    env: dict[str, str]
    child_fds: dict[int, Any]
    process: FakeProcess
    reactor: FakeReactor

    @property
    def index(self) -> int:
        return int(self.env[WORKER_ENV])

    @property
    def notify_path(self) -> str:
        return self.env["NOTIFY_SOCKET"]

    def send(self, **fields: str) -> None:
        """Send an sd_notify datagram to this worker's socket and let the reactor read it."""
        data = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(data, self.notify_path)
        for reader in list(self.reactor.getReaders()):
            reader.doRead()

    def end(self, code: int | None = None, signo: int | None = None) -> None:
        """The process exits with ``code`` or dies by ``signo``."""
        self.process.pid = None
        self.protocol.processEnded(Failure(ProcessTerminated(code, signo)))


class FakeReactor(MemoryReactorClock):
    """A memory reactor that can spawn fake processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []
        self.spawn_error: Exception | None = None
        self._pid = 1000

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str],
                     childFDs: dict[int, Any]) -> FakeProcess:
        if self.spawn_error is not None:
            raise self.spawn_error
        self._pid += 1
        process = FakeProcess(self._pid)
        self.spawned.append(Spawned(protocol, executable, list(args), env, childFDs, process, self))
        return process

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def latest(self, index: int) -> Spawned:
        """The most recent process of worker ``index``."""
        return [s for s in self.spawned if s.index == index][-1]


class FakeNotifier:
    """Records what would be sent to systemd."""

    watchdog_interval: float | None = None

    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self, status: str = "") -> None:
        self.sent.append(f"READY {status}")

    def stopping(self) -> None:
        self.sent.append("STOPPING")

    def watchdog(self) -> None:
        self.sent.append("WATCHDOG")

    def close(self) -> None:
        self.sent.append("close")


@attrs.define
class Harness:
    """A supervisor on a fake reactor."""

    reactor: FakeReactor
    notifier: FakeNotifier
    supervisor: Supervisor
    gave_up: list[None]

    def all_ready(self) -> None:
        """Every current worker says READY=1."""
        for index in range(self.supervisor.workers):
            self.reactor.latest(index).send(READY="1")

    def stop(self) -> None:
        """Stop the supervisor (see :func:`shutdown`)."""
        shutdown(self.supervisor, self.reactor)


def shutdown(supervisor: Supervisor, fake: FakeReactor) -> None:
    """Stop the supervisor if running; every worker still running then exits on its SIGTERM."""
    stopped = supervisor.stopService() if supervisor.running else None
    for spawned in fake.spawned:
        if spawned.process.pid is not None:
            spawned.end(signo=signal.SIGTERM)
    assert stopped is None or stopped.called


ARGV = ["/usr/bin/python3", "-c", "worker", "--listen=tcp:8080"]
ENVIRON = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": "1", "LISTEN_PID": "1", "LISTEN_FDS": "1", WORKER_ENV: "9"}


def make_harness(workers: int = 2, **kwargs: Any) -> Harness:
    """Start a supervisor of ``workers`` fake workers."""
    fake = FakeReactor()
    notifier = FakeNotifier()
    gave_up: list[None] = []
    kwargs.setdefault("handle_sighup", False)
    supervisor = Supervisor(fake, workers, ARGV, ENVIRON, 15.0, notifier=notifier,  # type: ignore[arg-type]
                            on_give_up=lambda: gave_up.append(None), **kwargs)
    supervisor.startService()
    return Harness(fake, notifier, supervisor, gave_up)


@pytest.fixture
def harness() -> Iterator[Harness]:
    """A started supervisor of two fake workers, stopped afterwards."""
    h = make_harness()
    yield h
    h.stop()


def test_spawns_each_worker_with_its_environment(harness: Harness) -> None:
    """Each worker runs argv with its index, our pid and a private notify socket in its env."""
    first, second = harness.reactor.spawned
    assert (first.executable, first.args) == (ARGV[0], ARGV)
    assert (first.index, second.index) == (0, 1)
    assert first.child_fds == {0: 0, 1: 1, 2: 2}
    env = first.env
    assert env["PATH"] == "/usr/bin"
    assert env[SUPERVISOR_ENV] == str(os.getpid())
    assert os.path.exists(first.notify_path) and first.notify_path != second.notify_path
    assert os.stat(os.path.dirname(first.notify_path)).st_mode & 0o777 == 0o700
    assert len(harness.reactor.getReaders()) == 2
    assert env["WATCHDOG_USEC"] == "30000000"
    assert not {"WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", LISTEN_FDS_ENV} & set(env)
    assert harness.supervisor.pids == {0: first.process.pid, 1: second.process.pid}


def test_ready_once_every_worker_is_ready(harness: Harness) -> None:
    """systemd hears READY=1 once, when the last worker reports ready."""
    harness.reactor.latest(0).send(READY="1", STATUS="up")
    assert harness.notifier.sent == [] and not harness.supervisor.ready
    harness.reactor.latest(1).send(READY="1")
    assert harness.notifier.sent == ["READY 2 workers"] and harness.supervisor.ready
    harness.reactor.latest(1).send(READY="1")
    assert harness.notifier.sent == ["READY 2 workers"]


def test_a_worker_that_dies_is_restarted(harness: Harness) -> None:
    """A worker that dies after a long run is replaced at once, on a fresh notify socket."""
    harness.all_ready()
    harness.reactor.advance(60)
    old = harness.reactor.latest(0)
    old.end(signo=signal.SIGKILL)
    assert not os.path.exists(old.notify_path)
    assert harness.supervisor.pids == {1: harness.reactor.latest(1).process.pid}
    harness.reactor.advance(0)
    new = harness.reactor.latest(0)
    assert new is not old and len(harness.reactor.spawned) == 3
    assert new.notify_path != old.notify_path and os.path.exists(new.notify_path)
    assert harness.gave_up == []


def test_rapid_failures_back_off_then_give_up() -> None:
    """A worker dying young is restarted after 1, 2, 4, 8 s, then the supervisor gives up."""
    h = make_harness(max_rapid_failures=4)
    h.all_ready()
    for delay in [1, 2, 4, 8]:
        h.reactor.latest(0).end(code=1)
        count = len(h.reactor.spawned)
        h.reactor.advance(delay - 0.01)
        assert len(h.reactor.spawned) == count
        h.reactor.advance(0.01)
        assert len(h.reactor.spawned) == count + 1
        assert h.gave_up == []
    h.reactor.latest(0).end(code=1)
    assert h.gave_up == [None] and h.supervisor.failed
    h.reactor.advance(100)
    assert len(h.reactor.spawned) == 6
    h.stop()


def test_a_long_run_resets_the_backoff() -> None:
    """After a worker has run min_uptime, its next death is not counted as rapid."""
    h = make_harness(min_uptime=10.0)
    h.all_ready()
    h.reactor.latest(0).end(code=1)
    h.reactor.advance(1)
    h.reactor.latest(0).send(READY="1")
    h.reactor.advance(30)
    h.reactor.latest(0).end(code=1)
    count = len(h.reactor.spawned)
    h.reactor.advance(0)
    assert len(h.reactor.spawned) == count + 1
    h.stop()


def test_a_graceful_stop_is_not_a_failure() -> None:
    """A worker that reported STOPPING=1 (stopped by an operator) is replaced, never counted."""
    h = make_harness(max_rapid_failures=1)
    h.all_ready()
    for _ in range(3):
        h.reactor.advance(0.5)
        h.reactor.latest(0).send(STOPPING="1")
        h.reactor.latest(0).end(signo=signal.SIGTERM)
        count = len(h.reactor.spawned)
        h.reactor.advance(0.5)
        assert len(h.reactor.spawned) == count + 1
        h.reactor.latest(0).send(READY="1")
    assert h.gave_up == []
    h.stop()


def test_at_most_one_restart_a_second() -> None:
    """Even when young deaths are not penalized, a worker is not respawned twice in a second."""
    h = make_harness(min_uptime=0.0)
    h.all_ready()
    h.reactor.advance(0.25)
    h.reactor.latest(0).end(code=1)
    count = len(h.reactor.spawned)
    h.reactor.advance(0.7)
    assert len(h.reactor.spawned) == count
    h.reactor.advance(0.05)
    assert len(h.reactor.spawned) == count + 1
    h.stop()


def test_a_failure_during_startup_gives_up(harness: Harness) -> None:
    """A worker exiting before all workers were ever ready (port in use...) is fatal."""
    harness.reactor.latest(0).send(READY="1")
    harness.reactor.latest(1).end(code=1)
    assert harness.gave_up == [None]
    harness.reactor.advance(100)
    assert len(harness.reactor.spawned) == 2


def test_a_spawn_error_gives_up() -> None:
    """If a process cannot even be spawned, the supervisor gives up."""
    fake = FakeReactor()
    fake.spawn_error = OSError("no such file")
    gave_up: list[None] = []
    supervisor = Supervisor(fake, 2, ARGV, {}, 5.0, notifier=FakeNotifier(),  # type: ignore[arg-type]
                            on_give_up=lambda: gave_up.append(None), handle_sighup=False)
    supervisor.startService()
    assert gave_up == [None]
    assert fake.getReaders() == []
    shutdown(supervisor, fake)


def test_giving_up_stops_the_reactor_and_exits_1() -> None:
    """By default, giving up stops the reactor and exits with status 1 after shutdown."""
    fake = FakeReactor()
    supervisor = Supervisor(fake, 1, ARGV, {}, 5.0, notifier=FakeNotifier(),  # type: ignore[arg-type]
                            handle_sighup=False)
    supervisor.startService()
    fake.latest(0).end(code=1)
    assert fake.hasStopped
    assert fake.triggers["after"]["shutdown"] == [(_hard_exit, (1,), {})]
    shutdown(supervisor, fake)


def test_stop_sends_sigterm_and_waits_for_every_worker(harness: Harness) -> None:
    """stopService SIGTERMs each worker and fires only when all have exited; none restart."""
    harness.all_ready()
    runtime_dir = Path(harness.reactor.latest(0).notify_path).parent
    assert runtime_dir.is_dir()
    stopped = harness.supervisor.stopService()
    first, second = harness.reactor.spawned
    assert first.process.signals == ["TERM"] and second.process.signals == ["TERM"]
    assert "STOPPING" in harness.notifier.sent
    first.end(signo=signal.SIGTERM)
    assert not stopped.called
    second.end(code=0)
    assert stopped.called and stopped.result is None
    harness.reactor.advance(100)
    assert len(harness.reactor.spawned) == 2
    assert not runtime_dir.exists()
    assert harness.reactor.getDelayedCalls() == [] and harness.reactor.getReaders() == []


def test_stop_kills_workers_that_outlive_the_timeout(harness: Harness) -> None:
    """A worker still running stop_timeout after SIGTERM gets SIGKILL."""
    harness.all_ready()
    stopped = harness.supervisor.stopService()
    first, second = harness.reactor.spawned
    first.end(code=0)
    harness.reactor.advance(14.9)
    assert second.process.signals == ["TERM"]
    harness.reactor.advance(0.1)
    assert second.process.signals == ["TERM", "KILL"]
    second.end(signo=signal.SIGKILL)
    assert stopped.called


def test_stop_spares_a_worker_already_stopping(harness: Harness) -> None:
    """A worker that reported STOPPING=1 (it got the signal itself) is not signalled again."""
    harness.all_ready()
    harness.reactor.latest(0).send(STOPPING="1")
    harness.supervisor.stopService()
    assert harness.reactor.latest(0).process.signals == []
    assert harness.reactor.latest(1).process.signals == ["TERM"]


def test_stop_with_no_worker_running() -> None:
    """Stopping a supervisor whose workers are all gone fires at once."""
    h = make_harness(workers=1)
    h.reactor.latest(0).end(code=1)
    assert h.supervisor.stopService().called


def test_reload_forwards_sighup() -> None:
    """SIGHUP to the supervisor is forwarded to every worker; the handler is removed on stop."""
    previous = signal.getsignal(signal.SIGHUP)
    h = make_harness(handle_sighup=True)
    try:
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler is not previous
        handler(signal.SIGHUP, None)
        assert [s.process.signals for s in h.reactor.spawned] == [["HUP"], ["HUP"]]
    finally:
        h.stop()
    assert signal.getsignal(signal.SIGHUP) is previous


def test_watchdog_kills_a_silent_worker() -> None:
    """A ready worker that stops sending WATCHDOG=1 is killed; a pinging one is left alone."""
    h = make_harness(worker_watchdog=8.0)
    h.all_ready()
    for _ in range(5):
        h.reactor.advance(2)
        h.reactor.latest(1).send(WATCHDOG="1")
        h.reactor.latest(0).send(WATCHDOG="1")
    for _ in range(4):
        h.reactor.advance(2)
        h.reactor.latest(1).send(WATCHDOG="1")
    assert h.reactor.latest(0).process.signals == []
    h.reactor.advance(2)
    assert h.reactor.latest(0).process.signals == ["KILL"]
    assert h.reactor.latest(1).process.signals == []
    h.reactor.advance(2)
    assert h.reactor.latest(0).process.signals == ["KILL"]
    h.stop()


def test_supervisor_feeds_its_own_watchdog() -> None:
    """With systemd's watchdog on, the supervisor pings it on schedule."""
    fake = FakeReactor()
    notifier = FakeNotifier()
    notifier.watchdog_interval = 5.0
    supervisor = Supervisor(fake, 1, ARGV, {}, 5.0, notifier=notifier,  # type: ignore[arg-type]
                            handle_sighup=False, worker_watchdog=None)
    supervisor.startService()
    fake.advance(4.9)
    assert notifier.sent == []
    fake.advance(0.1)
    fake.advance(5)
    assert notifier.sent == ["WATCHDOG", "WATCHDOG"]
    assert "WATCHDOG_USEC" not in fake.latest(0).env
    shutdown(supervisor, fake)


def test_socket_activation_sockets_are_passed_down() -> None:
    """Sockets from systemd are passed to every worker as fds 3, 4... and named in its env."""
    fake = FakeReactor()
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    supervisor = Supervisor(fake, 1, ARGV, environ, 5.0, notifier=FakeNotifier(),  # type: ignore[arg-type]
                            handle_sighup=False)
    supervisor.startService()
    spawned = fake.latest(0)
    assert spawned.child_fds == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    assert spawned.env[LISTEN_FDS_ENV] == "3,4" and spawned.env["LISTEN_FDNAMES"] == "a:b"
    shutdown(supervisor, fake)
    explicit = Supervisor(fake, 1, ARGV, {}, 5.0, notifier=FakeNotifier(),  # type: ignore[arg-type]
                          handle_sighup=False, listen_fds=[17])
    explicit.startService()
    assert fake.latest(0).child_fds[3] == 17
    shutdown(explicit, fake)


# -- real processes ----------------------------------------------------------------------------

WORKER_SCRIPT = """
import os, signal, sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
from imgproxy.sdnotify import Notifier, NotifierService
from imgproxy.workers import listen_shared

class Pid(Resource):
    isLeaf = True
    def render_GET(self, request):
        return str(os.getpid()).encode()

def hup():
    open(os.path.join(sys.argv[2], "hup-%d" % os.getpid()), "w").close()

def failed(f):
    sys.stderr.write(f.getTraceback())
    reactor.stop()

def start():
    d = listen_shared(reactor, sys.argv[1], Site(Pid()))
    d.addCallback(lambda _: notifier.startService())
    d.addErrback(failed)

signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(hup))
notifier = NotifierService(Notifier(reactor))
reactor.addSystemEventTrigger("before", "shutdown", notifier.stopService)
reactor.callWhenRunning(start)
reactor.run()
"""


async def poll(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true, checking every 50 ms."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


class HTTP10Get(Protocol):
    """Sends one HTTP/1.0 GET; ``done`` fires with the response body when the server closes."""

    def __init__(self, path: bytes = b"/") -> None:
        self.path = path
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET " + self.path + b" HTTP/1.0\r\nHost: test\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data.partition(b"\r\n\r\n")[2])


async def get_pid(port: int) -> int:
    """The pid in the answer to one GET on a new connection."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    protocol = await connectProtocol(endpoint, HTTP10Get())
    return int(await protocol.done)


async def get_pids(port: int, count: int) -> list[int]:
    """The pids answering ``count`` requests, each on a new connection, 10 at a time."""
    pids: list[int] = []
    for _ in range(0, count, 10):
        pids.extend(await gatherResults([ensureDeferred(get_pid(port)) for _ in range(10)]))
    return pids


@pytest.fixture
def reserved_port() -> Iterator[int]:
    """A loopback port held (bound, not listening, SO_REUSEPORT) so no other test takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def real_supervisor(workers: int, args: list[str], **kwargs: Any) -> Supervisor:
    """A supervisor of real ``python -c WORKER_SCRIPT args`` workers."""
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    environ.pop("NOTIFY_SOCKET", None)
    kwargs.setdefault("handle_sighup", False)
    kwargs.setdefault("on_give_up", lambda: None)
    return Supervisor(reactor, workers, [sys.executable, "-c", WORKER_SCRIPT, *args], environ,
                      10.0, **kwargs)


def gone(pid: int) -> bool:
    """Whether no process has this pid any more (exited and reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_real_workers_share_a_port(reserved_port: int, tmp_path: Path) -> None:
    """Two real workers both serve one port; a killed one is replaced; SIGHUP reaches both;
    stopping ends them all."""
    supervisor = real_supervisor(2, [f"tcp:{reserved_port}:interface=127.0.0.1", str(tmp_path)])
    supervisor.startService()
    try:
        await poll(lambda: supervisor.ready, what="workers ready")
        first = dict(supervisor.pids)
        assert set(await get_pids(reserved_port, 200)) == set(first.values())

        supervisor.reload()
        await poll(lambda: all((tmp_path / f"hup-{pid}").exists() for pid in first.values()),
                   what="SIGHUP markers")

        os.kill(first[0], signal.SIGKILL)
        await poll(lambda: supervisor.pids.get(0) not in (None, first[0]), what="a new worker")
        replacement = supervisor.pids[0]
        seen: set[int] = set()

        async def sample() -> None:
            seen.update(await get_pids(reserved_port, 20))

        while replacement not in seen:
            await sample()
            await deferLater(reactor, 0.05, lambda: None)
        assert first[0] not in seen and gone(first[0])
    finally:
        await supervisor.stopService()
    assert supervisor.pids == {}
    assert all(gone(pid) for pid in [*first.values(), replacement])
    assert not supervisor.failed


@pytest_twisted.ensureDeferred
async def test_real_worker_adopts_a_passed_socket(listening_socket: socket.socket) -> None:
    """A worker serves on a socket the supervisor holds and passes down (socket activation)."""
    supervisor = real_supervisor(1, ["systemd:domain=INET:index=0", "/nonexistent"],
                                 listen_fds=[listening_socket.fileno()])
    supervisor.startService()
    try:
        await poll(lambda: supervisor.ready, what="worker ready")
        pids = await get_pids(listening_socket.getsockname()[1], 10)
        assert set(pids) == set(supervisor.pids.values())
    finally:
        await supervisor.stopService()


@pytest_twisted.ensureDeferred
async def test_real_startup_failure_gives_up(listening_socket: socket.socket) -> None:
    """A worker that cannot start (its port is taken) makes the supervisor give up."""
    taken = listening_socket.getsockname()[1]
    gave_up: Deferred[None] = Deferred()
    supervisor = real_supervisor(2, [f"tcp:{taken}:interface=127.0.0.1", "/nonexistent"],
                                 on_give_up=lambda: gave_up.callback(None))
    supervisor.startService()
    try:
        await ensureDeferred(poll(lambda: gave_up.called, what="giving up"))
        assert supervisor.failed and not supervisor.ready
    finally:
        await supervisor.stopService()


# -- the real daemon ---------------------------------------------------------------------------

TAP_WIRED = "worker_index" in (REPO / "imgproxy" / "tap.py").read_text()


class Collect(ProcessProtocol):
    """Keeps a process's output; ``ended`` fires with its exit reason."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[Failure] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason)


@pytest.mark.skipif(not TAP_WIRED, reason="imgproxy/tap.py does not start workers yet")
@pytest_twisted.ensureDeferred
async def test_twistd_imageproxy_with_two_workers(reserved_port: int) -> None:
    """``twistd imageproxy --workers 2`` serves from two workers and SIGTERM stops them all."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), "IMAGEPROXY_KEY": "k" * 32}
    environ.pop("NOTIFY_SOCKET", None)
    argv = worker_argv([f"--listen=tcp:{reserved_port}:interface=127.0.0.1", "--workers=2",
                        "--no-access-log"])
    daemon = Collect()
    transport = reactor.spawnProcess(daemon, argv[0], argv, env=environ,
                                     childFDs={0: "w", 1: "r", 2: "r"})
    try:
        await poll(lambda: b"all 2 workers are ready" in daemon.output or daemon.ended.called,
                   what="the daemon's workers")
        assert not daemon.ended.called, daemon.output.decode()
        pids = [int(pid) for pid in re.findall(rb"worker \d started \(pid (\d+)\)", daemon.output)]
        assert len(pids) == 2 and transport.pid not in pids
        for _ in range(20):
            protocol = await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", reserved_port, timeout=10),
                HTTP10Get(b"/healthz"),
            )
            await protocol.done
            assert protocol.data.startswith(b"HTTP/1.0 200 ") or protocol.data.startswith(
                b"HTTP/1.1 200 "), protocol.data[:100]
        transport.signalProcess("TERM")
        await poll(lambda: daemon.ended.called, what="the daemon to stop")
        assert all(gone(pid) for pid in pids)
    finally:
        if not daemon.ended.called:
            transport.signalProcess("KILL")
            await daemon.ended
