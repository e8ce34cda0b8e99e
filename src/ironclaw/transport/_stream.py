"""Connection over asyncio transports: used for character devices (virtio-serial guest end).

The connection owns a single receive buffer (a deque of the chunks the kernel handed us)
for its whole life: ``read`` takes from its front and puts back what it did not return,
so no byte is ever dropped between reads. When the buffer passes ``read_limit`` the
transport stops reading, which fills the kernel buffers and slows the remote writer:
memory stays bounded without losing anything.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from typing import Final

from ironclaw.errors import ChannelClosed, ReadError, WriteError

__all__ = ["DEFAULT_READ_LIMIT", "ChunkBuffer", "StreamConnection", "check_read"]

log = logging.getLogger(__name__)

DEFAULT_READ_LIMIT: Final = 4 * 2**20
_CLOSE_GRACE: Final = 2.0


class _Proto(asyncio.Protocol):
    """Forwards transport callbacks to the owning connection (one per transport)."""

    def __init__(self, conn: StreamConnection, role: str) -> None:
        self._conn = conn
        self._role = role

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn._transport_made(transport, self._role)

    def data_received(self, data: bytes) -> None:
        self._conn._data(data)

    def eof_received(self) -> bool:
        self._conn._eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._lost(exc, self)

    def pause_writing(self) -> None:
        self._conn._write_paused = True

    def resume_writing(self) -> None:
        self._conn._resume_writing()


def check_read(max_bytes: int, *, busy: bool) -> None:
    """What every connection's ``read`` refuses: a size below one, or a second reader
    while one waits (which of the two would get the bytes is undefined)."""
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    if busy:
        raise RuntimeError("read() is already being awaited by another task")


class ChunkBuffer:
    """Received bytes, kept as the chunks they arrived in, and their total (``size``).

    ``take`` returns the front up to a size, joining small chunks and putting back the
    tail of a large one, so no byte is dropped or copied twice between reads.
    """

    __slots__ = ("_chunks", "size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def appendleft(self, data: bytes) -> None:
        self._chunks.appendleft(data)
        self.size += len(data)

    def take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        first = chunks.popleft()
        if len(first) > max_bytes:
            chunks.appendleft(first[max_bytes:])
            first = first[:max_bytes]
        elif chunks and len(first) + len(chunks[0]) <= max_bytes:
            parts = [first]
            size = len(first)
            while chunks and size + len(chunks[0]) <= max_bytes:
                nxt = chunks.popleft()
                parts.append(nxt)
                size += len(nxt)
            first = b"".join(parts)
        self.size -= len(first)
        return first

    def clear(self) -> None:
        self._chunks.clear()
        self.size = 0


class StreamConnection:
    """A :class:`~ironclaw.transport.Connection` on asyncio transports.

    ``initiator`` records which end opened the channel (the connecting side is True);
    the rpc layer uses it to split stream ids so the two ends never collide.
    """

    def __init__(
        self, *, initiator: bool | None, read_limit: int = DEFAULT_READ_LIMIT, name: str = ""
    ) -> None:
        loop = asyncio.get_running_loop()
        self.initiator = initiator
        self.name = name
        self._loop = loop
        self._read_limit = read_limit
        self._buffer = ChunkBuffer()
        self._eof = False
        self._read_error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._rtransport: asyncio.ReadTransport | None = None
        self._wtransport: asyncio.WriteTransport | None = None
        self._protos: list[_Proto] = []
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closing = False  # aclose() was called here
        self._gone = False  # all transports reported connection_lost
        self._gone_fut: asyncio.Future[None] = loop.create_future()
        self._made: asyncio.Future[None] = loop.create_future()

    # -- construction -------------------------------------------------------------
    def protocol(self, role: str = "rw") -> asyncio.Protocol:
        """A protocol for one transport; ``role`` says which direction it carries."""
        proto = _Proto(self, role)
        self._protos.append(proto)
        return proto

    def read_protocol(self) -> asyncio.Protocol:
        return self.protocol("r")

    def write_protocol(self) -> asyncio.Protocol:
        return self.protocol("w")

    def _transport_made(self, transport: asyncio.BaseTransport, role: str) -> None:
        # Pipe transports claim both interfaces; trust the role the caller gave instead.
        if "r" in role and isinstance(transport, asyncio.ReadTransport):
            self._rtransport = transport
        if "w" in role and isinstance(transport, asyncio.WriteTransport):
            self._wtransport = transport
        if not self._made.done():
            self._made.set_result(None)
        if "w" in role and isinstance(transport, asyncio.WriteTransport):
            # Pause the writer early: drain waits while more than 1 MiB is queued.
            transport.set_write_buffer_limits(high=2**20)

    # -- transport callbacks --------------------------------------------------------
    def _data(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer.append(data)
        self._wake()
        if self._buffer.size > self._read_limit and not self._reading_paused:
            rt = self._rtransport
            if rt is not None and not rt.is_closing():
                self._reading_paused = True
                rt.pause_reading()

    def _eof_received(self) -> None:
        self._eof = True
        self._wake()

    def _lost(self, exc: Exception | None, proto: _Proto) -> None:
        if proto in self._protos:
            self._protos.remove(proto)
        # A pty master reads EIO once the other side is gone: that is EOF, not an error.
        eio = isinstance(exc, OSError) and exc.errno == errno.EIO
        if exc is not None and self._read_error is None and not self._closing and not eio:
            self._read_error = exc
        self._eof = True
        self._wake()
        # One half of a pipe pair going away ends the whole channel.
        for tr in (self._rtransport, self._wtransport):
            if tr is not None and not tr.is_closing():
                tr.close()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ChannelClosed("connection lost while writing"))
            self._drain.exception()  # mark retrieved: nobody may be waiting
        if not self._protos:
            self._gone = True
            if not self._gone_fut.done():
                self._gone_fut.set_result(None)

    def _resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        w = self._reader
        if w is not None and not w.done():
            w.set_result(None)

    # -- Connection API -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closing or self._gone

    async def read(self, max_bytes: int = 262144) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at EOF. Raises ReadError / ChannelClosed."""
        check_read(max_bytes, busy=self._reader is not None)
        while not self._buffer:
            if self._closing:
                raise ChannelClosed("connection closed locally")
            if self._read_error is not None:
                raise ReadError(f"read failed: {self._read_error}") from self._read_error
            if self._eof:
                return b""
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self._take(max_bytes)

    def _take(self, max_bytes: int) -> bytes:
        first = self._buffer.take(max_bytes)
        if self._reading_paused and self._buffer.size <= self._read_limit // 2:
            self._reading_paused = False
            rt = self._rtransport
            if rt is not None and not rt.is_closing():
                rt.resume_reading()
        return first

    def unread(self, data: bytes) -> None:
        """Put bytes back at the front of the buffer (handshakes consume only their line)."""
        if data:
            self._buffer.appendleft(data)
            self._wake()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; waits while the transport is over its high-water mark."""
        tr = self._wtransport
        if self._closing:
            raise ChannelClosed("connection closed locally")
        if tr is None or self._gone or tr.is_closing():
            raise ChannelClosed("connection lost")
        try:
            tr.write(data)
        except (OSError, RuntimeError) as exc:
            raise WriteError(f"write failed: {exc}") from exc
        if tr.is_closing():
            # The transport hit a fatal send error inside write() and dropped the data.
            raise ChannelClosed("connection lost while writing")
        if self._write_paused:
            if self._drain is None or self._drain.done():
                self._drain = self._loop.create_future()
            await asyncio.shield(self._drain)

    async def aclose(self) -> None:
        """Flush what is queued (bounded wait), then close. Idempotent."""
        if not self._closing:
            self._closing = True
            self._buffer.clear()
            self._wake()
            for tr in (self._wtransport, self._rtransport):
                if tr is not None and not tr.is_closing():
                    tr.close()
            if not self._protos:
                self._gone = True
                if not self._gone_fut.done():
                    self._gone_fut.set_result(None)
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await asyncio.shield(self._gone_fut)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        """Drop the connection now, discarding queued writes (a crash, as seen remotely)."""
        self._closing = True
        self._buffer.clear()
        self._wake()
        for tr in (self._wtransport, self._rtransport):
            if tr is None or tr.is_closing():
                continue
            if isinstance(tr, asyncio.WriteTransport):
                tr.abort()
            else:
                tr.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._gone_fut)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<StreamConnection {self.name or '?'} {state} buffered={self._buffer.size}>"
