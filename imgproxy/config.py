"""One immutable configuration, built from defaults <- INI file <- command line, validated once.

Every option is described once, in :data:`OPTIONS`; the twistd ``Options`` class and the INI reader
are both generated from that table, so the command line and the file always accept the same names.
A bad value raises :class:`ConfigError` whose message names the option (one line, for startup).
"""

from __future__ import annotations

import configparser
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from imgproxy import PROJECT_URL, __version__
from imgproxy.netpolicy import host_pattern
from imgproxy.ratelimit import normalize_pattern
from imgproxy.sniff import SniffPolicy

DEFAULT_USER_AGENT = f"Mozilla/5.0 (compatible; imageproxy/{__version__}; +{PROJECT_URL})"
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
CREDENTIAL_NAME = "hmac-key"  # systemd LoadCredential= name, read from $CREDENTIALS_DIRECTORY
KEY_ENV = "IMAGEPROXY_KEY"


class ConfigError(ValueError):
    """A bad option value; ``str()`` is the one-line message shown at startup."""


# -- value parsers: each takes the text and returns the value or raises ValueError ------------


def _int(minimum: int = 0) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _float(minimum: float = 0.0, exclusive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"not a number: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not a finite number: {text!r}")
        if value < minimum or (exclusive and value == minimum):
            sign = ">" if exclusive else ">="
            raise ValueError(f"must be {sign} {minimum:g}, got {text.strip()}")
        return value

    return parse


