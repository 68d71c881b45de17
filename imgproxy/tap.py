"""The composition root: ``twistd imageproxy`` options and the service tree.

This is the only module that touches the global reactor; everything else gets it injected.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from imgproxy import __version__
from imgproxy.cache import Cache
from imgproxy.config import OPTIONS, Config, ConfigError, build_config, cli_values, read_keys
from imgproxy.logs import AccessLog, QuietSite, make_observer, parse_level
from imgproxy.metrics import Metrics, metrics_site
from imgproxy.netpolicy import AddressPolicy, HostPolicy, PolicyEndpointFactory, make_tls_policy
from imgproxy.ratelimit import HostLimiter, HostOverride, Limits
from imgproxy.sdnotify import Notifier, NotifierService
from imgproxy.sniff import DEFAULT_FORMATS, FORMATS, SniffPolicy
from imgproxy.upstream import Fetcher, FetchPolicy, UpstreamClientFactory
from imgproxy.urls import Signer
from imgproxy.web import VIA_TOKEN, ProxyResource, ResponsePolicy
from imgproxy.workers import (
    ParentWatch,
    Supervisor,
    check_shareable,
    options_argv,
    share_limits,
    shared_endpoint,
    supervisor_pid,
    worker_argv,
    worker_endpoint,
    worker_index,
)

log = Logger()


def _make_handler(name: str, takes_value: bool, doc: str) -> Callable[..., None]:
    if takes_value:
        def handler(self: Options, value: str) -> None:
            self.given.append((name, value))
    else:
        def handler(self: Options) -> None:  # type: ignore[misc]
            self.given.append((name, None))
    handler.__doc__ = doc
    return handler


class Options(usage.Options):
    """``twistd imageproxy`` options; every one can also be set in the INI file."""

    synopsis = "[options]"
    longdesc = (
        "Serve signed image URLs: verify the HMAC, fetch the image with our own User-Agent "
        "(SSRF-safe, rate-limited per origin host), check the bytes are an image, and stream it. "
        "Every option can be set in the [imageproxy] section of --config (same name, no --); "
        "command-line options win."
    )

    def __init__(self) -> None:
        super().__init__()
        self.given: list[tuple[str, str | None]] = []
        self.config: Config | None = None

    def postOptions(self) -> None:
        # A bad value stops startup with one line naming the option (not twistd's usage dump).
        try:
            self.config = build_config(cli_values(self.given), os.environ)
        except ConfigError as e:
            raise SystemExit(f"imageproxy: {e}") from None


for _option in OPTIONS:
    _default = _option.default
    if _option.repeat or _option.parse is None or _default is None:
        _doc = _option.help
    else:
        _doc = f"{_option.help} [default: {_default}]"
    setattr(
        Options,
        "opt_" + _option.attr,
        _make_handler(_option.name, _option.parse is not None, _doc),
    )
del _option, _default, _doc


def makeService(options: Options) -> IService:
    """Build the service tree from parsed options (twistd calls this).

    With ``--workers N`` (N > 1) this process becomes a supervisor of N worker processes that
    share the listening sockets; each worker runs the whole pipeline with its share of the
    per-host limits.
    """
    from twisted.internet import reactor

    config = options.config
    assert config is not None
    try:
        if config.workers > 1:
            for description in config.listen:
                check_shareable(description)
            index = worker_index(os.environ)
            if index is None:
                return Supervisor(
                    reactor, config.workers, worker_argv(options_argv(options.given)),
                    os.environ, stop_timeout=config.drain_timeout + 5,
                    log_observer=make_observer(
                        parse_level(config.log_level), config.log_format, sys.stdout),
                )
            config = attrs.evolve(
                share_limits(config, config.workers),
                metrics=config.metrics and worker_endpoint(config.metrics, index),
                manhole=config.manhole and worker_endpoint(config.manhole, index),
            )
        return build_service(config, reactor, os.environ)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"imageproxy: {e}") from None


def accept_header(formats: frozenset[str], allow_svg: bool) -> bytes:
    """The Accept header sent upstream: the allowed image types, then any image."""
    types = sorted({FORMATS[name] for name in formats} | ({FORMATS["svg"]} if allow_svg else set()))
    return ",".join([*types, "image/*;q=0.8"]).encode("ascii")


class ProxyService(MultiService):
    """The root service: listeners, proxy, metrics and manhole, with a graceful stop."""

    def __init__(
        self, config: Config, reactor: Any, resource: ProxyResource, pool: HTTPConnectionPool,
        log_observer: ILogObserver | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.resource = resource
        self._reactor = reactor
        self._pool = pool
        self._observer = log_observer
        self.listeners: list[IService] = []
        self.notifier: Notifier | None = None
        self._previous_hup: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd gives us its Application: our observer becomes its log observer.
        if self._observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # Bind every port before starting: a port that cannot be had stops startup, one line.
        for service in self:
            try:
                service.privilegedStartService()
            except Exception as e:
                option = getattr(service, "option_name", "--listen")
                reason = e.socketError if isinstance(e, CannotListenError) else e
                # twistd already routes sys.stderr into the log: write to the real one.
                stderr = sys.__stderr__ or sys.stderr
                stderr.write(f"imageproxy: {option}: cannot listen: {reason}\n")
                stderr.flush()
                raise SystemExit(1) from None

    def startService(self) -> None:
        super().startService()
        # Each request allocates many short-lived containers; with the default thresholds the
        # collector runs every 700 of them and keeps re-scanning long-lived objects. Startup
        # objects go to the permanent generation and collections come less often (measured:
        # about 8% less CPU per small request; requests leave no cyclic garbage to wait for).
        gc.freeze()
        gc.set_threshold(5000, 20, 20)
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(
                signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload_keys)
            )
        log.info("imageproxy {version} serving on {listen}", version=__version__,
                 listen=", ".join(self.config.listen))

    def reload_keys(self) -> None:
        """Re-read the key file (SIGHUP): rotation without a restart."""
        if not self.config.key_file:
            log.warn("SIGHUP: keys did not come from a file; nothing to reload")
            return
        try:
            keys = read_keys(self.config.key_file)
        except ConfigError as e:
            log.error("SIGHUP: keeping the old keys: {error}", error=str(e))
            return
        if self.notifier is not None:
            self.notifier.reloading()
        self.resource.signer = Signer(keys)
        log.info("SIGHUP: reloaded {count} key(s)", count=len(keys))
        if self.notifier is not None:
            self.notifier.ready()

    @inlineCallbacks
    def stopService(self) -> Any:
        if self.notifier is not None:
            self.notifier.stopping()  # before the listeners close, not after the drain
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        # Stop listening first, then let in-flight relays finish within the drain bound.
        yield DeferredList([s.stopService() for s in self.listeners if s.running])
        drained = self.resource.drain()
        timer = self._reactor.callLater(self.config.drain_timeout, drained.cancel)
        try:
            yield drained
        except Exception:
            log.warn("drain timeout: cutting {count} request(s)",
                     count=len(self.resource.inflight))
            self.resource.abort_all()
        if timer.active():
            timer.cancel()
        yield self._pool.closeCachedConnections()
        yield super().stopService()


@attrs.frozen
class Pipeline:
    """The wired request path and the live objects operators inspect."""

    resource: ProxyResource
    limiter: HostLimiter
    pool: HTTPConnectionPool
    metrics: Metrics


def build_pipeline(
    config: Config, reactor: Any, resolver: IHostnameResolver | None = None
) -> Pipeline:
    """Wire every module of the request path, one direction: web -> urls -> policy -> limiter
    -> upstream -> sniffer -> relay. ``resolver`` defaults to the reactor's."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = UpstreamClientFactory
    pool.maxPersistentPerHost = config.max_inflight_per_host
    pool.cachedConnectionTimeout = 30
    try:
        tls_policy = make_tls_policy(config.ca_file)
    except ValueError as e:
        raise ConfigError(f"--ca-file: {e}") from None
    endpoints = PolicyEndpointFactory(
        reactor,
        AddressPolicy(allow_networks=config.allow_network, deny_networks=config.deny_network),
        tls_policy,
        connect_timeout=config.timeout,
        resolver=resolver,
    )
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool)
    limiter = HostLimiter(
        reactor,
        Limits(config.rate, config.burst),
        queue_timeout=config.queue_timeout,
        max_queue=config.max_queue,
        max_inflight_per_host=config.max_inflight_per_host,
        max_inflight=config.max_inflight,
        overrides=[HostOverride(h.pattern, Limits(h.rate, h.burst)) for h in config.host_limits],
        max_hosts=config.max_hosts,
    )
    formats = config.formats if config.formats is not None else DEFAULT_FORMATS
    fetcher = Fetcher(
        reactor,
        agent,
        HostPolicy(allow_hosts=config.allow_host, deny_hosts=config.deny_host),
        limiter,
        FetchPolicy(
            user_agent=config.user_agent.encode("utf-8"),
            accept=accept_header(formats, config.allow_svg),
            via=b"1.1 " + VIA_TOKEN,
            max_redirects=config.max_redirects,
            timeout=config.timeout,
            max_size=config.max_size,
        ),
    )
    metrics = Metrics(__version__)
    resource = ProxyResource(
        reactor,
        Signer(config.keys),
        fetcher,
        SniffPolicy(formats=formats, allow_svg=config.allow_svg, max_pixels=config.max_pixels),
        response_policy=ResponsePolicy(
            config.default_cache_control.encode("latin-1"),
            config.cache_status_header.lower().encode("latin-1"),
        ),
        max_size=config.max_size,
        idle_timeout=config.idle_timeout,
        cache=Cache(reactor, max_bytes=config.cache_size, max_object=config.cache_object_max,
                    negative_ttl=config.negative_ttl),
        coalesce_max_size=config.coalesce_max_size,
        metrics=metrics,
        access_log=None if config.no_access_log else AccessLog(log_client_ip=config.log_client_ip),
    )
    _watch(metrics, limiter, pool, resource.cache)
    return Pipeline(resource, limiter, pool, metrics)


