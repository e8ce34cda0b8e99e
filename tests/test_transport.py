"""Transports over real sockets, ptys and (where the kernel has it) AF_VSOCK."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pty
import socket
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw.errors import ChannelClosed, ConnectError
from ironclaw.proto import HandshakeServer, ok_line
from ironclaw.transport import (
    Connection,
    SocketConnection,
    hybrid_vsock,
    memory,
    unix,
    virtio_serial,
    vsock,
)
from ironclaw.transport._socket import HIGH_WATER

pytestmark = pytest.mark.timeout(30)


async def read_exactly(conn: Connection, n: int, *, max_bytes: int = 65536) -> bytes:
    out = bytearray()
    async with asyncio.timeout(10):
        while len(out) < n:
            data = await conn.read(min(max_bytes, n - len(out)))
            assert data, f"EOF after {len(out)} of {n} bytes"
            out += data
    return bytes(out)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "ch.sock")


def listening(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


@pytest.fixture
async def echo_server(sock_path: str) -> AsyncIterator[str]:
    async def echo(conn: SocketConnection) -> None:
        while data := await conn.read():
            await conn.write(data)

    server = await unix.serve(listening(sock_path), echo)
    async with server:
        yield sock_path


# -- unix -------------------------------------------------------------------------------------
async def test_unix_round_trip_keeps_every_byte(echo_server: str) -> None:
    conn = await unix.connect(echo_server)
    assert isinstance(conn, Connection)
    assert conn.initiator is True
    payload = os.urandom(3 * 2**20 + 17)
    writer = asyncio.create_task(conn.write(payload))
    got = await read_exactly(conn, len(payload), max_bytes=7919)  # odd reads: bytes stay buffered
    await writer
    assert got == payload
    await conn.aclose()
    await conn.aclose()  # idempotent
    assert conn.closed
    with pytest.raises(ChannelClosed):
        await conn.read()


async def test_serve_accepts_an_inherited_fd(sock_path: str) -> None:
    parent = listening(sock_path)
    inherited = socket.socket(fileno=os.dup(parent.fileno()))
    parent.close()
    seen: list[bool | None] = []

    async def hello(conn: SocketConnection) -> None:
        seen.append(conn.initiator)
        await conn.write(b"hello")

    async with await unix.serve(inherited, hello):
        conn = await unix.connect(sock_path)
        assert await read_exactly(conn, 5) == b"hello"
        async with asyncio.timeout(5):
            assert await conn.read() == b""  # the server closed it when the handler returned
        await conn.aclose()
    assert seen == [False]


async def test_connect_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="No such file"):
        await unix.connect(tmp_path / "missing.sock")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(tmp_path / "deaf.sock"))  # bound but not listening: refused
    with pytest.raises(ConnectError, match="refused"):
        await unix.connect(tmp_path / "deaf.sock")
    bound.close()


async def test_slow_reader_slows_the_writer_and_memory_stays_bounded() -> None:
    a, b = socket.socketpair()
    tx, rx = unix.from_socket(a, initiator=True), unix.from_socket(b, initiator=False)
    chunk = os.urandom(256 * 1024)
    digest = hashlib.sha256()
    written = 0

    async def produce() -> None:
        nonlocal written
        for _ in range(64):  # 16 MiB, far more than socket buffers + high-water mark
            await tx.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            assert tx._wbytes <= HIGH_WATER + len(chunk)

    task = asyncio.create_task(produce())
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done, "writer finished although nobody read"
    assert written < 8 * 2**20
    got = hashlib.sha256()
    total = 0
    async with asyncio.timeout(20):
        while total < 64 * len(chunk):
            data = await rx.read()
            got.update(data)
            total += len(data)
        await task
    assert got.digest() == digest.digest()
    await tx.aclose()
    await rx.aclose()


async def test_write_to_a_vanished_peer_raises_channel_closed() -> None:
    a, b = socket.socketpair()
    conn = unix.from_socket(a, initiator=True)
    b.close()

    async def write_until_it_fails() -> None:
        async with asyncio.timeout(5):
            while True:
                await conn.write(b"x" * 65536)

    with pytest.raises(ChannelClosed):
        await write_until_it_fails()
    assert conn.closed
    async with asyncio.timeout(5):
        assert await conn.read() == b""
    await conn.aclose()


async def test_unread_bytes_come_first() -> None:
    a, b = socket.socketpair()
    conn = unix.from_socket(a, initiator=True)
    b.sendall(b"world")
    conn.unread(b"hello ")
    assert await read_exactly(conn, 11) == b"hello world"
    await conn.aclose()
    b.close()


# -- memory -------------------------------------------------------------------------------------
async def test_memory_pair_semantics() -> None:
    a, b = memory.pair(buffer_limit=1024)
    assert (a.initiator, b.initiator) == (True, False)
    blocked = asyncio.create_task(a.write(b"x" * 4096))
    done, _ = await asyncio.wait({blocked}, timeout=0.05)
    assert not done, "write beyond buffer_limit did not wait for the reader"
    assert await read_exactly(b, 4096, max_bytes=1000) == b"x" * 4096
    await blocked
    await a.write(b"last")
    await a.aclose()
    assert await read_exactly(b, 4) == b"last"
    assert await b.read() == b""
    with pytest.raises(ChannelClosed):
        await b.write(b"nobody listens")


# -- hybrid vsock ---------------------------------------------------------------------------
class FakeFirecracker:
    """A muxer like Firecracker's: EOF until the guest 'listens', then ``OK`` plus data."""

    def __init__(self, path: str, *, refuse_first: int, reply: bytes | None = None) -> None:
        self.path = path
        self.refuse_first = refuse_first
        self.reply = reply
        self.attempts = 0
        self.ports: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        hs = HandshakeServer()
        while (port := hs.receive_data(await reader.read(64))) is None:
            pass
        self.ports.append(port)
        if self.attempts <= self.refuse_first:
            writer.close()
            return
        # OK line and the guest's first bytes in one write: they must not be lost.
        writer.write(self.reply if self.reply is not None else ok_line(1073741824) + b"guest-hello")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


