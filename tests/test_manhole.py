"""Tests for imgproxy.manhole: key checks, and real SSH sessions against the manhole service."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.ssh import common, keys
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.session import packRequest_pty_req, packRequest_window_change
from twisted.conch.ssh.transport import SSHClientTransport
from twisted.conch.ssh.userauth import SSHUserAuthClient
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint

from imgproxy.manhole import check_authorized_keys, check_host_key, make_manhole_service

TIMEOUT = 10


def new_key() -> keys.Key:
    """A fresh ed25519 key pair."""
    return keys.Key(Ed25519PrivateKey.generate())


def write_private(path: Path, key: keys.Key, mode: int = 0o600) -> str:
    """Write ``key`` in OpenSSH private format with ``mode``; return the path."""
    path.write_bytes(key.toString("openssh"))
    path.chmod(mode)
    return str(path)


def write_authorized(path: Path, *allowed: keys.Key) -> str:
    """Write an authorized_keys file (mode 644) allowing ``allowed``; return the path."""
    lines = [b"# operators"] + [k.public().toString("openssh") + b" op@test" for k in allowed]
    path.write_bytes(b"\n".join(lines) + b"\n")
    path.chmod(0o644)
    return str(path)


class Box:
    """A live object the manhole namespace exposes."""

    value = 7


# -- startup checks -----------------------------------------------------------------------------


def test_host_key_mode_600_accepted(tmp_path: Path) -> None:
    """A private host key readable only by its owner passes the startup check."""
    check_host_key(write_private(tmp_path / "host", new_key()))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_host_key_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    """A host key readable by group or others stops startup with the chmod hint."""
    path = write_private(tmp_path / "host", new_key(), mode)
    with pytest.raises(ValueError) as e:
        check_host_key(path)
    assert str(e.value) == (f"--manhole-host-key: {path} is readable by group/others (chmod 600)")


def test_host_key_writable_by_others_refused(tmp_path: Path) -> None:
    """A host key that group members may overwrite is refused too."""
    path = write_private(tmp_path / "host", new_key(), 0o620)
    with pytest.raises(ValueError, match="writable by group/others"):
        check_host_key(path)


def test_host_key_missing_refused(tmp_path: Path) -> None:
    """A missing host key file is a startup error naming the option."""
    with pytest.raises(ValueError, match=r"^--manhole-host-key: .*/absent: No such file"):
        check_host_key(str(tmp_path / "absent"))


def test_host_key_garbage_refused(tmp_path: Path) -> None:
    """A file that is not a key is a startup error."""
    path = tmp_path / "host"
    path.write_bytes(b"not a key\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="not an SSH private key"):
        check_host_key(str(path))


def test_host_key_public_half_refused(tmp_path: Path) -> None:
    """Giving the .pub file instead of the private key is a startup error."""
    path = tmp_path / "host.pub"
    path.write_bytes(new_key().public().toString("openssh"))
    path.chmod(0o600)
    with pytest.raises(ValueError, match="a public key"):
        check_host_key(str(path))


def test_host_key_encrypted_refused(tmp_path: Path) -> None:
    """A passphrase-protected host key is refused (the daemon cannot ask for it)."""
    path = tmp_path / "host"
    path.write_bytes(new_key().toString("openssh", passphrase=b"secret"))
    path.chmod(0o600)
    with pytest.raises(ValueError, match="encrypted"):
        check_host_key(str(path))


def test_authorized_keys_checks(tmp_path: Path) -> None:
    """An authorized_keys file must exist and must not be writable by group/others."""
    path = write_authorized(tmp_path / "auth", new_key())
    check_authorized_keys(path)
    os.chmod(path, 0o664)
    with pytest.raises(ValueError, match="^--manhole-keys: .* writable by group/others"):
        check_authorized_keys(path)
    with pytest.raises(ValueError, match="^--manhole-keys: .*: No such file"):
        check_authorized_keys(str(tmp_path / "absent"))


@pytest.mark.parametrize("endpoint", ["tcp:2222", "tcp6:port=2222"])
def test_tcp_endpoint_without_interface_refused(tmp_path: Path, endpoint: str) -> None:
    """A tcp endpoint must name its interface: Twisted's default would listen on all."""
    host = write_private(tmp_path / "host", new_key())
    auth = write_authorized(tmp_path / "auth", new_key())
    with pytest.raises(ValueError, match="^--manhole: .*interface="):
        make_manhole_service(endpoint, auth, host, {}, reactor)