def _watch(
    metrics: Metrics, limiter: HostLimiter, pool: HTTPConnectionPool, cache: Cache | None
) -> None:
    """Expose the live counters of the limiter, the pool and the cache as metrics."""
    watched: list[tuple[str, str, Callable[[], float], str]] = [
        ("ratelimit_admitted", "Requests admitted by the per-host limiter",
         lambda: limiter.admitted, "counter"),
        ("ratelimit_delayed", "Requests that waited for a token",
         lambda: limiter.delayed, "counter"),
        ("ratelimit_refused", "Requests refused by the limiter (503)",
         lambda: limiter.refused, "counter"),
        ("ratelimit_tracked_hosts", "Origin hosts tracked by the limiter",
         lambda: limiter.tracked_hosts, "gauge"),
        ("upstream_inflight", "Upstream requests in flight or waiting for a token",
         lambda: limiter.inflight, "gauge"),
        ("upstream_pool_connections", "Idle keep-alive connections to origins",
         lambda: sum(len(c) for c in pool._connections.values()), "gauge"),
    ]
    if cache is not None:
        watched += [
            ("cache_hits", "Requests answered from a fresh cache entry",
             lambda: cache.hits, "counter"),
            ("cache_misses", "Requests not found in the cache", lambda: cache.misses, "counter"),
            ("cache_stale", "Requests that found a stale entry", lambda: cache.stale, "counter"),
            ("cache_revalidated", "Stale entries refreshed by an origin 304",
             lambda: cache.revalidated, "counter"),
            ("cache_negative_hits", "Requests answered from a cached refusal",
             lambda: cache.negative_hits, "counter"),
            ("cache_evictions", "Entries evicted to stay within --cache-size",
             lambda: cache.evictions, "counter"),
            ("cache_bytes", "Bytes held by the cache", lambda: cache.bytes_stored, "gauge"),
            ("cache_entries", "Entries held by the cache", lambda: cache.entry_count, "gauge"),
        ]
    for name, documentation, read, kind in watched:
        metrics.watch(name, documentation, read, kind)


