"""Host sessions on one virtio-serial port: the hello/ack that marks where each begins.

The sans-IO scanners are checked on every cut of the bytes. The guest's port driver
(:class:`PortSessions`) runs here on a stand-in with the port's read semantics: a FIFO
reads 0 and polls POLLHUP while no writer ("host") is connected, and a new writer can
come; the write side is a socket whose stale bytes stay for the next host to skip (worse
than QEMU, which discards them). The same driver on a real port is in test_qemu_restore.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw.errors import ChannelViolation
from ironclaw.proto import methods
from ironclaw.proto.frames import FrameType, encode_frame
from ironclaw.rpc import Peer
from ironclaw.transport import StreamConnection
from ironclaw.transport._sessions import (
    HELLO_SIZE,
    AckScanner,
    FrameTracker,
    HelloScanner,
    ack_frame,
    hello_frame,
)
from ironclaw.transport.virtio_serial import PortSessions, handshake

NONCE = bytes(range(16))
REQUEST = encode_frame(FrameType.MESSAGE, 0, b'{"jsonrpc":"2.0","id":1,"method":"ping"}')


# -- sans-IO --------------------------------------------------------------------------------


def _cuts(data: bytes) -> list[list[bytes]]:
    """``data`` whole, byte by byte, and in two pieces at every position."""
    return [[data], [bytes([b]) for b in data]] + [
        [data[:i], data[i:]] for i in range(1, len(data))
    ]


def test_hello_is_found_after_garbage_in_any_cut() -> None:
    stale = encode_frame(FrameType.DATA, 4, b"x" * 40)[:30]  # half a frame of the old host
    wire = stale + hello_frame(NONCE) + b"next"
    for pieces in _cuts(wire):
        scan = HelloScanner()
        found = [r for r in (scan.feed(p) for p in pieces) if r is not None]
        assert len(found) == 1
        nonce, rest = found[0]
        tail = b"".join(pieces)[len(stale) + HELLO_SIZE :]
        assert nonce == NONCE and rest == tail[: len(rest)]


def test_tracker_sees_a_hello_only_at_a_frame_boundary() -> None:
    inside = encode_frame(FrameType.DATA, 2, hello_frame(NONCE))  # as payload: not a hello
    framed = encode_frame(FrameType.MESSAGE, 0, b"{}") + inside
    wire = framed + hello_frame(NONCE) + b"new"
    for pieces in _cuts(wire):
        tr, seen, at = FrameTracker(), 0, -1
        for piece in pieces:
            at = tr.find_hello(piece)
            if at >= 0:
                assert seen + at - len(tr.carry) == len(framed)
                assert (tr.carry + piece[at:]).startswith(hello_frame(NONCE)[: len(tr.carry)])
                break
            seen += len(piece)
        assert at >= 0
    # A header no frame has ends the session where it begins; the bytes before it that
    # a hello may start in are kept for the rescan.
    lost = FrameTracker()
    broken = encode_frame(FrameType.END, 1, b"") + b"\x00\x00\x00\x00\x09\x00\x00\x00\x00"
    assert lost.find_hello(broken + b"rest") == 9 and lost.lost
    assert lost.carry == broken[:9] and lost.find_hello(b"more") == -1


def test_ack_scanner_skips_stale_output_and_is_bounded() -> None:
    for pieces in _cuts(b"old reply" + ack_frame(NONCE) + b"fresh"):
        scan = AckScanner(NONCE)
        got = [r for r in (scan.feed(p) for p in pieces) if r is not None]
        assert got and got[0] == b"fresh"[: len(got[0])]
    # An ack of another hello is stale output too.
    assert AckScanner(NONCE).feed(ack_frame(bytes(16))) is None
    with pytest.raises(ChannelViolation, match="handshake"):
        AckScanner(NONCE, limit=1000).feed(b"z" * 2000)


# -- the guest's port driver on a stand-in ---------------------------------------------------


class StandIn:
    """A FIFO the "host" opens for each session, and a socket it reads replies from."""

    def __init__(self, tmp: Path) -> None:
        self.fifo = tmp / "port"
        os.mkfifo(self.fifo)
        self.guest_out, self.host_in = socket.socketpair()
        self.writer: int | None = None

    def guest_fds(self) -> tuple[int, int]:
        rfd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return rfd, os.dup(self.guest_out.fileno())

    def connect(self) -> None:
        self.writer = os.open(self.fifo, os.O_WRONLY | os.O_CLOEXEC)

    def disconnect(self) -> None:
        if self.writer is not None:
            os.close(self.writer)
            self.writer = None

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        os.write(self.writer, data)

    async def host(
        self, *, first: bytes = b"", nonce: bytes | None = None, rehello_s: float = 1.0
    ) -> _Duplex:
        """A host session begun by :func:`virtio_serial.handshake`, as ``connect`` does:
        a hello into the FIFO (in one write after ``first``, bytes of the previous host),
        the ack awaited on the socket, what preceded it dropped."""
        self.connect()
        duplex = _Duplex(self, first)
        duplex.sock.unread(await handshake(duplex, nonce=nonce, rehello_s=rehello_s))
        return duplex


class _Duplex:
    """The host's end of the stand-in as one connection."""

    def __init__(self, stand: StandIn, first: bytes = b"") -> None:
        from ironclaw.transport.unix import from_socket

        self.stand = stand
        self.first = first  # sent with the first write
        self.sock = from_socket(
            socket.socket(fileno=os.dup(stand.host_in.fileno())), initiator=True
        )
        self.name = "stand-in"

    @property
    def closed(self) -> bool:
        return self.sock.closed

    async def read(self, max_bytes: int = 262144) -> bytes:
        return await self.sock.read(max_bytes)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.stand.writer is not None:
            self.stand.send(self.first + bytes(data))
            self.first = b""

    async def aclose(self) -> None:
        await self.sock.aclose()

    def pause_reading(self) -> None:
        self.sock.pause_reading()

    def resume_reading(self) -> None:
        self.sock.resume_reading()

    def attach_receiver(self, receiver: object) -> None:
        self.sock.attach_receiver(receiver)  # type: ignore[arg-type]


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[tuple[StandIn, PortSessions]]:
    stand = StandIn(tmp_path)
    rfd, wfd = stand.guest_fds()
    sessions = PortSessions(rfd, write_fd=wfd, poll_s=0.02)
    sessions.start()
    yield stand, sessions
    await sessions.close()
    stand.disconnect()
    stand.host_in.close()
    stand.guest_out.close()


