"""Checks of etc/imageproxy.service and etc/imageproxy.socket with systemd-analyze (offline)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ETC = Path(__file__).resolve().parent.parent / "etc"
SERVICE = ETC / "imageproxy.service"
SOCKET = ETC / "imageproxy.socket"
SHIPPED_TWISTD = "/opt/imageproxy/bin/twistd"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, in order."""
    section = ""
    found = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(path: Path, section: str, key: str) -> list[str]:
    """All values assigned to ``key`` in ``section``."""
    return [v for s, k, v in directives(path) if (s, k) == (section, key)]


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """Both units copied to a temporary directory, ExecStart pointing at this venv's twistd."""
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists(), twistd
    text = SERVICE.read_text()
    assert f"ExecStart={SHIPPED_TWISTD} " in text
    (tmp_path / SERVICE.name).write_text(
        text.replace(f"ExecStart={SHIPPED_TWISTD} ", f"ExecStart={twistd} ")
    )
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    return tmp_path


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with ``args`` in ``cwd``."""
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_analyze
def test_units_verify_without_any_output(units: Path) -> None:
    """systemd-analyze verify prints nothing for both units (it exits 0 even on warnings)."""
    result = analyze("verify", "--man=no", "imageproxy.service", "imageproxy.socket", cwd=units)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_analyze
def test_verify_check_catches_a_bad_unit(units: Path) -> None:
    """The verify check is not vacuous: an unknown key in the service produces output."""
    path = units / "imageproxy.service"
    path.write_text(path.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n"))
    result = analyze("verify", "--man=no", "imageproxy.service", cwd=units)
    assert "NoSuchKey" in result.stdout + result.stderr


@needs_analyze
def test_security_exposure_at_most_2(units: Path) -> None:
    """The offline security review rates the service's exposure at 2.0 or lower."""
    result = analyze("security", "--offline=yes", "--threshold=20", "imageproxy.service", cwd=units)
    match = re.search(r"Overall exposure level for imageproxy\.service: (\d+\.\d)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0
    assert result.returncode == 0, result.stderr


def test_service_runs_twistd_in_the_foreground_with_notify() -> None:
    """The service is Type=notify and runs twistd without daemonizing or a pid file."""
    assert values(SERVICE, "Service", "Type") == ["notify"]
    assert values(SERVICE, "Service", "NotifyAccess") == ["main"]
    assert values(SERVICE, "Service", "WatchdogSec") != []
    (exec_start,) = values(SERVICE, "Service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[:4] == [SHIPPED_TWISTD, "--nodaemon", "--pidfile=", "imageproxy"]
    options = argv[4:]
    assert options[options.index("--config") + 1] == "/etc/imageproxy/imageproxy.ini"
    assert options[options.index("--key-file") + 1] == "%d/hmac-key"


def test_hmac_key_comes_from_a_credential() -> None:
    """The HMAC key is loaded with LoadCredential, so the file can stay root-only."""
    assert values(SERVICE, "Service", "LoadCredential") == ["hmac-key:/etc/imageproxy/hmac-key"]


def test_hardening_set() -> None:
    """The service runs as a dynamic user without capabilities and with the hardening set."""
    expected = {
        "DynamicUser": "yes",
        "CapabilityBoundingSet": "",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateUsers": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }
    found = {k: v for s, k, v in directives(SERVICE) if s == "Service"}
    assert {k: found.get(k) for k in expected} == expected


def test_no_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute stays off: pyOpenSSL's ffi callbacks (every outbound TLS
    connection) need write+execute memory."""
    assert values(SERVICE, "Service", "MemoryDenyWriteExecute") == []


def test_socket_activation_is_documented_with_the_systemd_endpoint() -> None:
    """The socket unit activates imageproxy.service, and both units show the drop-in that
    makes the service use the inherited socket."""
    assert values(SOCKET, "Socket", "Service") == ["imageproxy.service"]
    assert values(SOCKET, "Socket", "ListenStream") != []
    drop_in = 'Environment="IMAGEPROXY_SOCKET_ARGS=--listen systemd:domain=INET:index=0"'
    assert drop_in in SOCKET.read_text()
    assert drop_in in SERVICE.read_text()
    (exec_start,) = values(SERVICE, "Service", "ExecStart")
    assert "$IMAGEPROXY_SOCKET_ARGS" in shlex.split(exec_start)
    assert "IMAGEPROXY_SOCKET_ARGS=" in values(SERVICE, "Service", "Environment")
