"""The host's end of a virtio-serial session facing a guest that breaks the handshake.

``virtio_serial.connect`` is what the QEMU backend calls for every channel: it sends a
hello with a fresh nonce and waits for the guest's ack. Here a fake guest sits where
QEMU's chardev socket would (a real Unix socket) and misbehaves at the protocol level:
it never answers, acks another nonce, echoes the host's own hello back, floods before
the ack, or hangs up. The host must end each with a clear typed error while holding a
bounded amount of memory, and must not take anything but the exact ack as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ironclaw.errors import ChannelClosed, ChannelViolation, ConnectError, FrameTooLarge
from ironclaw.proto.frames import FrameType, encode_frame
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport._sessions import HELLO_SIZE, NONCE_SIZE, ack_frame, hello_frame
from ironclaw.transport.virtio_serial import connect

pytestmark = pytest.mark.timeout(120)
MiB = 2**20

Guest = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_port(tmp_path: Path, guest: Guest) -> AsyncIterator[str]:
    """A Unix socket where QEMU's chardev would be, served by ``guest``."""
    path = str(tmp_path / "port.sock")
    tasks: set[asyncio.Task[None]] = set()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            with contextlib.suppress(ConnectionError, OSError):
                await guest(r, w)
        finally:
            w.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        yield path
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_hello(r: asyncio.StreamReader) -> bytes:
    hello = await r.readexactly(HELLO_SIZE)
    return hello[-NONCE_SIZE:]


async def test_a_guest_that_never_acks_is_a_connect_error(tmp_path: Path) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_hello(r)
        await r.read()  # holds the connection open, says nothing

    async with fake_port(tmp_path, silent) as path:
        with pytest.raises(ConnectError, match="did not answer the channel handshake"):
            await connect(path, handshake_s=0.3)


async def test_an_ack_of_another_nonce_or_the_hosts_own_hello_is_not_an_ack(
    tmp_path: Path,
) -> None:
    async def forger(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonce = await read_hello(r)
        wrong = bytes(b ^ 0xFF for b in nonce)
        # Everything that looks like an ack but is not this session's: another nonce,
        # the host's own hello sent back, a hello-shaped frame with the nonce, an ack
        # cut short, and the ack's header with the right nonce but a wrong magic.
        w.write(ack_frame(wrong))
        w.write(hello_frame(nonce))
        w.write(ack_frame(nonce)[:-1] + b"\x00")
        w.write(ack_frame(nonce)[:9] + b"\x00" * 16 + nonce)
        await w.drain()
        await r.read()

    async with fake_port(tmp_path, forger) as path:
        with pytest.raises(ConnectError, match="did not answer"):
            await connect(path, handshake_s=0.3)


async def test_a_guest_hanging_up_in_the_handshake_is_a_connect_error(tmp_path: Path) -> None:
    async def quitter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_hello(r)
        w.write(b"half an ack?"[:5])
        await w.drain()

    async with fake_port(tmp_path, quitter) as path:
        with pytest.raises(ConnectError, match="closed during the handshake"):
            await connect(path, handshake_s=10)


async def test_a_flood_before_the_ack_is_a_violation_and_costs_bounded_memory(
    tmp_path: Path,
) -> None:
    sent = 0

    async def flooder(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        nonce = await read_hello(r)
        # Partial acks of the right nonce at every chunk's end: a scanner that kept
        # "maybe the start of an ack" bytes without bound would grow here.
        piece = b"\xff" * (MiB - 40) + ack_frame(nonce)[:-1]
        while True:
            w.write(piece)
            await w.drain()
            sent += len(piece)

    async with fake_port(tmp_path, flooder) as path:
        tracemalloc.start()
        try:
            with pytest.raises(ChannelViolation, match="without acknowledging"):
                await connect(path, handshake_s=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert sent >= 64 * MiB - MiB  # it did get to flood past the limit
    assert peak < 8 * MiB  # what the host held: a read buffer or two, not the flood


async def test_stale_bytes_then_the_ack_in_pieces_begin_a_session_that_keeps_its_limits(
    tmp_path: Path,
) -> None:
    """The ack found after junk and cut byte by byte is a session; what follows it is
    the guest's first bytes, and the channel's limits apply to them from the start."""

    async def slow_then_huge(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonce = await read_hello(r)
        w.write(encode_frame(FrameType.DATA, 4, b"stale" * 100)[:200])
        for b in ack_frame(nonce):
            w.write(bytes([b]))
            await w.drain()
        # Right after the ack: a frame header claiming 1 GiB.
        w.write((2**30).to_bytes(4, "big") + bytes([FrameType.MESSAGE]) + bytes(4))
        await w.drain()
        await r.read()

    async with fake_port(tmp_path, slow_then_huge) as path:
        conn = await connect(path, handshake_s=10)
        peer = Peer(conn, name="host:virtio-hostile", limits=HOST_LIMITS)
        await peer.start()
        try:
            with pytest.raises(ChannelClosed) as info:
                await peer.call("ping", timeout=30)
            assert isinstance(info.value.__cause__, FrameTooLarge)
        finally:
            await peer.aclose()


async def test_the_hosts_hello_carries_a_fresh_nonce_each_time(tmp_path: Path) -> None:
    """A guest replaying the ack of an earlier session must not get in: nonces differ."""
    seen: list[bytes] = []

    async def recorder(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonce = await read_hello(r)
        if seen:  # the second session: replay the first one's ack
            w.write(ack_frame(seen[0]))
        else:
            w.write(ack_frame(nonce))
        seen.append(nonce)
        await w.drain()
        await r.read()

    async with fake_port(tmp_path, recorder) as path:
        first = await connect(path, handshake_s=10)
        await first.aclose()
        with pytest.raises(ConnectError, match="did not answer"):
            await connect(path, handshake_s=0.3)
    assert len(seen) == 2 and seen[0] != seen[1]
    assert len(set(seen)) == 2 and all(len(n) == NONCE_SIZE for n in seen)
