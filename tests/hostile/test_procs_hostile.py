"""A hostile guest against the host's process-output and file-watch readers.

The host's Peer (``HOST_LIMITS``) and the real host code (:mod:`ironclaw.host.processes`)
face a raw guest over the in-memory transport: it answers ``proc.connect`` and
``files.watch`` with floods. What the host keeps stays bounded (tracemalloc), whether
its reader is slow or the guest's lines never end.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import pytest

from ironclaw.errors import ProtocolError
from ironclaw.host.guest import GuestClient
from ironclaw.host.processes import ProcessHandle, watch
from ironclaw.proto import methods as m
from ironclaw.proto.proc_methods import MAX_WATCH_LINE
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport import memory

from . import hostile_guest as hg
from .test_channel_limits import feed, first_request

pytestmark = pytest.mark.timeout(120)
MiB = 2**20
BUDGET = HOST_LIMITS.max_buffered_bytes or 0


@pytest.fixture
async def pair() -> AsyncIterator[tuple[GuestClient, memory.MemoryConnection]]:
    a, b = memory.pair()
    peer = Peer(a, name="host:hostile", limits=HOST_LIMITS)
    await peer.start()
    try:
        yield GuestClient(peer, "hostile"), b
    finally:
        await peer.aclose()
        await b.aclose()


def frames(sid: int, payload: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(payload)):
        yield hg.frame(hg.DATA, sid, payload)


async def test_a_watch_line_that_never_ends_is_refused_not_buffered(
    pair: tuple[GuestClient, memory.MemoryConnection],
) -> None:
    guest, raw = pair

    async def consume() -> None:
        async for _ in watch(guest, "."):
            pass

    reader = asyncio.ensure_future(consume())
    req = await first_request(raw)
    assert req.method == "files.watch"
    sid = req.params["stream"]
    tracemalloc.start()
    try:
        flood = asyncio.ensure_future(feed(raw, frames(sid, b"x" * hg.CHUNK, 64 * MiB)))
        with pytest.raises(ProtocolError, match=f"longer than {MAX_WATCH_LINE}"):
            await asyncio.wait_for(reader, 60)
        await asyncio.wait_for(flood, 60)  # the rest is dropped as it arrives
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Of 64 MiB: the in-memory transport's queue of 64 frames (8 MiB) and a line's prefix.
    assert peak < 10 * MiB, peak
    assert guest.peer.stats()["stream_bytes"] == 0


async def test_a_watch_event_flood_on_a_slow_reader_is_held_to_the_budget(
    pair: tuple[GuestClient, memory.MemoryConnection],
) -> None:
    guest, raw = pair
    events = watch(guest, ".")
    first = asyncio.ensure_future(events.__anext__())
    req = await first_request(raw)
    sid = req.params["stream"]
    line = json.dumps({"type": "created", "path": "/workspace/" + "f" * 3000}).encode() + b"\n"
    chunk = line * (hg.CHUNK // len(line))
    flood = asyncio.ensure_future(feed(raw, frames(sid, chunk, 3 * BUDGET)))
    tracemalloc.start()
    try:
        assert (await first).type == "created"
        # The guest keeps writing; the host fills the stream's buffer, then stops reading.
        held, still = 0, 0
        while still < 100:
            await asyncio.sleep(0.001)
            now = guest.peer.stats()["stream_bytes"]
            held, still = now, (still + 1 if now == held else 0)
        assert not flood.done() and held > 0
        got = 1
        async for ev in events:  # reading on drains it all, nothing lost
            assert isinstance(ev, m.WatchEvent)
            got += 1
            if got == (3 * BUDGET // len(chunk)) * (len(chunk) // len(line)):
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await events.aclose()
    await flood
    assert held <= BUDGET
    assert peak < BUDGET + 8 * MiB, peak


async def test_a_replay_flood_is_streamed_through_not_kept(
    pair: tuple[GuestClient, memory.MemoryConnection],
) -> None:
    guest, raw = pair
    info = m.ProcInfo(pid=7, tag=None, argv=("x",), pty=False, running=True, exit_code=None,
                      signal=None, started_at=0.0, output_bytes=0)  # fmt: skip
    handle = ProcessHandle(guest, info)
    total = 0

    async def consume() -> None:
        nonlocal total
        async for chunk in handle.output():
            total += len(chunk)
            await asyncio.sleep(0)  # a reader slower than the guest

    reader = asyncio.ensure_future(consume())
    req = await first_request(raw)
    assert req.method == "proc.connect"
    sid = req.params["stream"]
    tracemalloc.start()
    try:
        await asyncio.wait_for(feed(raw, frames(sid, b"o" * hg.CHUNK, 4 * BUDGET)), 60)
        while total < (4 * BUDGET // hg.CHUNK) * hg.CHUNK:
            assert guest.peer.stats()["stream_bytes"] <= BUDGET
            await asyncio.sleep(0.001)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert peak < BUDGET + 8 * MiB, peak
