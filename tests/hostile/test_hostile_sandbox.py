"""A hostile guest inside a real sandbox against the host's real channel code.

Route: a real bubblewrap sandbox (the ``manager`` fixture) runs ``hostile_guest.py`` in
place of a well-behaved agent, listening on a Unix socket in a directory mounted from
the host. The host connects to it with the real transport (``unix.connect``, push mode)
and the real ``Peer`` built as the manager builds its sandbox peers (``HOST_LIMITS``,
streams from ``new_stream_id``/``open_stream``, an ``exec``-shaped call), in the same
event loop as the manager. Every attack must close just that channel with a typed
error; tracemalloc bounds what the host holds; other sandboxes keep answering ``exec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import tempfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ironclaw.errors import (
    ChannelClosed,
    ChannelViolation,
    FrameTooLarge,
    IronclawError,
    LimitExceeded,
    ProtocolError,
)
from ironclaw.host.manager import SandboxManager
from ironclaw.rpc import HOST_LIMITS, CallContext, Peer
from ironclaw.transport import unix

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]
MiB = 2**20
GUEST = Path(__file__).with_name("hostile_guest.py")
MOUNT = "/mnt/hostile"


@dataclass
class HostileSandbox:
    sandbox_id: str
    socket: Path


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A host directory the sandbox user can write (under /tmp, so bwrap can reach it)."""
    path = Path(tempfile.mkdtemp(prefix="ic-hostile-"))
    path.chmod(0o777)
    shutil.copy(GUEST, path / "hostile_guest.py")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def hostile(manager: SandboxManager, shared_dir: Path) -> HostileSandbox:
    record = await manager.create(
        {"mounts": [{"source": str(shared_dir), "target": MOUNT, "writable": True}]}
    )
    sock = shared_dir / "guest.sock"
    started = await manager.exec(
        record.id,
        ["sh", "-c", f"python3 {MOUNT}/hostile_guest.py {MOUNT}/guest.sock >{MOUNT}/log 2>&1 &"],
        keep_background=True,
    )
    assert started.exit_code == 0
    async with asyncio.timeout(30):
        while not sock.exists():
            await asyncio.sleep(0.05)
    return HostileSandbox(record.id, sock)


async def host_peer(sock: Path, seen: list[ProtocolError]) -> Peer:
    """The host's end, made the way the manager makes its sandbox peers."""
    conn = await unix.connect(str(sock))
    peer = Peer(
        conn,
        name="host:hostile",
        limits=HOST_LIMITS,
        on_protocol_error=lambda _p, exc: seen.append(exc),
    )

    async def agent_event(params: Any, ctx: CallContext) -> None:
        await asyncio.sleep(3600)  # a slow host handler (a model call, an approval)

    peer.register("agent.event", agent_event)
    await peer.start()
    return peer


async def run_attack(sock: Path, mode: str, **params: Any) -> tuple[Peer, list[ProtocolError]]:
    """One connection, one attack, driven like ``manager.exec``; returns the closed peer."""
    seen: list[ProtocolError] = []
    peer = await host_peer(sock, seen)
    try:
        out = peer.new_stream_id()
        stream = peer.open_stream(out)
        sub = peer.subscribe("exec.output")  # subscribed, but the host is busy elsewhere
        call = asyncio.ensure_future(
            peer.call("exec", {"mode": mode, "stdout_stream": out, **params})
        )
        await asyncio.wait_for(peer.wait_closed(), 120)
        with pytest.raises(ChannelClosed) as closed:
            await call
        assert closed.value.__cause__ is peer.close_reason
        with pytest.raises(ChannelClosed):
            async for _ in stream:
                pass
        sub.close()
    finally:
        await peer.aclose()
    return peer, seen


