"""The JSON-RPC peer: calls, notifications and byte streams over one connection.

This module is its public API; its state, closing and writing are in :mod:`._core`, and
reading and dispatching what arrives in :mod:`._receive`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ironclaw.errors import (
    ChannelClosed,
    ChannelViolation,
    ConfigError,
    TransportError,
)
from ironclaw.proto import (
    MAX_STREAM_ID,
    Notification,
    Request,
    RequestId,
    encode_end,
)
from ironclaw.proto.lifecycle import AsyncResource

from ._core import (
    CANCEL_METHOD,
    CallContext,
    Handler,
    ProtocolErrorHook,
)
from ._receive import Receiver
from ._streams import ByteStream, Subscription
from .limits import HOST_LIMITS, MAX_CHUNK

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


def _check_params(params: Any) -> Any:
    if params is None or isinstance(params, dict | list):
        return params
    if isinstance(params, tuple):
        return list(params)
    raise TypeError(f"JSON-RPC params must be a dict, list or None, not {type(params).__name__}")


class Peer(Receiver, AsyncResource):
    """One end of the channel. See :mod:`ironclaw.rpc` for the rules it follows.

    ``limits`` caps what the other end may make this one hold (the host passes
    :data:`HOST_LIMITS`; ``max_frame``/``max_inflight``/``stream_buffer`` are older
    shorthands for its fields). ``on_protocol_error(peer, error)`` is called once when the
    channel closes because the other end broke a rule (a ``ProtocolError``: a violation,
    an oversize or malformed frame), so its owner can put it in the trace and audit log;
    it may also be set later as the ``on_protocol_error`` attribute.
    """

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        """What ``async with`` runs: :meth:`start`."""
        await self.start()

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

    # -- calls and notifications ---------------------------------------------------------
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

    async def iter_notifications(self, method: str) -> AsyncIterator[Any]:
        """Shorthand for ``async for p in peer.subscribe(method)`` that unsubscribes on exit."""
        with self.subscribe(method) as sub:
            async for params in sub:
                yield params
