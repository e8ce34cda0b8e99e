"""virtio-serial: a character device in the guest, a Unix socket on the host.

QEMU exposes the port to the guest as ``/dev/virtio-ports/<name>`` and to the host as a
``chardev`` socket. The port is one byte stream for the VM's life while host connections
come and go, so each host connection is a session that begins with a hello and is
answered by an ack (:mod:`._sessions`): the host side is :func:`connect`, the guest side
:func:`serve_port`, which keeps the device open across sessions (:mod:`._port`).
A VM may give its agent several ports (one host connection each: QEMU's socket serves
one client at a time); :func:`serve_ports` serves them side by side in one process.
:func:`open_port` opens the device as one plain connection (no sessions).
The guest side drives the device with asyncio pipe transports, so writes get the same
drain-based backpressure as a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import stat
from collections.abc import Sequence
from typing import Protocol

from ironclaw.errors import ChannelClosed, ConnectError

from ._port import PortSessions
from ._sessions import NONCE_SIZE, AckScanner, hello_frame
from ._socket import SocketConnection, connect_socket
from ._stream import DEFAULT_READ_LIMIT, StreamConnection
from .unix import connect as unix_connect
from .unix import from_socket

__all__ = [
    "DEVICE_DIR",
    "PortSessions",
    "close_ports",
    "connect",
    "device_path",
    "from_fd",
    "handshake",
    "open_port",
    "port_family",
    "serve_port",
    "serve_ports",
]

DEVICE_DIR = "/dev/virtio-ports"
_REHELLO_MAX_S = 8.0


def device_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad virtio-serial port name {name!r}")
    return os.path.join(DEVICE_DIR, name)


def _open_device(path: str | os.PathLike[str]) -> int:
    fspath = os.fspath(path)
    if "/" not in fspath:
        fspath = device_path(fspath)
    try:
        return os.open(fspath, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConnectError(f"open {fspath}: {exc.strerror or exc}") from exc


async def serve_port(
    path: str | os.PathLike[str], *, read_limit: int = DEFAULT_READ_LIMIT
) -> PortSessions:
    """Open the device (guest side) for good; ``accept()`` the host sessions on it."""
    fd = _open_device(path)
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConnectError(f"{os.fspath(path)} is not a character device")
    port = PortSessions(fd, read_limit=read_limit)
    port.start()
    return port


def port_family(name: str) -> list[str]:
    """The device paths of port ``name`` and its siblings ``name.1``, ``name.2``, ...
    (a VM's several agent ports), in order; just ``name``'s when it has none."""
    found: list[tuple[int, str]] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(DEVICE_DIR):
            head, _, index = entry.rpartition(".")
            if (
                head == name
                and index.isascii()
                and index.isdigit()
                and index[0] != "0"
                and len(index) < 4
            ):
                found.append((int(index), entry))
    return [device_path(name), *(device_path(entry) for _, entry in sorted(found))]


async def serve_ports(
    paths: Sequence[str | os.PathLike[str]], *, read_limit: int = DEFAULT_READ_LIMIT
) -> list[PortSessions]:
    """:func:`serve_port` for each of a VM's agent ports, all opened before any is served.

    Every port's reader wakes on SIGIO (the host end came or went), and a process has
    one SIGIO handler: it is shared here, waking every port's reader (each checks its
    own). Close them with :func:`close_ports`.
    """
    ports: list[PortSessions] = []
    try:
        for path in paths:
            ports.append(await serve_port(path, read_limit=read_limit))
    except BaseException:
        await close_ports(ports)
        raise
    armed = [p for p in ports if p._sigio]
    if len(armed) > 1:

        def wake_all() -> None:
            for port in armed:
                port._wake.set()

        asyncio.get_running_loop().add_signal_handler(signal.SIGIO, wake_all)
    return ports


async def close_ports(ports: Sequence[PortSessions]) -> None:
    """Close ports served together: none signals SIGIO once the first has removed the
    shared handler (SIGIO's default action ends the process)."""
    for port in ports:
        if port._sigio:
            with contextlib.suppress(OSError):
                flags = fcntl.fcntl(port._fd, fcntl.F_GETFL)
                fcntl.fcntl(port._fd, fcntl.F_SETFL, flags & ~os.O_ASYNC)
    for port in ports:
        await port.close()


class _ClaimedConnection(SocketConnection):
    """A host session that holds its port's claim (a descriptor) until it is closed."""

    def __init__(self, sock: socket.socket, *, claim: int, name: str) -> None:
        super().__init__(sock, initiator=True, name=name)
        self._claim = claim

    def abort(self) -> None:
        try:
            super().abort()
        finally:  # after the socket: the next claimant finds the port let go
            claim, self._claim = self._claim, -1
            if claim >= 0:
                os.close(claim)


async def _connect_claimed(path: str, claim: int, timeout: float) -> SocketConnection:
    return await connect_socket(
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC),
        path,
        what=f"connect to {path}",
        name=path,
        timeout=timeout,
        wrap=lambda sock: _ClaimedConnection(sock, claim=claim, name=path),
    )