_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def parse_bool(text: str) -> bool:
    """Parse an INI boolean (yes/no, true/false, on/off, 1/0)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean (yes/no): {text!r}")


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"not a CIDR network: {text!r} ({e})") from None


def _text(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def _path(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return os.path.expanduser(value)


@attrs.frozen
class Option:
    """One configuration option: command-line ``--name`` and INI key ``name``."""

    name: str
    parse: Callable[[str], Any] | None  # None: a flag (boolean switch)
    default: Any
    help: str
    repeat: bool = False

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("config", _path, None, "INI file ([imageproxy] section); command-line options win"),
    Option("listen", _text, (DEFAULT_LISTEN,), "server endpoint string (repeatable)", repeat=True),
    Option("key-file", _path, None, f"HMAC keys, one per line: the first signs, all verify "
           f"(default: ${KEY_ENV}, or $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME})"),
    Option("allow-network", _network, (), "exempt a CIDR network from the destination block "
           "(repeatable)", repeat=True),
    Option("deny-network", _network, (), "block a further CIDR network (repeatable)", repeat=True),
    Option("allow-host", host_pattern, (), "only allow these origin hosts: name or *.suffix "
           "(repeatable)", repeat=True),
    Option("deny-host", host_pattern, (), "refuse these origin hosts: name or *.suffix "
           "(repeatable)", repeat=True),
    Option("ca-file", _path, None, "PEM file of extra trust roots for origin TLS"),
    Option("max-size", _int(1), 5242880, "largest body relayed, in bytes"),
    Option("max-redirects", _int(0), 4, "redirects followed"),
    Option("timeout", _float(0, exclusive=True), 10.0,
           "upstream budget in seconds: connect, headers and first bytes"),
    Option("idle-timeout", _float(0, exclusive=True), 10.0,
           "abort a relay that makes no progress for this many seconds"),
    Option("rate", _float(0), 10.0, "per-origin-host token rate, requests/s (0: unlimited)"),
    Option("burst", _int(1), 20, "per-origin-host bucket capacity"),
    Option("queue-timeout", _float(0), 5.0, "longest wait for a token before 503"),
    Option("max-queue", _int(0), 100, "waiting requests per origin host before 503"),
    Option("max-inflight-per-host", _int(1), 8, "concurrent upstream requests per origin host"),
    Option("max-inflight", _int(1), 1000, "upstream requests in flight or waiting, in all"),
    Option("max-hosts", _int(1), 10000, "origin hosts tracked by the rate limiter"),
    Option("user-agent", _text, DEFAULT_USER_AGENT, "User-Agent sent upstream"),
    Option("default-cache-control", _text, "public, max-age=31536000",
           "Cache-Control sent when the origin sends none"),
    Option("formats", SniffPolicy.parse_formats, None,
           "allowed image formats, comma-separated (default: all raster formats)"),
    Option("allow-svg", None, False, "relay SVG images (with a sandboxing CSP)"),
    Option("max-pixels", _int(1), 50_000_000, "largest width x height accepted"),
    Option("cache-size", _int(0), 64 * 2**20, "bytes of the in-memory image cache (0: off)"),
    Option("cache-object-max", _int(0), 2**20, "largest body cached, in bytes"),
    Option("negative-ttl", _float(0), 30.0, "seconds that 404/410 and refusals are cached"),
    Option("coalesce-max-size", _int(0), 2 * 2**20,
           "largest body shared between concurrent requests for one URL"),
    Option("cache-status-header", _text, "X-Cache", "name of the cache status header"),
    Option("metrics", _text, None, "serve Prometheus /metrics on this endpoint"),
    Option("manhole", _text, None,
           "SSH manhole endpoint (e.g. unix:/run/imageproxy/manhole:mode=600)"),
    Option("manhole-keys", _path, None, "authorized_keys file for the manhole"),
    Option("manhole-host-key", _path, None, "SSH host private key file for the manhole"),
    Option("log-level", _choice("debug", "info", "warn", "error", "critical"), "info",
           "lowest log level written"),
    Option("log-format", _choice("text", "json"), "text", "log line format"),
    Option("no-access-log", None, False, "do not log one line per request"),
    Option("log-client-ip", None, False, "include the client address in the access log"),
    Option("drain-timeout", _float(0), 10.0, "seconds in-flight requests get to finish on stop"),
    Option("workers", _int(1), 1, "worker processes sharing the listening sockets"),
)
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


@attrs.frozen
class HostLimit:
    """A per-origin override of rate and burst, from an INI ``[host:PATTERN]`` section."""

    pattern: str
    rate: float
    burst: int


@attrs.frozen(kw_only=True)
class Config:
    """The validated configuration of one imageproxy process."""

    config: str | None = None
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    key_file: str | None = None
    keys: tuple[bytes, ...] = ()
    allow_network: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny_network: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_host: tuple[str, ...] = ()
    deny_host: tuple[str, ...] = ()
    ca_file: str | None = None
    max_size: int = 5242880
    max_redirects: int = 4
    timeout: float = 10.0
    idle_timeout: float = 10.0
    rate: float = 10.0
    burst: int = 20
    queue_timeout: float = 5.0
    max_queue: int = 100
    max_inflight_per_host: int = 8
    max_inflight: int = 1000
    max_hosts: int = 10000
    host_limits: tuple[HostLimit, ...] = ()
    user_agent: str = DEFAULT_USER_AGENT
    default_cache_control: str = "public, max-age=31536000"
    formats: frozenset[str] | None = None
    allow_svg: bool = False
    max_pixels: int = 50_000_000
    cache_size: int = 64 * 2**20
    cache_object_max: int = 2**20
    negative_ttl: float = 30.0
    coalesce_max_size: int = 2 * 2**20
    cache_status_header: str = "X-Cache"
    metrics: str | None = None
    manhole: str | None = None
    manhole_keys: str | None = None
    manhole_host_key: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    no_access_log: bool = False
    log_client_ip: bool = False
    drain_timeout: float = 10.0
    workers: int = 1


def read_keys(path: str) -> tuple[bytes, ...]:
    """Read HMAC keys, one a line (blank lines and ``#`` comments skipped); the first signs."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"--key-file: cannot read {path}: {e.strerror}") from None
    return _split_keys(data, "--key-file")


def _split_keys(data: bytes, source: str) -> tuple[bytes, ...]:
    keys = tuple(
        line.strip()
        for line in data.splitlines()
        if line.strip() and not line.strip().startswith(b"#")
    )
    if not keys:
        raise ConfigError(f"{source}: no key found")
    return keys


def load_keys(
    key_file: str | None, environ: Mapping[str, str]
) -> tuple[str | None, tuple[bytes, ...]]:
    """Find the keys: ``--key-file``, else ``$IMAGEPROXY_KEY``, else the systemd credential."""
    if key_file:
        return key_file, read_keys(key_file)
    if environ.get(KEY_ENV):
        return None, _split_keys(environ[KEY_ENV].encode("utf-8"), KEY_ENV)
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and os.path.exists(os.path.join(cred_dir, CREDENTIAL_NAME)):
        path = os.path.join(cred_dir, CREDENTIAL_NAME)
        return path, read_keys(path)
    raise ConfigError(
        f"--key-file: no HMAC key (give --key-file, set ${KEY_ENV}, "
        f"or provide the systemd credential {CREDENTIAL_NAME})"
    )


def _parse_value(option: Option, text: str, source: str) -> Any:
    assert option.parse is not None
    try:
        return option.parse(text)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def _split_list(text: str) -> list[str]:
    return [item for item in text.replace(",", "\n").split() if item]


def read_ini(path: str) -> tuple[dict[str, Any], tuple[HostLimit, ...]]:
    """Read an INI file: the ``[imageproxy]`` section and ``[host:PATTERN]`` rate overrides."""
    parser = configparser.ConfigParser(interpolation=None, default_section="__no_defaults__")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as e:
        first_line = str(e).splitlines()[0]
        raise ConfigError(f"--config: {path}: {first_line}") from None
    values: dict[str, Any] = {}
    host_limits = []
    for section in parser.sections():
        if section.startswith("host:"):
            host_limits.append(_read_host_section(path, section, parser[section]))
        elif section != "imageproxy":
            raise ConfigError(f"--config: {path}: unknown section [{section}]")
    if parser.has_section("imageproxy"):
        for key, raw in parser["imageproxy"].items():
            option = OPTIONS_BY_NAME.get(key)
            source = f"{path} [imageproxy] {key}"
            if option is None or option.name == "config":
                raise ConfigError(f"{source}: unknown option")
            if option.parse is None:
                values[option.attr] = _parse_value(
                    Option(key, parse_bool, False, ""), raw, source
                )
            elif option.repeat:
                values[option.attr] = tuple(
                    _parse_value(option, item, source) for item in _split_list(raw)
                )
            else:
                values[option.attr] = _parse_value(option, raw, source)
    return values, tuple(host_limits)


def _read_host_section(path: str, section: str, items: Mapping[str, str]) -> HostLimit:
    source = f"{path} [{section}]"
    pattern = _parse_value(Option("host", normalize_pattern, None, ""), section[5:], source)
    unknown = set(items) - {"rate", "burst"}
    if unknown:
        raise ConfigError(f"{source} {sorted(unknown)[0]}: unknown option (rate, burst)")
    rate = _parse_value(OPTIONS_BY_NAME["rate"], items["rate"], f"{source} rate") if (
        "rate" in items) else None
    burst = _parse_value(OPTIONS_BY_NAME["burst"], items["burst"], f"{source} burst") if (
        "burst" in items) else None
    if rate is None and burst is None:
        raise ConfigError(f"{source}: needs rate or burst")
    return HostLimit(pattern, -1.0 if rate is None else rate, -1 if burst is None else burst)


def build_config(
    cli: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    require_key: bool = True,
) -> Config:
    """Merge defaults, the INI file named by ``config`` and the command-line values ``cli``.

    ``cli`` holds only the options given on the command line, already parsed, keyed by attribute
    name. Host overrides with a missing rate or burst inherit the global value.
    """
    values: dict[str, Any] = {}
    host_limits: tuple[HostLimit, ...] = ()
    if cli.get("config"):
        values, host_limits = read_ini(cli["config"])
    values.update(cli)
    if require_key:
        values["key_file"], values["keys"] = load_keys(values.get("key_file"), environ)
    config = Config(**values)
    resolved = tuple(
        HostLimit(
            h.pattern,
            config.rate if h.rate < 0 else h.rate,
            config.burst if h.burst < 0 else h.burst,
        )
        for h in host_limits
    )
    config = attrs.evolve(config, host_limits=resolved)
    _check(config)
    return config


def _check(config: Config) -> None:
    if (config.manhole is None) != (config.manhole_keys is None) or (
        config.manhole is not None and config.manhole_host_key is None
    ):
        raise ConfigError(
            "--manhole: needs --manhole-keys and --manhole-host-key (and they need --manhole)"
        )
    if config.cache_object_max > config.cache_size and config.cache_size:
        raise ConfigError("--cache-object-max: larger than --cache-size")
    if not config.listen:
        raise ConfigError("--listen: at least one endpoint is needed")


def cli_values(given: Sequence[tuple[str, str | None]]) -> dict[str, Any]:
    """Parse (name, text) pairs from the command line; a flag has text None."""
    values: dict[str, Any] = {}
    for name, text in given:
        option = OPTIONS_BY_NAME[name]
        if option.parse is None:
            values[option.attr] = True
        elif option.repeat:
            values[option.attr] = values.get(option.attr, ()) + (
                _parse_value(option, text or "", f"--{name}"),
            )
        else:
            values[option.attr] = _parse_value(option, text or "", f"--{name}")
    return values