async def _serve(conn: StreamConnection) -> None:
    """A guest end answering ping, as the agent would."""

    async def ping(params: object, ctx: object) -> object:
        return methods.encode_result(methods.PingResult(pong=True, kernel="k", uid=0, gid=0,
                                                        pid=1, hostname="h", workdir="/",
                                                        python="3"))  # fmt: skip

    async with Peer(conn, handlers={"ping": ping}, name="guest") as peer:
        await peer.wait_closed()


async def _ping(host: _Duplex) -> bool:
    async with Peer(host, name="host") as peer:
        pong = await methods.call(peer, methods.PingRequest(), methods.PingResult, timeout=10)
        return pong.pong


async def test_a_host_cut_off_mid_frame_leaves_nothing_for_the_next(
    port: tuple[StandIn, PortSessions],
) -> None:
    stand, sessions = port
    async with asyncio.timeout(30):
        # Session 1 sends half a request and vanishes.
        first = asyncio.ensure_future(stand.host())
        served1 = asyncio.ensure_future(_serve(await sessions.accept()))
        await first
        stand.send(REQUEST[:20])
        stand.disconnect()
        await served1  # the guest saw that session end, inside its half frame
        # Session 2 is served from its first byte, and its host skips nothing of its own.
        second = await stand.host()
        served2 = asyncio.ensure_future(_serve(await sessions.accept()))
        assert await _ping(second)
        stand.disconnect()
        await served2
    assert sessions.sessions == 2


async def test_a_reconnect_the_guest_did_not_notice_still_begins_a_new_session(
    port: tuple[StandIn, PortSessions],
) -> None:
    stand, sessions = port
    async with asyncio.timeout(30):
        first = asyncio.ensure_future(stand.host())
        served1 = asyncio.ensure_future(_serve(await sessions.accept()))
        assert await _ping(await first)
        # The next host's writer opens before the old one closes: the port never reads
        # as disconnected, and the new hello arrives at a frame boundary of session 1.
        old = stand.writer
        second = asyncio.ensure_future(stand.host())
        served2 = asyncio.ensure_future(_serve(await sessions.accept()))
        await served1  # ended by the new hello
        assert old is not None
        os.close(old)
        assert await _ping(await second)
        stand.disconnect()
        await served2
    assert sessions.sessions == 2


@pytest.mark.parametrize("cut", [4, 5, 9, 20, len(REQUEST) - 1])
async def test_a_hello_swallowed_by_the_previous_hosts_unfinished_frame_is_found(
    port: tuple[StandIn, PortSessions], cut: int
) -> None:
    """The previous host left ``cut`` bytes of a frame and the next one connected before
    the guest read anything in between: the new hello lands inside that frame (or
    completes it and breaks the next header). Its session must begin all the same."""
    stand, sessions = port
    async with asyncio.timeout(30):
        first = asyncio.ensure_future(stand.host())
        served1 = asyncio.ensure_future(_serve(await sessions.accept()))
        await first
        old = stand.writer
        second = asyncio.ensure_future(stand.host(first=REQUEST[:cut]))
        conn2 = await sessions.accept()
        assert old is not None
        os.close(old)
        await served1
        served2 = asyncio.ensure_future(_serve(conn2))
        assert await _ping(await second)
        stand.disconnect()
        await served2
    assert sessions.sessions == 2


