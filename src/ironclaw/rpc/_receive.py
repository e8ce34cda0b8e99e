"""The receiving side of a Peer: reading frames, dispatching them, running handlers.

Two ways in: pull mode (:meth:`Receiver._read_loop` over ``conn.read``) and push mode
(the connection calls ``get_buffer``/``buffer_updated``/``eof_received``). Either way an
event that cannot be taken now (a full queue, no room for another handler) returns an
awaitable, and the reader stops until it is done: backpressure instead of growth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

from ironclaw.errors import (
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    ChannelClosed,
    ChannelViolation,
    FrameTooLarge,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    RequestCancelled,
    TransportError,
    from_wire,
)
from ironclaw.proto import (
    ErrorObject,
    ErrorResponse,
    InvalidMessage,
    Notification,
    Request,
    Response,
    StreamData,
    StreamEnd,
)

from ._core import CANCEL_METHOD, READ_SIZE, CallContext, Handler, PeerCore, log
from ._streams import ByteStream

if TYPE_CHECKING:
    from .peer import Peer


class Receiver(PeerCore):
    """Frames in, in arrival order: responses resolve calls, requests run handlers."""

    async def _read_loop(self) -> None:
        """Pull mode, for connections that only offer ``read``."""
        decoder = self._decoder
        conn = self._conn
        try:
            while True:
                data = await conn.read(READ_SIZE)
                if not data:
                    self.eof_received(None)
                    return
                decoder.receive_data(data)
                while (event := decoder.next_event()) is not None:
                    waiter = self._dispatch(event)
                    if waiter is not None:
                        await waiter
        except (ProtocolError, TransportError) as exc:
            self._fail(exc)
        except Exception as exc:  # a bug here must still release every waiter
            log.exception("%s: reader failed", self.name)
            self._fail(exc)

    # Push mode: the receiver interface a connection's ``attach_receiver`` drives.
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(max(sizehint, READ_SIZE))

    def buffer_updated(self, nbytes: int) -> None:
        self._decoder.buffer_updated(nbytes)
        if self._backlog is None and not self._closed:
            self._process()

    def eof_received(self, exc: BaseException | None) -> None:
        """The connection ended (``exc`` says why if it was not a clean EOF)."""
        if exc is not None:
            self._fail(exc)
            return
        buffered = self._decoder.buffered
        if buffered:
            why = f"connection closed inside a frame ({buffered} bytes of it arrived)"
        else:
            why = "connection closed by the other end"
        self._fail(ChannelClosed(f"{self.name}: {why}"))

    def _process(self) -> None:
        decoder = self._decoder
        try:
            while (event := decoder.next_event()) is not None:
                waiter = self._dispatch(event)
                if waiter is not None:
                    # A full queue: stop reading until it has room, then carry on in order.
                    self._conn.pause_reading()  # type: ignore[attr-defined]
                    self._backlog = asyncio.get_running_loop().create_task(self._drain(waiter))
                    return
        except ProtocolError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("%s: dispatch failed", self.name)
            self._fail(exc)

    async def _drain(self, waiter: Awaitable[Any]) -> None:
        try:
            await waiter
        except ProtocolError as exc:  # the held-back event broke a rule after all
            self._fail(exc)
        finally:
            self._backlog = None
        if self._closed:
            return
        self._process()
        if self._backlog is None and not self._closed:
            self._conn.resume_reading()  # type: ignore[attr-defined]

    def _fail(self, reason: BaseException) -> None:
        if self._closed:
            return
        if isinstance(reason, ProtocolError | TransportError) and not isinstance(
            reason, ChannelClosed
        ):
            # A string, not the exception: a log handler that keeps records must not keep
            # the traceback's frames, and with them this peer and its buffers, alive.
            log.warning("%s: closing channel: %s", self.name, str(reason))
        self._shutdown(reason)
        self._spawn(self._conn.aclose())
        hook = self.on_protocol_error
        if hook is not None and isinstance(reason, ProtocolError):
            try:
                hook(cast("Peer", self), reason)
            except Exception:
                log.exception("%s: on_protocol_error hook failed", self.name)

    def _dispatch(self, event: Any) -> Awaitable[Any] | None:
        """Route one event; returns an awaitable only when the reader must wait (backpressure)."""
        if type(event) is Response:
            fut = self._pending.get(event.id)
            if fut is not None and not fut.done():
                fut.set_result(event.result)
            return None
        if isinstance(event, Request):
            return self._on_request(event)
        if isinstance(event, StreamData):
            return self._on_data(event)
        if isinstance(event, Notification):
            return self._on_notification(event)
        if isinstance(event, ErrorResponse):
            self._on_error_response(event)
            return None
        if isinstance(event, StreamEnd):
            stream = self._stream_for(event.stream_id)
            stream.sender_ended = True
            stream._queue.end()
            if stream.opened or stream.discarding:
                self._streams.pop(event.stream_id, None)
                self._expected.discard(event.stream_id)
            return None
        if isinstance(event, InvalidMessage):
            self._on_invalid(event)
            return None
        raise MalformedFrame(f"unexpected event {type(event).__name__}")

    def _on_request(self, req: Request, size: int | None = None) -> Awaitable[Any] | None:
        if size is None:
            size = self._decoder.last_size
        if len(self._handler_tasks) >= self._max_inflight:
            if self._strict:
                raise LimitExceeded(
                    f"more than max_inbound_calls={self._max_inflight} calls at once",
                    limit="max_inbound_calls",
                    value=self._max_inflight,
                )
            return self._wait_room_then(req, size)
        if req.id in self._handler_tasks:
            self._spawn_inbound(
                self._reply_error(req.id, ErrorObject(-32600, "duplicate request id"))
            )
            return None
        handler = self._handlers.get(req.method)
        if handler is None:
            err = ErrorObject(METHOD_NOT_FOUND, f"method not found: {req.method}")
            self._spawn_inbound(self._reply_error(req.id, err))
            return None
        budget = self.limits.max_inbound_bytes
        if budget is not None and self._inbound_bytes + size > budget:
            raise LimitExceeded(
                f"running calls hold {self._inbound_bytes + size} request bytes, "
                f"more than max_inbound_bytes={budget}",
                limit="max_inbound_bytes",
                value=budget,
            )
        task = asyncio.create_task(
            self._run_handler(req, handler), name=f"{self.name}-{req.method}"
        )
        self._handler_tasks[req.id] = task
        self._handler_bytes[req.id] = size
        self._inbound_bytes += size
        return None

    async def _wait_room_then(self, req: Request, size: int) -> None:
        room = self._handler_room
        assert room is not None
        while len(self._handler_tasks) >= self._max_inflight and not self._closed:
            room.clear()
            await room.wait()
        if not self._closed:
            self._on_request(req, size)

    async def _run_handler(self, req: Request, handler: Handler) -> None:
        rid = req.id
        try:
            try:
                result = await handler(req.params, CallContext(cast("Peer", self), rid, req.method))
            except asyncio.CancelledError:
                if self._closed:
                    raise
                frame = self._error_frame(rid, RequestCancelled())
            except Exception as exc:
                frame = self._error_frame(rid, exc)
            else:
                try:
                    frame = self._message_frame(Response(rid, result))
                except (TypeError, ValueError, FrameTooLarge) as exc:
                    # The handler succeeded but its result cannot travel: that is our bug,
                    # not the caller's bad params, so it is an internal error.
                    why = f"result of {req.method} cannot be sent: {type(exc).__name__}: {exc}"
                    frame = self._message_frame(
                        ErrorResponse(rid, ErrorObject(INTERNAL_ERROR, why[:1000]))
                    )
            await self._send(frame)
        except TransportError:
            pass
        finally:
            if self._handler_tasks.get(rid) is asyncio.current_task():
                del self._handler_tasks[rid]
                self._inbound_bytes -= self._handler_bytes.pop(rid, 0)
            room = self._handler_room
            if room is not None:
                room.set()

    def _on_error_response(self, event: ErrorResponse) -> None:
        if event.id is None:
            log.warning(
                "%s: the other end rejected a message: %s (code %d)",
                self.name,
                event.error.message,
                event.error.code,
            )
            return
        fut = self._pending.get(event.id)
        if fut is not None and not fut.done():
            fut.set_exception(from_wire(event.error.to_dict()))

    def _on_invalid(self, event: InvalidMessage) -> None:
        if event.is_response:
            # Never answer a response: two peers could bounce errors forever.
            fut = self._pending.get(event.id) if event.id is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(MalformedFrame(event.reason))
            else:
                log.warning("%s: dropped invalid response: %s", self.name, event.reason)
            return
        self._spawn_inbound(self._reply_error(event.id, ErrorObject(event.code, event.reason)))

    def _on_notification(self, note: Notification) -> Awaitable[Any] | None:
        if note.method == CANCEL_METHOD:
            rid = note.params.get("id") if isinstance(note.params, dict) else None
            task = self._handler_tasks.get(rid) if isinstance(rid, int | str) else None
            if task is not None:
                task.cancel()
            return None
        handler = self._handlers.get(note.method)
        if handler is not None:
            self._spawn_inbound(self._run_notification_handler(note, handler))
        subs = self._subs.get(note.method)
        if not subs:
            if handler is None:
                log.debug("%s: no subscriber for notification %s", self.name, note.method)
            return None
        blocked = [s for s in subs if s._queue.full()]
        if blocked and self._strict:
            size = blocked[0]._queue.maxsize
            raise LimitExceeded(
                f"{size} {note.method} notifications already queued unread "
                f"(max_queued_notifications={size})",
                limit="max_queued_notifications",
                value=size,
            )
        for sub in subs:
            if not sub._queue.full():
                sub._queue.put_nowait(note.params)
        if blocked:
            return asyncio.gather(*(s._queue.put(note.params) for s in blocked))
        return None

    async def _run_notification_handler(self, note: Notification, handler: Handler) -> None:
        try:
            await handler(note.params, CallContext(cast("Peer", self), "", note.method))
        except Exception:
            log.exception("%s: notification handler for %s failed", self.name, note.method)

    def _stream_for(self, stream_id: int) -> ByteStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._own_ids and stream_id not in self._expected:
                raise ChannelViolation(
                    f"DATA/END for stream {stream_id}, which this end did not open "
                    "(own_stream_ids: streams are allocated by their reader)"
                )
            cap = self.limits.max_open_streams
            if len(self._streams) >= cap:
                # Each unopened stream holds buffers: a peer inventing ids could exhaust memory.
                raise LimitExceeded(
                    f"more than max_open_streams={cap} streams at once",
                    limit="max_open_streams",
                    value=cap,
                )
            stream = ByteStream(self, stream_id, self._stream_buffer)
            self._streams[stream_id] = stream
        return stream

    def _on_data(self, event: StreamData) -> Awaitable[Any] | None:
        stream = self._stream_for(event.stream_id)
        if stream.discarding or stream._queue.ended:
            return None
        budget = self.limits.max_buffered_bytes
        if (
            budget is not None
            and self._buffered_bytes
            and self._buffered_bytes + len(event.data) > budget
        ):
            return self._wait_bytes_then(event)
        if stream._queue.full():
            return self._put_later(stream, event.data)
        self._queued(stream, event.data)
        return None

    def _queued(self, stream: ByteStream, data: bytes) -> None:
        stream._queue.put_nowait(data)
        stream._bytes += len(data)
        self._buffered_bytes += len(data)

    async def _put_later(self, stream: ByteStream, data: bytes) -> None:
        if await stream._queue.put(data):
            stream._bytes += len(data)
            self._buffered_bytes += len(data)

    async def _wait_bytes_then(self, event: StreamData) -> None:
        """Flow control on the connection's stream budget: read on once consumers caught up."""
        room = self._bytes_room
        assert room is not None
        budget = self.limits.max_buffered_bytes
        assert budget is not None
        while self._buffered_bytes and self._buffered_bytes + len(event.data) > budget:
            if self._closed:
                return
            room.clear()
            await room.wait()
        if not self._closed:
            waiter = self._on_data(event)
            if waiter is not None:
                await waiter
