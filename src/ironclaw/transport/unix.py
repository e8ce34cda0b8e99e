"""Unix stream sockets: the host side of every medium, and jails that share a socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

from ironclaw.errors import ConnectError

from ._server import SocketServer, serve_socket
from ._socket import SocketConnection, connect_socket

__all__ = ["connect", "from_socket", "serve"]


async def connect(
    path: str | os.PathLike[str],
    *,
    timeout: float = 5.0,
) -> SocketConnection:
    """Connect to a listening Unix socket; :class:`ConnectError` if missing or refused."""
    fspath = os.fspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return await connect_socket(
        sock, fspath, what=f"connect to {fspath}", name=fspath, timeout=timeout
    )


def from_socket(sock: socket.socket, *, initiator: bool | None = None) -> SocketConnection:
    """Wrap an already-connected stream socket (inherited fd, socketpair end, vsock).

    The connection owns the socket from now on. ``initiator`` defaults to a guess for
    named Unix sockets (the end without a name of its own is the one that connected);
    pass it explicitly for socketpairs, whose two ends look alike, if both ends will
    allocate stream ids.
    """
    if sock.type != socket.SOCK_STREAM:
        raise ConnectError("from_socket() needs a SOCK_STREAM socket")
    if initiator is None:
        initiator = _guess_initiator(sock)
    return SocketConnection(sock, initiator=initiator, name=f"fd{sock.fileno()}")


def _guess_initiator(sock: socket.socket) -> bool:
    if sock.family != socket.AF_UNIX:
        return True
    try:
        own = sock.getsockname()
    except OSError:
        return True
    return not own


async def serve(
    sock: socket.socket, on_connect: Callable[[SocketConnection], Awaitable[None]]
) -> SocketServer:
    """Serve an already bound and listening AF_UNIX socket (possibly an inherited fd).

    Each accepted connection runs ``on_connect(conn)`` in its own task and is closed when
    that coroutine returns.
    """
    if sock.family != socket.AF_UNIX:
        raise ValueError("unix.serve() needs an AF_UNIX socket")
    name = sock.getsockname()
    return await serve_socket(sock, on_connect, name=str(name or "unix"))