def _spilling(length: int, ftype: int) -> bytes:
    """A nonce whose bytes 4-8 are read as a frame header when its hello completes
    REQUEST cut at 20 (the hello's last 12 bytes spill into the next header)."""
    return bytes(4) + struct.pack(">IB", length, ftype) + bytes(range(7))


_FAKE = hello_frame(b"F" * 16)


@pytest.mark.parametrize(
    ("previous", "nonce", "exact"),
    [
        # Read as a MESSAGE header of 2 GiB: the old session's reader closes it on that.
        (REQUEST[:20], _spilling(2**31, FrameType.MESSAGE), False),
        (REQUEST[:20], _spilling(3, FrameType.DATA), True),  # a frame ending exactly
        (REQUEST[:20], _spilling(32, 0x68), False),  # the hello's type, not its header
        # The hello completes a frame exactly, as if it were its payload.
        (encode_frame(FrameType.DATA, 2, b"d" * 100)[:-HELLO_SIZE], None, True),
        # A hostile host: a fake hello in a frame claiming 4 GiB, or bare.
        (struct.pack(">IBI", 2**32 - 1, FrameType.DATA, 2) + _FAKE + b"x", None, False),
        (encode_frame(FrameType.DATA, 2, b"x" + _FAKE)[:-1], None, False),
        (_FAKE[:24], None, False),
    ],
    ids=["huge-message", "exact-spill", "hello-type", "exact", "hostile-4g", "fake", "border"],
)
async def test_a_swallowed_hello_of_any_shape_begins_the_next_session(
    port: tuple[StandIn, PortSessions], previous: bytes, nonce: bytes | None, exact: bool
) -> None:
    """As above, with the placements that once hung: the new session begins (one
    re-hello later where the hello ends a frame exactly) and its first request is
    answered."""
    stand, sessions = port
    async with asyncio.timeout(30):
        first = asyncio.ensure_future(stand.host())
        served1 = asyncio.ensure_future(_serve(await sessions.accept()))
        await first
        old = stand.writer
        # Only a hello that ends a frame exactly needs the host's second hello.
        rehello_s = 0.5 if exact else 60.0
        second = asyncio.ensure_future(stand.host(first=previous, nonce=nonce, rehello_s=rehello_s))
        conns = [await sessions.accept()]
        assert old is not None
        os.close(old)
        await served1
        host = await second
        while len(conns) < sessions.sessions - 1:  # a fake hello's, or the first hello's
            conns.append(await sessions.accept())
        served2 = asyncio.ensure_future(_serve(conns[-1]))
        assert await _ping(host)
        stand.disconnect()
        await served2
    assert sessions.sessions == 1 + len(conns) <= 4


async def test_a_host_leaving_a_paused_session_ends_it_and_its_unread_bytes(
    tmp_path: Path,
) -> None:
    """Backpressure: the session's reader is full and the port is no longer read, so no
    read of 0 can tell the host left; POLLHUP (woken by SIGIO) ends the session, and
    the next host is served although the old session is never read again. (A host
    coming back before the guest saw POLLHUP waits until the old session is read.)"""
    stand = StandIn(tmp_path)
    rfd, wfd = stand.guest_fds()
    sessions = PortSessions(rfd, write_fd=wfd, read_limit=4096, poll_s=0.02)
    sessions.start()
    try:
        async with asyncio.timeout(30):
            first = asyncio.ensure_future(stand.host())
            stalled = await sessions.accept()  # nobody reads it: it pauses the port
            await first
            chunk = encode_frame(FrameType.DATA, 2, b"d" * 8000)
            for _ in range(4):
                stand.send(chunk)  # 32 kB: past the session's limit, within the FIFO's
            while "buffered=0" in repr(stalled):  # let the guest read them and pause
                await asyncio.sleep(0.01)
            stand.disconnect()
            while not stalled.closed:  # ended though never read again
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(stand.host())
            conn2 = await sessions.accept()
            served2 = asyncio.ensure_future(_serve(conn2))
            assert await _ping(await second)
            stand.disconnect()
            await served2
            # The stalled session ended: what it got (its host's bytes only) is
            # readable, then EOF.
            got = b""
            while piece := await stalled.read():
                got += piece
            assert len(got) > 4096 and got == (chunk * 4)[: len(got)]
    finally:
        await sessions.close()
        stand.disconnect()
        stand.host_in.close()
        stand.guest_out.close()