def _listener(
    reactor: Any, option: str, description: str, factory: Any,
    environ: Mapping[str, str] | None = None,
) -> StreamServerEndpointService:
    """A listening service for an endpoint string; errors name ``option``.

    With ``environ`` (a worker of ``--workers``) the socket is shared with the other workers.
    """
    try:
        endpoint = (
            serverFromString(reactor, description) if environ is None
            else shared_endpoint(reactor, description, environ)
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{option}: {description!r}: {e}") from None
    except IndexError:
        raise ConfigError(
            f"{option}: {description!r}: no such inherited socket (is the .socket unit active?)"
        ) from None
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True  # a port in use fails startup, not just a log line
    service.option_name = option  # type: ignore[attr-defined]
    return service


def build_service(config: Config, reactor: Any, environ: Mapping[str, str]) -> ProxyService:
    """The service tree of one process: listeners, metrics, manhole, systemd notification."""
    observer = make_observer(parse_level(config.log_level), config.log_format, sys.stdout)
    pipeline = build_pipeline(config, reactor)
    resource, metrics = pipeline.resource, pipeline.metrics
    site = QuietSite(resource, reactor=reactor)  # our own access log replaces the Site's
    root = ProxyService(config, reactor, resource, pipeline.pool, observer)
    index = worker_index(environ) if config.workers > 1 else None
    for description in config.listen:
        listener = _listener(
            reactor, "--listen", description, site, None if index is None else environ)
        listener.setServiceParent(root)
        root.listeners.append(listener)
    if config.metrics:
        _listener(
            reactor, "--metrics", config.metrics, metrics_site(metrics, reactor=reactor)
        ).setServiceParent(root)
    if config.manhole:
        from imgproxy.manhole import make_manhole_service

        assert config.manhole_keys is not None and config.manhole_host_key is not None
        namespace: dict[str, object] = {
            "config": config, "service": root, "resource": resource,
            "limiter": pipeline.limiter, "metrics": metrics, "pool": pipeline.pool,
            "inflight": resource.inflight, "cache": resource.cache,
        }
        manhole: Any = make_manhole_service(
            config.manhole, config.manhole_keys, config.manhole_host_key, namespace, reactor
        )
        manhole.option_name = "--manhole"
        manhole._raiseSynchronously = True
        manhole.setServiceParent(root)
    parent = supervisor_pid(environ) if index is not None else None
    if parent is not None:
        ParentWatch(reactor, parent, reactor.stop).setServiceParent(root)
    root.notifier = Notifier(reactor, environ)
    NotifierService(root.notifier).setServiceParent(root)
    return root


__all__ = ["Options", "build_pipeline", "build_service", "makeService"]