class _Duplex(Protocol):
    """What :func:`handshake` needs of a connection (a test's stand-in has it too)."""

    async def read(self, max_bytes: int = ...) -> bytes: ...
    async def write(self, data: bytes | bytearray | memoryview) -> None: ...


async def connect(
    path: str | os.PathLike[str],
    *,
    timeout: float = 5.0,
    handshake_s: float | None = 30.0,
    rehello_s: float = 1.0,
    claim: int | None = None,
) -> SocketConnection:
    """Host side: connect to the port's socket and begin a session (:func:`handshake`).

    ``handshake_s`` bounds the wait for the ack (None: as long as it takes, for a caller
    that bounds it itself). ``claim`` (a descriptor, owned from now on) is closed with
    the session, or at once if it cannot begin: a lock that says which process uses the
    port.
    """
    if claim is None:
        conn = await unix_connect(path, timeout=timeout)
    else:
        try:
            conn = await _connect_claimed(os.fspath(path), claim, timeout)
        except BaseException:
            os.close(claim)
            raise
    try:
        async with asyncio.timeout(handshake_s):
            rest = await handshake(conn, rehello_s=rehello_s)
    except TimeoutError:
        await conn.aclose()
        raise ConnectError(
            f"{os.fspath(path)}: the guest agent did not answer the channel handshake within "
            f"{handshake_s}s (is the VM paused or overloaded?)"
        ) from None
    except ChannelClosed:
        await conn.aclose()
        raise ConnectError(f"{os.fspath(path)}: channel closed during the handshake") from None
    except BaseException:
        await conn.aclose()
        raise
    conn.unread(rest)
    return conn


async def handshake(conn: _Duplex, *, rehello_s: float = 1.0, nonce: bytes | None = None) -> bytes:
    """Begin a host session on ``conn``: a hello with a fresh nonce, then its ack.

    Returns what followed the ack (what came before it, an earlier session's output, is
    dropped); nothing else is sent before (see :mod:`._port`: the guest relies on it).
    ChannelClosed if ``conn`` ends first; unbounded in time (the caller bounds it). ``nonce``
    is the first hello's (a test's choice); a fresh random one by default.

    With no ack ``rehello_s`` after a hello, another one with a new nonce follows (the
    wait doubling up to 8 s), and only its ack counts: a hello that exactly completed a
    frame the previous host left unfinished looks like that frame's payload to the
    guest, and the next one is at a frame boundary. A guest that acked the earlier hello
    meanwhile begins a session at the later one as well.
    """
    loop = asyncio.get_running_loop()
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    scan = AckScanner(nonce)
    await conn.write(hello_frame(nonce))
    wait = rehello_s
    next_hello = loop.time() + wait
    while True:
        try:
            async with asyncio.timeout_at(next_hello):
                data = await conn.read()
        except TimeoutError:
            nonce = os.urandom(NONCE_SIZE)
            scan.expect(nonce)
            await conn.write(hello_frame(nonce))
            wait = min(_REHELLO_MAX_S, wait * 2)
            next_hello = loop.time() + wait
            continue
        if not data:
            raise ChannelClosed("channel closed during the handshake")
        rest = scan.feed(data)
        if rest is not None:
            return rest


async def open_port(
    path: str | os.PathLike[str], *, initiator: bool = False, read_limit: int = DEFAULT_READ_LIMIT
) -> StreamConnection | SocketConnection:
    """Open a virtio-serial device (guest side) as a connection.

    ``path`` is the device path, or a bare port name looked up in ``/dev/virtio-ports``.
    """
    return await from_fd(_open_device(path), initiator=initiator, read_limit=read_limit)


async def from_fd(
    fd: int, *, initiator: bool = False, read_limit: int = DEFAULT_READ_LIMIT
) -> StreamConnection | SocketConnection:
    """Wrap an open character-device descriptor; the connection owns it (closed on error).

    A socket descriptor standing in for the device is handled as a socket, because
    asyncio's write-pipe transport reads readiness on a socket as "peer closed".
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        return from_socket(socket.socket(fileno=fd), initiator=initiator)
    if not stat.S_ISCHR(mode):
        os.close(fd)
        raise ConnectError(f"fd {fd} is not a character device")
    loop = asyncio.get_running_loop()
    conn = StreamConnection(initiator=initiator, read_limit=read_limit, name=f"virtio-fd{fd}")
    wfd = os.dup(fd)
    rfile = os.fdopen(fd, "rb", buffering=0, closefd=True)
    wfile = os.fdopen(wfd, "wb", buffering=0, closefd=True)
    try:
        await loop.connect_read_pipe(conn.read_protocol, rfile)
        await loop.connect_write_pipe(conn.write_protocol, wfile)
    except OSError as exc:
        rfile.close()
        wfile.close()
        raise ConnectError(f"cannot drive fd {fd}: {exc}") from exc
    return conn
