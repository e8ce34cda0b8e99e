"""Lifecycle under load: event-loop stalls, warm vs cold start, memory per idle sandbox.

Prints one JSON line:

* ``max_stall_ms`` / ``p99_stall_ms``: how late a 1 ms ticker on the orchestrator's event
  loop woke while 100 sandboxes were created in parallel (target max <= 20 ms);
* ``warm_acquire_exec_p50_ms`` (target <= 5 ms) beside ``cold_create_exec_p50_ms`` from
  the same run: take a pooled sandbox (final id, limits) and run ``true`` in it, versus
  creating one from nothing;
* ``idle_mib_per_sandbox`` with 200 sandboxes up (target <= 15 MiB), counted honestly:
  the proportional set size of every process of every sandbox, plus the kernel memory
  charged to their cgroups, plus the orchestrator's own growth divided by 200. The
  host-wide drop of MemAvailable per sandbox is reported beside it as a cross-check.

    python benchmarks/lifecycle.py --json [--sandboxes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ironclaw.config import Settings
from ironclaw.host.looplag import LoopLagMonitor
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.procs import descendants

MiB = 1024 * 1024


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def kmem_bytes(manager: SandboxManager, rid: str) -> int:
    cg = manager.cgroups.open(rid)
    for d in cg.dirs:
        for name in ("memory.kmem.usage_in_bytes",):
            path = d.path / name
            if path.exists():
                return int(path.read_text())
        stat = d.path / "memory.stat"
        if d.version == 2 and stat.exists():
            fields = dict(line.split() for line in stat.read_text().splitlines())
            return int(fields.get("kernel", 0))
    return 0


async def stalls(manager: SandboxManager, n: int) -> tuple[float, float]:
    async with LoopLagMonitor(threshold_ms=20, interval_ms=1) as mon:
        records = await asyncio.gather(*(manager.create(use_pool=False) for _ in range(n)))
    await asyncio.gather(*(manager.destroy(r.id) for r in records))
    return mon.max_ms, mon.percentile(0.99)


async def cold(manager: SandboxManager, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rec = await manager.create(use_pool=False)
        await manager.exec(rec.id, ["true"])
        out.append((time.perf_counter() - t0) * 1000)
        await manager.destroy(rec.id)
    return out


async def warm(manager: SandboxManager, runs: int) -> list[float]:
    await manager.fill_pool({}, size=runs)
    out = []
    for i in range(runs):
        t0 = time.perf_counter()
        rec = await manager.create({"limits": {"memory_mib": 256}}, sandbox_id=f"warm-{i}")
        await manager.exec(rec.id, ["true"])
        out.append((time.perf_counter() - t0) * 1000)
        assert rec.rid != rec.id, "not taken from the pool"
        await manager.destroy(rec.id)
    return out


async def idle_memory(manager: SandboxManager, n: int) -> dict[str, float]:
    avail0, rss0 = mem_available_kib(), rss_kib()
    sem = asyncio.Semaphore(10)

    async def one() -> str:
        async with sem:
            return (await manager.create(use_pool=False)).id

    ids = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(2.0)  # let start-up garbage settle
    records = [await manager.get(i) for i in ids]
    pss = 0
    kmem = 0
    for r in records:
        pid = int(r.info["pid"])
        pss += sum(pss_kib(p) for p in [pid, *descendants(pid)]) * 1024
        kmem += kmem_bytes(manager, r.rid)
    orchestrator = max(0, rss_kib() - rss0) * 1024
    host_drop = max(0, avail0 - mem_available_kib()) * 1024
    for i in ids:
        await manager.destroy(i)
    return {
        "idle_mib_per_sandbox": round((pss + kmem + orchestrator) / n / MiB, 2),
        "pss_mib_per_sandbox": round(pss / n / MiB, 2),
        "kernel_mib_per_sandbox": round(kmem / n / MiB, 2),
        "orchestrator_mib_per_sandbox": round(orchestrator / n / MiB, 3),
        "host_memavailable_drop_mib_per_sandbox": round(host_drop / n / MiB, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ironclaw-bench-") as home:
        os.chmod(home, 0o700)
        settings = Settings.from_env({"IRONCLAW_HOME": home})
        async with SandboxManager(settings, cgroup_root="ironclaw-bench") as manager:
            await cold(manager, 3)  # warm caches: guest bundle, imports
            max_stall, p99_stall = await stalls(manager, args.parallel)
            cold_ms = await cold(manager, args.runs)
            warm_ms = await warm(manager, args.runs)
            memory = await idle_memory(manager, args.sandboxes)
    return {
        "benchmark": "lifecycle",
        "parallel_creates": args.parallel,
        "max_stall_ms": round(max_stall, 2),
        "p99_stall_ms": round(p99_stall, 2),
        "warm_acquire_exec_p50_ms": round(statistics.median(warm_ms), 2),
        "cold_create_exec_p50_ms": round(statistics.median(cold_ms), 2),
        "sandboxes_up": args.sandboxes,
        **memory,
        "targets": {"max_stall_ms": 20, "warm_acquire_exec_p50_ms": 5, "idle_mib_per_sandbox": 15},
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=100)
    parser.add_argument("--sandboxes", type=int, default=200)
    args = parser.parse_args()
    doc = asyncio.run(run(args))
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
