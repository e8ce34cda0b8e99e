"""Framing: the byte layout of the channel, with no I/O in it.

Every frame is a 9-byte header followed by ``length`` payload bytes::

    +----------------+--------+--------------------+------------------+
    | length: u32 BE | type:u8 | stream_id: u32 BE | payload (length) |
    +----------------+--------+--------------------+------------------+

``length`` counts the payload only. The decoder checks it against the configured
maximum *before* it waits for (or allocates) the payload, so a hostile or corrupt
header costs nine bytes, never 4 GiB. Bulk bytes travel in DATA frames as they are;
nothing is ever base64-encoded.

The decoder keeps one buffer for its whole life, so bytes that arrive behind a frame
(the next message, half a frame) stay buffered until asked for; nothing is dropped
between reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from ironclaw.errors import FrameTooLarge, LimitExceeded, MalformedFrame

from .limits import DEFAULT_MAX_FRAME, ChannelLimits, check_json_shape
from .messages import InvalidMessage, Message, decode_message, encode_message

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "HEADER_SIZE",
    "MAX_STREAM_ID",
    "Decoder",
    "Event",
    "FrameType",
    "StreamData",
    "StreamEnd",
    "encode_data",
    "encode_data_header",
    "encode_end",
    "encode_frame",
    "encode_message_frame",
]

HEADER: Final = struct.Struct(">IBI")
HEADER_SIZE: Final = HEADER.size
MAX_STREAM_ID: Final = 2**32 - 1


class FrameType(IntEnum):
    MESSAGE = 1  # one JSON-RPC 2.0 object, UTF-8 JSON
    DATA = 2  # raw bytes for ``stream_id``
    END = 3  # end of ``stream_id``; empty payload


@dataclass(frozen=True, slots=True)
class StreamData:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnd:
    stream_id: int


Event = Message | InvalidMessage | StreamData | StreamEnd


def encode_frame(
    ftype: FrameType, stream_id: int, payload: bytes | bytearray | memoryview
) -> bytes:
    """Header and payload as one buffer (one write, one syscall for small frames)."""
    return HEADER.pack(len(payload), ftype, stream_id) + payload


def encode_message_frame(message: Message) -> bytes:
    return encode_frame(FrameType.MESSAGE, 0, encode_message(message))


def encode_data_header(stream_id: int, length: int) -> bytes:
    """Header alone, for large payloads written separately without copying them."""
    return HEADER.pack(length, FrameType.DATA, stream_id)


def encode_data(stream_id: int, data: bytes | bytearray | memoryview) -> bytes:
    return encode_frame(FrameType.DATA, stream_id, data)


def encode_end(stream_id: int) -> bytes:
    return HEADER.pack(0, FrameType.END, stream_id)


class Decoder:
    """Incremental frame decoder: feed bytes in any cuts, take events out in order.

    Feed it with :meth:`receive_data`, or without a copy by reading straight into
    :meth:`get_buffer` and reporting the count with :meth:`buffer_updated`.
    ``next_event`` returns ``None`` when it needs more bytes. A frame that is well formed
    but carries bad JSON-RPC comes out as an :class:`InvalidMessage` event (the framing is
    intact, the stream goes on). An oversize header or an unknown frame type raises
    (:class:`FrameTooLarge` / :class:`MalformedFrame`) and leaves the decoder failed: every
    later call raises the same error, because the byte stream can no longer be trusted.
    With ``limits`` (:class:`ChannelLimits`) the header is checked against the cap of its
    frame type and a MESSAGE's JSON shape before it is parsed; a breach raises
    :class:`LimitExceeded` and fails the decoder the same way.

    One buffer serves the decoder's whole life: unconsumed bytes move to its front only
    when more room is needed, and it grows only when a single frame needs it (bounded by
    ``max_frame``), so steady traffic causes no allocation besides the payloads handed out.
    """

    __slots__ = (
        "_buf",
        "_caps",
        "_end",
        "_error",
        "_max_data",
        "_max_depth",
        "_max_frame",
        "_max_items",
        "_max_message",
        "_off",
        "_shape_free",
        "last_size",
    )

    def __init__(
        self,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        initial_size: int = 2**20,
        limits: ChannelLimits | None = None,
    ) -> None:
        if limits is not None:
            max_frame = limits.max_frame
        if max_frame < 0 or max_frame > 2**32 - 1:
            raise ValueError("max_frame must be within 0 .. 2**32-1")
        self._max_frame = max_frame
        self._max_message = limits.max_message if limits is not None else max_frame
        self._max_data = limits.max_data_frame if limits is not None else max_frame
        self._max_depth = limits.max_json_depth if limits is not None else None
        self._max_items = limits.max_json_containers if limits is not None else None
        caps = [c for c in (self._max_depth, self._max_items) if c is not None]
        self._shape_free = min(caps) if caps else None  # bracket count needing no scan
        # Indexed by frame type: the cap its header is checked against.
        self._caps = (0, self._max_message, self._max_data, max_frame)
        self._buf = bytearray(initial_size)
        self._off = 0  # first unconsumed byte
        self._end = 0  # one past the last received byte
        self._error: MalformedFrame | LimitExceeded | None = None
        #: Payload size of the last event returned (what a handler's request costs).
        self.last_size = 0

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return self._end - self._off

    def get_buffer(self, size: int) -> memoryview:
        """A writable view of at least ``size`` free bytes; release it before the next call."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._end + size > len(buf):
            pending = self._end - self._off
            if pending + size > len(buf):
                bigger = bytearray(max(pending + size, 2 * len(buf)))
                bigger[:pending] = buf[self._off : self._end]
                self._buf = buf = bigger
            elif pending:
                buf[:pending] = buf[self._off : self._end]
            self._off = 0
            self._end = pending
        return memoryview(buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise ValueError("buffer_updated() beyond the buffer")
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        n = len(data)
        if n:
            with self.get_buffer(n) as view:
                view[:n] = data
            self._end += n

    def next_event(self) -> Event | None:
        if self._error is not None:
            raise self._error
        off = self._off
        if self._end - off < HEADER_SIZE:
            if off == self._end:
                self._off = self._end = 0
            return None
        buf = self._buf
        length, ftype, stream_id = HEADER.unpack_from(buf, off)
        if ftype not in _KNOWN_TYPES:
            self._error = MalformedFrame(f"unknown frame type {ftype}")
            raise self._error
        if length > self._caps[ftype]:
            raise self._too_large(ftype, length)
        if ftype == _END and length:
            self._error = MalformedFrame(f"END frame for stream {stream_id} has a payload")
            raise self._error
        start = off + HEADER_SIZE
        end = start + length
        if end > self._end:
            return None
        self._off = end
        self.last_size = length
        if ftype == _DATA:
            with memoryview(buf) as view:
                return StreamData(stream_id, view[start:end].tobytes())
        if ftype == _MESSAGE:
            # Fewer brackets than both caps settle it here (nearly every message).
            if (
                self._shape_free is not None
                and buf.count(b"[", start, end) + buf.count(b"{", start, end) > self._shape_free
            ):
                try:
                    check_json_shape(
                        buf, start, end, max_depth=self._max_depth, max_containers=self._max_items
                    )
                except LimitExceeded as exc:
                    self._error = exc
                    raise
            with memoryview(buf) as view, view[start:end] as payload:
                return decode_message(payload)
        return StreamEnd(stream_id)

    def _too_large(self, ftype: int, length: int) -> FrameTooLarge:
        name = _CAP_NAMES[ftype]
        cap = self._caps[ftype]
        self._error = FrameTooLarge(
            f"{FrameType(ftype).name} frame header claims {length} bytes, maximum is {name}={cap}",
            limit=name,
            value=cap,
        )
        return self._error

    def events(self) -> list[Event]:
        """Every complete event buffered right now (convenience for tests and simple loops)."""
        out: list[Event] = []
        while (ev := self.next_event()) is not None:
            out.append(ev)
        return out


_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType)
_MESSAGE: Final = int(FrameType.MESSAGE)
_DATA: Final = int(FrameType.DATA)
_END: Final = int(FrameType.END)
_CAP_NAMES: Final = ("", "max_message", "max_data_frame", "max_frame")
