"""The host's Peer (``HOST_LIMITS``) against a hostile guest over the in-memory transport.

Each attack from issue 12 is tried on its own connection: the channel closes with the
typed error naming the limit, pending calls fail with ChannelClosed carrying it, the
``on_protocol_error`` hook sees it once, and tracemalloc shows the host holding a
bounded amount of memory (the hostile side produces its bytes lazily, so what is
measured is what the host kept).
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ironclaw.errors import (
    ChannelClosed,
    ChannelViolation,
    ConfigError,
    FrameTooLarge,
    LimitExceeded,
    ProtocolError,
)
from ironclaw.proto import ChannelLimits, Decoder, Request
from ironclaw.rpc import HOST_LIMITS, CallContext, Peer
from ironclaw.transport import memory

from . import hostile_guest as hg

pytestmark = pytest.mark.timeout(120)
MiB = 2**20


@dataclass
class Host:
    """The host end as the manager builds it, plus what its hook recorded."""

    peer: Peer
    raw: memory.MemoryConnection
    violations: list[ProtocolError] = field(default_factory=list)


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    a, b = memory.pair()
    seen: list[ProtocolError] = []
    peer = Peer(
        a,
        name="host:hostile",
        limits=HOST_LIMITS,
        on_protocol_error=lambda _peer, exc: seen.append(exc),
    )
    await peer.start()
    try:
        yield Host(peer, b, seen)
    finally:
        await peer.aclose()
        await b.aclose()


async def feed(conn: memory.MemoryConnection, pieces: Iterable[bytes]) -> int:
    """Write until the host hangs up; returns the bytes it took."""
    sent = 0
    try:
        for piece in pieces:
            await conn.write(piece)
            sent += len(piece)
    except ChannelClosed:
        pass
    return sent


async def first_request(conn: memory.MemoryConnection) -> Request:
    dec = Decoder()
    while True:
        dec.receive_data(await conn.read())
        for ev in dec.events():
            if isinstance(ev, Request):
                return ev


async def attack(host: Host, pieces: Iterator[bytes], *, read_host: bool = False) -> int:
    """Start an exec-like call (streams opened the manager's way), then let ``pieces`` in.

    Returns tracemalloc's peak over the attack, in bytes.
    """
    peer = host.peer
    out = peer.new_stream_id()
    stream = peer.open_stream(out)
    call = asyncio.ensure_future(peer.call("exec", {"argv": ["true"], "stdout_stream": out}))
    await first_request(host.raw)
    tracemalloc.start()
    try:
        await asyncio.wait_for(feed(host.raw, pieces), 60)
        await asyncio.wait_for(peer.wait_closed(), 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with pytest.raises(ChannelClosed) as closed:
        await call
    assert closed.value.__cause__ is peer.close_reason
    with pytest.raises(ChannelClosed):
        async for _ in stream:
            pass
    return peak


def assert_closed_by(host: Host, kind: type[ProtocolError], limit: str | None = None) -> None:
    reason = host.peer.close_reason
    assert isinstance(reason, kind), reason
    assert host.violations == [reason]  # the hook saw it, exactly once
    if limit is not None:
        assert isinstance(reason, LimitExceeded) and reason.limit == limit
        assert f"{limit}=" in str(reason)  # the message names the limit and its value


async def test_data_on_invented_stream_ids_closes_the_channel(host: Host) -> None:
    """The review's attack: 200 invented ids x 64 full frames (it cost the host 200 MiB)."""
    peak = await attack(host, hg.invented_ids(random.Random(1)))
    assert_closed_by(host, ChannelViolation)
    assert "did not open" in str(host.peer.close_reason)
    assert peak < 4 * MiB, peak


@pytest.mark.parametrize("sid", [2, 3, 1001])
async def test_ids_this_end_did_not_allocate_are_refused(host: Host, sid: int) -> None:
    """The guest's even ids, and odd ones the host never handed out, are violations."""
    await attack(host, iter([hg.frame(hg.DATA, sid, b"x")]))
    assert_closed_by(host, ChannelViolation)


async def test_data_on_a_stream_the_host_writes_is_refused(host: Host) -> None:
    peer = host.peer
    stdin = peer.new_stream_id()
    await peer.send_bytes(stdin, b"input")
    await peer.end_stream(stdin)
    await attack(host, iter([hg.frame(hg.DATA, stdin, b"not yours to write")]))
    assert_closed_by(host, ChannelViolation)


async def test_data_on_a_stream_before_the_host_writes_it_is_refused(host: Host) -> None:
    """The guest writes first on the id the host allocated for stdin: found when the host
    starts writing it, and the host's write fails instead of feeding a hijacked stream."""
    peer = host.peer
    stdin = peer.new_stream_id()
    await host.raw.write(hg.frame(hg.DATA, stdin, b"pretend stdin"))
    while peer.stats()["streams"] == 0:
        await asyncio.sleep(0.001)
    with pytest.raises(ChannelClosed):
        await peer.send_bytes(stdin, b"input")
    assert_closed_by(host, ChannelViolation)


async def test_16_mib_of_nested_json_is_refused_at_its_header(host: Host) -> None:
    peak = await attack(host, hg.huge_nested_chunks(16 * MiB))
    assert_closed_by(host, FrameTooLarge, "max_message")
    assert peak < 4 * MiB, peak


async def test_deep_json_under_the_size_cap_is_refused_before_parsing(host: Host) -> None:
    peak = await attack(host, iter([hg.nested(40_000)]))
    assert_closed_by(host, LimitExceeded, "max_json_depth")
    assert peak < 4 * MiB, peak


async def test_wide_json_under_the_size_cap_is_refused_before_parsing(host: Host) -> None:
    """2 MiB of ``[],`` would be ~700k lists (~50 MiB); the bracket count stops it first."""
    peak = await attack(host, iter([hg.wide(2 * MiB - 200)]))
    assert_closed_by(host, LimitExceeded, "max_json_containers")
    assert peak < 12 * MiB, peak


async def test_an_oversized_data_frame_is_refused(host: Host) -> None:
    peak = await attack(host, iter([hg.HEADER.pack(16 * MiB, hg.DATA, 1), b"\0" * MiB]))
    assert_closed_by(host, FrameTooLarge, "max_data_frame")
    assert peak < 4 * MiB, peak


async def test_thousands_of_calls_close_at_max_inbound_calls(host: Host) -> None:
    gate = asyncio.Event()

    async def agent_event(params: Any, ctx: CallContext) -> None:
        await gate.wait()  # the host is slow (a model call, a person approving)

    host.peer.register("agent.event", agent_event)
    calls = (hg.message({"jsonrpc": "2.0", "id": i, "method": "agent.event"}) for i in range(5000))
    await attack(host, calls)
    assert_closed_by(host, LimitExceeded, "max_inbound_calls")
    await host.peer.aclose()
    assert host.peer.stats()["handler_tasks"] == 0  # cancelled with the channel


async def test_calls_whose_replies_go_unread_close_the_channel(host: Host) -> None:
    """Unknown methods get error replies; a guest that never reads them piles them up."""
    calls = (
        hg.message({"jsonrpc": "2.0", "id": i, "method": "nope", "params": ["x" * 200]})
        for i in range(200_000)
    )
    peak = await attack(host, calls)
    assert_closed_by(host, LimitExceeded, "max_inbound_calls")
    assert peak < 8 * MiB, peak


async def test_request_bytes_held_by_running_handlers_are_capped(host: Host) -> None:
    gate = asyncio.Event()

    async def model_complete(params: Any, ctx: CallContext) -> None:
        await gate.wait()

    host.peer.register("model.complete", model_complete)
    big = {"messages": ["m" * (MiB + MiB // 2)]}
    calls = (
        hg.message({"jsonrpc": "2.0", "id": i, "method": "model.complete", "params": big})
        for i in range(10)
    )
    await attack(host, calls)
    assert_closed_by(host, LimitExceeded, "max_inbound_bytes")


async def test_a_notification_flood_on_an_unread_subscription_closes(host: Host) -> None:
    sub = host.peer.subscribe("exec.output")
    note = hg.message({"jsonrpc": "2.0", "method": "exec.output", "params": {"d": "x" * 64}})
    peak = await attack(host, (note for _ in range(100_000)))
    assert_closed_by(host, LimitExceeded, "max_queued_notifications")
    assert peak < 4 * MiB, peak
    sub.close()


async def test_a_notification_flood_into_a_handler_closes(host: Host) -> None:
    gate = asyncio.Event()

    async def on_event(params: Any, ctx: CallContext) -> None:
        await gate.wait()

    host.peer.register("agent.event", on_event)
    note = hg.message({"jsonrpc": "2.0", "method": "agent.event", "params": {}})
    await attack(host, (note for _ in range(100_000)))
    assert_closed_by(host, LimitExceeded, "max_inbound_calls")


async def test_unheard_notifications_cost_nothing_and_keep_the_channel(host: Host) -> None:
    """Notifications nobody listens to are dropped (JSON-RPC), so they hold no memory."""
    peer = host.peer
    note = hg.message({"jsonrpc": "2.0", "method": "nobody.listens", "params": [1, 2, 3]})
    tracemalloc.start()
    try:
        await feed(host.raw, (note for _ in range(50_000)))
        await host.raw.write(hg.message({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        reply = await asyncio.wait_for(first_response(host.raw), 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply["error"]["code"] == -32601  # still answering: the channel is open
    assert not peer.closed and host.violations == []
    assert peak < 4 * MiB, peak


async def first_response(conn: memory.MemoryConnection) -> dict[str, Any]:
    dec = Decoder()
    while True:
        dec.receive_data(await conn.read())
        ev = dec.next_event()
        if ev is not None:
            return {"error": {"code": ev.error.code}} if hasattr(ev, "error") else {}


async def test_a_flood_on_opened_streams_is_held_to_the_byte_budget(host: Host) -> None:
    """The streams are legitimate, so this is flow control, not a violation: the host
    holds at most ``max_buffered_bytes`` across them (each alone would take 8 MiB) and
    loses nothing once it reads."""
    peer = host.peer
    sids = [peer.new_stream_id() for _ in range(3)]
    streams = [peer.open_stream(sid) for sid in sids]
    per_stream = 150  # 3 x ~19 MiB, three times the budget
    frames = [hg.frame(hg.DATA, sid, b"y" * hg.CHUNK) for sid in sids]
    writer = asyncio.ensure_future(feed(host.raw, frames * per_stream))
    budget = HOST_LIMITS.max_buffered_bytes
    assert budget is not None
    tracemalloc.start()
    try:
        # Nobody reads yet: the host fills its budget, then stops reading the guest.
        while peer.stats()["stream_bytes"] + hg.CHUNK <= budget:
            await asyncio.sleep(0.001)
        for _ in range(200):
            await asyncio.sleep(0)
        held = peer.stats()["stream_bytes"]

        async def drain(stream: Any) -> int:
            got = 0
            async for piece in stream:
                got += len(piece)
                if got == per_stream * hg.CHUNK:
                    break
            return got

        got = await asyncio.gather(*(drain(s) for s in streams))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await writer
    assert got == [per_stream * hg.CHUNK] * 3 and not peer.closed
    assert held <= budget
    assert peak < budget + 4 * MiB, peak


async def test_the_manager_stream_pattern_still_works_with_a_real_guest_peer() -> None:
    """exec's shape: host allocates stdout/stderr/stdin, the guest writes before the host
    opens, reads stdin, answers; nothing trips a limit."""
    a, b = memory.pair()

    async def exec_(params: Any, ctx: CallContext) -> dict[str, Any]:
        await ctx.peer.send_bytes(params["stdout_stream"], b"early bytes " * 1000)
        data = await ctx.peer.open_stream(params["stdin_stream"]).read_all()
        await ctx.peer.send_bytes(params["stderr_stream"], data)
        for sid in (params["stdout_stream"], params["stderr_stream"]):
            await ctx.peer.end_stream(sid)
        return {"exit_code": 0}

    async with (
        Peer(a, limits=HOST_LIMITS, name="host") as peer,
        Peer(b, handlers={"exec": exec_}, name="guest"),
    ):
        for _ in range(20):
            out, err, inp = peer.new_stream_id(), peer.new_stream_id(), peer.new_stream_id()
            call = asyncio.ensure_future(
                peer.call("exec", {"stdout_stream": out, "stderr_stream": err, "stdin_stream": inp})
            )
            await peer.send_bytes(inp, b"stdin!" * 50_000)
            await peer.end_stream(inp)
            await asyncio.sleep(0)  # let the early bytes arrive before the host opens
            stdout = await peer.open_stream(out).read_all()
            stderr = await peer.open_stream(err).read_all()
            assert (await call)["exit_code"] == 0
            assert stdout == b"early bytes " * 1000 and stderr == b"stdin!" * 50_000
        assert peer.stats()["streams"] == 0 and peer.stats()["stream_bytes"] == 0
        assert not peer._expected  # every id the host handed out was released


async def test_open_stream_refuses_ids_the_host_did_not_allocate(host: Host) -> None:
    with pytest.raises(ConfigError, match="new_stream_id"):
        host.peer.open_stream(7)


def test_limits_are_validated_and_default_to_the_generous_guest_set() -> None:
    assert ChannelLimits().max_message == 16 * MiB and not ChannelLimits().own_stream_ids
    with pytest.raises(ValueError, match="max_inbound_calls"):
        ChannelLimits(max_inbound_calls=0)
    assert HOST_LIMITS.max_data_frame == hg.CHUNK  # guests never send bigger DATA frames


async def test_the_hook_failing_does_not_keep_the_channel_open() -> None:
    a, b = memory.pair()

    def broken(peer: Peer, exc: ProtocolError) -> None:
        raise RuntimeError("hook bug")

    peer = Peer(a, limits=HOST_LIMITS, on_protocol_error=broken)
    await peer.start()
    await b.write(hg.frame(hg.DATA, 2, b"x"))
    await asyncio.wait_for(peer.wait_closed(), 10)
    assert isinstance(peer.close_reason, ChannelViolation)
    await peer.aclose()