def rss() -> int:
    """This process's resident set (the host orchestrator's memory, as the kernel sees it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


ATTACKS = [
    ("invented_ids", ChannelViolation, None),
    ("huge_nested", FrameTooLarge, "max_message"),
    ("deep_json", LimitExceeded, "max_json_depth"),
    ("wide_json", LimitExceeded, "max_json_containers"),
    ("big_data", FrameTooLarge, "max_data_frame"),
    ("many_calls", LimitExceeded, "max_inbound_calls"),
    ("notify_flood", LimitExceeded, "max_queued_notifications"),
]


async def test_every_attack_from_a_real_sandbox_is_refused_with_bounded_memory(
    hostile: HostileSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    peaks: dict[str, int] = {}
    rss_before = rss()
    for mode, kind, limit in ATTACKS:
        tracemalloc.start()
        try:
            peer, seen = await run_attack(hostile.socket, mode)
            _, peaks[mode] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        reason = peer.close_reason
        assert isinstance(reason, kind), (mode, reason)
        assert seen == [reason], mode  # the hook saw it once, for the trace and audit log
        if limit is not None:
            assert isinstance(reason, LimitExceeded) and reason.limit == limit, (mode, reason)
    grew = rss() - rss_before
    with capsys.disabled():
        print("\nhost tracemalloc peak per attack (MiB):",
              {m: round(p / MiB, 2) for m, p in peaks.items()},
              f"; host RSS grew {grew / MiB:.1f} MiB over all attacks")  # fmt: skip
    assert grew < 64 * MiB, grew  # the unbounded host grew by 200 MiB on the first one
    # The worst is the 2 MiB wide frame, held once before its bracket count refuses it.
    assert max(peaks.values()) < 16 * MiB, peaks


async def test_the_polite_mode_is_a_working_guest(hostile: HostileSandbox) -> None:
    """The harness itself is sound: the same route with a rule-abiding guest just works."""
    seen: list[ProtocolError] = []
    peer = await host_peer(hostile.socket, seen)
    try:
        out = peer.new_stream_id()
        stream = peer.open_stream(out)
        result = await asyncio.wait_for(
            peer.call("exec", {"mode": "polite", "stdout_stream": out}), 30
        )
        assert result == {"exit_code": 0}
        assert await stream.read_all() == b"hello from a polite guest\n"
        await asyncio.wait_for(peer.wait_closed(), 30)  # the guest hangs up when done
        assert seen == [] and not isinstance(peer.close_reason, ProtocolError)
    finally:
        await peer.aclose()


async def test_a_flooding_guest_does_not_stop_other_sandboxes(
    manager: SandboxManager, hostile: HostileSandbox
) -> None:
    """While one sandbox floods its channel (the host not reading it), another sandbox
    and the flooding sandbox's own agent keep answering exec; then the flood's channel
    is closed by a violation and the host's memory never went past the stream budget."""
    other = await manager.create()
    seen: list[ProtocolError] = []
    peer = await host_peer(hostile.socket, seen)
    tracemalloc.start()
    try:
        sids = [peer.new_stream_id() for _ in range(3)]
        streams = [peer.open_stream(sid) for sid in sids]  # opened, not read for now
        count = 400  # ~50 MiB, three times the host's stream budget
        flood = asyncio.ensure_future(
            peer.call("exec", {"mode": "stream_flood", "streams": sids, "count": count})
        )
        budget = HOST_LIMITS.max_buffered_bytes
        assert budget is not None
        async with asyncio.timeout(60):
            while peer.stats()["stream_bytes"] + 128 * 1024 <= budget:
                await asyncio.sleep(0.01)
        for i in range(5):
            res = await asyncio.wait_for(manager.exec(other.id, ["echo", f"still here {i}"]), 60)
            assert (res.exit_code, res.stdout) == (0, f"still here {i}\n".encode())
            res = await asyncio.wait_for(manager.exec(hostile.sandbox_id, ["true"]), 60)
            assert res.exit_code == 0
            assert not peer.closed and peer.stats()["stream_bytes"] <= budget
        # The host reads again: the flood flows, then the guest writes on an id it
        # invented, which closes this channel (and only this one).
        got = 0

        async def drain(stream: Any) -> None:
            nonlocal got
            with contextlib.suppress(ChannelClosed):
                async for chunk in stream:
                    got += len(chunk)

        await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await peer.aclose()
    assert got == count * (128 * 1024 - 64)  # every legitimate byte arrived
    with pytest.raises(ChannelClosed):
        await flood
    assert isinstance(peer.close_reason, ChannelViolation) and seen == [peer.close_reason]
    res = await asyncio.wait_for(manager.exec(other.id, ["echo", "after"]), 60)
    assert res.stdout == b"after\n"
    print(f"\nflood: host tracemalloc peak {peak / MiB:.1f} MiB (budget {budget / MiB:.0f} MiB)")
    assert peak < budget + 16 * MiB, peak


class _Crashes(logging.Handler):
    """Counts ERROR records (``reader failed``/``dispatch failed``) without keeping them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_fuzzing_the_host_from_inside_a_sandbox(hostile: HostileSandbox) -> None:
    """Seeded mutations of valid traffic, one connection each (bounded count): the host
    never crashes, every close is typed, and its memory stays bounded."""
    rounds = int(os.environ.get("IRONCLAW_HOSTILE_FUZZ_ROUNDS", "150"))
    reasons: dict[str, int] = {}
    crashes = _Crashes()
    logging.getLogger("ironclaw").addHandler(crashes)
    tracemalloc.start()
    try:
        for seed in range(rounds):
            gc.collect()  # a closed peer and its close reason form a cycle; count live data
            seen: list[ProtocolError] = []
            peer = await host_peer(hostile.socket, seen)
            try:
                out = peer.new_stream_id()
                stream = peer.open_stream(out)
                call = asyncio.ensure_future(
                    peer.call("exec", {"mode": "fuzz", "stdout_stream": out, "seed": seed,
                                       "count": 1 + seed % 5})
                )  # fmt: skip
                drain = asyncio.ensure_future(stream.read_all())
                await asyncio.wait_for(peer.wait_closed(), 60)  # the guest ends with EOF
                for fut in (call, drain):
                    with contextlib.suppress(IronclawError):  # typed failures only
                        await fut
            finally:
                await peer.aclose()
            reason = peer.close_reason
            # Typed: a violation, or the guest's EOF; never an untyped crash.
            assert isinstance(reason, ProtocolError | ChannelClosed), (seed, reason)
            if isinstance(reason, ProtocolError):
                assert seen == [reason]
            name = type(reason).__name__
            if isinstance(reason, LimitExceeded):
                name += f"({reason.limit})"
            reasons[name] = reasons.get(name, 0) + 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        logging.getLogger("ironclaw").removeHandler(crashes)
    print(f"\nfuzz: {rounds} connections, close reasons {reasons}, peak {peak / MiB:.1f} MiB")
    assert sum(reasons.values()) == rounds
    assert crashes.messages == []  # "reader failed"/"dispatch failed": an untyped crash
    assert peak < 16 * MiB, peak
