"""A Peer's state and what both directions need: closing, framing, writing, spawning.

Split from :mod:`.peer` (the public API) and :mod:`._receive` (reading and dispatch) so
that each reads alone; together they are one class, :class:`ironclaw.rpc.Peer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ironclaw.errors import (
    INTERNAL_ERROR,
    ChannelClosed,
    FrameTooLarge,
    LimitExceeded,
    ProtocolError,
    TransportError,
    to_wire,
)
from ironclaw.proto import (
    HEADER,
    ChannelLimits,
    Decoder,
    ErrorObject,
    ErrorResponse,
    FrameType,
    Notification,
    Request,
    RequestId,
    Response,
    encode_frame,
    encode_message,
)
from ironclaw.transport import Connection

from ._streams import ByteStream, Subscription
from .limits import apply_overrides

if TYPE_CHECKING:
    from .peer import Peer

# One logger for the three modules of the Peer, under the name it always had.
log = logging.getLogger("ironclaw.rpc.peer")

CANCEL_METHOD: Final = "$/cancel"
# Reads of 128 KiB into a 384 KiB decoder buffer keep the receive path inside the L2 cache.
READ_SIZE: Final = 128 * 1024
_DECODER_BUFFER: Final = 3 * READ_SIZE


@dataclass(slots=True)
class CallContext:
    """What a handler knows about the call it serves."""

    peer: Peer
    request_id: RequestId
    method: str


Handler = Callable[[Any, CallContext], Awaitable[Any]]
ProtocolErrorHook = Callable[["Peer", ProtocolError], None]


class PeerCore:
    """The state of one end of the channel; see :class:`ironclaw.rpc.Peer`."""

    def __init__(
        self,
        conn: Connection,
        *,
        handlers: Mapping[str, Handler] | None = None,
        limits: ChannelLimits | None = None,
        max_frame: int | None = None,
        max_inflight: int | None = None,
        name: str = "",
        initiator: bool | None = None,
        stream_buffer: int | None = None,
        on_protocol_error: ProtocolErrorHook | None = None,
    ) -> None:
        limits = apply_overrides(limits or ChannelLimits(), max_frame, max_inflight, stream_buffer)
        self.limits = limits
        self.name = name or "peer"
        self._conn = conn
        self._handlers: dict[str, Handler] = dict(handlers or {})
        self._max_frame = limits.max_frame
        self._decoder = Decoder(limits=limits, initial_size=_DECODER_BUFFER)
        self._max_inflight = limits.max_inbound_calls
        self._strict = limits.overflow_closes
        self.on_protocol_error = on_protocol_error
        if initiator is None:
            initiator = getattr(conn, "initiator", None)
        self._initiator: bool | None = initiator
        self._stream_buffer = limits.stream_buffer
        self._own_ids = limits.own_stream_ids
        self._expected: set[int] = set()  # ids allocated here that the other end may feed
        self._buffered_bytes = 0
        self._bytes_room: asyncio.Event | None = None
        self._inbound: set[asyncio.Task[None]] = set()  # replies/notification handlers
        self._handler_bytes: dict[RequestId, int] = {}
        self._inbound_bytes = 0
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1 if initiator else 2, 2)
        self._pending: dict[RequestId, asyncio.Future[Any]] = {}
        self._call_slots: asyncio.Semaphore | None = None
        self._handler_tasks: dict[RequestId, asyncio.Task[None]] = {}
        self._anon_tasks: set[asyncio.Task[None]] = set()
        self._handler_room: asyncio.Event | None = None
        self._subs: dict[str, list[Subscription]] = {}
        self._streams: dict[int, ByteStream] = {}
        self._wlock: asyncio.Lock | None = None
        self._writev: Callable[[Sequence[bytes | memoryview]], Awaitable[None]] | None = getattr(
            conn, "writev", None
        )
        self._reader: asyncio.Task[None] | None = None
        self._started = False
        self._backlog: asyncio.Task[None] | None = None
        self._closed = False
        self._close_reason: BaseException | None = None
        self._closed_event: asyncio.Event | None = None
        self._closing_task: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> BaseException | None:
        """Why the channel closed (EOF, a transport error, a protocol error), once closed."""
        return self._close_reason

    # -- closing -----------------------------------------------------------------------------
    def _shutdown(self, reason: BaseException) -> None:
        """Fail everything that waits on the channel, at once (sync: no await in between)."""
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self._closed_error(reason))
        self._pending.clear()
        for t in self._handler_tasks.values():
            t.cancel()
        for subs in self._subs.values():
            for sub in subs:
                sub._queue.end()
        self._subs.clear()
        for stream in self._streams.values():
            stream._queue.end(self._closed_error(reason))
        self._streams.clear()
        if self._handler_room is not None:
            self._handler_room.set()
        if self._bytes_room is not None:
            self._bytes_room.set()
        if self._closed_event is not None:
            self._closed_event.set()

    def _closed_error(self, reason: BaseException) -> ChannelClosed:
        if isinstance(reason, ChannelClosed):
            err = ChannelClosed(str(reason))
        else:
            err = ChannelClosed(f"{self.name}: channel closed: {type(reason).__name__}: {reason}")
        err.__cause__ = reason
        return err

    # -- called back by the receiving ends (Subscription, ByteStream) ----------------------
    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.method)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.method]

    def _stream_done(self, stream: ByteStream) -> None:
        if stream.discarding and not stream.sender_ended:
            # Closed by its reader before the sender's END: chunks already in flight are
            # still this stream's and are dropped, not a violation; END retires the id.
            return
        if stream._queue.ended and self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._expected.discard(stream.stream_id)

    def _consumed(self, nbytes: int) -> None:
        """Stream bytes left the buffers (read or dropped): the reader may go on."""
        self._buffered_bytes -= nbytes
        if self._bytes_room is not None:
            self._bytes_room.set()

    # -- sending --------------------------------------------------------------------------
    async def _send(self, frame: bytes) -> None:
        if self._closed:
            raise self._closed_error(self._close_reason or ChannelClosed("closed"))
        assert self._wlock is not None, "peer not started"
        async with self._wlock:
            await self._conn.write(frame)

    async def _send_data(self, stream_id: int, payload: memoryview) -> None:
        if self._closed:
            raise self._closed_error(self._close_reason or ChannelClosed("closed"))
        assert self._wlock is not None, "peer not started"
        header = HEADER.pack(len(payload), FrameType.DATA, stream_id)
        async with self._wlock:
            if self._writev is not None:
                # Header and payload leave in one sendmsg; the payload is never copied.
                await self._writev((header, payload))
            else:
                await self._conn.write(header + payload)

    def _message_frame(self, message: Request | Notification | Response | ErrorResponse) -> bytes:
        payload = encode_message(message)
        if len(payload) > self._max_frame:
            raise FrameTooLarge(f"message of {len(payload)} bytes exceeds {self._max_frame}")
        return encode_frame(FrameType.MESSAGE, 0, payload)

    def _error_frame(self, rid: RequestId | None, exc: BaseException) -> bytes:
        wire = to_wire(exc)
        try:
            return self._message_frame(
                ErrorResponse(rid, ErrorObject(wire["code"], wire["message"], wire.get("data")))
            )
        except (TypeError, ValueError, FrameTooLarge):
            detail = f"handler error not encodable: {type(exc).__name__}"
            return self._message_frame(ErrorResponse(rid, ErrorObject(INTERNAL_ERROR, detail)))

    async def _reply_error(self, rid: RequestId | None, error: ErrorObject) -> None:
        with contextlib.suppress(TransportError):
            await self._send(self._message_frame(ErrorResponse(rid, error)))

    # -- housekeeping ------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._anon_tasks.add(task)
        task.add_done_callback(self._anon_tasks.discard)
        return task

    def _spawn_inbound(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Work the other end caused (an error reply, a notification handler): capped too."""
        cap = self._max_inflight
        if self._strict and len(self._inbound) >= cap:
            coro.close()
            raise LimitExceeded(
                f"more than max_inbound_calls={cap} replies and notification handlers "
                "pending (the other end sends faster than it reads)",
                limit="max_inbound_calls",
                value=cap,
            )
        task = self._spawn(coro)
        self._inbound.add(task)
        task.add_done_callback(self._inbound.discard)

    def stats(self) -> dict[str, int]:
        """Counts for tests and debugging: nothing here should grow without bound."""
        return {
            "pending_calls": len(self._pending),
            "handler_tasks": len(self._handler_tasks),
            "background_tasks": len(self._anon_tasks),
            "streams": len(self._streams),
            "stream_bytes": self._buffered_bytes,
            "inbound_bytes": self._inbound_bytes,
            "subscriptions": sum(len(s) for s in self._subs.values()),
            "decoder_buffered": self._decoder.buffered,
        }
