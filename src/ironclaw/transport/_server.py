"""Accepting connections on a listening stream socket (Unix or vsock)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from ._socket import SocketConnection

__all__ = ["SocketServer", "serve_socket"]

log = logging.getLogger(__name__)

OnConnect = Callable[[SocketConnection], Awaitable[None]]


class SocketServer(asyncio.AbstractServer):
    """Runs ``on_connect(conn)`` in its own task for each accepted connection.

    The connection is closed when that coroutine returns or raises, so a handler cannot
    leak a descriptor. ``close()`` stops accepting; ``wait_closed()`` also waits for the
    running handlers (as asyncio does from 3.12 on); ``close_clients()`` cancels them.
    """

    def __init__(self, sock: socket.socket, on_connect: OnConnect, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._on_connect = on_connect
        self._name = name
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._forever: asyncio.Future[None] | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._closed:
            raise RuntimeError("server is closed")
        if not self._serving:
            self._serving = True
            self._sock.setblocking(False)
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn_sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving, say why
                log.warning("%s: accept failed: %s", self._name, exc)
                return
            conn = SocketConnection(conn_sock, initiator=False, name=self._name)
            task = self._loop.create_task(self._run(conn), name=f"{self._name}-conn")
            self._tasks.add(task)
            self._idle.clear()
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _run(self, conn: SocketConnection) -> None:
        try:
            await self._on_connect(conn)
        except Exception:
            log.exception("%s: connection handler failed", self._name)
        finally:
            await conn.aclose()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
            self._serving = False
        self._sock.close()
        if self._forever is not None and not self._forever.done():
            self._forever.cancel()

    def close_clients(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        await self._idle.wait()

    async def serve_forever(self) -> None:
        await self.start_serving()
        self._forever = self._loop.create_future()
        try:
            await self._forever
        finally:
            self.close()

    async def __aenter__(self) -> SocketServer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()


async def serve_socket(sock: socket.socket, on_connect: OnConnect, *, name: str) -> SocketServer:
    if sock.type != socket.SOCK_STREAM:
        raise ValueError("serve() needs a SOCK_STREAM socket")
    server = SocketServer(sock, on_connect, name)
    await server.start_serving()
    return server
