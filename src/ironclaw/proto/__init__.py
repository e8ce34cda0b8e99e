"""Sans-IO wire protocol of the host<->sandbox channel: frames, messages, handshake.

No asyncio and no sockets here: the same code runs in the host orchestrator and in the
guest agent (plain ``python3``, standard library only), and it is tested by feeding it
bytes. See ``docs/CHANNEL.md`` for the wire format.
"""

from __future__ import annotations

from .frames import (
    DEFAULT_MAX_FRAME,
    HEADER,
    HEADER_SIZE,
    MAX_STREAM_ID,
    Decoder,
    Event,
    FrameType,
    StreamData,
    StreamEnd,
    encode_data,
    encode_data_header,
    encode_end,
    encode_frame,
    encode_message_frame,
)
from .handshake import HandshakeClient, HandshakeServer, connect_line, ok_line
from .limits import ChannelLimits, check_json_shape
from .messages import (
    ErrorObject,
    ErrorResponse,
    InvalidMessage,
    Message,
    Notification,
    Request,
    RequestId,
    Response,
    decode_message,
    encode_message,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "HEADER_SIZE",
    "MAX_STREAM_ID",
    "ChannelLimits",
    "Decoder",
    "ErrorObject",
    "ErrorResponse",
    "Event",
    "FrameType",
    "HandshakeClient",
    "HandshakeServer",
    "InvalidMessage",
    "Message",
    "Notification",
    "Request",
    "RequestId",
    "Response",
    "StreamData",
    "StreamEnd",
    "check_json_shape",
    "connect_line",
    "decode_message",
    "encode_data",
    "encode_data_header",
    "encode_end",
    "encode_frame",
    "encode_message",
    "encode_message_frame",
    "ok_line",
]
