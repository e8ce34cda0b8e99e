"""virtio-serial: a character device in the guest, a Unix socket on the host.

QEMU exposes the port to the guest as ``/dev/virtio-ports/<name>`` and to the host as a
``chardev`` socket. The port is one byte stream for the VM's life while host connections
come and go, so each host connection is a session that begins with a hello and is
answered by an ack (:mod:`._sessions`): the host side is :func:`connect`, the guest side
:func:`serve_port`, which keeps the device open across sessions (:mod:`._port`).
:func:`open_port` opens the device as one plain connection (no sessions).
The guest side drives the device with asyncio pipe transports, so writes get the same
drain-based backpressure as a socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat

from ironclaw.errors import ChannelViolation, ConnectError

from ._port import PortSessions
from ._sessions import NONCE_SIZE, AckScanner, hello_frame
from ._socket import Receiver, SocketConnection
from ._stream import DEFAULT_READ_LIMIT, StreamConnection
from .unix import connect as unix_connect
from .unix import from_socket

__all__ = [
    "DEVICE_DIR",
    "HostSession",
    "PortSessions",
    "connect",
    "device_path",
    "from_fd",
    "open_port",
    "serve_port",
]

DEVICE_DIR = "/dev/virtio-ports"


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


async def connect(path: str | os.PathLike[str], *, timeout: float = 5.0) -> HostSession:
    """Host side: connect to the port's socket and begin a session with a fresh hello.

    Returns at once (requests may follow the hello straight away); reads skip whatever
    the guest sent before its ack of this hello (an earlier session's output).
    """
    conn = await unix_connect(path, timeout=timeout)
    nonce = os.urandom(NONCE_SIZE)
    try:
        await conn.write(hello_frame(nonce))
    except BaseException:
        await conn.aclose()
        raise
    return HostSession(conn, nonce)


class HostSession:
    """The host's end of one session: a :class:`SocketConnection` whose reads begin
    after the guest's ack (in pull and in push mode)."""

    def __init__(self, conn: SocketConnection, nonce: bytes) -> None:
        self._conn = conn
        self._scan: AckScanner | None = AckScanner(nonce)
        self.initiator = True
        self.name = conn.name

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def acknowledged(self) -> bool:
        """Whether the guest's ack has arrived (its session has begun)."""
        return self._scan is None

    def _skip(self, data: bytes | bytearray | memoryview) -> bytes | None:
        assert self._scan is not None
        rest = self._scan.feed(data)
        if rest is not None:
            self._scan = None
        return rest

    async def read(self, max_bytes: int = 262144) -> bytes:
        while self._scan is not None:
            data = await self._conn.read(max_bytes)
            if not data:
                return b""
            rest = self._skip(data)
            if rest:
                return rest
        return await self._conn.read(max_bytes)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._conn.write(data)

    async def aclose(self) -> None:
        await self._conn.aclose()

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def attach_receiver(self, receiver: Receiver) -> None:
        if self._scan is None:
            self._conn.attach_receiver(receiver)
        else:
            self._conn.attach_receiver(_SkipToAck(self, receiver))


class _SkipToAck:
    """Push-mode receiver that drops bytes until the ack, then hands on to ``receiver``."""

    def __init__(self, session: HostSession, receiver: Receiver) -> None:
        self._session = session
        self._receiver = receiver
        self._own: bytearray | None = None
        self._failed = False

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._session.acknowledged:
            self._own = None
            return self._receiver.get_buffer(sizehint)
        self._own = bytearray(max(sizehint, 4096))
        return memoryview(self._own)

    def buffer_updated(self, nbytes: int) -> None:
        own, self._own = self._own, None
        if self._failed:
            return
        if own is None:
            self._receiver.buffer_updated(nbytes)
            return
        try:
            rest = self._session._skip(memoryview(own)[:nbytes])
        except ChannelViolation as exc:
            self._failed = True
            self._receiver.eof_received(exc)
            return
        if rest:
            with self._receiver.get_buffer(len(rest)) as view:
                view[: len(rest)] = rest
            self._receiver.buffer_updated(len(rest))

    def eof_received(self, exc: BaseException | None) -> None:
        self._receiver.eof_received(exc)


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
