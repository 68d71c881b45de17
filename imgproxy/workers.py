"""Several worker processes on the same listening sockets (``--workers N``), and their supervisor.

Why: one Twisted reactor uses one CPU core. With ``--workers N`` the ``twistd`` process becomes a
:class:`Supervisor`: it listens on nothing itself and runs N copies of the same ``twistd
imageproxy`` command, each a complete proxy with its own reactor, marked by ``$IMAGEPROXY_WORKER``.

How the workers share a port:

- ``tcp:``, ``tcp6:`` and ``ssl:`` endpoints are bound by every worker with ``SO_REUSEPORT``
  (:func:`shared_endpoint`); the kernel spreads new connections evenly between the sockets.
- ``systemd:`` endpoints (socket activation) are inherited: the supervisor passes the sockets
  systemd gave it to every worker, which adopts them. The workers then share one accept queue,
  and the kernel spreads connections less evenly than with ``SO_REUSEPORT``.
- Other endpoint types (``unix:``, plugins) are refused at startup (:func:`check_shareable`).

The supervisor restarts a worker that exits (at most once a second per worker, with an
exponential backoff while a worker keeps dying young), gives up and exits with status 1 when a
worker fails before all are ready or keeps failing, forwards SIGHUP (key reload), and on stop
sends SIGTERM to every worker (each drains gracefully) and SIGKILL to those still running after
``stop_timeout``.

Each worker speaks the systemd notification protocol (``READY=1``, ``WATCHDOG=1``,
``STOPPING=1``) to a private socket of the supervisor, which is how the supervisor knows a worker
is up, and kills a worker whose reactor stopped turning. The supervisor itself sends ``READY=1``
to systemd once all workers are ready, and feeds systemd's watchdog.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imgproxy.config import Config, HostLimit
from imgproxy.sdnotify import Notifier

__all__ = [
    "LISTEN_FDS_ENV",
    "SUPERVISOR_ENV",
    "WORKER_ENV",
    "ParentWatch",
    "Supervisor",
    "check_shareable",
    "listen_shared",
    "options_argv",
    "share_limits",
    "shared_endpoint",
    "supervisor_pid",
    "worker_argv",
    "worker_endpoint",
    "worker_index",
]

log = Logger()

#: Set in a worker's environment to its index, 0 to N-1; absent in the supervisor.
WORKER_ENV = "IMAGEPROXY_WORKER"
#: Set in a worker's environment to the supervisor's pid (see :class:`ParentWatch`).
SUPERVISOR_ENV = "IMAGEPROXY_SUPERVISOR_PID"
#: Set in a worker's environment to the inherited socket-activation descriptors, ``3,4,...``.
LISTEN_FDS_ENV = "IMAGEPROXY_LISTEN_FDS"

_TWISTD = "from twisted.scripts.twistd import run; run()"
_SHARED_TYPES = frozenset({"tcp", "tcp6", "ssl", "systemd"})
_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
_FIRST_LISTEN_FD = 3  # sd_listen_fds(3): systemd's sockets start at fd 3


# -- the worker side ---------------------------------------------------------------------------


def worker_index(environ: Mapping[str, str]) -> int | None:
    """This process's worker index from ``$IMAGEPROXY_WORKER``, or ``None`` outside a worker."""
    value = environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def supervisor_pid(environ: Mapping[str, str]) -> int | None:
    """The supervisor's pid from ``$IMAGEPROXY_SUPERVISOR_PID``, or ``None``."""
    value = environ.get(SUPERVISOR_ENV, "")
    return int(value) if value.isdigit() else None


