"""Sans-IO protocol: framing, message codec, hybrid-vsock handshake."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ironclaw.errors import ConnectError, FrameTooLarge, MalformedFrame
from ironclaw.proto import (
    HEADER,
    Decoder,
    ErrorObject,
    ErrorResponse,
    Event,
    FrameType,
    HandshakeClient,
    HandshakeServer,
    InvalidMessage,
    Notification,
    Request,
    Response,
    StreamData,
    StreamEnd,
    encode_data,
    encode_end,
    encode_frame,
    encode_message_frame,
)

# -- strategies ------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
params = (
    st.none()
    | st.lists(json_values, max_size=3)
    | st.dictionaries(st.text(max_size=8), json_values, max_size=3)
)
ids = st.integers(0, 2**53) | st.text(max_size=12)
methods = st.text(min_size=1, max_size=16)
stream_ids = st.integers(1, 2**32 - 1)

events: st.SearchStrategy[Event] = st.one_of(
    st.builds(Request, ids, methods, params),
    st.builds(Notification, methods, params),
    st.builds(Response, ids, json_values),
    st.builds(
        ErrorResponse,
        st.none() | ids,
        st.builds(
            ErrorObject, st.integers(-33000, 0), st.text(max_size=20), st.none() | json_values
        ),
    ),
    st.builds(StreamData, stream_ids, st.binary(min_size=1, max_size=300)),
    st.builds(StreamEnd, stream_ids),
)


def encode(ev: Event) -> bytes:
    if isinstance(ev, StreamData):
        return encode_data(ev.stream_id, ev.data)
    if isinstance(ev, StreamEnd):
        return encode_end(ev.stream_id)
    assert not isinstance(ev, InvalidMessage)
    return encode_message_frame(ev)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


# -- properties -------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, max_size=12), st.lists(st.integers(0, 10**6), max_size=30))
def test_any_messages_cut_anywhere_decode_identically(evs: list[Event], cuts: list[int]) -> None:
    wire = b"".join(encode(e) for e in evs)
    dec = Decoder()
    got: list[Event] = []
    for piece in cut(wire, cuts):
        dec.receive_data(piece)
        got.extend(dec.events())
    assert got == evs
    assert dec.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=12), st.lists(st.integers(1, 97), min_size=1, max_size=20))
def test_zero_copy_feeding_decodes_identically(evs: list[Event], sizes: list[int]) -> None:
    """The get_buffer/buffer_updated path (what sockets use) with a tiny, growing buffer."""
    wire = b"".join(encode(e) for e in evs)
    dec = Decoder(initial_size=16)
    got: list[Event] = []
    pos = i = 0
    while pos < len(wire):
        n = min(sizes[i % len(sizes)], len(wire) - pos)
        i += 1
        with dec.get_buffer(n) as room:
            room[:n] = wire[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        got.extend(dec.events())
    assert got == evs


def test_response_and_notification_in_one_read_are_both_delivered() -> None:
    """Regression for the seed's bug: bytes behind a response must not be dropped."""
    wire = (
        encode_message_frame(Response(7, {"ok": True}))
        + encode_message_frame(Notification("exec/exit", {"code": 0}))
        + encode_data(3, b"tail")[:5]  # and half of a third frame
    )
    dec = Decoder()
    dec.receive_data(wire)
    assert dec.events() == [Response(7, {"ok": True}), Notification("exec/exit", {"code": 0})]
    assert dec.buffered == 5
    dec.receive_data(encode_data(3, b"tail")[5:])
    assert dec.events() == [StreamData(3, b"tail")]


# -- framing errors -------------------------------------------------------------------------
def test_oversize_header_raises_before_allocating() -> None:
    dec = Decoder(max_frame=1024)
    tracemalloc.start()
    try:
        dec.receive_data(HEADER.pack(2**32 - 1, FrameType.DATA, 1))
        with pytest.raises(FrameTooLarge, match="4294967295"):
            dec.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    # The decoder stays failed: the byte stream cannot be resynchronised.
    with pytest.raises(FrameTooLarge):
        dec.receive_data(b"more")
    with pytest.raises(FrameTooLarge):
        dec.next_event()


