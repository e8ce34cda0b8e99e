"""A bounded FIFO whose producer waits when it is full and that can be ended.

asyncio.Queue cannot take an end marker once full; this one can, which is what lets a
subscription or a byte stream end cleanly even while its consumer is behind.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["BoundedQueue"]

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    __slots__ = ("_ended", "_error", "_items", "_maxsize", "_readable", "_space")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._maxsize = maxsize
        self._items: deque[T] = deque()
        self._ended = False
        self._error: BaseException | None = None
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def ended(self) -> bool:
        return self._ended

    def set_maxsize(self, maxsize: int) -> None:
        self._maxsize = max(1, maxsize)
        if len(self._items) < self._maxsize:
            self._space.set()

    def full(self) -> bool:
        return len(self._items) >= self._maxsize

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._readable.set()

    async def put(self, item: T) -> bool:
        """Append, waiting for room first; False if the queue ended meanwhile."""
        while len(self._items) >= self._maxsize and not self._ended:
            self._space.clear()
            await self._space.wait()
        if self._ended:
            return False
        self.put_nowait(item)
        return True

    def end(self, error: BaseException | None = None) -> None:
        """No more items; readers drain what is queued, then stop (or raise ``error``)."""
        if not self._ended:
            self._ended = True
            self._error = error
        self._readable.set()
        self._space.set()

    def discard(self) -> None:
        self._items.clear()
        self.end()

    async def get(self) -> T:
        """Next item; StopAsyncIteration once ended and drained (or the end error)."""
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        if len(self._items) < self._maxsize:
            self._space.set()
        return item