def _endpoint_type(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def check_shareable(description: str) -> None:
    """Refuse, with a one-line :class:`ValueError`, a listen endpoint workers cannot share.

    Cheap (nothing is parsed or opened): the supervisor calls it at startup so that a bad
    ``--listen`` fails before any worker is spawned.
    """
    kind = _endpoint_type(description)
    if kind not in _SHARED_TYPES:
        raise ValueError(
            f"--workers: cannot share {description!r} between worker processes: only tcp:, "
            "tcp6:, ssl: and systemd: listen endpoints can be shared"
        )


class _ReusePortReactor:
    """Just enough of a reactor for the ``tcp:``/``ssl:`` endpoints: binds with SO_REUSEPORT.

    Twisted's endpoint strings cannot ask for ``SO_REUSEPORT``; the endpoints they build call
    ``listenTCP``/``listenSSL`` on their reactor, so this wrapper turns the port number into a
    :func:`twisted.internet.tcp.makeBinding` with ``reusePort=True``.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        from twisted.internet.tcp import makeBinding

        binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
        return self._reactor.listenTCP(binding, factory, backlog=backlog, interface=interface)

    def listenSSL(
        self,
        port: int,
        factory: IProtocolFactory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        tls_factory = TLSMemoryBIOFactory(contextFactory, False, factory)
        return self.listenTCP(port, tls_factory, backlog=backlog, interface=interface)


def _endpoint_args(description: str) -> tuple[list[str], dict[str, str]]:
    """Positional and keyword arguments of ``kind:a:b=c`` (no escapes: used for ``systemd:``)."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for token in description.split(":")[1:]:
        if "=" in token:
            key, value = token.split("=", 1)
            kwargs[key] = value
        else:
            args.append(token)
    return args, kwargs


def _inherited_endpoint(
    reactor: Any, description: str, environ: Mapping[str, str]
) -> IStreamServerEndpoint:
    args, kwargs = _endpoint_args(description)
    fds = [int(fd) for fd in environ.get(LISTEN_FDS_ENV, "").split(",") if fd.strip().isdigit()]
    if not fds:
        raise ValueError(f"--listen {description!r}: no socket was passed by systemd")
    family = _FAMILIES.get(kwargs.get("domain", "").upper())
    if family is None:
        raise ValueError(f"--listen {description!r}: domain= must be INET, INET6 or UNIX")
    if "name" in kwargs:
        names = environ.get("LISTEN_FDNAMES", "").split(":")
        if kwargs["name"] not in names:
            raise ValueError(f"--listen {description!r}: no socket named {kwargs['name']!r}")
        index = names.index(kwargs["name"])
    else:
        text = kwargs.get("index", args[0] if args else "")
        if not text.isdigit():
            raise ValueError(f"--listen {description!r}: needs index=N or name=NAME")
        index = int(text)
    if index >= len(fds):
        raise ValueError(
            f"--listen {description!r}: index {index} out of range ({len(fds)} socket(s) passed)"
        )
    # Made non-blocking, adopted, and the inherited descriptor closed, on listen.
    return AdoptedStreamServerEndpoint(reactor, fds[index], family)


def shared_endpoint(
    reactor: Any, description: str, environ: Mapping[str, str] = os.environ
) -> IStreamServerEndpoint:
    """The server endpoint a worker listens on, for a ``--listen`` endpoint string.

    ``tcp:``/``tcp6:``/``ssl:`` bind with ``SO_REUSEPORT`` (every worker binds the same port);
    ``systemd:`` adopts the socket the supervisor passed down. Anything else raises
    :class:`ValueError` (synchronously, like :func:`serverFromString` for a bad string).
    """
    check_shareable(description)
    if _endpoint_type(description) == "systemd":
        return _inherited_endpoint(reactor, description, environ)
    return serverFromString(_ReusePortReactor(reactor), description)  # type: ignore[arg-type]


def listen_shared(
    reactor: Any,
    description: str,
    factory: IProtocolFactory,
    environ: Mapping[str, str] = os.environ,
) -> Deferred[IListeningPort]:
    """Listen with ``factory`` on a port shared with the other workers (see
    :func:`shared_endpoint`); raises :class:`ValueError` for an unshareable endpoint."""
    return shared_endpoint(reactor, description, environ).listen(factory)


def _split_unescaped(description: str) -> list[str]:
    """Split an endpoint string on ``:`` not preceded by a backslash; escapes are kept."""
    tokens, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ":":
            tokens.append("".join(current))
            current = []
        else:
            current.append(char)
    tokens.append("".join(current))
    return tokens


def worker_endpoint(description: str, index: int) -> str:
    """A per-worker variant of an endpoint each worker needs for itself (``--metrics``,
    ``--manhole``): worker ``i`` gets port ``P + i`` (``tcp:``, ``tcp6:``, ``ssl:``) or path
    ``PATH.i`` (``unix:``); worker 0 keeps the endpoint as given, and port 0 stays 0.

    Raises :class:`ValueError` for other endpoint types.
    """
    tokens = _split_unescaped(description)
    kind = tokens[0].strip().lower()
    if index == 0:
        return description
    key = {"tcp": "port", "tcp6": "port", "ssl": "port", "unix": "address"}.get(kind)
    if key is None:
        raise ValueError(
            f"--workers: {description!r}: only tcp:, tcp6:, ssl: and unix: endpoints can be "
            "given one per worker"
        )
    for position, token in enumerate(tokens[1:], start=1):
        named = token.startswith(key + "=")
        if "=" in token and not named:
            continue
        prefix, value = (key + "=", token[len(key) + 1:]) if named else ("", token)
        if key == "address":
            tokens[position] = f"{prefix}{value}.{index}"
        else:
            if not value.strip().isdigit():
                raise ValueError(f"{description!r}: not a port number: {value!r}")
            port = int(value)
            tokens[position] = f"{prefix}{port + index if port else 0}"
        return ":".join(tokens)
    raise ValueError(f"{description!r}: no {key} given")


def share_limits(config: Config, workers: int) -> Config:
    """The configuration of one of ``workers`` processes: the per-origin limits divided by N.

    Limits kept per process cannot see each other, so each worker gets its share of
    ``--rate``, ``--burst`` (rounded up), ``--max-inflight-per-host`` (rounded up) and of every
    ``[host:...]`` override; the sums over all workers are what the operator configured (a
    rounded-up burst may exceed it by less than N).
    """
    if workers <= 1:
        return config

    def share(value: int) -> int:
        return max(1, math.ceil(value / workers))

    return attrs.evolve(
        config,
        rate=config.rate / workers,
        burst=share(config.burst),
        max_inflight_per_host=share(config.max_inflight_per_host),
        host_limits=tuple(
            HostLimit(h.pattern, h.rate / workers, share(h.burst)) for h in config.host_limits
        ),
    )


class ParentWatch(Service):
    """Stops a worker whose supervisor is gone (killed with SIGKILL, crashed).

    Without it an orphaned worker would keep serving on the shared port forever. It polls
    ``getppid()`` (portable, and a second's delay is fine for this rare case).

    :param parent_pid: the supervisor's pid (:func:`supervisor_pid`).
    :param on_orphaned: what to do then; the lead passes ``reactor.stop`` (a graceful stop).
    """

    def __init__(
        self,
        reactor: Any,
        parent_pid: int,
        on_orphaned: Callable[[], object],
        interval: float = 1.0,
        getppid: Callable[[], int] = os.getppid,
    ) -> None:
        self._reactor = reactor
        self.parent_pid = parent_pid
        self._on_orphaned = on_orphaned
        self._interval = interval
        self._getppid = getppid
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._check)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

    def _check(self) -> None:
        if self._getppid() != self.parent_pid:
            log.critical(
                "supervisor (pid {pid}) is gone: this worker stops", pid=self.parent_pid
            )
            assert self._loop is not None
            self._loop.stop()
            self._loop = None
            self._on_orphaned()

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