async def test_hybrid_vsock_retries_until_the_guest_listens(sock_path: str) -> None:
    fc = FakeFirecracker(sock_path, refuse_first=3)
    async with await asyncio.start_unix_server(fc.handle, sock_path):
        conn = await hybrid_vsock.connect(sock_path, 1024, deadline=10, initial_backoff=0.01)
        assert await read_exactly(conn, 11) == b"guest-hello"
        await conn.write(b"ping")
        assert await read_exactly(conn, 4) == b"ping"
        await conn.aclose()
    assert fc.attempts == 4
    assert fc.ports == [1024] * 4


async def test_hybrid_vsock_gives_up_at_the_deadline(sock_path: str) -> None:
    fc = FakeFirecracker(sock_path, refuse_first=10**6)
    loop = asyncio.get_running_loop()
    async with await asyncio.start_unix_server(fc.handle, sock_path):
        t0 = loop.time()
        with pytest.raises(ConnectError, match="gave up after"):
            await hybrid_vsock.connect(sock_path, 5, deadline=0.5, initial_backoff=0.01)
        assert loop.time() - t0 < 3
    assert fc.attempts >= 3


async def test_hybrid_vsock_rejects_a_bad_reply(sock_path: str) -> None:
    fc = FakeFirecracker(sock_path, refuse_first=0, reply=b"ERR no such port\n")
    async with await asyncio.start_unix_server(fc.handle, sock_path):
        with pytest.raises(ConnectError, match="unexpected handshake reply"):
            await hybrid_vsock.connect_once(sock_path, 5)


async def test_hybrid_vsock_without_socket_is_a_connect_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectError):
        await hybrid_vsock.connect(tmp_path / "none.sock", 5, deadline=0.2, initial_backoff=0.05)


# -- virtio-serial ------------------------------------------------------------------------------
async def test_virtio_serial_guest_side_on_a_pty() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)  # a virtio port is a raw byte pipe, no line discipline
    guest = await virtio_serial.open_port(os.ttyname(slave))
    os.close(slave)
    host = await virtio_serial.from_fd(master, initiator=True)
    payload = os.urandom(200_000)
    send = asyncio.create_task(host.write(payload))
    assert await read_exactly(guest, len(payload)) == payload
    await send
    await guest.write(b"from guest")
    assert await read_exactly(host, 10) == b"from guest"
    await guest.aclose()
    async with asyncio.timeout(5):
        assert await host.read() == b""  # pty hang-up reads as EOF, not an error
    await host.aclose()


async def test_virtio_serial_accepts_a_socket_standing_in() -> None:
    a, b = socket.socketpair()
    guest = await virtio_serial.from_fd(os.dup(a.fileno()))
    a.close()
    b.sendall(b"abc")
    assert await read_exactly(guest, 3) == b"abc"
    await guest.write(b"xyz")
    assert b.recv(3) == b"xyz"
    await guest.aclose()
    b.close()


async def test_virtio_serial_refuses_regular_files(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConnectError, match="character device"):
        await virtio_serial.open_port(tmp_path / "f")
    with pytest.raises(ConnectError, match="No such file"):
        await virtio_serial.open_port(tmp_path / "nope")
    assert virtio_serial.device_path("org.ironclaw.0") == "/dev/virtio-ports/org.ironclaw.0"
    with pytest.raises(ValueError):
        virtio_serial.device_path("../etc")


# -- vsock --------------------------------------------------------------------------------------
needs_vsock = pytest.mark.skipif(not vsock.available(), reason="kernel has no AF_VSOCK")


@needs_vsock
async def test_vsock_listen_and_loopback() -> None:
    sock = vsock.listen(0x4000 + os.getpid() % 10000)
    port = sock.getsockname()[1]

    async def echo(conn: SocketConnection) -> None:
        while data := await conn.read():
            await conn.write(data)

    async with await vsock.serve(sock, echo):
        try:
            conn = await vsock.connect(vsock.CID_LOCAL, port, timeout=0.5)
        except ConnectError as exc:
            pytest.skip(f"no vsock loopback here (vsock_loopback module?): {exc}")
        await conn.write(b"over vsock")
        assert await read_exactly(conn, 10) == b"over vsock"
        await conn.aclose()


@needs_vsock
async def test_vsock_connect_failure_is_a_connect_error() -> None:
    with pytest.raises(ConnectError, match="vsock connect"):
        await vsock.connect(0xFFFF_FFF0, 9, timeout=0.3)
