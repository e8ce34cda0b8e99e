"""Firecracker hybrid vsock: the guest's vsock ports reached through one Unix socket.

The handshake itself lives in :mod:`ironclaw.proto.handshake`; this module retries it
with exponential backoff until a deadline, because the host usually connects while the
guest is still booting. Bytes that follow the ``OK`` line in the same read are pushed back
into the connection's buffer: the first message from the guest is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ironclaw.errors import ConnectError
from ironclaw.proto.handshake import HandshakeClient
from ironclaw.proto.lifecycle import or_close

from . import unix
from ._socket import SocketConnection

__all__ = ["connect", "connect_once"]

log = logging.getLogger(__name__)


async def connect_once(
    uds_path: str | os.PathLike[str],
    port: int,
    *,
    timeout: float = 2.0,
) -> SocketConnection:
    """One attempt: connect, ``CONNECT port``, expect ``OK hostport``; else ConnectError."""
    hs = HandshakeClient(port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    conn = await unix.connect(uds_path, timeout=timeout)
    try:
        await or_close(conn, _handshake(conn, hs, deadline))
    except TimeoutError as exc:
        raise ConnectError(f"vsock port {port}: no handshake reply within {timeout}s") from exc
    conn.unread(hs.leftover)
    conn.name = f"hvsock:{os.fspath(uds_path)}:{port}"
    return conn


async def _handshake(conn: SocketConnection, hs: HandshakeClient, deadline: float) -> None:
    async with asyncio.timeout_at(deadline):
        await conn.write(hs.initiate())
        while True:
            data = await conn.read(256)
            if not data:
                hs.eof()
            if hs.receive_data(data):
                return


async def connect(
    uds_path: str | os.PathLike[str],
    port: int,
    *,
    deadline: float = 10.0,
    initial_backoff: float = 0.05,
    max_backoff: float = 1.0,
) -> SocketConnection:
    """Retry :func:`connect_once` with exponential backoff for up to ``deadline`` seconds.

    Raises the last :class:`ConnectError` (with the attempt count) when time runs out.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    backoff = initial_backoff
    attempts = 0
    while True:
        attempts += 1
        remaining = end - loop.time()
        try:
            return await connect_once(uds_path, port, timeout=max(0.01, min(remaining, 2.0)))
        except ConnectError as exc:
            remaining = end - loop.time()
            if remaining <= 0:
                raise ConnectError(
                    f"{exc} (gave up after {attempts} attempts in {deadline}s)"
                ) from exc
            log.debug("hybrid vsock attempt %d failed: %s", attempts, exc)
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, max_backoff)