# -- the supervisor side -----------------------------------------------------------------------


def options_argv(given: Iterable[tuple[str, str | None]]) -> list[str]:
    """Rebuild ``imageproxy`` arguments from ``(name, value)`` pairs (``Options.given``; a flag
    has value ``None``), as ``--name=value`` so no value can be mistaken for an option."""
    return [f"--{name}" if value is None else f"--{name}={value}" for name, value in given]


def worker_argv(imageproxy_args: Sequence[str]) -> list[str]:
    """The command run for each worker: this Python running ``twistd --nodaemon --pidfile=
    imageproxy ARGS`` (``python -m twisted`` would run ``twist``, not ``twistd``)."""
    return [sys.executable, "-c", _TWISTD, "--nodaemon", "--pidfile=", "imageproxy",
            *imageproxy_args]


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = f"signal {value.signal}"
            return f"ended by {name}"
        return f"exited with status {value.exitCode}"
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    return f"ended ({reason.getErrorMessage()})"


@attrs.define(eq=False)
class _Worker:
    """One worker process (a slot gets a new one at each restart)."""

    index: int
    started: float
    notify: _NotifySocket | None = None
    transport: Any = None  # the IProcessTransport
    pid: int | None = None  # kept after exit (the transport forgets it)
    ready: bool = False
    stopping: bool = False
    killed: bool = False
    last_ping: float = 0.0

    def signal(self, name: str) -> None:
        """Send a signal, ignoring a process that has just exited."""
        try:
            self.transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass


@attrs.define(eq=False)
class _Slot:
    """Worker number ``index``: its current process and its recent failures."""

    index: int
    worker: _Worker | None = None
    rapid_failures: int = 0
    last_spawn: float = float("-inf")
    timer: IDelayedCall | None = None


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, worker: _Worker) -> None:
        self._supervisor = supervisor
        self._worker = worker

    def processEnded(self, reason: Failure) -> None:
        self._supervisor._ended(self._worker, reason)


def _parse_notify(datagram: bytes) -> dict[str, str]:
    """The ``KEY=VALUE`` fields of one sd_notify datagram."""
    return dict(
        line.split("=", 1)
        for line in datagram.decode("utf-8", "replace").split("\n")
        if "=" in line
    )


@implementer(IReadDescriptor)
class _NotifySocket:
    """A worker's private sd_notify socket: an ``AF_UNIX`` datagram socket in the supervisor's
    0700 runtime directory, read by the reactor (Twisted's own datagram port logs three lines
    per socket)."""

    def __init__(
        self, reactor: Any, path: str, on_message: Callable[[dict[str, str]], None]
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._on_message = on_message
        self._socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._socket.setblocking(False)
            self._socket.bind(path)
        except OSError:
            self._socket.close()
            raise
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def doRead(self) -> None:
        while self._socket is not None:
            try:
                datagram = self._socket.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warn("supervisor: notify socket: {error}", error=e.strerror)
                return
            self._on_message(_parse_notify(datagram))

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "sd_notify"

    def close(self) -> None:
        """Stop reading, close the socket and remove its file."""
        if self._socket is None:
            return
        self._reactor.removeReader(self)
        self._socket.close()
        self._socket = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _hard_exit(status: int) -> None:
    """Leave with ``status`` once the reactor has shut down (twistd itself always exits 0)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class Supervisor(Service):
    """Runs ``workers`` copies of ``argv`` and keeps them running (see the module docstring).

    :param argv: the full command of a worker (:func:`worker_argv`).
    :param environ: the supervisor's environment; workers get a copy plus ``$IMAGEPROXY_WORKER``,
        ``$IMAGEPROXY_SUPERVISOR_PID`` and a private ``$NOTIFY_SOCKET``.
    :param stop_timeout: seconds the workers get to exit after SIGTERM before SIGKILL (the lead
        passes ``--drain-timeout`` plus a margin).
    :param worker_watchdog: a ready worker that sends no ``WATCHDOG=1`` for this many seconds is
        killed and restarted (``None``: no watchdog).
    :param min_uptime: a worker that exits sooner counts as a rapid failure; rapid failures
        back off exponentially (1, 2, 4... up to ``max_backoff`` seconds).
    :param max_rapid_failures: consecutive rapid failures of one worker before giving up.
    :param on_give_up: called once when giving up; by default the reactor is stopped (the
        workers get SIGTERM) and the process then exits with status 1.
    :param listen_fds: sockets to pass to every worker (socket activation); by default the
        systemd ones (``$LISTEN_FDS`` when ``$LISTEN_PID`` is this process).
    :param notifier: reports to systemd; by default built from ``environ``.
    :param handle_sighup: install a SIGHUP handler that forwards the signal to the workers.
    :param log_observer: made the log observer of twistd's application (as the proxy's root
        service does), so the supervisor's lines look like the workers'.
    """

    name = "supervisor"  # type: ignore[assignment]

    def __init__(
        self,
        reactor: Any,
        workers: int,
        argv: Sequence[str],
        environ: Mapping[str, str],
        stop_timeout: float,
        *,
        worker_watchdog: float | None = 30.0,
        min_uptime: float = 10.0,
        restart_delay: float = 1.0,
        max_backoff: float = 30.0,
        max_rapid_failures: int = 5,
        on_give_up: Callable[[], object] | None = None,
        listen_fds: Sequence[int] | None = None,
        notifier: Notifier | None = None,
        handle_sighup: bool = True,
        log_observer: ILogObserver | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("--workers: must be at least 1")
        self._reactor = reactor
        self.workers = workers
        self.argv = list(argv)
        self._environ = dict(environ)
        self.stop_timeout = stop_timeout
        self.worker_watchdog = worker_watchdog
        self.min_uptime = min_uptime
        self.restart_delay = restart_delay
        self.max_backoff = max_backoff
        self.max_rapid_failures = max_rapid_failures
        self._on_give_up = on_give_up if on_give_up is not None else self._exit_failure
        self._listen_fds = list(listen_fds) if listen_fds is not None else self._systemd_fds()
        self._notifier = notifier if notifier is not None else Notifier(reactor, environ)
        self._handle_sighup = handle_sighup
        self._observer = log_observer
        self._slots = [_Slot(index) for index in range(workers)]
        self._runtime_dir: str | None = None
        self._spawned = 0
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._kill_timer: IDelayedCall | None = None
        self._loops: list[LoopingCall] = []
        self._previous_hup: Any = None
        self.ready = False  # all workers reported READY=1 at least once
        self.failed = False  # gave up

    def _systemd_fds(self) -> list[int]:
        count = self._environ.get("LISTEN_FDS", "")
        if self._environ.get("LISTEN_PID") != str(os.getpid()) or not count.isdigit():
            return []
        return list(range(_FIRST_LISTEN_FD, _FIRST_LISTEN_FD + int(count)))

    @property
    def pids(self) -> dict[int, int]:
        """The pid of each running worker, by index."""
        return {
            slot.index: slot.worker.pid
            for slot in self._slots
            if slot.worker is not None and slot.worker.pid is not None
        }

    def setServiceParent(self, parent: Any) -> None:
        if self._observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)

    # -- starting --------------------------------------------------------------------------

    def startService(self) -> None:
        """Spawn every worker, start the watchdogs and the SIGHUP handler."""
        super().startService()
        self._stopping = False
        self._runtime_dir = tempfile.mkdtemp(prefix="imageproxy-")
        if self._handle_sighup and hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(
                signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload)
            )
        self._start_loop(self._notifier.watchdog_interval, self._notifier.watchdog)
        if self.worker_watchdog is not None:
            self._start_loop(self.worker_watchdog / 4, self._check_watchdogs)
        log.info("supervisor: starting {count} workers", count=self.workers)
        for slot in self._slots:
            self._spawn(slot)

    def _start_loop(self, interval: float | None, function: Callable[[], None]) -> None:
        if interval is None:
            return
        loop = LoopingCall(function)
        loop.clock = self._reactor
        loop.start(interval, now=False)
        self._loops.append(loop)

    def _worker_env(self, index: int, notify_path: str) -> dict[str, str]:
        env = {
            key: value for key, value in self._environ.items()
            if key not in {"LISTEN_PID", "LISTEN_FDS", "WATCHDOG_PID", "WATCHDOG_USEC",
                           "NOTIFY_SOCKET", LISTEN_FDS_ENV}
        }
        env[WORKER_ENV] = str(index)
        env[SUPERVISOR_ENV] = str(os.getpid())
        env["NOTIFY_SOCKET"] = notify_path
        if self.worker_watchdog is not None:
            env["WATCHDOG_USEC"] = str(int(self.worker_watchdog * 1_000_000))
        if self._listen_fds:
            env[LISTEN_FDS_ENV] = ",".join(
                str(_FIRST_LISTEN_FD + i) for i in range(len(self._listen_fds))
            )
        return env

    def _spawn(self, slot: _Slot) -> None:
        slot.timer = None
        if self._stopping:
            return
        assert self._runtime_dir is not None
        now = self._reactor.seconds()
        self._spawned += 1
        worker = _Worker(slot.index, started=now, last_ping=now)
        notify_path = os.path.join(self._runtime_dir, f"{slot.index}.{self._spawned}")
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2}
        for i, fd in enumerate(self._listen_fds):
            child_fds[_FIRST_LISTEN_FD + i] = fd
        try:
            worker.notify = _NotifySocket(
                self._reactor, notify_path, lambda fields: self._notified(worker, fields)
            )
            worker.transport = self._reactor.spawnProcess(
                _WorkerProtocol(self, worker), self.argv[0], self.argv,
                env=self._worker_env(slot.index, notify_path), childFDs=child_fds,
            )
        except Exception as e:
            if worker.notify is not None:
                worker.notify.close()
            log.critical("supervisor: cannot start worker {index}: {error}",
                         index=slot.index, error=str(e))
            self._give_up()
            return
        worker.pid = worker.transport.pid
        slot.worker = worker
        slot.last_spawn = now
        log.info("supervisor: worker {index} started (pid {pid})",
                 index=slot.index, pid=worker.pid)

    # -- notifications from the workers ----------------------------------------------------

    def _notified(self, worker: _Worker, fields: Mapping[str, str]) -> None:
        now = self._reactor.seconds()
        if fields.get("WATCHDOG") == "1":
            worker.last_ping = now
        if fields.get("STOPPING") == "1":
            worker.stopping = True
        if fields.get("READY") == "1" and not worker.ready:
            worker.ready = True
            worker.last_ping = now
            log.info("supervisor: worker {index} (pid {pid}) is ready",
                     index=worker.index, pid=worker.pid)
            if not self.ready and all(
                slot.worker is not None and slot.worker.ready for slot in self._slots
            ):
                self.ready = True
                self._notifier.ready(f"{self.workers} workers")
                log.info("supervisor: all {count} workers are ready", count=self.workers)

    def _check_watchdogs(self) -> None:
        assert self.worker_watchdog is not None
        now = self._reactor.seconds()
        for slot in self._slots:
            worker = slot.worker
            if (worker is None or not worker.ready or worker.killed or worker.stopping
                    or now - worker.last_ping <= self.worker_watchdog):
                continue
            log.error(
                "supervisor: worker {index} (pid {pid}) sent no watchdog ping for {seconds:.0f}s:"
                " killing it", index=worker.index, pid=worker.pid, seconds=now - worker.last_ping,
            )
            worker.killed = True
            worker.signal("KILL")

    # -- a worker ended --------------------------------------------------------------------

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        slot = self._slots[worker.index]
        if slot.worker is worker:
            slot.worker = None
        if worker.notify is not None:
            worker.notify.close()
            worker.notify = None
        how = _describe_exit(reason)
        if self._stopping:
            log.info("supervisor: worker {index} (pid {pid}) {how}",
                     index=worker.index, pid=worker.pid, how=how)
            self._maybe_stopped()
            return
        now = self._reactor.seconds()
        uptime = now - worker.started
        graceful = worker.stopping and not worker.killed  # it said STOPPING=1: someone stopped it
        (log.info if graceful else log.error)(
            "supervisor: worker {index} (pid {pid}) {how} after {uptime:.1f}s",
            index=worker.index, pid=worker.pid, how=how, uptime=uptime,
        )
        if self.failed:
            return
        if not self.ready:
            log.critical("supervisor: a worker failed during startup (see its log above): "
                         "giving up")
            self._give_up()
            return
        if uptime >= self.min_uptime:
            slot.rapid_failures = 0
        elif not graceful:
            slot.rapid_failures += 1
        if slot.rapid_failures > self.max_rapid_failures:
            log.critical(
                "supervisor: worker {index} failed {count} times in a row within {uptime:.0f}s"
                " of starting: giving up", index=slot.index, count=slot.rapid_failures,
                uptime=self.min_uptime,
            )
            self._give_up()
            return
        delay = 0.0
        if slot.rapid_failures:
            delay = min(self.max_backoff, self.restart_delay * 2 ** (slot.rapid_failures - 1))
        delay = max(delay, slot.last_spawn + self.restart_delay - now)  # at most one a second
        log.info("supervisor: restarting worker {index} in {delay:.1f}s",
                 index=slot.index, delay=delay)
        slot.timer = self._reactor.callLater(delay, self._spawn, slot)

    def _give_up(self) -> None:
        if self.failed:
            return
        self.failed = True
        for slot in self._slots:
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
        self._on_give_up()

    def _exit_failure(self) -> None:
        self._reactor.addSystemEventTrigger("after", "shutdown", _hard_exit, 1)
        try:
            self._reactor.stop()
        except Exception:  # already stopping
            pass

    # -- signals ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Forward SIGHUP to every running worker (each re-reads its key file)."""
        pids = []
        for slot in self._slots:
            if slot.worker is not None and not slot.worker.stopping:
                slot.worker.signal("HUP")
                pids.append(slot.worker.pid)
        log.info("supervisor: SIGHUP forwarded to workers {pids}",
                 pids=", ".join(str(pid) for pid in pids))

    # -- stopping --------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """SIGTERM every worker; fires once all have exited (SIGKILL after ``stop_timeout``)."""
        super().stopService()
        self._stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for slot in self._slots:
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
        self._notifier.stopping()
        self._notifier.close()
        running = [slot.worker for slot in self._slots if slot.worker is not None]
        if not running:
            self._cleanup()
            return succeed(None)
        for worker in running:
            if not worker.stopping:  # a worker that said STOPPING=1 is already on its way
                worker.signal("TERM")
        log.info("supervisor: stopping {count} workers", count=len(running))
        self._stopped = Deferred()
        self._kill_timer = self._reactor.callLater(self.stop_timeout, self._kill_all)
        return self._stopped

    def _kill_all(self) -> None:
        self._kill_timer = None
        running = [slot.worker for slot in self._slots if slot.worker is not None]
        log.warn("supervisor: {count} worker(s) still running {timeout}s after SIGTERM: SIGKILL",
                 count=len(running), timeout=self.stop_timeout)
        for worker in running:
            worker.signal("KILL")

    def _maybe_stopped(self) -> None:
        if any(slot.worker is not None for slot in self._slots) or self._stopped is None:
            return
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        self._cleanup()
        stopped, self._stopped = self._stopped, None
        log.info("supervisor: all workers have exited")
        stopped.callback(None)

    def _cleanup(self) -> None:
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None
