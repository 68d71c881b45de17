#!/usr/bin/env python3
"""The imageproxy benchmark: imageproxy against nginx as a plain reverse proxy, on one core.

``make bench`` runs this script. It installs what it lacks (nginx and wrk from Debian packages,
Pillow into the virtualenv), writes three noise JPEGs (about 8 KiB, 200 KiB and 4 MiB), starts an
nginx origin on 127.0.0.2 and, on 127.0.0.1, nginx as a reverse proxy (one worker) and imageproxy
(one process), both pinned to the same CPU while the load generator and the origin share the
others. Every scenario runs for each proxy in alternation (A B A B ...), several repetitions; the
report gives medians with min-max, ratios against nginx and pass/fail per target, in
``bench/results/<date>.md`` and ``.json``. Everything started is stopped on exit, Ctrl-C included.

The ``zipf`` scenario measures imageproxy's memory cache instead: requests drawn from a Zipf
distribution over 2,000 distinct cacheable URLs, imageproxy with its default cache on and with
cache and coalescing off, alternately, each run from a fresh (cold) process; it reports req/s,
latency, the hit ratio from ``/metrics`` and the requests that reached the origin.

``--quick`` is a smoke run for development (1 repetition, 3 s per scenario, 1,000 connections);
its results go to ``bench/work/results/`` so that they are never committed by mistake.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import importlib
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clients import IdleCrowd, SlowClients, python_load  # noqa: E402
from report import summarise, write_reports  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WORK_ROOT = BENCH / "work"
LOOPBACK = "127.0.0.1"
ORIGIN_ADDR = "127.0.0.2"
MANY_ORIGINS = 1000
IMAGE_TARGETS = {"small": 8 * 1024, "medium": 200 * 1024, "large": 4 * 1024 * 1024}
THROUGHPUT = {  # scenario: (image, connections, spread over many origins)
    "small": ("small", 64, False),
    "medium": ("medium", 32, False),
    "large": ("large", 8, False),
    "many-origins": ("small", 64, True),
}
# The memory scenarios run before many-origins, whose 1,000 pooled origin connections would
# otherwise still be open (and counted) while they measure.
ALL_SCENARIOS = ("small", "medium", "large", "slow-clients", "connections", "many-origins",
                 "zipf", "multi-core")
# The zipf scenario: ZIPF_URLS distinct URLs of the medium image (about 400 MB of distinct
# content against the default 64 MiB cache: only the most popular fit), popularity of rank k
# proportional to 1/k**ZIPF_EXPONENT, ZIPF_SEQUENCE requests sampled once with a fixed seed and
# replayed in the same order by every run.
ZIPF_URLS = 2000
ZIPF_EXPONENT = 1.1
ZIPF_SEQUENCE = 50_000
ZIPF_SEED = "imageproxy-bench-zipf"
ZIPF_IMAGE = "medium"
ZIPF_CONNECTIONS = 32
ZIPF_MODES = ("cache-on", "cache-off")
FRESH_PROCESS = ("slow-clients", "connections")  # memory scenarios: a new proxy process each
OWN_PROCESSES = ("zipf", "multi-core")  # scenarios that start proxies of their own
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
WANT_NOFILE = 200_000
# imageproxy options the harness cannot do without; the others are dropped (and the drop
# reported) when the proxy rejects them at startup, so the harness works while the proxy grows.
PROXY_REQUIRED = ("--listen", "--key-file", "--allow-network")


def say(message: str) -> None:
    """Progress on stdout, with the time since start."""
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


T0 = time.monotonic()


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """What one run does."""

    quick: bool
    reps: int
    duration: int
    warmup: int
    scenarios: tuple[str, ...]
    proxies: tuple[str, ...]
    slow_clients: int
    slow_rate: int
    slow_rcvbuf: int
    slow_duration: float
    crowd: int
    crowd_idle: float
    budget: float
    loadgen: str
    out_dir: Path
    proxy_cache: bool
    install: bool
    workers: int
    strict: bool
    zipf_duration: int


def parse_args(argv: Sequence[str] | None) -> Settings:
    """Command-line options into :class:`Settings`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repetition, 3 s per scenario, 1,000 connections")
    p.add_argument("--reps", type=int, help="repetitions per scenario and proxy (default 3)")
    p.add_argument("--duration", type=int, help="seconds per throughput run (default 8)")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}")
    p.add_argument("--proxies", default="nginx,imageproxy", help="nginx,imageproxy or one")
    p.add_argument("--connections", type=int, help="connections scenario size (default 10000)")
    p.add_argument("--python-loadgen", action="store_true",
                   help="use the Python load generator even when wrk is there")
    p.add_argument("--proxy-cache", action="store_true",
                   help="leave imageproxy's cache and request coalescing on")
    p.add_argument("--no-install", action="store_true", help="never call apt-get or pip")
    p.add_argument("--workers", type=int, default=2, help="workers of the multi-core run")
    p.add_argument("--out", type=Path, help="results directory (default bench/results, "
                   "bench/work/results with --quick)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a measured target fails (default: 0 once results exist)")
    p.add_argument("--zipf-duration", type=int,
                   help="seconds per zipf run (default 5, 3 with --quick)")
    p.add_argument("--budget", type=float, default=570.0,
                   help="seconds after which remaining runs are skipped (default 570)")
    a = p.parse_args(argv)
    chosen = {s for s in a.scenarios.split(",") if s}
    if chosen - set(ALL_SCENARIOS):
        p.error(f"unknown scenarios: {', '.join(sorted(chosen - set(ALL_SCENARIOS)))}")
    scenarios = tuple(s for s in ALL_SCENARIOS if s in chosen)
    proxies = tuple(x for x in a.proxies.split(",") if x)
    if not proxies or set(proxies) - {"nginx", "imageproxy"}:
        p.error("--proxies takes nginx, imageproxy or both")
    quick = a.quick
    reps = a.reps or (1 if quick else 3)
    duration = a.duration or (3 if quick else 8)
    out = a.out or (WORK_ROOT / "results" if quick else BENCH / "results")
    return Settings(
        quick=quick, reps=reps, duration=duration, warmup=1, scenarios=scenarios,
        proxies=proxies, slow_clients=200, slow_rate=20 * 1024, slow_rcvbuf=4096,
        slow_duration=3.0 if quick else 10.0,
        crowd=a.connections or (1000 if quick else 10_000), crowd_idle=1.0 if quick else 2.0,
        budget=a.budget, loadgen="python" if a.python_loadgen else "wrk", out_dir=out,
        proxy_cache=a.proxy_cache, install=not a.no_install, workers=a.workers,
        strict=a.strict, zipf_duration=a.zipf_duration or (3 if quick else 5),
    )


# --------------------------------------------------------------------------------------------
# Set-up: tools, file limit, images


