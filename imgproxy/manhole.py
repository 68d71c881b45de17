"""SSH manhole: a Python prompt inside the running daemon, for operators.

Off unless ``--manhole`` is given. SSH only, public-key authentication only: the keys are read
from an authorized_keys file at every login (add or remove an operator without a restart), the
host key from a file that must not be readable by anyone else. Each session evaluates Python
against its own copy of the namespace the daemon passes in (so the live objects are shared, the
top-level names are not).

Two ways in:

* ``ssh -p 2222 host`` (a pty): Twisted's coloured line-editing manhole, ^D to leave.
* ``ssh -T host <<< 'expr'`` or ``ssh host 'expr'`` (no pty): a plain line interpreter without
  prompt, echo or terminal control codes, so the output is the value and nothing else; the
  session ends at end of input with exit status 0, or 1 if any line raised.

Twisted's stock ``TerminalSession`` fails in the no-pty case (no width), on end of input
(``eofReceived`` unimplemented) and on window resize; :class:`_ManholeSession` replaces it.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from typing import Any

from twisted.application.service import IService
from twisted.application.strports import service as strports_service
from twisted.conch import manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.manhole import ColoredManhole, ManholeInterpreter
from twisted.conch.ssh import keys
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.session import SSHSessionProcessProtocol
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["check_authorized_keys", "check_host_key", "make_manhole_service"]

log = Logger()

#: Terminal size assumed until the client reports one (no pty, or a pty-req of 0x0).
DEFAULT_WIDTH = 80
DEFAULT_HEIGHT = 24
#: Seconds a no-pty session waits at end of input for displayed Deferreds to fire.
DEFERRED_WAIT = 10.0


# -- startup checks -----------------------------------------------------------------------------


def check_host_key(path: str) -> None:
    """Refuse a host key file that others can read or write, or that is not a private key.

    Called at startup so a bad file stops the daemon with a one-line error.

    :raises ValueError: naming ``--manhole-host-key`` and what is wrong.
    """
    _load_host_key(path)


def _file_mode(option: str, path: str) -> int:
    """The mode of a regular file, or a ValueError naming ``option``."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"{option}: {path}: {e.strerror}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{option}: {path}: not a regular file")
    return mode


def _load_host_key(path: str) -> keys.Key:
    """Check the host key file's mode and parse it; see :func:`check_host_key`."""
    mode = _file_mode("--manhole-host-key", path)
    if mode & 0o044:
        raise ValueError(f"--manhole-host-key: {path} is readable by group/others (chmod 600)")
    if mode & 0o022:
        raise ValueError(f"--manhole-host-key: {path} is writable by group/others (chmod 600)")
    try:
        key = keys.Key.fromFile(path)
    except keys.EncryptedKeyError:
        raise ValueError(f"--manhole-host-key: {path}: encrypted keys are not supported")
    except Exception as e:
        raise ValueError(f"--manhole-host-key: {path}: not an SSH private key ({e})")
    if key.isPublic():
        raise ValueError(f"--manhole-host-key: {path}: a public key; give the private key")
    return key


def check_authorized_keys(path: str) -> None:
    """Refuse an authorized_keys file that is missing or writable by group/others.

    The file is read again at each login; this startup check catches a mistyped path early.

    :raises ValueError: naming ``--manhole-keys`` and what is wrong.
    """
    mode = _file_mode("--manhole-keys", path)
    if mode & 0o022:
        raise ValueError(f"--manhole-keys: {path} is writable by group/others (chmod 644)")


_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def _checked_endpoint(endpoint: str) -> str:
    """Return the endpoint string to listen on, refusing an accidental all-interfaces bind.

    A ``tcp:``/``tcp6:`` endpoint must say ``interface=`` (Twisted's default is every
    interface); a ``unix:`` endpoint without ``mode=`` gets ``mode=600``.
    """
    parts = _UNESCAPED_COLON.split(endpoint)
    kind = parts[0].lower()
    options = {p.split("=", 1)[0] for p in parts[1:] if "=" in p}
    if kind in ("tcp", "tcp6") and "interface" not in options:
        raise ValueError(
            f"--manhole: {endpoint}: say which interface, e.g. {kind}:2222:interface=127.0.0.1"
        )
    if kind == "unix" and "mode" not in options:
        return endpoint + ":mode=600"
    return endpoint


# -- authentication -----------------------------------------------------------------------------


