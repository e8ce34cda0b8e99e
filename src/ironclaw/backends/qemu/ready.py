"""How a booting VM proves it is ready: its agent answers ``ping`` on the channel, or,
in an image without the agent, the fallback init writes ``READY <kernel release>``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ironclaw.errors import BackendError
from ironclaw.images import GUEST_PKG_DIR, ImageArtifacts
from ironclaw.proto import methods
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport import virtio_serial

__all__ = ["ReadyProbe", "agent_usable", "ping_probe", "ready_line_probe"]

#: Given the channel's socket path; returns whatever proves the guest is ready.
ReadyProbe = Callable[[Path], Awaitable[dict[str, Any]]]


def agent_usable(artifacts: ImageArtifacts) -> bool:
    """Whether to run the image's agent: the image must carry it."""
    return (artifacts.rootfs_dir / GUEST_PKG_DIR / "guest" / "__main__.py").is_file()


async def _connect_channel(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    while True:
        try:
            return await asyncio.open_unix_connection(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(0.02)


async def ready_line_probe(path: Path) -> dict[str, Any]:
    """Read the fallback init's ``READY <release>`` line (images without an agent)."""
    reader, writer = await _connect_channel(path)
    try:
        while True:
            line = await reader.readline()
            if not line:
                raise BackendError("channel closed before READY")
            text = line.decode(errors="replace").strip()
            if text.startswith("READY "):
                return {"kernel": text.split(" ", 1)[1], "agent": False}
    finally:
        writer.close()


async def ping_probe(path: Path, attempt_s: float | None = None) -> dict[str, Any]:
    """Call the guest agent's ``ping`` over ironclaw.rpc on the channel.

    Each connection is a session of the port (``virtio_serial.connect``): bytes sent
    before the agent opens its port wait in the socket, so on a fresh boot one attempt
    waits as long as it takes. With ``attempt_s`` (a restored or attached VM) an attempt
    (handshake and ping) not answered in time is retried on a new connection, a clean
    disconnect for the agent: a safety net, not how a session normally begins.
    """
    while True:
        try:
            async with asyncio.timeout(attempt_s):
                conn = await virtio_serial.connect(path, handshake_s=None)
                peer = Peer(conn, name="qemu-ready-probe", limits=HOST_LIMITS)
                await peer.start()
                try:
                    pong = await methods.call(peer, methods.PingRequest(), methods.PingResult)
                finally:
                    await peer.aclose()
            return {**methods.to_json(pong), "agent": True}
        except TimeoutError:
            continue