def _apt_install(packages: Sequence[str]) -> None:
    """Install Debian packages without letting their scripts start system services."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                           check=True)
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    finally:
        if made_policy:
            policy.unlink()


def find_nginx() -> str | None:
    """The nginx binary (it lives in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def ensure_tools(settings: Settings) -> dict[str, str | None]:
    """nginx (required), wrk (else the Python load generator) and Pillow (required)."""
    missing = []
    if find_nginx() is None:
        missing.append("nginx")
    if settings.loadgen == "wrk" and shutil.which("wrk") is None:
        missing.append("wrk")
    if missing and settings.install and os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"installing {', '.join(missing)} with apt-get")
        try:
            _apt_install(missing)
        except subprocess.CalledProcessError as e:
            say(f"apt-get failed ({e}); carrying on with what is there")
    try:
        importlib.import_module("PIL.Image")
    except ImportError:
        if not settings.install:
            raise SystemExit("Pillow is missing (pip install Pillow)")
        say("installing Pillow into the virtualenv")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "Pillow"], check=True)
        importlib.invalidate_caches()
    nginx = find_nginx()
    if nginx is None:
        raise SystemExit("nginx is missing and could not be installed (apt-get install nginx)")
    wrk = shutil.which("wrk") if settings.loadgen == "wrk" else None
    if settings.loadgen == "wrk" and wrk is None:
        say("wrk is missing: using the Python load generator")
    return {"nginx": nginx, "wrk": wrk}


def raise_file_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE for this process and its children (the proxies inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (WANT_NOFILE, max(hard, WANT_NOFILE)))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def make_images(directory: Path) -> dict[str, dict[str, Any]]:
    """Noise JPEGs near the target sizes (kept across runs), checked to decode."""
    from PIL import Image  # installed by ensure_tools

    directory.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, target in IMAGE_TARGETS.items():
        path = directory / f"{name}.jpg"
        if not (path.exists() and abs(path.stat().st_size - target) <= target * 0.05):
            rng = random.Random(f"imageproxy-bench-{name}")
            side = max(8, int(math.sqrt(target / 1.5)))
            for _ in range(12):
                # Smooth gradients under noise: a plausible photo-like JPEG whose size follows
                # the pixel count closely.
                noise = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
                gradient = Image.linear_gradient("L").resize((side, side)).convert("RGB")
                image = Image.blend(noise, gradient, 0.3)
                image.save(path, "JPEG", quality=85)
                size = path.stat().st_size
                if abs(size - target) <= target * 0.02:
                    break
                side = max(8, int(side * math.sqrt(target / size)))
        with Image.open(path) as check:
            check.load()
            dims = check.size
        data = path.read_bytes()
        images[name] = {"file": path.name, "bytes": len(data), "width": dims[0],
                        "height": dims[1], "sha256": hashlib.sha256(data).hexdigest()}
    return images


