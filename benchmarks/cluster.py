"""What the cluster layer costs, and what a second node gives.

Starts a local Ray cluster (``ray start`` on 127.0.0.1, then a second node on 127.0.0.2,
each its own IronClaw host: home, uid range, cgroup root, address pool), then prints
one JSON line:

* ``single_p50_ms`` / ``cluster_p50_ms`` / ``ratio``: create -> exec ``true`` -> destroy
  through the single-host manager the service uses versus the cluster's manager (one
  node: the routing overhead: placement, an actor hop, the node's manager), alternated
  in the same run;
* ``stdin_echo_p50_ms``: an interactive exec (``cat``, stdin open): one line sent, its
  echo received, on one host (the channel in this process) and through the cluster
  (stdin as an actor call, output from the node's streaming generator);
* ``controls_p50_ms``: on one sandbox, pause + resume, ``set_timeout``, a workspace
  snapshot and a restore from it, on one host and through the cluster (one actor hop
  each; the snapshot stays on the node);
* ``creates_per_s``: ``--burst`` sandboxes created ``--parallel`` at a time, with one node
  and then with two (both nodes share this machine's cores, so a second node adds
  placement spread, not CPU).

    python benchmarks/cluster.py --json [--rounds 15 --burst 8 --parallel 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ironclaw.cluster.links import ExecPipe, ExecSession
from ironclaw.cluster.manager import ClusterManager
from ironclaw.cluster.shelf import Shelf, SnapshotShelf
from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from raycluster import RayCluster

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


async def lifecycle(mgr: SandboxManager) -> float:
    t0 = time.perf_counter()
    record = await mgr.create({})
    try:
        result = await mgr.exec(record.id, ["true"])
        assert result.exit_code == 0
    finally:
        await mgr.destroy(record.id)
    return (time.perf_counter() - t0) * 1000


CAT = {"argv": ["cat"], "env": None, "cwd": None, "timeout": None, "keep_background": False}


async def echo_p50(session: ExecSession, rounds: int) -> float:
    """One line to a running ``cat``, its echo back: the p50 round trip in ms."""
    items = session.items().__aiter__()
    times = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            await session.send(b"x\n")
            kind, data = await items.__anext__()
            assert (kind, data) == ("stdout", b"x\n"), (kind, data)
            times.append((time.perf_counter() - t0) * 1000)
        await session.eof()
        async for kind, _ in items:
            if kind == "exit":
                break
    finally:
        await session.aclose()
    return statistics.median(times)


async def echoes(single: SandboxManager, cluster: ClusterManager, rounds: int) -> dict[str, float]:
    a, b = await single.create({}), await cluster.create({})
    try:
        local = await echo_p50(ExecPipe(await single.peer(a.id), CAT, stdin=True), rounds)
        remote = await echo_p50(await cluster.open_exec(b.id, CAT, stdin=True), rounds)
    finally:
        await single.destroy(a.id)
        await cluster.destroy(b.id)
    return {"single": round(local, 2), "cluster": round(remote, 2)}


async def controls(mgr: SandboxManager, rounds: int) -> dict[str, float]:
    shelf: Shelf = getattr(mgr, "snapshot_shelf", None) or SnapshotShelf(mgr)
    record = await mgr.create({"limits": {"memory_mib": 128}})
    times: dict[str, list[float]] = {"pause_resume": [], "set_timeout": [], "snapshot": [],
                                     "restore": []}  # fmt: skip
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            await mgr.pause(record.id)
            await mgr.resume(record.id)
            t1 = time.perf_counter()
            await mgr.set_timeout(record.id, 600)
            t2 = time.perf_counter()
            name = f"bench-{secrets.token_hex(4)}"
            await mgr.snapshot(record.id, name)
            t3 = time.perf_counter()
            made = await mgr.restore(name)
            t4 = time.perf_counter()
            await mgr.destroy(made.id)
            await shelf.remove(name)
            for key, ms in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[key].append(ms * 1000)
    finally:
        await mgr.destroy(record.id)
    return {key: round(statistics.median(v), 1) for key, v in times.items()}


async def burst(mgr: ClusterManager, count: int, parallel: int) -> tuple[float, dict[str, int]]:
    gate = asyncio.Semaphore(parallel)

    async def one() -> str:
        async with gate:
            return (await mgr.create({"limits": {"memory_mib": 128}})).id

    t0 = time.perf_counter()
    ids = await asyncio.gather(*(one() for _ in range(count)))
    rate = count / (time.perf_counter() - t0)
    spread: dict[str, int] = {}
    for sid in ids:
        node = mgr.cluster.placement(sid)
        spread[node] = spread.get(node, 0) + 1
    for sid in ids:
        await mgr.destroy(sid)
    return rate, spread


async def run(args: argparse.Namespace, base: Path, rc: RayCluster) -> dict[str, Any]:
    os.environ["IRONCLAW_NET_POOL"] = "10.243.0.0/16"
    single = SandboxManager(
        Settings.from_env({"IRONCLAW_HOME": str(base / "single")}),
        uid_base=1_400_000_000 + secrets.randbelow(1000) * 20_000,
        cgroup_root="ironclaw-bench-cluster-single",
    )
    await single.open()
    cluster = ClusterManager(Settings.from_env({"IRONCLAW_HOME": str(base / "head")}),
                             address=rc.address)  # fmt: skip
    await cluster.open()
    try:
        s_ms, c_ms = [], []
        await lifecycle(single), await lifecycle(cluster)  # warm-up
        for _ in range(args.rounds):
            s_ms.append(await lifecycle(single))
            c_ms.append(await lifecycle(cluster))
        echo = await echoes(single, cluster, 4 * args.rounds)
        ctl = {"single": await controls(single, max(3, args.rounds // 3)),
               "cluster": await controls(cluster, max(3, args.rounds // 3))}  # fmt: skip
        one_rate, one_spread = await burst(cluster, args.burst, args.parallel)
        rc.add_node("b", "127.0.0.2")
        deadline = time.monotonic() + 240
        while "b" not in cluster.cluster.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError("node b did not join")
            await asyncio.sleep(0.5)
        two_rate, two_spread = await burst(cluster, args.burst, args.parallel)
    finally:
        await cluster.aclose()
        await single.aclose(destroy_owned=True)
    s50, c50 = statistics.median(s_ms), statistics.median(c_ms)
    return {
        "rounds": args.rounds,
        "single_p50_ms": round(s50, 1),
        "cluster_p50_ms": round(c50, 1),
        "ratio": round(c50 / s50, 2),
        "routing_overhead_ms": round(c50 - s50, 1),
        "stdin_echo_p50_ms": echo,
        "controls_p50_ms": ctl,
        "creates_per_s": {"one_node": round(one_rate, 2), "two_nodes": round(two_rate, 2)},
        "spread": {"one_node": one_spread, "two_nodes": two_spread},
        "burst": args.burst,
        "parallel": args.parallel,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="icbc") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o700)
        rc = RayCluster(base)
        try:
            rc.start("a")
            result = asyncio.run(run(ns, base, rc))
        finally:
            rc.stop()
            rc.cleanup()
    print(json.dumps(result) if ns.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