# -- an in-process SSH client -------------------------------------------------------------------


class Session:
    """What one client connection saw: auth methods offered, output, exit status, close."""

    def __init__(self) -> None:
        self.methods: bytes | None = None
        self.host_key: bytes | None = None
        self.authenticated = False
        self.output = b""
        self.exit_status: int | None = None
        self.channel: ClientChannel | None = None
        self.started: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._waiting: list[tuple[bytes, defer.Deferred[None]]] = []

    def output_arrived(self, data: bytes) -> None:
        self.output += data
        for needle, d in list(self._waiting):
            if needle in self.output:
                self._waiting.remove((needle, d))
                d.callback(None)

    async def wait_for(self, needle: bytes) -> None:
        """Wait until ``needle`` appears in the output."""
        if needle in self.output:
            return
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((needle, d))
        await d.addTimeout(TIMEOUT, reactor)

    def send(self, data: bytes) -> None:
        assert self.channel is not None
        self.channel.write(data)

    def send_eof(self) -> None:
        assert self.channel is not None
        self.channel.conn.sendEOF(self.channel)

    def request(self, kind: bytes, data: bytes) -> defer.Deferred[Any]:
        assert self.channel is not None
        return self.channel.conn.sendRequest(self.channel, kind, data, wantReply=True)