# --------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Child processes, each in its own session (process group), all stopped at the end."""

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: Sequence[str], cpus: set[int] | None, log: Path,
              env: dict[str, str] | None = None, cwd: Path | None = None
              ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` pinned to ``cpus`` (taskset), output to ``log``."""
        full = list(cmd)
        if cpus is not None:
            full = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *full]
        with open(log, "ab") as out:
            proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=env, cwd=cwd)
        self._procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``."""
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop in {timeout:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers left behind by a leader that died first.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop everything, newest first."""
        for name in reversed(list(self._procs)):
            self.stop(name)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_ticks(pids: Sequence[int]) -> int:
    """utime + stime of the processes, in clock ticks (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident set size of the processes, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
    return total


class RssSampler:
    """Samples the RSS of a process tree every 100 ms in a thread; keeps the peak."""

    def __init__(self, pids: Sequence[int], interval: float = 0.1):
        self._pids = list(pids)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = rss_bytes(self._pids)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_bytes(self._pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self._pids))


def _proc_net_endpoint(addr: str, port: int) -> str:
    (value,) = struct.unpack("=I", socket.inet_aton(addr))
    return f"{value:08X}:{port:04X}"


def kernel_queues(origin: tuple[str, int], proxy: tuple[str, int]) -> dict[str, int]:
    """Bytes in the TCP queues along origin -> proxy -> clients, from /proc/net/tcp.

    Both ends of a loopback connection are listed: ``tx_queue`` is data written and not yet
    acknowledged, ``rx_queue`` data received and not yet read by the application. The queues are
    split by hop so that what the proxy read and what it wrote can be told apart.
    """
    o, p = _proc_net_endpoint(*origin), _proc_net_endpoint(*proxy)
    out = {"origin_tx": 0, "proxy_upstream_rx": 0, "proxy_downstream_tx": 0, "clients_rx": 0,
           "other": 0, "sockets": 0}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN: rx_queue is the accept backlog
                continue
            local, remote = parts[1], parts[2]
            tx, rx = (int(x, 16) for x in parts[4].split(":"))
            if local == o:
                out["origin_tx"] += tx
                out["other"] += rx
            elif remote == o:
                out["proxy_upstream_rx"] += rx
                out["other"] += tx
            elif local == p:
                out["proxy_downstream_tx"] += tx
                out["other"] += rx
            elif remote == p:
                out["clients_rx"] += rx
                out["other"] += tx
            else:
                continue
            out["sockets"] += 1
    return out


def accepted_connections(addr: str, port: int) -> int:
    """Established connections to a listening socket that its process has accepted.

    /proc/net/tcp lists established connections still in the accept queue too; the listening
    socket's ``rx_queue`` is the length of that queue.
    """
    endpoint = _proc_net_endpoint(addr, port)
    established = backlog = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] != endpoint:
                continue
            if parts[3] == "01":
                established += 1
            elif parts[3] == "0A":
                backlog += int(parts[4].split(":")[1], 16)
    return established - backlog


def free_port(addr: str) -> int:
    """A TCP port free on ``addr`` right now."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, host: str = LOOPBACK, timeout: float = 10.0
             ) -> tuple[int, dict[str, str], bytes]:
    """One GET: status, headers (lower-case names), body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "imageproxy-bench"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The origin and the proxies


def render(template: str, out: Path, values: dict[str, str]) -> None:
    """Fill ``@NAME@`` placeholders of a template in bench/ into ``out``."""
    text = (BENCH / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"unfilled placeholders in {template}: {leftover}")
    out.write_text(text)


def many_addresses(count: int = MANY_ORIGINS) -> list[str]:
    """Distinct loopback addresses, one per origin host: 127.0.3.1 ... 127.0.6.250."""
    return [f"127.0.{3 + i // 250}.{1 + i % 250}" for i in range(count)]


@dataclass
class Origin:
    """The nginx origin: throughput port, counting port, many-origins port, zipf port."""

    port: int
    count_port: int
    many_port: int
    pid: int
    count_log: Path
    zipf_port: int
    zipf_log: Path


@dataclass
class Target:
    """A proxy under test and how to address an origin file through it."""

    name: str
    port: int
    pid: int
    path_for: Callable[[str, int, str], str]  # (host, port, "/file?query") -> request path
    options: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def sign_path(key: bytes, url: str) -> str:
    """The camo hex path of ``url``: ``/<hex HMAC-SHA1(key, url)>/<hex(url)>``."""
    raw = url.encode("utf-8")
    return f"/{hmac.new(key, raw, hashlib.sha1).hexdigest()}/{raw.hex()}"


class Bench:
    """Starts the processes, runs the scenarios, collects the figures."""

    def __init__(self, settings: Settings, tools: dict[str, str | None], work: Path):
        self.s = settings
        self.tools = tools
        self.work = work
        self.procs = Processes()
        cpus = sorted(os.sched_getaffinity(0))
        self.all_cpus = set(cpus)
        if len(cpus) >= 2:
            self.proxy_cpus: set[int] | None = {cpus[0]}
            self.load_cpus: set[int] | None = set(cpus[1:])
            os.sched_setaffinity(0, self.load_cpus)  # the Python clients and wrk run here too
        else:
            self.proxy_cpus = self.load_cpus = None
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.nginx_connections = max(1024, min(60000, self.nofile - 100))
        self.key = secrets.token_hex(32).encode()
        self.key_file = work / "key"
        self.key_file.write_bytes(self.key + b"\n")
        self.key_file.chmod(0o600)
        self.images: dict[str, dict[str, Any]] = {}
        self.origin: Origin | None = None
        self.targets: dict[str, Target] = {}
        self.runs: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.validation: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()
        self._warmed: set[tuple[str, str]] = set()
        self.rejected: set[str] = set()  # imageproxy options it refused at startup
        self.used_for_memory: set[str] = set()  # proxies to restart before the next scenario
        self.zipf_info: dict[str, Any] = {}  # the zipf workload and the options of its runs

    # -- processes ---------------------------------------------------------------------------

    def _nginx_user(self) -> str:
        return "user root root;" if os.geteuid() == 0 else ""

    def start_origin(self) -> None:
        """The origin nginx, on the load CPUs; retried with other ports on a clash."""
        nginx = self.tools["nginx"]
        assert nginx is not None
        for d in ("origin-tmp", "proxy-tmp"):
            (self.work / d).mkdir(exist_ok=True)
        for attempt in range(3):
            port, count_port = free_port(ORIGIN_ADDR), free_port(ORIGIN_ADDR)
            zipf_port = free_port(ORIGIN_ADDR)
            many_port = free_port("127.0.3.1")
            listens = "\n".join(f"        listen {a}:{many_port};" for a in many_addresses())
            conf = self.work / "origin.conf"
            render("nginx-origin.conf.in", conf, {
                "USER": self._nginx_user(), "WORK": str(self.work),
                "IMAGES": str(self.work.parent / "images"), "ORIGIN_ADDR": ORIGIN_ADDR,
                "ORIGIN_PORT": str(port), "COUNT_PORT": str(count_port),
                "MANY_LISTEN": listens, "NOFILE": str(self.nofile),
                "CONNECTIONS": str(self.nginx_connections), "ZIPF_PORT": str(zipf_port),
                "ZIPF_IMAGE": ZIPF_IMAGE,
            })
            log = self.work / "origin.out"
            proc = self.procs.start("origin", [nginx, "-p", str(self.work), "-c", str(conf),
                                               "-e", str(self.work / "origin-error.log")],
                                    self.load_cpus, log)
            if self._wait_http(proc, ORIGIN_ADDR, port, "/small.jpg", 10) == "up":
                self.origin = Origin(port, count_port, many_port, proc.pid,
                                     self.work / "origin-count.log", zipf_port,
                                     self.work / "origin-zipf.log")
                say(f"origin nginx up on {ORIGIN_ADDR}:{port} (+{count_port}, zipf "
                    f"+{zipf_port}, {MANY_ORIGINS} hosts on :{many_port})")
                return
            self.procs.stop("origin")
            say(f"origin nginx failed to start (attempt {attempt + 1}): "
                f"{self._tail(self.work / 'origin-error.log')}")
        raise RuntimeError("the origin nginx does not start")

    def start_nginx_proxy(self) -> None:
        """nginx as a reverse proxy, one worker, on the proxy CPU."""
        nginx = self.tools["nginx"]
        assert nginx is not None and self.origin is not None
        port = free_port(LOOPBACK)
        conf = self.work / "proxy-nginx.conf"
        render("nginx-proxy.conf.in", conf, {
            "USER": self._nginx_user(), "WORK": str(self.work), "ORIGIN_ADDR": ORIGIN_ADDR,
            "ORIGIN_PORT": str(self.origin.port), "COUNT_PORT": str(self.origin.count_port),
            "LISTEN_ADDR": LOOPBACK, "LISTEN_PORT": str(port), "NOFILE": str(self.nofile),
            "CONNECTIONS": str(self.nginx_connections),
        })
        proc = self.procs.start("nginx", [nginx, "-p", str(self.work), "-c", str(conf),
                                          "-e", str(self.work / "proxy-nginx-error.log")],
                                self.proxy_cpus, self.work / "proxy-nginx.out")
        if self._wait_http(proc, LOOPBACK, port, "/small.jpg", 10) != "up":
            raise RuntimeError("nginx proxy does not start: "
                               + self._tail(self.work / "proxy-nginx-error.log"))
        origin = self.origin

        def path_for(host: str, oport: int, file: str) -> str:
            if (host, oport) == (ORIGIN_ADDR, origin.port):
                return file
            if (host, oport) == (ORIGIN_ADDR, origin.count_port):
                return "/c" + file
            return f"/o/{host}:{oport}{file}"

        self.targets["nginx"] = Target("nginx", port, proc.pid, path_for,
                                       options=["worker_processes 1", "proxy keepalive 1024"])
        say(f"nginx proxy up on {LOOPBACK}:{port}")

    def imageproxy_options(self, port: int, workers: int | None, cache: bool | None = None,
                           metrics_port: int | None = None) -> list[tuple[str, str | None]]:
        """The contract command line, plus the capacity settings a benchmark needs.

        ``cache`` None follows ``--proxy-cache``; True leaves imageproxy's default cache and
        coalescing on, False turns both off.
        """
        opts: list[tuple[str, str | None]] = [
            # nginx's listen backlog on Linux is 511; Twisted's default of 50 overflows under a
            # connection burst (SYN cookies, half-open connections): same backlog for both.
            ("--listen", f"tcp:{port}:interface={LOOPBACK}:backlog=511"),
            ("--key-file", str(self.key_file)),
            ("--allow-network", "127.0.0.0/8"),
            ("--log-level", "warn"),
            ("--no-access-log", None),
            ("--rate", "100000"),
            ("--burst", "100000"),
            ("--max-inflight-per-host", "1000"),
            ("--max-size", "8388608"),
            # A 10,000-request burst on one origin host would otherwise get 503s by design
            # (overload shedding): the connections scenario measures capacity, not politeness.
            ("--max-inflight", "100000"),
            ("--max-queue", "100000"),
            ("--queue-timeout", "60"),
        ]
        if not (self.s.proxy_cache if cache is None else cache):
            opts += [("--cache-size", "0"), ("--coalesce-max-size", "0")]
        if metrics_port:
            opts.append(("--metrics", f"tcp:{metrics_port}:interface={LOOPBACK}"))
        if workers:
            opts.append(("--workers", str(workers)))
        return [(o, v) for o, v in opts if o not in self.rejected]

    def start_imageproxy(self, name: str, cpus: set[int] | None, workers: int | None = None,
                         cache: bool | None = None, metrics_port: int | None = None
                         ) -> Target | None:
        """Start imageproxy, dropping options it rejects; None when it cannot run."""
        twistd = Path(sys.executable).parent / "twistd"
        port = free_port(LOOPBACK)
        opts = self.imageproxy_options(port, workers, cache, metrics_port)
        required = set(PROXY_REQUIRED) | ({"--workers"} if workers else set())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        dropped = sorted(self.rejected)
        log = self.work / f"{name}.log"
        for _ in range(len(opts) + 1):
            argv = [a for opt, val in opts for a in ((opt,) if val is None else (opt, val))]
            cmd = [str(twistd), "--nodaemon", "--pidfile=", "imageproxy", *argv]
            log.write_bytes(b"")
            proc = self.procs.start(name, cmd, cpus, log, env=env, cwd=self.work)
            state = self._wait_http(proc, LOOPBACK, port, "/healthz", 30)
            if state == "up":
                target = Target(name, port, proc.pid,
                                lambda h, p, f: sign_path(self.key, f"http://{h}:{p}{f}"),
                                options=argv, dropped=dropped)
                say(f"{name} up on {LOOPBACK}:{port}"
                    + (f" (dropped: {' '.join(dropped)})" if dropped else ""))
                return target
            self.procs.stop(name)
            last = self._last_line(log)
            if state != "exited":
                self.notes.append(f"{name}: did not answer within 30 s: {last}")
                return None
            rejected = rejected_option(last, [o for o, _ in opts])
            if rejected is None or rejected in required:
                self.notes.append(f"{name}: does not start: {last}")
                say(f"{name} does not start: {last}")
                return None
            say(f"{name} rejected {rejected}: dropping it ({last})")
            dropped.append(rejected)
            self.rejected.add(rejected)
            opts = [(o, v) for o, v in opts if o != rejected]
        return None

    def _wait_http(self, proc: subprocess.Popen[bytes], host: str, port: int, path: str,
                   timeout: float) -> str:
        """'up' once ``path`` answers 200 (or, after 3 s, any status), 'exited' or 'timeout'."""
        deadline = time.monotonic() + timeout
        first_answer = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "exited"
            try:
                status, _, _ = http_get(port, path, host=host, timeout=2)
            except OSError:
                status = 0
            if status == 200:
                return "up"
            if status:
                first_answer = first_answer or time.monotonic()
                if time.monotonic() - first_answer > 3:
                    self.notes.append(f"{host}:{port}{path} answers {status}, not 200")
                    return "up"
            time.sleep(0.2)
        return "timeout"

    @staticmethod
    def _tail(path: Path, lines: int = 3) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
        return ""

    @staticmethod
    def _last_line(path: Path) -> str:
        with contextlib.suppress(OSError):
            lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
            if lines:
                return lines[-1].strip()[:300]
        return "(no output)"

    def alive(self, name: str) -> bool:
        """Whether a target's process still runs (restarting imageproxy once if not)."""
        target = self.targets.get(name)
        if target is None:
            return False
        try:
            os.kill(target.pid, 0)
            with open(f"/proc/{target.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except OSError:
            pass
        last = self._last_line(self.work / f"{name}.log")
        self.notes.append(f"{name} died during the run: {last}")
        say(f"{name} died; restarting it")
        self.procs.stop(name)
        del self.targets[name]
        if name == "imageproxy":
            target = self.start_imageproxy(name, self.proxy_cpus)
            if target is not None:
                self.targets[name] = target
                return True
        return False

    def restart(self, name: str) -> bool:
        """A fresh proxy process for a memory scenario, warmed up with a few requests.

        Memory figures of a process that earlier scenarios left with free heap would depend on
        the scenarios run before; a fresh process makes them reproducible.
        """
        self.procs.stop(name)
        self.targets.pop(name, None)
        if name == "nginx":
            self.start_nginx_proxy()
        else:
            target = self.start_imageproxy(name, self.proxy_cpus)
            if target is not None:
                self.targets[name] = target
        target = self.targets.get(name)
        if target is None:
            return False
        assert self.origin is not None
        warm = [(self.origin.port, f"/{image}.jpg") for image in ("small", "medium", "small")]
        warm.append((self.origin.count_port, "/small.jpg?s=warm-up"))
        for port, file in warm:
            with contextlib.suppress(OSError):
                http_get(target.port, target.path_for(ORIGIN_ADDR, port, file))
        return True

    # -- checks ------------------------------------------------------------------------------

    def validate(self, target: Target) -> dict[str, Any]:
        """Fetch each image through ``target`` and compare it with the file."""
        assert self.origin is not None
        checks = {}
        cases = [(name, ORIGIN_ADDR, self.origin.port, f"/{name}.jpg", name)
                 for name in IMAGE_TARGETS]
        cases.append(("many-origins", many_addresses()[-1], self.origin.many_port,
                      "/small.jpg", "small"))
        cases.append(("counting", ORIGIN_ADDR, self.origin.count_port,
                      "/large.jpg?s=validate", "large"))
        for label, host, port, file, image in cases:
            try:
                status, headers, body = http_get(target.port, target.path_for(host, port, file))
            except OSError as e:
                checks[label] = {"ok": False, "error": str(e)}
                continue
            ok = status == 200 and hashlib.sha256(body).hexdigest() == self.images[image]["sha256"]
            checks[label] = {"ok": ok, "status": status, "bytes": len(body),
                             "content_type": headers.get("content-type"),
                             "content_length": headers.get("content-length"),
                             "etag": headers.get("etag")}
        return checks

    # -- load --------------------------------------------------------------------------------

    def load(self, target: Target, paths: Sequence[str], connections: int, duration: int,
             cpus: set[int] | None, sequence: Sequence[int] | None = None) -> dict[str, float]:
        """Run the load generator against ``target``; the wrk-``done()`` fields.

        Without ``sequence`` the requests go round-robin over ``paths`` from a random start;
        with it they follow ``paths[sequence[0]], paths[sequence[1]], ...`` from the start.
        """
        wrk = self.tools.get("wrk")
        if not wrk:
            if sequence is not None:
                return python_load(LOOPBACK, target.port, [paths[i] for i in sequence],
                                   connections, duration, start=0)
            return python_load(LOOPBACK, target.port, paths, connections, duration)
        threads = max(1, min(connections, len(self.load_cpus or self.all_cpus)))
        script = self.work / "wrk.lua"
        script.write_text(wrk_script(paths if len(paths) > 1 or sequence else (), sequence,
                                     threads))
        cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
               "--latency", "-s", str(script), f"http://{LOOPBACK}:{target.port}{paths[0]}"]
        if cpus is not None:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        with open(self.work / "wrk.out", "a") as f:
            f.write(f"### {target.name} {connections} conns {len(paths)} paths\n{out.stdout}"
                    f"{out.stderr}\n")
        match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
        if not match:
            raise RuntimeError(f"wrk failed: {out.stderr.strip() or out.stdout[-500:]}")
        return json.loads(match.group(1))

    def over_budget(self) -> bool:
        """Whether the run has used up its time budget."""
        return time.monotonic() - self.started > self.s.budget

    def throughput_run(self, scenario: str, target: Target, rep: int,
                       cpus: set[int] | None, label: str | None = None) -> dict[str, Any]:
        """One throughput measurement: wrk figures plus the proxy's CPU and peak RSS."""
        assert self.origin is not None
        image, connections, many = THROUGHPUT[scenario]
        if many:
            paths = [target.path_for(a, self.origin.many_port, f"/{image}.jpg")
                     for a in many_addresses()]
        else:
            paths = [target.path_for(ORIGIN_ADDR, self.origin.port, f"/{image}.jpg")]
        key = (label or scenario, target.name)
        if key not in self._warmed:
            self.load(target, paths, connections, self.s.warmup, cpus)
            self._warmed.add(key)
        return {
            "scenario": label or scenario, "proxy": target.name, "rep": rep,
            "connections": connections, "image_bytes": self.images[image]["bytes"],
            **self.measured_load(target, paths, connections, self.s.duration, cpus, image),
        }

    def measured_load(self, target: Target, paths: Sequence[str], connections: int,
                      duration: int, cpus: set[int] | None, image: str,
                      sequence: Sequence[int] | None = None) -> dict[str, Any]:
        """One load run with the proxy's CPU time and peak RSS: the throughput figures."""
        pids = process_tree(target.pid)
        ticks0 = cpu_ticks(pids)
        with RssSampler(pids) as rss:
            result = self.load(target, paths, connections, duration, cpus, sequence)
        ticks = cpu_ticks(pids) - ticks0
        seconds = result["duration_us"] / 1e6
        requests = int(result["requests"])
        errors = sum(int(result[k]) for k in ("connect", "read", "write", "status", "timeout"))
        per_request = result["bytes"] / requests if requests else 0
        valid = requests > 0 and errors <= 0.01 * requests and \
            per_request >= self.images[image]["bytes"]
        return {
            "requests": requests, "seconds": seconds,
            "rps": requests / seconds if seconds else 0.0,
            "mb_s": result["bytes"] / seconds / 1e6 if seconds else 0.0,
            "p50_ms": result["p50"] / 1000, "p90_ms": result["p90"] / 1000,
            "p99_ms": result["p99"] / 1000, "max_ms": result["max"] / 1000,
            "cpu_us_per_req": ticks / CLK_TCK * 1e6 / requests if requests else None,
            "cpu_util": ticks / CLK_TCK / seconds if seconds else None,
            "peak_rss_mib": rss.peak / 2**20,
            "errors": errors,
            "error_detail": {k: int(result[k]) for k in ("connect", "read", "write", "status",
                                                          "timeout")},
            "valid": valid,
        }

    def slow_run(self, target: Target, rep: int) -> dict[str, Any]:
        """Slow clients: what the proxy pulls from the origin against what it delivers."""
        assert self.origin is not None
        tag = f"{target.name}-{rep}-{secrets.token_hex(3)}"
        paths = [target.path_for(ORIGIN_ADDR, self.origin.count_port,
                                 f"/large.jpg?s={tag}-{i}") for i in range(self.s.slow_clients)]
        pids = process_tree(target.pid)
        baseline = rss_bytes(pids)
        clients = SlowClients(LOOPBACK, target.port, paths, self.s.slow_rcvbuf, self.s.slow_rate)
        try:
            with RssSampler(pids) as rss:
                clients.start()
                clients.read_for(self.s.slow_duration)
                # Stop reading and let every buffer on the path fill: the steady state in which
                # whatever the origin sent is either delivered, queued in a kernel, or held by
                # the proxy.
                time.sleep(1.0)
                queues = kernel_queues((ORIGIN_ADDR, self.origin.count_port),
                                       (LOOPBACK, target.port))
                delivered = clients.delivered_body
                held_rss = rss_bytes(pids)
            statuses = clients.statuses()
            closed_early = clients.closed_early()
            connected = len(clients.clients)
        finally:
            clients.close()
        pulled, logged = self._origin_bytes(tag, self.s.slow_clients)
        n = max(1, connected)
        read = pulled - queues["origin_tx"] - queues["proxy_upstream_rx"]
        written = delivered + queues["proxy_downstream_tx"] + queues["clients_rx"]
        held = read - written  # = pulled - delivered - every kernel queue on the path
        return {
            "scenario": "slow-clients", "proxy": target.name, "rep": rep,
            "clients": connected, "connect_errors": clients.connect_errors,
            "statuses": {str(k): v for k, v in statuses.items()}, "closed_early": closed_early,
            "origin_responses_logged": logged,
            "pulled_bytes": pulled, "delivered_bytes": delivered,
            "read_by_proxy_bytes": read, "written_by_proxy_bytes": written,
            "kernel_queued_bytes": pulled - delivered - held, "kernel_queues": queues,
            "read_per_client_kib": read / n / 1024,
            "held_bytes": held, "held_per_client_kib": held / n / 1024,
            "pulled_per_client_kib": pulled / n / 1024,
            "delivered_per_client_kib": delivered / n / 1024,
            "baseline_rss_mib": baseline / 2**20, "peak_rss_mib": rss.peak / 2**20,
            "rss_growth_mib": (rss.peak - baseline) / 2**20,
            "rss_at_stall_mib": held_rss / 2**20,
            "valid": statuses.get(200, 0) == connected and connected == self.s.slow_clients,
        }

    def _origin_bytes(self, tag: str, expected: int, wait: float = 10.0) -> tuple[int, int]:
        """Body bytes the counting origin sent for ``tag``'s requests, once all are logged."""
        assert self.origin is not None
        deadline = time.monotonic() + wait
        pattern = re.compile(rf"s={re.escape(tag)}-\d+ (\d+) (\d+) (\d+)$")
        while True:
            total = count = 0
            with contextlib.suppress(OSError):
                for line in self.origin.count_log.read_text().splitlines():
                    m = pattern.search(line)
                    if m:
                        total += int(m.group(3))
                        count += 1
            if count >= expected or time.monotonic() > deadline:
                return total, count
            time.sleep(0.2)

    def crowd_run(self, target: Target, rep: int) -> dict[str, Any]:
        """Many idle connections, then one request on each: all served, RSS per connection."""
        assert self.origin is not None
        path = target.path_for(ORIGIN_ADDR, self.origin.port, "/small.jpg")
        pids = process_tree(target.pid)
        baseline = rss_bytes(pids)
        before = accepted_connections(LOOPBACK, target.port)
        nginx_log = self.work / "proxy-nginx-error.log"
        log_offset = nginx_log.stat().st_size if nginx_log.exists() else 0
        crowd = IdleCrowd(LOOPBACK, target.port, self.s.crowd)
        try:
            with RssSampler(pids) as rss:
                t0 = time.monotonic()
                connected = crowd.connect(deadline_s=60)
                connect_s = time.monotonic() - t0
                # Held = accepted by the proxy, not merely queued in the kernel.
                deadline = time.monotonic() + 20
                while (accepted_connections(LOOPBACK, target.port) - before < connected
                       and time.monotonic() < deadline):
                    time.sleep(0.2)
                time.sleep(self.s.crowd_idle)
                held = accepted_connections(LOOPBACK, target.port) - before
                held_rss = rss_bytes(pids)
                served = crowd.request_all(path, self.images["small"]["bytes"], deadline_s=90)
        finally:
            crowd.close()
        n = max(1, connected)
        if target.name == "nginx" and nginx_log.exists():
            with open(nginx_log, errors="replace") as f:
                f.seek(log_offset)
                if "worker_connections are not enough" in f.read():
                    note = (f"nginx closed idle connections in the connections scenario: its "
                            f"worker_connections ({self.nginx_connections}, from the file limit "
                            f"{self.nofile}) cannot hold every client plus its upstream "
                            f"connection")
                    if note not in self.notes:
                        self.notes.append(note)
        return {
            "scenario": "connections", "proxy": target.name, "rep": rep,
            "wanted": self.s.crowd, "connected": connected,
            "connect_errors": crowd.connect_errors, "connect_s": connect_s,
            "held": held, "served": int(served["ok"]),
            "bad_status": int(served["bad_status"]), "bad_length": int(served["bad_length"]),
            "failed": int(served["failed"]), "unfinished": int(served["unfinished"]),
            "serve_s": served["seconds"],
            "other_statuses": {k[7:]: int(v) for k, v in served.items()
                               if k.startswith("status_")},
            "baseline_rss_mib": baseline / 2**20, "held_rss_mib": held_rss / 2**20,
            "rss_per_conn_kib": (held_rss - baseline) / n / 1024,
            "peak_rss_mib": rss.peak / 2**20,
            "valid": connected == self.s.crowd,
        }

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> None:
        """Everything: processes up, validation, scenarios in alternation, multi-core."""
        self.images = make_images(self.work.parent / "images")
        say("images: " + ", ".join(f"{k} {v['bytes']} B ({v['width']}x{v['height']})"
                                   for k, v in self.images.items()))
        self.start_origin()
        # zipf and multi-core start imageproxy processes of their own.
        shared = any(s not in OWN_PROCESSES for s in self.s.scenarios)
        if shared and "nginx" in self.s.proxies:
            self.start_nginx_proxy()
        if shared and "imageproxy" in self.s.proxies:
            target = self.start_imageproxy("imageproxy", self.proxy_cpus)
            if target is not None:
                self.targets["imageproxy"] = target
        for name, target in self.targets.items():
            self.validation[name] = self.validate(target)
            bad = {k: v for k, v in self.validation[name].items() if not v["ok"]}
            if bad:
                say(f"{name}: validation failed: {bad}")
                self.notes.append(f"{name}: validation failed for {', '.join(bad)}")
            else:
                say(f"{name}: every image comes through intact")
        order = [p for p in self.s.proxies if p in self.targets]
        for scenario in self.s.scenarios:
            if scenario in OWN_PROCESSES:
                continue
            for rep in range(1, self.s.reps + 1):
                for name in order:
                    if self.over_budget():
                        self._skip(scenario, name, rep, "time budget used up")
                        continue
                    # A memory scenario gets a fresh process, and so does the scenario after
                    # it (a process that held 10,000 connections is not a typical one).
                    fresh = scenario in FRESH_PROCESS or name in self.used_for_memory
                    if not self.alive(name) or (fresh and not self.restart(name)):
                        self._skip(scenario, name, rep, "proxy not running")
                        continue
                    self.used_for_memory.discard(name)
                    if scenario in FRESH_PROCESS:
                        self.used_for_memory.add(name)
                    check = self._validation_case(scenario)
                    if check and not self.validation.get(name, {}).get(check, {}).get("ok"):
                        self._skip(scenario, name, rep, f"validation of {check} failed")
                        continue
                    self._measure(scenario, self.targets[name], rep)
        if "zipf" in self.s.scenarios:
            if "imageproxy" in self.s.proxies:
                self.zipf()
            else:
                self.notes.append("zipf skipped: it measures imageproxy only")
        if "multi-core" in self.s.scenarios and "imageproxy" in self.s.proxies:
            self.multi_core()

    @staticmethod
    def _validation_case(scenario: str) -> str | None:
        if scenario in THROUGHPUT:
            return "many-origins" if THROUGHPUT[scenario][2] else THROUGHPUT[scenario][0]
        return {"slow-clients": "counting", "connections": "small"}.get(scenario)

    def _skip(self, scenario: str, proxy: str, rep: int, why: str) -> None:
        self.runs.append({"scenario": scenario, "proxy": proxy, "rep": rep, "skipped": why})

    def _measure(self, scenario: str, target: Target, rep: int) -> None:
        try:
            if scenario in THROUGHPUT:
                r = self.throughput_run(scenario, target, rep, self.load_cpus)
                say(f"{scenario:13} {target.name:10} rep {rep}: {r['rps']:9.0f} req/s "
                    f"{r['mb_s']:7.1f} MB/s p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
                    f"cpu {r['cpu_us_per_req'] or 0:.0f} us/req rss {r['peak_rss_mib']:.0f} MiB"
                    + ("" if r["valid"] else f"  INVALID errors={r['error_detail']}"))
            elif scenario == "slow-clients":
                r = self.slow_run(target, rep)
                say(f"{scenario:13} {target.name:10} rep {rep}: pulled "
                    f"{r['pulled_per_client_kib']:.0f} KiB/client, delivered "
                    f"{r['delivered_per_client_kib']:.0f}, held {r['held_per_client_kib']:.1f} "
                    f"KiB/client, rss +{r['rss_growth_mib']:.1f} MiB statuses {r['statuses']}")
            else:
                r = self.crowd_run(target, rep)
                say(f"{scenario:13} {target.name:10} rep {rep}: {r['connected']} connected, "
                    f"{r['held']} held, {r['served']} served in {r['serve_s']:.1f} s, "
                    f"{r['rss_per_conn_kib']:.1f} KiB/conn, peak {r['peak_rss_mib']:.0f} MiB"
                    + (f", other statuses {r['other_statuses']}" if r["other_statuses"] else ""))
        except Exception as e:  # one broken run must not lose the others
            say(f"{scenario} {target.name} rep {rep} failed: {e!r}")
            r = {"scenario": scenario, "proxy": target.name, "rep": rep, "error": repr(e)}
        self.runs.append(r)

    def zipf(self) -> None:
        """The cache scenario: one Zipf request sequence, imageproxy's cache on and off.

        The modes alternate (on, off, on, off ...) and every run starts a fresh imageproxy
        process, so that each begins with a cold cache and no earlier run's state.
        """
        ranks = zipf_sequence(ZIPF_URLS, ZIPF_EXPONENT, ZIPF_SEQUENCE, ZIPF_SEED)
        self.zipf_info = {
            "urls": ZIPF_URLS, "exponent": ZIPF_EXPONENT, "sequence": ZIPF_SEQUENCE,
            "seed": ZIPF_SEED, "distinct_in_sequence": len(set(ranks)), "image": ZIPF_IMAGE,
            "image_bytes": self.images[ZIPF_IMAGE]["bytes"], "connections": ZIPF_CONNECTIONS,
            "duration": self.s.zipf_duration, "options": {},
        }
        for rep in range(1, self.s.reps + 1):
            for mode in ZIPF_MODES:
                if self.over_budget():
                    self._skip("zipf", mode, rep, "time budget used up")
                    continue
                try:
                    r = self.zipf_run(mode, rep, ranks)
                    hit = "–" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}"
                    say(f"zipf {mode:9} rep {rep}: {r['rps']:7.0f} req/s p50 {r['p50_ms']:.2f} "
                        f"ms p99 {r['p99_ms']:.2f} ms hit ratio {hit}, origin "
                        f"{r['origin_requests']} of {r['requests']} requests, cache "
                        f"{r['cache_mib'] or 0:.1f} MiB"
                        + ("" if r["valid"] else f"  INVALID errors={r['error_detail']}"))
                except Exception as e:  # one broken run must not lose the others
                    say(f"zipf {mode} rep {rep} failed: {e!r}")
                    r = {"scenario": "zipf", "proxy": mode, "rep": rep, "error": repr(e)}
                self.runs.append(r)

    def zipf_run(self, mode: str, rep: int, ranks: Sequence[int]) -> dict[str, Any]:
        """One zipf run from a fresh imageproxy: load figures, cache counters, origin requests."""
        assert self.origin is not None
        name = "imageproxy-zipf"
        metrics_port = free_port(LOOPBACK)
        target = self.start_imageproxy(name, self.proxy_cpus, cache=mode == "cache-on",
                                       metrics_port=metrics_port)
        if target is None:
            raise RuntimeError("imageproxy does not start")
        try:
            self.zipf_info["options"][mode] = target.options
            zport = self.origin.zipf_port
            paths = [target.path_for(ORIGIN_ADDR, zport, f"/z/{k + 1}.jpg")
                     for k in range(ZIPF_URLS)]
            # A URL outside the workload, fetched twice: the image comes through intact, and
            # with the cache on the second answer comes from the cache.
            check = target.path_for(ORIGIN_ADDR, zport, "/z/check.jpg")
            intact, x_cache = True, None
            for _ in range(2):
                status, headers, body = http_get(target.port, check)
                intact = intact and status == 200 and \
                    hashlib.sha256(body).hexdigest() == self.images[ZIPF_IMAGE]["sha256"]
                x_cache = headers.get("x-cache")
            if mode == "cache-on" and x_cache != "HIT":
                note = f"zipf: with the cache on, a second fetch answered X-Cache: {x_cache}"
                if note not in self.notes:
                    self.notes.append(note)
            before = self.scrape_cache(metrics_port)
            log_offset = self.origin.zipf_log.stat().st_size \
                if self.origin.zipf_log.exists() else 0
            figures = self.measured_load(target, paths, ZIPF_CONNECTIONS, self.s.zipf_duration,
                                         self.load_cpus, ZIPF_IMAGE, ranks)
            after = self.scrape_cache(metrics_port)
        finally:
            self.procs.stop(name)
        # Stopped: every origin response it asked for is complete, and logged.
        origin_requests, origin_bytes = self._origin_since(self.origin.zipf_log, log_offset)
        delta = {k: after[k] - before.get(k, 0)
                 for k in ("hits", "misses", "stale", "revalidated") if k in after}
        lookups = sum(delta.get(k, 0) for k in ("hits", "misses", "stale"))
        requests = figures["requests"]
        return {
            "scenario": "zipf", "proxy": mode, "rep": rep, "connections": ZIPF_CONNECTIONS,
            "image_bytes": self.images[ZIPF_IMAGE]["bytes"], **figures,
            "valid": figures["valid"] and intact,
            "check_intact": intact, "check_x_cache": x_cache,
            "cache_hits": delta.get("hits"), "cache_misses": delta.get("misses"),
            "cache_stale": delta.get("stale"),
            "cache_revalidated": delta.get("revalidated"),
            "hit_ratio": delta.get("hits", 0) / lookups if lookups else None,
            "cache_mib": after["bytes"] / 2**20 if "bytes" in after else None,
            "cache_entries": after.get("entries"),
            "origin_requests": origin_requests,
            "origin_mb": origin_bytes / 1e6,
            "origin_share": origin_requests / requests if requests else None,
            "distinct_urls": len(set(ranks[:requests])),
        }

    @staticmethod
    def scrape_cache(port: int) -> dict[str, int]:
        """The ``imageproxy_cache_*`` figures of ``/metrics`` (empty when there are none)."""
        with contextlib.suppress(OSError):
            status, _, body = http_get(port, "/metrics")
            if status == 200:
                found = re.findall(r"^imageproxy_cache_(\w+?)(?:_total)? ([0-9.e+-]+)$",
                                   body.decode("utf-8", "replace"), re.M)
                return {k: int(float(v)) for k, v in found}
        return {}

    @staticmethod
    def _origin_since(log: Path, offset: int) -> tuple[int, int]:
        """Responses and body bytes the origin logged in ``log`` after ``offset``."""
        count = total = 0
        with contextlib.suppress(OSError), open(log, "rb") as f:
            f.seek(offset)
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    count += 1
                    total += int(parts[3])
        return count, total

    def multi_core(self) -> None:
        """The small scenario with ``--workers N`` and no pinning: the scaling factor."""
        label = f"small-workers{self.s.workers}"
        if self.over_budget():
            self._skip(label, "imageproxy", 1, "time budget used up")
            return
        # The pinned instance is not needed any more: stop it so that it holds no CPU or memory.
        self.procs.stop("imageproxy")
        self.targets.pop("imageproxy", None)
        # taskset over every CPU: a child would otherwise inherit this process's pinning.
        target = self.start_imageproxy("imageproxy-mc", self.all_cpus, workers=self.s.workers)
        if target is None:
            self.notes.append(f"multi-core skipped: imageproxy does not start with "
                              f"--workers {self.s.workers}")
            self._skip(label, "imageproxy", 1, "--workers not accepted")
            return
        time.sleep(1.0)  # workers may come up after the first answers /healthz
        workers = len(process_tree(target.pid))
        self.notes.append(f"multi-core: {workers} imageproxy process(es), no pinning")
        if workers < self.s.workers:
            self.notes.append(f"multi-core: --workers {self.s.workers} was accepted but only "
                              f"{workers} process(es) run: the factor shows no scaling")
        try:
            for rep in range(1, self.s.reps + 1):
                if self.over_budget():
                    self._skip(label, target.name, rep, "time budget used up")
                    continue
                try:
                    r = self.throughput_run("small", target, rep, self.all_cpus, label=label)
                    r["proxy"] = "imageproxy"
                    r["processes"] = workers
                    say(f"{label} rep {rep}: {r['rps']:.0f} req/s cpu "
                        f"{r['cpu_util']:.2f} cores")
                except Exception as e:
                    r = {"scenario": label, "proxy": "imageproxy", "rep": rep, "error": repr(e)}
                    say(f"{label} rep {rep} failed: {e!r}")
                self.runs.append(r)
        finally:
            self.procs.stop("imageproxy-mc")


def rejected_option(line: str, options: Sequence[str]) -> str | None:
    """The option named in a one-line startup error, longest name first."""
    for option in sorted(options, key=len, reverse=True):
        bare = re.escape(option.lstrip("-"))
        if re.search(rf"(?<![\w-])(?:--)?{bare}(?![\w-])", line):
            return option
    return None


def zipf_sequence(n: int, exponent: float, count: int, seed: str) -> list[int]:
    """``count`` ranks in ``0 .. n-1``, rank k drawn with weight ``1 / (k + 1) ** exponent``.

    Seeded with a string, so the sequence is the same in every run and Python process.
    """
    cumulative = list(itertools.accumulate(1 / k ** exponent for k in range(1, n + 1)))
    return random.Random(seed).choices(range(n), cum_weights=cumulative, k=count)


def wrk_script(paths: Sequence[str], sequence: Sequence[int] | None = None,
               threads: int = 1) -> str:
    """A wrk Lua script and its JSON summary line.

    Requests go round-robin over ``paths`` (if any) from a random start, or, with
    ``sequence`` (0-based indices into ``paths``), in that order from the start; each of the
    ``threads`` threads starts at its own share of the sequence.
    """
    lines = ["-- generated by bench/run.py"]
    if sequence:
        lines.append("local paths = {")
        lines.extend(f'  "{p}",' for p in paths)
        lines.append("}")
        lines.append("local seq = {")
        lines.extend("  " + ",".join(str(i + 1) for i in sequence[k:k + 25]) + ","
                     for k in range(0, len(sequence), 25))
        lines.append("}")
        lines.append(f"""local made = 0
function setup(thread)
  thread:set("first", math.floor(made * #seq / {max(1, threads)}))
  made = made + 1
end
local reqs = {{}}
local i = 0
function init(args)
  for k, p in ipairs(paths) do reqs[k] = wrk.format("GET", p) end
  i = first or 0
end
function request()
  i = i % #seq + 1
  return reqs[seq[i]]
end""")
    elif paths:
        lines.append("local paths = {")
        lines.extend(f'  "{p}",' for p in paths)
        lines.append("}")
        lines.append("""local reqs = {}
local i = 0
function init(args)
  for k, p in ipairs(paths) do reqs[k] = wrk.format("GET", p) end
  i = math.random(#reqs) - 1
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end""")
    lines.append("""function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "bytes": %d, "duration_us": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, '
    .. '"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end""")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Machine description


def _version(cmd: Sequence[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else None
    return None


def machine_info(tools: dict[str, str | None]) -> dict[str, Any]:
    """What the figures were measured on."""
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    twisted_version = None
    with contextlib.suppress(ImportError):
        import twisted

        twisted_version = twisted.__version__
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "twisted": twisted_version,
        "nginx": _version([tools["nginx"], "-v"]) if tools.get("nginx") else None,
        "wrk": re.sub(r" \[.*", "", _version([tools["wrk"], "-v"]) or "") or None
        if tools.get("wrk") else None,
        "commit": commit if commit and re.fullmatch(r"[0-9a-f]+", commit) else None,
        "loadavg_at_start": os.getloadavg(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    }


# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run through the ``finally`` clauses.

    SIGINT is set explicitly: a shell starts background jobs with it ignored.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every measured target passes."""
    settings = parse_args(argv)
    nofile = raise_file_limit()
    if nofile[0] < settings.crowd + 1000:
        say(f"file limit {nofile[0]} is below the connections scenario's need")
    tools = ensure_tools(settings)
    work = WORK_ROOT / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stamp = dt.datetime.now()
    info = machine_info(tools)
    bench = Bench(settings, tools, work)
    interrupted = None
    targets: list[dict[str, Any]] = []
    with signals_raise():
        try:
            bench.run()
        except KeyboardInterrupt as e:
            interrupted = f"interrupted ({e or 'Ctrl-C'})"
        except Exception as e:
            interrupted = f"aborted: {e!r}"
            raise
        finally:
            bench.procs.stop_all()
            if interrupted:
                say(interrupted)
                bench.notes.append(interrupted)
            if bench.runs:
                data = {
                    "date": stamp.isoformat(timespec="seconds"), "incomplete": interrupted,
                    "settings": {k: (str(v) if isinstance(v, Path) else v)
                                 for k, v in vars(settings).items()},
                    "machine": info, "images": bench.images,
                    "pinning": {"proxy_cpus": sorted(bench.proxy_cpus or []),
                                "load_cpus": sorted(bench.load_cpus or [])},
                    "loadgen": "wrk" if tools.get("wrk") else "python",
                    "proxies": {n: {"options": t.options, "dropped": t.dropped}
                                for n, t in bench.targets.items()},
                    "validation": bench.validation, "notes": bench.notes, "runs": bench.runs,
                    "zipf": bench.zipf_info or None,
                    "elapsed_s": time.monotonic() - T0,
                }
                data["summary"], data["targets"] = summarise(data)
                targets = data["targets"]
                md, js = write_reports(data, settings.out_dir, stamp)
                say(f"results: {md} and {js.name}")
                for t in targets:
                    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
                    say(f"  {verdict:4} {t['name']}: {t['measured']} (target {t['required']})")
    if interrupted:
        return 130
    failed = [t for t in targets if t["pass"] is False]
    return 1 if failed and settings.strict else 0


if __name__ == "__main__":
    sys.exit(main())
