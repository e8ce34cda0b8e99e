"""Per-connection caps of the channel, and the cheap JSON shape check they need.

The host treats everything inside a sandbox as hostile, the guest agent included, so
what one connection may make the host hold is capped here: frame sizes, JSON size,
nesting and container count (checked on the bytes *before* ``json`` builds objects, since
one megabyte of ``[]`` becomes tens of megabytes of lists), streams, buffered bytes,
concurrent calls and queued notifications. ``ChannelLimits()`` keeps the generous
defaults the guest uses; the host's strict set is ``ironclaw.rpc.HOST_LIMITS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Final

from ironclaw.errors import LimitExceeded

__all__ = ["DEFAULT_MAX_FRAME", "ChannelLimits", "check_json_shape"]

DEFAULT_MAX_FRAME: Final = 16 * 2**20


@dataclass(frozen=True, slots=True)
class ChannelLimits:
    """What one connection may make this end hold. ``None`` switches a check off.

    Sizes are bytes. Caps marked *closes* end the channel with :class:`LimitExceeded`
    when passed; ``stream_buffer`` and ``max_buffered_bytes`` are flow control (the
    reader stops until the consumer catches up), since a well-behaved sender meets them
    whenever this end reads slower than it writes. With ``overflow_closes`` the inbound
    call and notification caps close instead of waiting: right for the host, which must
    not let a sandbox park work on it.
    """

    max_message: int = DEFAULT_MAX_FRAME  # MESSAGE payload (closes)
    max_data_frame: int = DEFAULT_MAX_FRAME  # DATA payload (closes)
    max_json_depth: int | None = None  # nesting of [ and { (closes)
    max_json_containers: int | None = None  # [ and { per message (closes)
    max_open_streams: int = 4096  # receive buffers at once (closes)
    stream_buffer: int = 64  # chunks queued per stream (waits)
    max_buffered_bytes: int | None = None  # stream bytes queued, all streams (waits)
    max_inbound_calls: int = 1024  # handlers and replies running for the other end
    max_inbound_bytes: int | None = None  # request bytes held by running handlers (closes)
    max_outbound_calls: int = 1024  # this end's calls awaiting an answer (callers wait)
    max_queued_notifications: int = 1024  # per subscription
    own_stream_ids: bool = False  # DATA/END only for ids this end allocated (closes)
    overflow_closes: bool = False

    def __post_init__(self) -> None:
        for name in ("max_message", "max_data_frame"):
            if not 0 <= getattr(self, name) <= 2**32 - 1:
                raise ValueError(f"{name} must be within 0 .. 2**32-1")
        for name in (
            "max_open_streams",
            "stream_buffer",
            "max_inbound_calls",
            "max_outbound_calls",
            "max_queued_notifications",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def max_frame(self) -> int:
        return max(self.max_message, self.max_data_frame)


# A JSON string, escapes included (unrolled: no backtracking per character).
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")
_DELTA: Final = [0] * 256
_DELTA[ord("[")] = _DELTA[ord("{")] = 1
_DELTA[ord("]")] = _DELTA[ord("}")] = -1


def check_json_shape(
    buf: bytes | bytearray,
    start: int,
    end: int,
    *,
    max_depth: int | None,
    max_containers: int | None,
) -> None:
    """Raise LimitExceeded if ``buf[start:end]`` nests or holds too many containers.

    Counting brackets is C-speed and settles almost every message: fewer brackets than
    ``max_depth`` can nest no deeper. Only otherwise are strings cut out (one regex pass)
    and the depth summed over the remaining brackets, bounded by ``max_containers``.
    """
    openers = buf.count(b"[", start, end) + buf.count(b"{", start, end)
    if (max_depth is None or openers <= max_depth) and (
        max_containers is None or openers <= max_containers
    ):
        return
    with memoryview(buf) as view, view[start:end] as payload:
        skeleton = _STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    containers = skeleton.count(b"[") + skeleton.count(b"{")
    if max_containers is not None and containers > max_containers:
        raise LimitExceeded(
            f"JSON message holds {containers} arrays/objects, "
            f"more than max_json_containers={max_containers}",
            limit="max_json_containers",
            value=max_containers,
        )
    if max_depth is None or containers <= max_depth:
        return
    depth = max(accumulate(map(_DELTA.__getitem__, skeleton)))
    if depth > max_depth:
        raise LimitExceeded(
            f"JSON message nests {depth} levels deep, more than max_json_depth={max_depth}",
            limit="max_json_depth",
            value=max_depth,
        )
