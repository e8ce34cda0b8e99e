"""The receiving ends a Peer hands out: notification subscriptions and byte streams."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from ironclaw.errors import ProtocolError

from ._queue import BoundedQueue

if TYPE_CHECKING:
    from ._core import PeerCore

__all__ = ["ByteStream", "Subscription"]


class Subscription:
    """Notifications of one method, in arrival order; ends when the peer closes.

    Bounded: when ``maxsize`` notifications wait unread, the peer's reader waits too, and
    so (through the transport) does the remote writer. Leave it (``with`` or
    :meth:`close`) to stop receiving.
    """

    def __init__(self, peer: PeerCore, method: str, maxsize: int) -> None:
        self.method = method
        self._peer = peer
        self._queue: BoundedQueue[Any] = BoundedQueue(maxsize)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        return await self._queue.get()

    def close(self) -> None:
        self._peer._unsubscribe(self)
        self._queue.discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ByteStream:
    """Receiver side of a bulk stream: ``bytes`` chunks until the sender's end marker.

    If the channel closes before the end marker, iteration raises :class:`ChannelClosed`
    after the chunks that did arrive: a truncated stream never looks complete.
    """

    def __init__(self, peer: PeerCore, stream_id: int, max_buffered: int) -> None:
        self.stream_id = stream_id
        self._peer = peer
        self._queue: BoundedQueue[bytes] = BoundedQueue(max_buffered)
        self._bytes = 0  # queued, counted against the peer's max_buffered_bytes
        self.opened = False
        self.discarding = False
        self.sender_ended = False  # the END marker arrived

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._queue.get()
        self._bytes -= len(chunk)
        self._peer._consumed(len(chunk))
        return chunk

    async def read_all(self, *, limit: int | None = None) -> bytes:
        """Everything until the end marker; ProtocolError past ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise ProtocolError(f"stream {self.stream_id} exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Stop reading: chunks still to come for this stream are dropped, not buffered."""
        self.discarding = True
        self._queue.discard()
        self._peer._consumed(self._bytes)
        self._bytes = 0
        self._peer._stream_done(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
