"""AF_VSOCK (virtio-vsock, vhost-vsock): host<->guest sockets addressed by (cid, port).

Where the kernel has no AF_VSOCK the functions raise :class:`ConnectError` with the
reason, so callers can fall back to another medium.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Final

from ironclaw.errors import ConnectError

from ._server import SocketServer, serve_socket
from ._socket import SocketConnection, connect_socket

__all__ = ["CID_ANY", "CID_HOST", "CID_LOCAL", "available", "connect", "listen", "serve"]

CID_ANY: Final = 0xFFFFFFFF
CID_LOCAL: Final = 1  # loopback, needs the vsock_loopback module
CID_HOST: Final = 2


def available() -> bool:
    """True if this kernel can create AF_VSOCK sockets."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return False
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _new_socket() -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise ConnectError("this Python has no AF_VSOCK")
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectError(f"AF_VSOCK unavailable: {exc.strerror or exc}") from exc


async def connect(
    cid: int,
    port: int,
    *,
    timeout: float = 5.0,
) -> SocketConnection:
    return await connect_socket(
        _new_socket(),
        (cid, port),
        what=f"vsock connect to {cid}:{port}",
        name=f"vsock:{cid}:{port}",
        timeout=timeout,
    )


def listen(port: int, *, cid: int = CID_ANY, backlog: int = 16) -> socket.socket:
    """A bound, listening vsock socket (the guest agent listens on its port)."""
    sock = _new_socket()
    try:
        sock.bind((cid, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConnectError(f"vsock listen on {cid}:{port}: {exc.strerror or exc}") from exc
    return sock


async def serve(
    sock: socket.socket,
    on_connect: Callable[[SocketConnection], Awaitable[None]],
) -> SocketServer:
    """Serve a socket from :func:`listen`; ``on_connect`` runs per connection."""
    port = sock.getsockname()[1]
    return await serve_socket(sock, on_connect, name=f"vsock:{port}")
