"""Configuration: defaults, INI file, command line precedence and one-line errors."""

import ipaddress

import pytest

from imgproxy.config import Config, ConfigError, HostLimit, build_config, cli_values

ENV = {"IMAGEPROXY_KEY": "envkey"}


def build(given=(), environ=ENV, **kw):
    return build_config(cli_values(list(given)), environ, **kw)


def test_defaults():
    """With only a key, every option has its documented default."""
    config = build()
    assert config == Config(keys=(b"envkey",))
    assert config.listen == ("tcp:8080:interface=127.0.0.1",)
    assert (config.max_size, config.max_redirects, config.timeout) == (5242880, 4, 10.0)
    assert (config.rate, config.burst, config.queue_timeout) == (10.0, 20, 5.0)


def test_cli_values_parsed_and_repeatable():
    """Command-line values are parsed; repeatable options accumulate in order."""
    config = build([
        ("listen", "tcp:1"), ("listen", "unix:/tmp/s"), ("max-size", "1000"),
        ("allow-network", "10.0.0.0/8"), ("allow-network", "::1/128"), ("allow-svg", None),
        ("timeout", "2.5"),
    ])
    assert config.listen == ("tcp:1", "unix:/tmp/s")
    assert config.max_size == 1000
    assert config.allow_network == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.allow_svg is True
    assert config.timeout == 2.5


def test_ini_then_cli(tmp_path):
    """INI values override defaults and command-line values override the INI."""
    ini = tmp_path / "p.ini"
    ini.write_text(
        "[imageproxy]\nmax-size = 123\nrate = 3\nlisten = tcp:1, tcp:2\n"
        "allow-svg = yes\ndeny-host = *.Evil.example\n"
        "[host:img.example.com]\nrate = 1\n[host:*.cdn.example]\nburst = 7\n"
    )
    config = build([("config", str(ini)), ("rate", "5")])
    assert config.max_size == 123
    assert config.rate == 5.0
    assert config.listen == ("tcp:1", "tcp:2")
    assert config.allow_svg is True
    assert config.deny_host == ("*.evil.example",)
    assert config.host_limits == (
        HostLimit("img.example.com", 1.0, 20), HostLimit("*.cdn.example", 5.0, 7))


@pytest.mark.parametrize(
    "given,message",
    [
        ([("max-size", "big")], "--max-size: not an integer: 'big'"),
        ([("max-size", "0")], "--max-size: must be at least 1"),
        ([("timeout", "-1")], "--timeout: must be > 0"),
        ([("timeout", "nan")], "--timeout: not a finite number"),
        ([("allow-network", "10.0.0.1/8")], "--allow-network: not a CIDR network"),
        ([("deny-host", "a b")], "--deny-host: invalid host pattern"),
        ([("log-level", "loud")], "--log-level: must be one of"),
        ([("manhole", "tcp:2222")], "--manhole: needs --manhole-keys"),
    ],
)
def test_bad_values_name_the_option(given, message):
    """A bad value raises ConfigError whose one-line message names the option."""
    with pytest.raises(ConfigError) as e:
        build(given)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[imageproxy]\nmax-sise = 1\n", "[imageproxy] max-sise: unknown option"),
        ("[imageproxy]\nrate = fast\n", "[imageproxy] rate: not a number"),
        ("[other]\nx = 1\n", "unknown section [other]"),
        ("[host:a.example]\nspeed = 1\n", "speed: unknown option"),
        ("[host:a.example]\n", "needs rate or burst"),
        ("not an ini", "File contains no section headers"),
        ("[imageproxy]\nallow-svg = perhaps\n", "allow-svg: not a boolean"),
    ],
)
def test_bad_ini(tmp_path, text, message):
    """INI mistakes name the file, section and key."""
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    with pytest.raises(ConfigError) as e:
        build([("config", str(ini))])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_ini(tmp_path):
    """A config file that cannot be read is a --config error."""
    with pytest.raises(ConfigError, match="--config: cannot read"):
        build([("config", str(tmp_path / "nope.ini"))])


def test_key_file_rotation(tmp_path):
    """Keys come one a line from --key-file; blank and comment lines are skipped."""
    keys = tmp_path / "keys"
    keys.write_bytes(b"# current first\nnew\n\nold\n")
    config = build([("key-file", str(keys))], environ={})
    assert config.keys == (b"new", b"old")


def test_key_sources(tmp_path):
    """Without --key-file the env variable, then the systemd credential, is used."""
    (tmp_path / "hmac-key").write_bytes(b"cred\n")
    assert build(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}).keys == (b"cred",)
    assert build(environ={"IMAGEPROXY_KEY": "a", "CREDENTIALS_DIRECTORY": str(tmp_path)}
                 ).keys == (b"a",)


def test_no_key_refuses():
    """No key anywhere is a startup error naming --key-file."""
    with pytest.raises(ConfigError, match="--key-file: no HMAC key"):
        build(environ={})


def test_empty_key_file(tmp_path):
    """A key file with no key in it is refused."""
    keys = tmp_path / "keys"
    keys.write_bytes(b"\n# nothing\n")
    with pytest.raises(ConfigError, match="--key-file: no key found"):
        build([("key-file", str(keys))], environ={})


def test_host_lists_validated_like_the_policy():
    """--allow-host entries are checked by the destination policy's rules, naming the option."""
    with pytest.raises(ConfigError, match="--allow-host: invalid host pattern"):
        build([("allow-host", "bad..example")])
    assert build([("allow-host", "Bücher.Example")]).allow_host == ("xn--bcher-kva.example",)


def test_host_section_with_port(tmp_path):
    """A [host:NAME:PORT] section limits one origin port, as the limiter's keys do."""
    ini = tmp_path / "p.ini"
    ini.write_text("[host:IMG.example.com:8443]\nrate = 2\n")
    config = build([("config", str(ini))])
    assert config.host_limits == (HostLimit("img.example.com:8443", 2.0, 20),)


def test_shipped_ini_files_parse():
    """etc/imageproxy.ini and etc/dev.ini are valid configurations."""
    from pathlib import Path

    etc = Path(__file__).parent.parent / "etc"
    for name in ("imageproxy.ini", "dev.ini"):
        config = build([("config", str(etc / name))])
        assert config.listen == ("tcp:8080:interface=127.0.0.1",)