@implementer(IAuthorizedKeysDB)
class _AuthorizedKeysFile:
    """The public keys in one authorized_keys file, read at each login, for any user name.

    A short local file read on the reactor thread, like Twisted's own
    ``UNIXAuthorizedKeysFiles``. A file that others may write is ignored (no one gets in).
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> list[keys.Key]:
        try:
            with open(self._path, "rb") as f:
                if os.fstat(f.fileno()).st_mode & 0o022:
                    log.error(
                        "manhole: {path} is writable by group/others; refusing all keys",
                        path=self._path,
                    )
                    return []
                return list(readAuthorizedKeyFile(f))
        except OSError as e:
            log.error("manhole: cannot read {path}: {error}", path=self._path, error=e.strerror)
            return []


# -- sessions -----------------------------------------------------------------------------------


class _Transport:
    """The few transport methods the protocols on either side of a shell call."""

    disconnecting = False

    def __init__(self, write: Any, lose: Any, session: SSHSessionProcessProtocol) -> None:
        self._write = write
        self._lose = lose
        self._session = session

    def write(self, data: bytes) -> None:
        self._write(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self._write(b"".join(seq))

    def loseConnection(self) -> None:
        self._lose()

    def getPeer(self) -> Any:
        return self._session.getPeer()

    def getHost(self) -> Any:
        return self._session.getHost()


class _Shell:
    """Connects one SSH session channel to an interpreter protocol, and ends it cleanly.

    Input from the client goes to ``protocol.dataReceived``; the protocol's output goes to the
    channel (which buffers what the client's window does not admit yet). :meth:`end` sends the
    exit status, then closes the channel once that buffer has drained.
    """

    def __init__(self, proto: SSHSessionProcessProtocol, protocol: IProtocol) -> None:
        self._proto = proto
        self._channel: SSHChannel = proto.session
        self.protocol = protocol
        self.ended = False
        protocol.makeConnection(_Transport(self._output, self.end, proto))  # type: ignore[arg-type]
        proto.makeConnection(_Transport(protocol.dataReceived, self._closed, proto))

    def _output(self, data: bytes | str) -> None:
        if self.ended:
            return
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        self._channel.write(data)

    def end(self, status: int = 0) -> None:
        """Send ``exit-status`` and close the channel after the pending output."""
        if self.ended:
            return
        self.ended = True
        conn = self._channel.conn
        assert conn is not None
        conn.sendRequest(self._channel, b"exit-status", struct.pack(">L", status))
        # SSHChannel.loseConnection closes only after the channel's buffer is sent; the
        # SSHSession override would also call back into _closed, which is not needed here.
        SSHChannel.loseConnection(self._channel)
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def _closed(self) -> None:
        """The channel went away (client closed it, or the connection dropped)."""
        if not self.ended:
            self.ended = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


class _LineInterpreter(ManholeInterpreter):
    """A ManholeInterpreter that ends each displayed value with a newline (as Python's REPL
    does, so ``for x in xs: x`` gives one line each) and remembers whether any input raised
    (or any displayed Deferred failed)."""

    failed = False

    def displayhook(self, obj: object) -> None:
        super().displayhook(obj)
        if obj is not None:
            self.write("\n")

    def showtraceback(self) -> None:
        self.failed = True
        super().showtraceback()

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        self.failed = True
        super().showsyntaxerror(filename, **kwargs)

    def _ebDisplayDeferred(self, failure: Failure, k: int, obj: Deferred[Any]) -> Failure:
        self.failed = True
        return super()._ebDisplayDeferred(failure, k, obj)


class _LineManhole(Protocol):
    """Evaluates newline-terminated Python lines, writing only their output: for ``ssh -T``.

    No prompt, no echo, no terminal control codes: ``ssh -T host <<< '1+1'`` prints ``2``.
    """

    def __init__(self, namespace: dict[str, object]) -> None:
        self._namespace = dict(namespace)
        self._pending = b""
        self._last = b"\n"

    def connectionMade(self) -> None:
        self.interpreter = _LineInterpreter(self, self._namespace)

    def dataReceived(self, data: bytes) -> None:
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            self._push(line.rstrip(b"\r"))

    def _push(self, line: bytes) -> None:
        self.interpreter.push(line)
        if self._last != b"\n":
            self.addOutput(b"\n")

    def finish(self) -> None:
        """Run what is left at end of input: a last line without newline, an open block."""
        if self._pending:
            self._push(self._pending)
            self._pending = b""
        if self.interpreter.buffer:
            self._push(b"")

    @property
    def status(self) -> int:
        """The exit status to report: 1 if any input raised, else 0."""
        return 1 if self.interpreter.failed else 0

    def settled(self) -> Deferred[None]:
        """Fires when every Deferred displayed so far has fired (and its result was shown)."""
        pending = [d for _, d in getattr(self.interpreter, "_pendingDeferreds", {}).values()]
        done: Deferred[None] = Deferred()
        remaining = len(pending)

        def one_fired(result: object) -> object:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not done.called:
                done.callback(None)
            return result

        for d in pending:
            d.addBoth(one_fired)
        if not pending:
            done.callback(None)
        return done

    def addOutput(self, data: bytes | str, isAsync: bool | None = None) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        if not data:
            return
        if isAsync and self._last != b"\n":
            data = b"\n" + data
        if isAsync and not data.endswith(b"\n"):
            data += b"\n"
        self._last = data[-1:]
        assert self.transport is not None
        self.transport.write(data)


@implementer(ISession)
class _ManholeSession(manhole_ssh.TerminalSession):
    """An ISession that works with and without a pty, at end of input, and on resize."""

    namespace: dict[str, object]
    reactor: Any
    width = DEFAULT_WIDTH
    height = DEFAULT_HEIGHT
    _pty = False
    _exec = False
    _shell: _Shell | None = None

    def getPty(self, term: bytes, windowSize: tuple[int, ...], attrs: Any) -> None:
        self._pty = True
        self._resize(windowSize)

    def _resize(self, window_size: tuple[int, ...]) -> None:
        rows, cols = window_size[:2]
        self.height = rows or DEFAULT_HEIGHT
        self.width = cols or DEFAULT_WIDTH

    def openShell(self, proto: SSHSessionProcessProtocol) -> None:
        self._log_open(proto, "shell" if self._pty else "no-pty shell")
        if self._pty:
            terminal = insults.ServerProtocol(ColoredManhole, self.namespace)
            self._shell = _Shell(proto, terminal)
            terminal.terminalProtocol.terminalSize(  # type: ignore[attr-defined]
                self.width, self.height)
        else:
            self._shell = _Shell(proto, _LineManhole(self.namespace))

    def execCommand(self, proto: SSHSessionProcessProtocol, cmd: bytes) -> None:
        self._log_open(proto, "command")
        self._exec = True
        line_manhole = _LineManhole(self.namespace)
        shell = self._shell = _Shell(proto, line_manhole)

        def run() -> None:
            if not shell.ended:
                line_manhole.dataReceived(cmd)
                self._end_after_input(shell, line_manhole)

        # After the reply to the exec request: nothing may follow the channel's close.
        self.reactor.callLater(0, run)

    def _end_after_input(self, shell: _Shell, line_manhole: _LineManhole) -> None:
        """Evaluate the rest of the input, wait (boundedly) for Deferred results, then end."""
        line_manhole.finish()
        waiting = line_manhole.settled()
        waiting.addTimeout(DEFERRED_WAIT, self.reactor)
        waiting.addBoth(lambda _: shell.end(line_manhole.status))

    def _log_open(self, proto: SSHSessionProcessProtocol, kind: str) -> None:
        user = IConchUser(self.original)
        log.info(
            "manhole {kind} opened by {user} from {peer}",
            kind=kind,
            user=getattr(user, "username", "?"),
            peer=getattr(proto.getPeer(), "address", None),
        )

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        self._resize(newWindowSize)
        shell = self._shell
        if shell is not None and isinstance(shell.protocol, insults.ServerProtocol):
            shell.protocol.terminalProtocol.terminalSize(  # type: ignore[attr-defined]
                self.width, self.height)

    def eofReceived(self) -> None:
        shell = self._shell
        if shell is None or shell.ended or self._exec:
            return
        if isinstance(shell.protocol, _LineManhole):
            self._end_after_input(shell, shell.protocol)
        else:
            shell.end(0)

    def closed(self) -> None:
        if self._shell is not None:
            self._shell._closed()


class _ManholeUser(manhole_ssh.TerminalUser):
    """The conch avatar; remembers the login name for the session log line."""

    def __init__(self, original: Any, avatarId: bytes) -> None:
        super().__init__(original, avatarId)
        self.username = avatarId.decode("utf-8", "replace")


class _ManholeRealm(manhole_ssh.TerminalRealm):
    """Gives every authenticated user a manhole session over ``namespace``."""

    userFactory = _ManholeUser
    sessionFactory = _ManholeSession

    def __init__(self, namespace: dict[str, object], reactor: Any) -> None:
        super().__init__()
        self._namespace = namespace
        self._reactor = reactor

    def _getAvatar(self, avatarId: bytes) -> Any:
        user = super()._getAvatar(avatarId)
        session: Any = ISession(user.original)
        session.namespace = self._namespace
        session.reactor = self._reactor
        return user


# -- the service --------------------------------------------------------------------------------


def make_manhole_service(
    endpoint: str,
    authorized_keys: str,
    host_key: str,
    namespace: dict[str, object],
    reactor: Any,
) -> IService:
    """Build the SSH manhole service listening on ``endpoint``.

    :param endpoint: a Twisted server endpoint string; ``tcp:`` needs ``interface=``
        (e.g. ``tcp:2222:interface=127.0.0.1``), ``unix:`` defaults to ``mode=600``.
    :param authorized_keys: an OpenSSH authorized_keys file, read at each login.
    :param host_key: an unencrypted OpenSSH/PEM private key (ed25519, ECDSA or RSA), mode 600.
    :param namespace: the names offered at the prompt; each session gets a shallow copy.
    :param reactor: the reactor to listen with (IReactorTCP/IReactorUNIX and IReactorTime).
    :raises ValueError: a bad endpoint, host key or authorized_keys file.
    """
    listen = _checked_endpoint(endpoint)
    key = _load_host_key(host_key)
    check_authorized_keys(authorized_keys)
    checker = SSHPublicKeyChecker(_AuthorizedKeysFile(authorized_keys))
    portal = Portal(_ManholeRealm(namespace, reactor), [checker])  # type: ignore[arg-type]
    factory = manhole_ssh.ConchFactory(portal)
    # Class-level dicts in Twisted: give this factory its own.
    factory.publicKeys = {key.sshType(): key.public()}  # type: ignore[dict-item]
    factory.privateKeys = {key.sshType(): key}  # type: ignore[dict-item]
    return strports_service(listen, factory, reactor=reactor)
