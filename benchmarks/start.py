"""Sandbox start cost: create -> first exec result -> destroy, against the raw floor.

Prints one JSON line. The raw floor is measured in the same run: a bare
``bwrap --unshare-all ... true`` plus a bare ``python3 -c pass`` (the agent is Python),
so ``ratio`` says what IronClaw adds on this machine, whatever its speed. ``ratio`` is a
cold start; ``ratio_warm`` takes the sandbox from the warm pool (refilled between runs,
outside the timed region) and still includes the full destroy. ``cold_create_exec_*``
and ``ratio_create_exec`` stop the clock at the first exec's result (the destroy after it
is left out): the latency a caller waits for its first answer.

    python benchmarks/start.py --json [--runs 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager

RAW_BWRAP = [
    "bwrap",
    "--unshare-all",
    "--unshare-user",
    "--die-with-parent",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--",
    "/usr/bin/true",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def time_cmd(argv: list[str], runs: int, preexec: object = None) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, preexec_fn=preexec)  # type: ignore[arg-type]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def drop() -> None:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


async def ironclaw_runs(runs: int) -> tuple[list[float], list[float], list[float]]:
    """(cold, warm) create -> exec -> destroy times, and cold create -> exec result; warm
    takes sandboxes from the pool, which is refilled between runs, outside the timed
    region."""
    cold, warm, first = [], [], []
    with tempfile.TemporaryDirectory(prefix="ironclaw-bench-") as home:
        os.chmod(home, 0o700)
        settings = Settings.from_env({"IRONCLAW_HOME": home})
        async with SandboxManager(settings, cgroup_root="ironclaw-bench") as manager:
            for _ in range(3):  # warm caches (guest bundle, imports)
                rec = await manager.create(one_shot=True, use_pool=False)
                await manager.exec(rec.id, ["true"])
                await manager.destroy(rec.id)
            for pooled, out in ((False, cold), (True, warm)):
                for _ in range(runs):
                    if pooled:
                        await manager.fill_pool({}, size=1)
                    t0 = time.perf_counter()
                    rec = await manager.create(one_shot=True, use_pool=pooled)
                    result = await manager.exec(rec.id, ["true"])
                    if not pooled:
                        first.append((time.perf_counter() - t0) * 1000)
                    await manager.destroy(rec.id)
                    out.append((time.perf_counter() - t0) * 1000)
                    assert result.exit_code == 0
                    assert (rec.rid != rec.id) == pooled
    return cold, warm, first


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    bwrap = time_cmd(RAW_BWRAP, args.runs, drop)
    python = time_cmd(["/usr/bin/python3", "-c", "pass"], args.runs)
    cold, warm, first = asyncio.run(ironclaw_runs(args.runs))
    raw_p50 = statistics.median(bwrap) + statistics.median(python)
    doc = {
        "benchmark": "start",
        "runs": args.runs,
        "create_exec_destroy_p50_ms": round(statistics.median(cold), 2),
        "create_exec_destroy_p99_ms": round(pct(cold, 0.99), 2),
        "cold_create_exec_p50_ms": round(statistics.median(first), 2),
        "cold_create_exec_p99_ms": round(pct(first, 0.99), 2),
        "warm_create_exec_destroy_p50_ms": round(statistics.median(warm), 2),
        "warm_create_exec_destroy_p99_ms": round(pct(warm, 0.99), 2),
        "raw_bwrap_true_p50_ms": round(statistics.median(bwrap), 2),
        "raw_python_pass_p50_ms": round(statistics.median(python), 2),
        "raw_floor_p50_ms": round(raw_p50, 2),
        "ratio": round(statistics.median(cold) / raw_p50, 2),
        "ratio_create_exec": round(statistics.median(first) / raw_p50, 2),
        "ratio_warm": round(statistics.median(warm) / raw_p50, 2),
        "target_ratio": 3.0,
        "target_ratio_warm": 1.5,
    }
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