def test_frame_at_the_limit_is_accepted() -> None:
    dec = Decoder(max_frame=10)
    dec.receive_data(encode_data(1, b"x" * 10))
    assert dec.events() == [StreamData(1, b"x" * 10)]


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (HEADER.pack(0, 9, 0), "unknown frame type 9"),
        (HEADER.pack(1, FrameType.END, 4) + b"x", "END frame"),
    ],
)
def test_malformed_frames_fail_the_decoder(frame: bytes, match: str) -> None:
    dec = Decoder()
    dec.receive_data(frame)
    with pytest.raises(MalformedFrame, match=match):
        dec.next_event()
    with pytest.raises(MalformedFrame):
        dec.next_event()


# -- message validation ----------------------------------------------------------------------
def message(obj: Any) -> bytes:
    return encode_frame(FrameType.MESSAGE, 0, json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("payload", "code", "rid"),
    [
        (b"{not json", -32700, None),
        (b"\xff\xfe", -32700, None),
        (b"[1, 2]", -32600, None),
        (b'"str"', -32600, None),
        (json.dumps({"jsonrpc": "1.0", "id": 4, "method": "x"}).encode(), -32600, 4),
        (json.dumps({"id": 5, "method": "x"}).encode(), -32600, 5),
        (json.dumps({"jsonrpc": "2.0", "id": 6, "method": 3}).encode(), -32600, 6),
        (json.dumps({"jsonrpc": "2.0", "id": 7, "method": "m", "params": 3}).encode(), -32600, 7),
        (json.dumps({"jsonrpc": "2.0", "id": [1], "method": "m"}).encode(), -32600, None),
        (json.dumps({"jsonrpc": "2.0", "id": True, "method": "m"}).encode(), -32600, None),
        (json.dumps({"jsonrpc": "2.0", "id": 8}).encode(), -32600, 8),
    ],
)
def test_invalid_messages_become_events_and_the_stream_goes_on(
    payload: bytes, code: int, rid: Any
) -> None:
    dec = Decoder()
    dec.receive_data(
        encode_frame(FrameType.MESSAGE, 0, payload) + message({"jsonrpc": "2.0", "method": "ok"})
    )
    bad, good = dec.events()
    assert isinstance(bad, InvalidMessage)
    assert (bad.code, bad.id) == (code, rid)
    assert good == Notification("ok")


def test_deeply_nested_json_is_a_parse_error_not_a_crash() -> None:
    dec = Decoder()
    dec.receive_data(encode_frame(FrameType.MESSAGE, 0, b"[" * 100_000 + b"]" * 100_000))
    (ev,) = dec.events()
    assert isinstance(ev, InvalidMessage)
    assert ev.code == -32700


def test_invalid_response_is_flagged_as_response() -> None:
    dec = Decoder()
    dec.receive_data(message({"jsonrpc": "2.0", "id": 3, "error": {"code": "x"}}))
    (ev,) = dec.events()
    assert isinstance(ev, InvalidMessage)
    assert ev.is_response
    assert ev.id == 3


def test_encoding_is_strict_json() -> None:
    with pytest.raises(ValueError):
        encode_message_frame(Response(1, float("nan")))
    with pytest.raises(TypeError):
        encode_message_frame(Response(1, object()))


# -- handshake ------------------------------------------------------------------------------
def test_handshake_ok_keeps_leftover_bytes() -> None:
    hs = HandshakeClient(52)
    assert hs.initiate() == b"CONNECT 52\n"
    assert not hs.receive_data(b"OK 10737")
    assert hs.receive_data(b"41824\n\x00\x00\x00\x05first-frame")
    assert hs.host_port == 1073741824
    assert hs.leftover == b"\x00\x00\x00\x05first-frame"


@pytest.mark.parametrize(
    "reply", [b"NOPE\n", b"OK\n", b"OK x\n", b"OK 1 2\n", b"ok 5\n", b"OK 99999999999\n"]
)
def test_handshake_rejects_anything_but_ok(reply: bytes) -> None:
    with pytest.raises(ConnectError, match="unexpected handshake reply"):
        HandshakeClient(52).receive_data(reply)


def test_handshake_eof_and_overlong_line_are_connect_errors() -> None:
    with pytest.raises(ConnectError, match="guest listening"):
        HandshakeClient(1).eof()
    with pytest.raises(ConnectError, match="no handshake line"):
        HandshakeClient(1).receive_data(b"O" * 100)


def test_handshake_server_side() -> None:
    srv = HandshakeServer()
    assert srv.receive_data(b"CONNECT 5") is None
    assert srv.receive_data(b"2\nrest") == 52
    assert srv.leftover == b"rest"
    with pytest.raises(ValueError):
        HandshakeServer().receive_data(b"HELLO\n")
