"""Seeded fuzzing of the host's end (``HOST_LIMITS``) over the in-memory transport.

Bounded: ``IRONCLAW_HOSTILE_FUZZ_CASES`` connections (default 600), each fed one to five
mutations of valid traffic (bit flips, cuts, bad headers, foreign stream ids, deep
JSON) and then EOF. The host must end every connection with a typed reason, log no
crash, answer nothing it should not, and hold bounded memory throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import tracemalloc
from typing import Any

import pytest

from ironclaw.errors import ChannelClosed, IronclawError, LimitExceeded, ProtocolError
from ironclaw.rpc import HOST_LIMITS, CallContext, Peer
from ironclaw.transport import memory

from . import hostile_guest as hg

pytestmark = pytest.mark.timeout(300)
CASES = int(os.environ.get("IRONCLAW_HOSTILE_FUZZ_CASES", "600"))
MiB = 2**20


class _Crashes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def one_case(seed: int) -> BaseException | None:
    a, b = memory.pair()
    seen: list[ProtocolError] = []

    async def model_complete(params: Any, ctx: CallContext) -> dict[str, Any]:
        return {"message": {"content": "ok"}}

    peer = Peer(
        a,
        name="host:fuzz",
        limits=HOST_LIMITS,
        handlers={"model.complete": model_complete},
        on_protocol_error=lambda _p, exc: seen.append(exc),
    )
    await peer.start()
    try:
        out = peer.new_stream_id()
        stream = peer.open_stream(out)
        call = asyncio.ensure_future(peer.call("exec", {"stdout_stream": out}))
        drain = asyncio.ensure_future(stream.read_all())
        rng = random.Random(seed)
        try:
            for _ in range(1 + seed % 5):
                await b.write(hg.mutated(rng))
        except ChannelClosed:
            pass
        await b.aclose()  # EOF: every case ends
        await asyncio.wait_for(peer.wait_closed(), 30)
        for fut in (call, drain):
            with contextlib.suppress(IronclawError):  # typed: a violation, EOF, a remote error
                await fut
        reason = peer.close_reason
        if isinstance(reason, ProtocolError):
            assert seen == [reason]
        else:
            assert seen == []
        return reason
    finally:
        await peer.aclose()


async def test_fuzzing_the_host_end_in_memory() -> None:
    reasons: dict[str, int] = {}
    crashes = _Crashes()
    logging.getLogger("ironclaw").addHandler(crashes)
    tracemalloc.start()
    try:
        for seed in range(CASES):
            if seed % 50 == 0:
                gc.collect()  # closed peers are cycles through their close reason
            reason = await one_case(seed)
            assert isinstance(reason, ProtocolError | ChannelClosed), (seed, reason)
            name = type(reason).__name__
            if isinstance(reason, LimitExceeded):
                name += f"({reason.limit})"
            reasons[name] = reasons.get(name, 0) + 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        logging.getLogger("ironclaw").removeHandler(crashes)
    print(f"\nfuzz (memory): {CASES} cases, close reasons {reasons}, peak {peak / MiB:.1f} MiB")
    assert crashes.messages == []
    assert sum(reasons.values()) == CASES
    assert len(reasons) >= 3  # the mutations reach several distinct checks
    assert peak < 32 * MiB, peak
