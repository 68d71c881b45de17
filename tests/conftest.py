"""Shared fixtures: a test origin server and an in-process proxy, both on loopback.

Integration tests run on the real reactor (pytest-twisted) with real sockets on 127.0.0.1; the
proxy is told to allow the loopback network, as an operator would for an internal origin.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from imgproxy.config import Config
from imgproxy.logs import QuietSite
from imgproxy.tap import Pipeline, build_pipeline
from imgproxy.urls import Signer

KEY = b"test-key-0123456789"
CORPUS = Path(__file__).parent / "corpus"


def corpus(name: str) -> bytes:
    """The bytes of a fixture file in tests/corpus."""
    return (CORPUS / name).read_bytes()


JPEG = corpus("jpeg-baseline-jfif.jpg")
PNG = corpus("png-rgb-8bit.png")


@attrs.define
class Seen:
    """One request as the origin saw it."""

    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]


Handler = Callable[[Request], Any]


class OriginResource(Resource):
    """An origin whose routes are set by each test; it records every request it gets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[bytes, Handler] = {}
        self.seen: list[Seen] = []

    def render(self, request: Request) -> Any:
        self.seen.append(
            Seen(request.method, request.uri, dict(request.requestHeaders.getAllRawHeaders()))
        )
        handler = self.routes.get(request.path)
        if handler is None:
            request.setResponseCode(404)
            return b"no such route"
        return handler(request)


def image(body: bytes, content_type: bytes = b"image/jpeg", **headers: bytes) -> Handler:
    """A route answering ``body`` with a Content-Type and extra headers."""

    def handler(request: Request) -> bytes:
        request.setHeader(b"content-type", content_type)
        for name, value in headers.items():
            request.setHeader(name.replace("_", "-").encode(), value)
        return body

    return handler


def chunked(body: bytes, chunk: int = 1000, content_type: bytes = b"image/jpeg",
            delay: float = 0.0) -> Handler:
    """A route writing ``body`` in pieces without Content-Length (chunked encoding)."""

    def handler(request: Request) -> Any:
        request.setHeader(b"content-type", content_type)
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]

        def step() -> None:
            if request.finished or request._disconnected:
                return
            if not pieces:
                request.finish()
                return
            request.write(pieces.pop(0))
            reactor.callLater(delay, step)

        step()
        return NOT_DONE_YET

    return handler


@attrs.define
class Origin:
    """A running origin on 127.0.0.1."""

    resource: OriginResource
    port: Any

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def route(self, path: str, handler: Handler) -> str:
        self.resource.routes[path.encode()] = handler
        return self.base + path


@pytest.fixture
def origin() -> Iterator[Origin]:
    resource = OriginResource()
    site = QuietSite(resource)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield Origin(resource, port)
    pytest_twisted.blockon(port.stopListening())


@attrs.define
class Proxy:
    """A running proxy on 127.0.0.1 wired like the daemon."""

    pipeline: Pipeline
    port: Any
    signer: Signer = Signer((KEY,))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def url(self, target: str | bytes, form: str = "hex_path") -> str:
        raw = target.encode() if isinstance(target, str) else target
        return self.base + getattr(self.signer, form)(raw)


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., Proxy]]:
    """Start proxies with config overrides; all are stopped at teardown."""
    started: list[Proxy] = []

    def make(resolver: Any = None, **overrides: Any) -> Proxy:
        values: dict[str, Any] = {"keys": (KEY,), "allow_network": LOOPBACK,
                                  "no_access_log": True}
        values.update(overrides)
        pipeline = build_pipeline(Config(**values), reactor, resolver=resolver)
        site = QuietSite(pipeline.resource)
        proxy = Proxy(pipeline, reactor.listenTCP(0, site, interface="127.0.0.1"))
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        pytest_twisted.blockon(proxy.port.stopListening())
        pytest_twisted.blockon(proxy.pipeline.pool.closeCachedConnections())


@pytest.fixture
def proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy()


@pytest.fixture
def client_pool() -> Iterator[HTTPConnectionPool]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield pool
    pytest_twisted.blockon(pool.closeCachedConnections())


@attrs.frozen
class _Resolution:
    name: str

    def cancel(self) -> None:
        raise AssertionError("a synchronous resolution cannot be cancelled")


@implementer(IHostnameResolver)
class FakeResolver:
    """An ``IHostnameResolver`` answering synchronously from a table; it asks nobody else.

    ``table`` maps a name to its answer (address strings, or address objects delivered as
    they are); an answer may be a callable taking the lookup number for that name (1, 2, ...),
    to simulate DNS rebinding. ``table`` may itself be a callable from name to answer. Unknown
    names resolve to nothing. ``lookups`` lists every name asked, in order.
    """

    def __init__(self, table: dict[str, Any] | Callable[[str], Any]) -> None:
        self.table = table
        self.lookups: list[str] = []

    def resolveHostName(  # noqa: N802 - Twisted interface
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Sequence[type[IAddress]] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        self.lookups.append(hostName)
        if callable(self.table):
            answer = self.table(hostName)
        else:
            answer = self.table.get(hostName, self.table.get(hostName.lower(), ()))
            if callable(answer):
                answer = answer(self.lookups.count(hostName))
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for item in [answer] if isinstance(answer, str) else answer:
            if isinstance(item, str):
                kind = IPv6Address if ":" in item else IPv4Address
                item = kind("TCP", item, portNumber)
            if addressTypes is None or type(item) in addressTypes:
                resolutionReceiver.addressResolved(item)
        resolutionReceiver.resolutionComplete()
        return resolution


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on the real reactor."""
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def free_port() -> int:
    """A loopback TCP port that nothing listens on (bound then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
