"""Limits give a clear status, never a silent hang; output arrives complete and bounded."""

from __future__ import annotations

import hashlib
import time

import pytest

from ironclaw.host.manager import SandboxManager

pytestmark = pytest.mark.root


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def test_fork_bomb_stops_at_the_pids_limit(manager: SandboxManager) -> None:
    rec = await manager.create({"limits": {"pids": 32, "memory_mib": 256}})
    r = await manager.exec(
        rec.id, ["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 1; echo alive"], timeout=15
    )
    assert r.status == "pids limit", (r.status, r.stderr[-300:])
    cg = manager.cgroups.open(rec.id)
    assert cg.stats().pids_current <= 32
    # The agent survived and the sandbox still works.
    assert (await manager.exec(rec.id, ["true"], timeout=10)).exit_code == 0


async def test_memory_hog_is_killed_and_reported(manager: SandboxManager) -> None:
    rec = await manager.create({"limits": {"memory_mib": 96}})
    hog = "b=[]\nwhile True: b.append(bytearray(8<<20))"
    r = await manager.exec(rec.id, ["python3", "-c", hog], timeout=60)
    assert r.status == "memory limit exceeded", (r.status, r.exit_code, r.stderr[-300:])
    assert r.signal == 9
    assert (await manager.exec(rec.id, ["echo", "still here"])).stdout == b"still here\n"


async def test_timeout_kills_the_command_and_its_children(manager: SandboxManager) -> None:
    rec = await manager.create()
    t0 = time.monotonic()
    r = await manager.exec(
        rec.id, ["sh", "-c", "sleep 100 & sleep 100 & sleep 100; echo never"], timeout=1
    )
    assert time.monotonic() - t0 < 10
    assert r.status == "timeout" and r.timed_out and r.signal == 9
    ps = await manager.exec(rec.id, ["sh", "-c", "ps -eo comm= | grep -c sleep || true"])
    assert ps.stdout.strip() == b"0"


async def test_wall_time_limit_ends_the_sandbox(manager: SandboxManager) -> None:
    rec = await manager.create({"limits": {"wall_time_s": 1.5}})
    deadline = time.monotonic() + 15
    state = rec.state
    while time.monotonic() < deadline:
        state = (await manager.get(rec.id)).state
        if state == "dead":
            break
        import asyncio

        await asyncio.sleep(0.2)
    got = await manager.get(rec.id)
    assert got.state == "dead" and got.reason is not None and "timeout" in got.reason


async def test_100_mib_of_stdout_arrives_complete_with_bounded_memory(
    manager: SandboxManager,
) -> None:
    rec = await manager.create({"limits": {"memory_mib": 256}})
    size = 100 * 1024 * 1024
    digest = hashlib.sha256()
    seen = 0

    peak = [0]

    def sink(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)
        digest.update(chunk)
        peak[0] = max(peak[0], rss_kib())

    rss_before = rss_kib()
    script = (
        "import sys, hashlib\n"
        f"n = {size}\nblock = bytes(range(256)) * 4096\nh = hashlib.sha256()\n"
        "out = sys.stdout.buffer\n"
        "while n:\n    b = block[:n]\n    out.write(b)\n    h.update(b)\n    n -= len(b)\n"
        "out.flush()\nsys.stderr.write(h.hexdigest())\n"
    )
    err = bytearray()
    r = await manager.exec(
        rec.id,
        ["python3", "-c", script],
        on_stdout=sink,
        on_stderr=err.extend,
        capture=False,
        timeout=120,
    )
    assert r.exit_code == 0, bytes(err)
    assert seen == size == r.stdout_bytes
    assert digest.hexdigest() == err.decode()  # every byte, in order
    # Sampled while the data flowed: RSS never grew by anything near the 100 MiB passed.
    assert peak[0] - rss_before < 48 * 1024, (rss_before, peak[0])
