"""MicroVM start latency: cold boot and snapshot restore, each until the agent answers.

Boots the default image (built first unless the cache has this tree's) ``--boots``
times, one after another, and reports p50/p99 of start -> ready; then, in the same run,
restores ``--restores`` VMs from the image's agent-ready snapshot (built first if there
is none, not timed) and reports p50 of restore -> agent ready with a fresh identity
(``identity.reset`` answered). The accelerator used (KVM when a probe boot works, else
TCG) and the guest kernel release are printed. ``--json`` prints one JSON line.

Run as root: ``.venv/bin/python benchmarks/vm_boot.py --json`` (IRONCLAW_HOME moves the
state directory, as everywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ironclaw.backends.qemu.accel import probe_accel
from ironclaw.backends.qemu.restore import SnapshotKey, SnapshotStore, fresh_identity
from ironclaw.backends.qemu.vm import QemuVm
from ironclaw.config import Settings
from ironclaw.images import build_image


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(boots: int, restores: int, memory_mib: int, cpus: int) -> dict[str, Any]:
    settings = Settings.from_env()
    settings.ensure()
    # Always through the builder (a cache hit when nothing changed): the snapshot must be
    # of an image with this tree's guest agent, not whatever "default" named last.
    art = await build_image(
        settings, progress=lambda step, f: print(f"  {f:4.0%} {step}", file=sys.stderr)
    )
    times: list[float] = []
    accel = None
    kernel = None
    with tempfile.TemporaryDirectory(prefix="icvm-") as tmp:
        for i in range(boots):
            vm = QemuVm()
            started = time.perf_counter()
            try:
                await vm.start(
                    art, Path(tmp) / str(i), cpus=cpus, memory_mib=memory_mib, settings=settings
                )
                info = await vm.wait_ready(120)
                times.append((time.perf_counter() - started) * 1000)
                accel, kernel = vm.accel, info.get("kernel")
            finally:
                await vm.stop(graceful_timeout=0.5)
        used = accel if accel is not None else await asyncio.to_thread(probe_accel, art, settings)
        store = SnapshotStore(art, settings)
        key = SnapshotKey(accel=used, cpus=cpus, memory_mib=memory_mib, network=False)
        built = time.perf_counter()
        snap = await store.ensure(key)
        build_ms = (time.perf_counter() - built) * 1000
        restored: list[float] = []
        for i in range(restores):
            started = time.perf_counter()
            vm = await store.restore(key, Path(tmp) / f"r{i}", fresh_identity(f"bench-{i}"))
            try:
                restored.append((time.perf_counter() - started) * 1000)
            finally:
                await vm.kill()
    return {
        "benchmark": "vm_boot",
        "boots": boots,
        "start_to_ready_p50_ms": round(statistics.median(times), 1),
        "start_to_ready_p99_ms": round(_pct(times, 0.99), 1),
        "start_to_ready_min_ms": round(min(times), 1),
        "restores": restores,
        "restore_to_ready_p50_ms": round(statistics.median(restored), 1) if restored else None,
        "restore_to_ready_min_ms": round(min(restored), 1) if restored else None,
        "snapshot_build_ms": round(build_ms, 1),
        "snapshot_mib": round(snap.size / (1 << 20), 1),
        "accel": accel,
        "guest_kernel": kernel,
        "memory_mib": memory_mib,
        "cpus": cpus,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--restores", type=int, default=5)
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(run(args.boots, args.restores, args.memory_mib, args.cpus))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
