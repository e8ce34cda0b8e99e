"""virtio-serial: a character device in the guest, a Unix socket on the host.

QEMU exposes the port to the guest as ``/dev/virtio-ports/<name>`` and to the host as a
``chardev`` socket; the host side therefore uses :func:`ironclaw.transport.unix.connect`.
The guest side opens the device non-blocking and drives it with asyncio pipe transports
(one for reading, one for writing, on two descriptors of the same open file), so
writes get the same drain-based backpressure as a socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat

from ironclaw.errors import ConnectError

from ._socket import SocketConnection
from ._stream import DEFAULT_READ_LIMIT, StreamConnection
from .unix import from_socket

__all__ = ["DEVICE_DIR", "device_path", "from_fd", "open_port"]

DEVICE_DIR = "/dev/virtio-ports"


def device_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad virtio-serial port name {name!r}")
    return os.path.join(DEVICE_DIR, name)


async def open_port(
    path: str | os.PathLike[str], *, initiator: bool = False, read_limit: int = DEFAULT_READ_LIMIT
) -> StreamConnection | SocketConnection:
    """Open a virtio-serial device (guest side) as a connection.

    ``path`` is the device path, or a bare port name looked up in ``/dev/virtio-ports``.
    """
    fspath = os.fspath(path)
    if "/" not in fspath:
        path = device_path(fspath)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConnectError(f"open {os.fspath(path)}: {exc.strerror or exc}") from exc
    return await from_fd(fd, initiator=initiator, read_limit=read_limit)


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
