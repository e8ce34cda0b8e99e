"""The host's channel limits, and the stream chunk size they are built around."""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from ironclaw.proto import ChannelLimits

__all__ = ["HOST_LIMITS", "MAX_CHUNK", "apply_overrides"]

# Payloads stay below glibc's default 128 KiB mmap threshold: larger ``bytes`` objects
# are mmap'ed, page-faulted and zeroed afresh for every chunk, which halves throughput.
MAX_CHUNK: Final = 128 * 1024 - 64

HOST_LIMITS: Final = ChannelLimits(
    max_message=2 * 2**20,
    max_data_frame=MAX_CHUNK,
    max_json_depth=64,
    max_json_containers=50_000,
    max_open_streams=256,
    stream_buffer=64,
    max_buffered_bytes=16 * 2**20,
    max_inbound_calls=16,
    max_inbound_bytes=4 * 2**20,
    max_outbound_calls=256,
    max_queued_notifications=256,
    own_stream_ids=True,
    overflow_closes=True,
)
"""Caps for the host's end of a sandbox channel: everything on the other end is hostile.

A guest's own traffic stays far below them (DATA frames are MAX_CHUNK, replies and the
agent's model calls are well under 2 MiB and 64 levels deep, the agent makes one call at
a time), while a guest that passes one loses its channel, not the host's memory.
"""


def apply_overrides(
    limits: ChannelLimits, max_frame: int | None, max_inflight: int | None, buffer: int | None
) -> ChannelLimits:
    """The older keyword arguments, kept as shorthands for fields of ChannelLimits."""
    changes: dict[str, Any] = {}
    if max_frame is not None:
        changes.update(max_message=max_frame, max_data_frame=max_frame)
    if max_inflight is not None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        changes.update(max_inbound_calls=max_inflight, max_outbound_calls=max_inflight)
    if buffer is not None:
        changes.update(stream_buffer=buffer)
    return dataclasses.replace(limits, **changes) if changes else limits
