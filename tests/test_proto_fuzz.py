"""Bounded fuzzing of the frame decoder (runs in the normal test run, well under 30 s).

Whatever bytes arrive, the decoder either yields well-typed events, waits for more, or
raises a ProtocolError; it never raises anything else, never hangs, and never holds
more than it was given. For longer campaigns raise IRONCLAW_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ironclaw.errors import ProtocolError
from ironclaw.proto import (
    HEADER,
    Decoder,
    FrameType,
    InvalidMessage,
    Notification,
    Request,
    Response,
    StreamData,
    StreamEnd,
    encode_data,
    encode_end,
    encode_message_frame,
)
from ironclaw.proto.messages import ErrorResponse

EXAMPLES = int(os.environ.get("IRONCLAW_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EVENT_TYPES = (
    Request,
    Notification,
    Response,
    ErrorResponse,
    InvalidMessage,
    StreamData,
    StreamEnd,
)

seeds = [
    encode_message_frame(Request(1, "exec", {"cmd": ["ls"]})),
    encode_message_frame(Notification("out", [1, "two"])),
    encode_message_frame(Response("a", None)),
    encode_data(3, b"bulk"),
    encode_end(3),
]


def drive(dec: Decoder, chunks: list[bytes]) -> None:
    fed = 0
    for chunk in chunks:
        try:
            dec.receive_data(chunk)
        except ProtocolError:
            return
        fed += len(chunk)
        while True:
            try:
                ev = dec.next_event()
            except ProtocolError:
                return
            if ev is None:
                break
            assert isinstance(ev, EVENT_TYPES)
        assert dec.buffered <= fed


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=16), st.integers(0, 256))
def test_random_bytes(chunks: list[bytes], max_frame: int) -> None:
    drive(Decoder(max_frame=max_frame), chunks)


@FUZZ
@given(
    st.lists(st.sampled_from(seeds), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8),
    st.integers(1, 64),
)
def test_mutated_valid_streams(
    frames: list[bytes], flips: list[tuple[int, int]], step: int
) -> None:
    wire = bytearray(b"".join(frames))
    for pos, value in flips:
        wire[pos % len(wire)] = value
    drive(Decoder(max_frame=4096), [bytes(wire[i : i + step]) for i in range(0, len(wire), step)])


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=32))
def test_arbitrary_headers(length: int, ftype: int, tail: bytes) -> None:
    dec = Decoder(max_frame=1 << 20)
    drive(dec, [HEADER.pack(length, ftype, 1), tail])
    if length > 1 << 20 or ftype not in set(FrameType):
        assert dec.buffered <= HEADER.size + len(tail)
