"""The JSON-RPC peer: calls, notifications and byte streams over one connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from ironclaw.errors import (
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    ChannelClosed,
    ChannelViolation,
    ConfigError,
    FrameTooLarge,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    RequestCancelled,
    TransportError,
    from_wire,
    to_wire,
)
from ironclaw.proto import (
    HEADER,
    MAX_STREAM_ID,
    ChannelLimits,
    Decoder,
    ErrorObject,
    ErrorResponse,
    FrameType,
    InvalidMessage,
    Notification,
    Request,
    RequestId,
    Response,
    StreamData,
    StreamEnd,
    encode_end,
    encode_frame,
    encode_message,
)
from ironclaw.transport import Connection

from ._streams import ByteStream, Subscription
from .limits import HOST_LIMITS, MAX_CHUNK, apply_overrides

__all__ = [
    "CANCEL_METHOD",
    "HOST_LIMITS",
    "MAX_CHUNK",
    "ByteStream",
    "CallContext",
    "Handler",
    "Peer",
    "ProtocolErrorHook",
    "Subscription",
]

log = logging.getLogger(__name__)

CANCEL_METHOD: Final = "$/cancel"
# Reads of 128 KiB into a 384 KiB decoder buffer keep the receive path inside the L2 cache.
_READ_SIZE: Final = 128 * 1024
_DECODER_BUFFER: Final = 3 * _READ_SIZE


@dataclass(slots=True)
class CallContext:
    """What a handler knows about the call it serves."""

    peer: Peer
    request_id: RequestId
    method: str


Handler = Callable[[Any, CallContext], Awaitable[Any]]
ProtocolErrorHook = Callable[["Peer", ProtocolError], None]


def _check_params(params: Any) -> Any:
    if params is None or isinstance(params, dict | list):
        return params
    if isinstance(params, tuple):
        return list(params)
    raise TypeError(f"JSON-RPC params must be a dict, list or None, not {type(params).__name__}")


class Peer:
    """One end of the channel. See :mod:`ironclaw.rpc` for the rules it follows.

    ``limits`` caps what the other end may make this one hold (the host passes
    :data:`HOST_LIMITS`; ``max_frame``/``max_inflight``/``stream_buffer`` are older
    shorthands for its fields). ``on_protocol_error(peer, error)`` is called once when the
    channel closes because the other end broke a rule (a ``ProtocolError``: a violation,
    an oversize or malformed frame), so its owner can put it in the trace and audit log;
    it may also be set later as the ``on_protocol_error`` attribute.
    """

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

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise ChannelClosed(f"{self.name}: peer already closed")
        self._started = True
        self._wlock = asyncio.Lock()
        self._closed_event = asyncio.Event()
        self._handler_room = asyncio.Event()
        self._bytes_room = asyncio.Event()
        self._call_slots = asyncio.Semaphore(self.limits.max_outbound_calls)
        attach = getattr(self._conn, "attach_receiver", None)
        if attach is not None:
            # Push mode: the connection reads into the decoder from its readiness callback
            # and events are dispatched right there, one loop step sooner than a task.
            attach(self)
        else:
            self._reader = asyncio.create_task(self._read_loop(), name=f"{self.name}-reader")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> BaseException | None:
        """Why the channel closed (EOF, a transport error, a protocol error), once closed."""
        return self._close_reason

    async def wait_closed(self) -> None:
        if self._closed_event is None:
            raise RuntimeError("peer not started")
        await self._closed_event.wait()

    async def aclose(self) -> None:
        """Close the channel; pending calls fail with ChannelClosed; no task survives."""
        self._shutdown(ChannelClosed(f"{self.name}: closed locally"))
        current = asyncio.current_task()
        tasks: list[asyncio.Task[Any]] = []
        for t in (self._reader, self._backlog):
            if t is not None and t is not current:
                t.cancel()
                tasks.append(t)
        for t in (*self._handler_tasks.values(), *self._anon_tasks):
            if t is not current:
                t.cancel()
                tasks.append(t)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # A handler cancelled before its first step never ran its own clean-up.
        self._handler_tasks.clear()
        self._handler_bytes.clear()
        self._inbound_bytes = 0
        await self._conn.aclose()

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

    # -- registration -------------------------------------------------------------------
    def register(self, method: str, handler: Handler) -> None:
        if method == CANCEL_METHOD:
            raise ValueError(f"{CANCEL_METHOD} is reserved")
        self._handlers[method] = handler

    def subscribe(self, method: str, *, maxsize: int | None = None) -> Subscription:
        sub = Subscription(self, method, maxsize or self.limits.max_queued_notifications)
        if self._closed:
            sub._queue.end()
        else:
            self._subs.setdefault(method, []).append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.method)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.method]

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

    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Call ``method`` on the other side and return its result.

        Raises ChannelClosed if the channel goes away, the builtin TimeoutError after
        ``timeout`` seconds, or the remote error rebuilt by :func:`errors.from_wire`. On
        timeout or cancellation the other side is told (``$/cancel``) to stop the handler.
        """
        if self._closed:
            raise self._closed_error(self._close_reason or ChannelClosed("closed"))
        if self._call_slots is None:
            raise RuntimeError("peer not started")
        rid = next(self._ids)
        frame = self._message_frame(Request(rid, method, _check_params(params)))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sent = False
        try:
            async with asyncio.timeout(timeout), self._call_slots:
                self._pending[rid] = fut
                await self._send(frame)
                sent = True
                return await fut
        except (asyncio.CancelledError, TimeoutError):
            # Cancelling this task also cancels ``fut``: only a real answer means done.
            answered = fut.done() and not fut.cancelled()
            if sent and not answered and not self._closed:
                self._spawn(self._send_cancel(rid))
            raise
        finally:
            self._pending.pop(rid, None)

    async def _send_cancel(self, rid: RequestId) -> None:
        with contextlib.suppress(TransportError):
            await self._send(self._message_frame(Notification(CANCEL_METHOD, {"id": rid})))

    async def notify(self, method: str, params: Any = None) -> None:
        await self._send(self._message_frame(Notification(method, _check_params(params))))

    # -- streams ----------------------------------------------------------------------------
    def new_stream_id(self) -> int:
        """A stream id the other end never allocates (initiator odd, acceptor even)."""
        if self._initiator is None:
            raise ConfigError(
                "stream ids need to know which end opened the channel: "
                "pass Peer(..., initiator=True/False)"
            )
        sid = next(self._stream_ids)
        if sid > MAX_STREAM_ID:
            raise ConfigError("stream ids exhausted on this channel")
        if self._own_ids:
            self._expected.add(sid)
        return sid

    async def send_bytes(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on ``stream_id`` as DATA frames of at most MAX_CHUNK bytes."""
        if not 0 < stream_id <= MAX_STREAM_ID:
            raise ValueError(f"stream id out of range: {stream_id}")
        self._sending(stream_id)
        chunk = min(MAX_CHUNK, self._max_frame)
        with memoryview(data) as view, view.cast("B") as flat:
            for off in range(0, len(flat), chunk):
                await self._send_data(stream_id, flat[off : off + chunk])

    async def end_stream(self, stream_id: int) -> None:
        if not 0 < stream_id <= MAX_STREAM_ID:
            raise ValueError(f"stream id out of range: {stream_id}")
        self._sending(stream_id)
        await self._send(encode_end(stream_id))

    def _sending(self, stream_id: int) -> None:
        """This end writes ``stream_id``: the other end may no longer feed it."""
        if self._own_ids and stream_id in self._expected:
            self._expected.discard(stream_id)
            if stream_id in self._streams:
                self._fail(
                    ChannelViolation(
                        f"the other end wrote stream {stream_id}, which this end writes"
                    )
                )

    def open_stream(self, stream_id: int, *, max_buffered: int | None = None) -> ByteStream:
        """The receiving end of ``stream_id``, with whatever already arrived for it.

        With ``own_stream_ids`` only ids from :meth:`new_stream_id` can be opened.
        """
        max_buffered = max_buffered or self._stream_buffer
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._own_ids and stream_id not in self._expected and not self._closed:
                raise ConfigError(
                    f"stream {stream_id} was not allocated by this end: use new_stream_id()"
                )
            stream = ByteStream(self, stream_id, max_buffered)
            if self._closed:
                stream._queue.end(self._closed_error(self._close_reason or ChannelClosed("")))
            else:
                self._streams[stream_id] = stream
        elif stream.opened:
            raise RuntimeError(f"stream {stream_id} is already open")
        else:
            stream._queue.set_maxsize(max_buffered)
        stream.opened = True
        if stream._queue.ended:
            self._streams.pop(stream_id, None)
            self._expected.discard(stream_id)
        return stream

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

    # -- receiving ----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        """Pull mode, for connections that only offer ``read``."""
        decoder = self._decoder
        conn = self._conn
        try:
            while True:
                data = await conn.read(_READ_SIZE)
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
        return self._decoder.get_buffer(max(sizehint, _READ_SIZE))

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
                hook(self, reason)
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
                result = await handler(req.params, CallContext(self, rid, req.method))
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
            await handler(note.params, CallContext(self, "", note.method))
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

    async def iter_notifications(self, method: str) -> AsyncIterator[Any]:
        """Shorthand for ``async for p in peer.subscribe(method)`` that unsubscribes on exit."""
        with self.subscribe(method) as sub:
            async for params in sub:
                yield params
