"""An in-process connection pair with the same semantics as a socket, for tests.

Writes land in the other end's buffer; once that buffer holds more than
``buffer_limit`` bytes the writer waits until the reader catches up, so tests see real
backpressure. Closing one end gives the other EOF after it has read what was sent.
"""

from __future__ import annotations

import asyncio

from ironclaw.errors import ChannelClosed
from ironclaw.transport._stream import ChunkBuffer, check_read

__all__ = ["DEFAULT_BUFFER_LIMIT", "MemoryConnection", "pair"]

DEFAULT_BUFFER_LIMIT = 1 * 2**20


class MemoryConnection:
    def __init__(self, *, buffer_limit: int, initiator: bool, name: str) -> None:
        self.initiator = initiator
        self.name = name
        self._limit = buffer_limit
        self._buffer = ChunkBuffer()
        self._closing = False
        self._eof = False  # the other end closed: no more data will arrive
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._other: MemoryConnection | None = None
        self._reading = False
        self.bytes_written = 0

    @property
    def closed(self) -> bool:
        return self._closing or self._eof

    async def read(self, max_bytes: int = 262144) -> bytes:
        check_read(max_bytes, busy=self._reading)
        self._reading = True
        try:
            while not self._buffer:
                if self._closing:
                    raise ChannelClosed("connection closed locally")
                if self._eof:
                    return b""
                self._readable.clear()
                await self._readable.wait()
        finally:
            self._reading = False
        first = self._buffer.take(max_bytes)
        if self._buffer.size <= self._limit:
            self._space.set()
        return first

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        other = self._other
        if self._closing:
            raise ChannelClosed("connection closed locally")
        if other is None or other._closing or self._eof:
            raise ChannelClosed("the other end is closed")
        if not data:
            return
        chunk = bytes(data)
        other._buffer.append(chunk)
        self.bytes_written += len(chunk)
        other._readable.set()
        while other._buffer.size > other._limit:
            other._space.clear()
            await other._space.wait()
            if self._closing or other._closing:
                raise ChannelClosed("connection closed while writing")

    async def aclose(self) -> None:
        self.abort()

    def abort(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._buffer.clear()
        self._readable.set()
        self._space.set()
        other = self._other
        if other is not None:
            other._eof = True
            other._readable.set()
            other._space.set()

    def __repr__(self) -> str:
        return f"<MemoryConnection {self.name} buffered={self._buffer.size}>"


def pair(*, buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> tuple[MemoryConnection, MemoryConnection]:
    """Two connected ends; the first counts as the initiator."""
    a = MemoryConnection(buffer_limit=buffer_limit, initiator=True, name="a")
    b = MemoryConnection(buffer_limit=buffer_limit, initiator=False, name="b")
    a._other = b
    b._other = a
    return a, b