class ClientChannel(SSHChannel):
    """A session channel: optional pty-req, then shell or exec."""

    name = b"session"

    def __init__(self, session: Session, pty: bool, command: bytes | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.session = session
        self.pty = pty
        self.command = command

    def channelOpen(self, specificData: bytes) -> None:
        self.session.channel = self
        if self.pty:
            pty_req = packRequest_pty_req(b"xterm", (30, 100, 0, 0), b"")
            self.conn.sendRequest(self, b"pty-req", pty_req, wantReply=True)
        if self.command is None:
            d = self.conn.sendRequest(self, b"shell", b"", wantReply=True)
        else:
            d = self.conn.sendRequest(self, b"exec", common.NS(self.command), wantReply=True)
        d.addCallback(lambda _: self.session.started.callback(None))

    def dataReceived(self, data: bytes) -> None:
        self.session.output_arrived(data)

    def request_exit_status(self, data: bytes) -> int:
        self.session.exit_status = struct.unpack(">L", data)[0]
        return 1

    def closed(self) -> None:
        self.session.closed.callback(None)
        self.conn.transport.loseConnection()


class ClientConnection(SSHConnection):
    def __init__(self, session: Session, pty: bool, command: bytes | None) -> None:
        super().__init__()
        self._session = session
        self._pty = pty
        self._command = command

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._session.authenticated = True
        self.openChannel(ClientChannel(self._session, self._pty, self._command, conn=self))


class ClientAuth(SSHUserAuthClient):
    """Offers one key for publickey auth, and nothing else."""

    def __init__(self, user: bytes, conn: SSHConnection, key: keys.Key, session: Session) -> None:
        super().__init__(user, conn)
        self._key = key
        self._offered = False
        self._session = session

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        self._session.methods = common.getNS(packet)[0]
        return super().ssh_USERAUTH_FAILURE(packet)

    def getPublicKey(self) -> keys.Key | None:
        if self._offered:
            return None
        self._offered = True
        return self._key.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        return defer.succeed(self._key)


class ClientTransport(SSHClientTransport):
    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[bool]:
        self.factory.session.host_key = hostKey
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        f = self.factory
        conn = ClientConnection(f.session, f.pty, f.command)
        self.requestService(ClientAuth(b"operator", conn, f.key, f.session))

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.factory.session.lost.callback(None)


async def connect(
    endpoint: Any, key: keys.Key, *, pty: bool = False, command: bytes | None = None
) -> Session:
    """Connect, authenticate with ``key`` and open a session; returns once set up or refused."""
    factory = protocol.ClientFactory()
    factory.protocol = ClientTransport
    factory.session = session = Session()
    factory.key, factory.pty, factory.command = key, pty, command
    await endpoint.connect(factory)
    started = defer.DeferredList([session.started, session.lost], fireOnOneCallback=True)
    await started.addTimeout(TIMEOUT, reactor)
    return session


async def finished(session: Session) -> Session:
    """Wait for the server to close the session and the connection to drop."""
    await defer.gatherResults([session.closed, session.lost]).addTimeout(TIMEOUT, reactor)
    return session


class Manhole:
    """A running manhole service and what the tests need to reach it."""

    def __init__(self, tmp_path: Path) -> None:
        self.host_key = new_key()
        self.operator_key = new_key()
        self.host_key_path = write_private(tmp_path / "host_key", self.host_key)
        self.keys_path = write_authorized(tmp_path / "authorized_keys", self.operator_key)
        self.box = Box()
        self.namespace: dict[str, object] = {"box": self.box}
        self.endpoint: Any = None
        self.port = 0

    async def run(self, where: str, client_endpoint: Callable[[Any], Any]) -> Any:
        self.service = make_manhole_service(
            where, self.keys_path, self.host_key_path, self.namespace, reactor
        )
        self.service.startService()
        listening = await self.service._waitingForPort
        self.port = getattr(listening.getHost(), "port", 0)
        self.endpoint = client_endpoint(self)
        return self

    async def stop(self) -> None:
        await self.service.stopService()

    async def session(self, key: keys.Key | None = None, **kw: Any) -> Session:
        return await connect(self.endpoint, key or self.operator_key, **kw)


@pytest_twisted.async_yield_fixture
async def manhole(tmp_path: Path) -> AsyncIterator[Manhole]:
    """A manhole on 127.0.0.1, an ephemeral port."""
    m = Manhole(tmp_path)
    await m.run(
        "tcp:0:interface=127.0.0.1", lambda m: TCP4ClientEndpoint(reactor, "127.0.0.1", m.port)
    )
    yield m
    await m.stop()


# -- sessions -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_key_accepted_and_expression_evaluated(manhole: Manhole) -> None:
    """An authorized key logs in (host key as configured) and a no-pty shell prints 1+1 as 2."""
    s = await manhole.session()
    assert s.authenticated
    assert s.host_key == manhole.host_key.public().blob()
    s.send(b"1+1\n")
    s.send_eof()
    await finished(s)
    assert s.output == b"2\n"
    assert s.exit_status == 0


@pytest_twisted.ensureDeferred
async def test_wrong_key_refused(manhole: Manhole) -> None:
    """A key not in authorized_keys is refused, and publickey is the only method offered."""
    s = await manhole.session(new_key())
    await s.lost.addTimeout(TIMEOUT, reactor)
    assert not s.authenticated
    assert s.methods == b"publickey"
    assert s.output == b""


@pytest_twisted.ensureDeferred
async def test_namespace_objects_are_live(manhole: Manhole) -> None:
    """The session sees the value the daemon set, and a change made in it is seen by the daemon."""
    manhole.box.value = 7
    s = await manhole.session()
    s.send(b"box.value\nbox.value = 42\nprint('new', box.value)\nscratch = 1\n")
    s.send_eof()
    await finished(s)
    assert s.output == b"7\nnew 42\n"
    assert manhole.box.value == 42
    assert "scratch" not in manhole.namespace


@pytest_twisted.ensureDeferred
async def test_end_of_input_completes_block_and_last_line(manhole: Manhole) -> None:
    """At EOF an open block is run and a last line without newline is evaluated."""
    s = await manhole.session()
    s.send(b"for i in range(3):\n    i * 10\n\n'last'")
    s.send_eof()
    await finished(s)
    assert s.output == b"0\n10\n20\n'last'\n"
    assert s.exit_status == 0


@pytest_twisted.ensureDeferred
async def test_error_sets_exit_status(manhole: Manhole) -> None:
    """An exception prints its traceback and makes the exit status 1."""
    s = await manhole.session()
    s.send(b"1/0\n2\n")
    s.send_eof()
    await finished(s)
    assert b"ZeroDivisionError" in s.output
    assert s.output.endswith(b"2\n")
    assert s.exit_status == 1


@pytest_twisted.ensureDeferred
async def test_deferred_result_awaited_before_exit(manhole: Manhole) -> None:
    """A Deferred value is shown, and its result too, before the session ends."""
    d: defer.Deferred[int] = defer.Deferred()
    manhole.namespace["pending"] = d
    s = await manhole.session()
    s.send(b"pending\n")
    s.send_eof()
    await s.wait_for(b"<Deferred #0>")
    assert not s.closed.called
    d.callback(5)
    await finished(s)
    assert s.output == b"<Deferred #0>\nDeferred #0 called back: 5\n"
    assert s.exit_status == 0


@pytest_twisted.ensureDeferred
async def test_exec_command(manhole: Manhole) -> None:
    """``ssh host 'expr'`` (an exec request) evaluates the command and exits."""
    manhole.box.value = 6
    s = await manhole.session(command=b"box.value * 7")
    await finished(s)
    assert s.output == b"42\n"
    assert s.exit_status == 0


@pytest_twisted.ensureDeferred
async def test_pty_session_and_window_change(manhole: Manhole) -> None:
    """With a pty: the line-editing manhole evaluates, accepts a resize, and ^D ends it."""
    s = await manhole.session(pty=True)
    s.send(b"box.value + 1\r")
    await s.wait_for(b"\r\n8\r\n")
    await s.request(b"window-change", packRequest_window_change((40, 120, 0, 0)))
    s.send(b"\x04")
    await finished(s)
    assert s.exit_status == 0


@pytest_twisted.ensureDeferred
async def test_window_change_without_pty(manhole: Manhole) -> None:
    """A resize on a no-pty session is accepted instead of failing the request."""
    s = await manhole.session()
    await s.request(b"window-change", packRequest_window_change((40, 120, 0, 0)))
    s.send(b"3\n")
    s.send_eof()
    await finished(s)
    assert s.output == b"3\n"


@pytest_twisted.ensureDeferred
async def test_authorized_keys_reread_at_login(manhole: Manhole) -> None:
    """A key added to authorized_keys works at the next login, without a restart."""
    newcomer = new_key()
    refused = await manhole.session(newcomer)
    await refused.lost.addTimeout(TIMEOUT, reactor)
    assert not refused.authenticated
    write_authorized(Path(manhole.keys_path), manhole.operator_key, newcomer)
    accepted = await manhole.session(newcomer)
    assert accepted.authenticated
    accepted.send_eof()
    await finished(accepted)


@pytest_twisted.ensureDeferred
async def test_writable_authorized_keys_refuses_everyone(manhole: Manhole) -> None:
    """If authorized_keys becomes group/world-writable, no key is accepted."""
    os.chmod(manhole.keys_path, 0o666)
    s = await manhole.session()
    await s.lost.addTimeout(TIMEOUT, reactor)
    assert not s.authenticated


@pytest_twisted.ensureDeferred
async def test_unix_socket_defaults_to_mode_600(tmp_path: Path) -> None:
    """A unix: endpoint without mode= gets a 0600 socket, and sessions work over it."""
    path = tmp_path / "manhole.sock"
    m = Manhole(tmp_path)
    await m.run(f"unix:{path}", lambda m: UNIXClientEndpoint(reactor, str(path)))
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        s = await m.session()
        s.send(b"box.value\n")
        s.send_eof()
        await finished(s)
        assert s.output == b"7\n"
    finally:
        await m.stop()


# -- the real OpenSSH client ----------------------------------------------------------------------


class Collect(protocol.ProcessProtocol):
    """Feeds stdin, collects stdout/stderr and the exit code of a child process."""

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.code: int | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.code = reason.value.exitCode
        self.done.callback(None)


async def run_ssh(manhole: Manhole, key_path: str, stdin: bytes) -> Collect:
    """Run ``ssh -T`` against the manhole with ``stdin`` (heredoc style), without blocking."""
    ssh = shutil.which("ssh")
    assert ssh is not None
    args = [
        ssh, "-T", "-F", "/dev/null", "-p", str(manhole.port), "-i", key_path,
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        "operator@127.0.0.1",
    ]  # fmt: skip
    child = Collect(stdin)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path(key_path).parent)}
    reactor.spawnProcess(child, ssh, args, env=env)
    await child.done.addTimeout(TIMEOUT * 2, reactor)
    return child


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
@pytest_twisted.ensureDeferred
async def test_openssh_client(manhole: Manhole, tmp_path: Path) -> None:
    """``ssh -T host <<< '1+1'`` with OpenSSH prints 2 and exits 0; a stranger's key exits 255."""
    key_path = write_private(tmp_path / "id_ed25519", manhole.operator_key)
    ok = await run_ssh(manhole, key_path, b"1+1\n")
    assert (ok.out, ok.code) == (b"2\n", 0), ok.err
    stranger = write_private(tmp_path / "id_stranger", new_key())
    refused = await run_ssh(manhole, stranger, b"1+1\n")
    assert refused.out == b""
    assert b"Permission denied (publickey)" in refused.err
    assert refused.code == 255
