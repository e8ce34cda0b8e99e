"""Lifecycle: nothing leaks after crashes, the warm pool, graceful shutdown, loop stalls.

Leaks are checked by scanning the system (ip, nft, cgroupfs, /proc, the runtime
directory), never by asking the registry.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT, UID_BASE
from ironclaw.host.looplag import LoopLagMonitor
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.firewall import Firewall
from ironclaw.resources.procs import processes_with_uid_in
from nethelpers import PeerHost, probe, sh

pytestmark = pytest.mark.root
HERE = Path(__file__).resolve().parent


async def system_scan(home: Path) -> dict[str, list[str]]:
    """Every IronClaw object on this machine that belongs to this test session."""
    netns = [n.split()[0] for n in (await sh("ip", "netns", "list")).splitlines()]
    links = [
        line.split(":")[1].strip().split("@")[0]
        for line in (await sh("ip", "-o", "link")).splitlines()
    ]
    chains: list[str] = []
    elements: list[str] = []
    out = await sh("nft", "-j", "list", "table", "inet", "ironclaw", check=False)
    for obj in json.loads(out or '{"nftables": []}').get("nftables", []):
        if "chain" in obj and obj["chain"]["name"].startswith(("icc-", "icn-")):
            chains.append(obj["chain"]["name"])
        for kind in ("map", "set"):
            for elem in obj.get(kind, {}).get("elem", []) or []:
                key = elem[0] if isinstance(elem, list) else elem
                elements.append(f"{kind}:{key}")
    cgroups = [
        str(p)
        for ctrl in Path("/sys/fs/cgroup").iterdir()
        if (ctrl / CGROUP_ROOT).is_dir()
        for p in (ctrl / CGROUP_ROOT).iterdir()
        if p.is_dir()
    ]
    run = home / "run"
    return {
        "netns": sorted(n for n in netns if n.startswith("icns-")),
        "links": sorted(n for n in links if n.startswith("icv")),
        "chains": sorted(chains),
        "map_elements": sorted(elements),
        "cgroups": sorted(cgroups),
        "processes": sorted(str(p) for p, _ in processes_with_uid_in(UID_BASE, UID_BASE + 16384)),
        "runtime_dirs": sorted(p.name for p in (run / "sandboxes").glob("*")),
        "sockets": sorted(str(p) for p in run.rglob("*.sock")) if run.exists() else [],
    }


def leaks(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, list[str]]:
    return {
        k: sorted(set(after[k]) - set(before[k])) for k in after if set(after[k]) - set(before[k])
    }


def ironclaw_cli(*args: str, home: Path) -> str:
    import subprocess

    p = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", *args],
        env={**os.environ, "IRONCLAW_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


async def test_crashed_drivers_leave_nothing_after_gc(ironclaw_home: Path) -> None:
    peer = await PeerHost.start((8080,))
    try:
        # The table's base (chains, shard maps) is shared and rightly kept by gc: make sure
        # it exists before the first scan, whatever ran earlier, so only the crashes count.
        fw = Firewall()
        try:
            await fw.ensure_base()
        finally:
            fw.close()
        before = await system_scan(ironclaw_home)
        rng = random.Random(7)
        for _ in range(3):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "lifecycle_driver.py"), "20", peer.ip,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "IRONCLAW_HOME": str(ironclaw_home)},
            )  # fmt: skip
            assert proc.stdout is not None
            async with asyncio.timeout(60):
                assert (await proc.stdout.readline()).strip() == b"READY"
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        mid = await system_scan(ironclaw_home)
        assert leaks(before, mid), "the crash left nothing behind: the test proved nothing"
        report = json.loads(ironclaw_cli("gc", "--json", home=ironclaw_home))
        assert not report["errors"], report
        # One-shot-free sandboxes whose processes died with the driver may need a moment.
        after = await system_scan(ironclaw_home)
        left = leaks(before, after)
        detail = {
            p: Path(f"/proc/{p}/stat").read_text()[:200]
            for p in left.get("processes", [])
            if Path(f"/proc/{p}/stat").exists()
        }
        assert left == {}, (report, left, detail)
        ls = json.loads(ironclaw_cli("sandbox", "ls", "--json", home=ironclaw_home))
        assert ls["sandboxes"] == []
    finally:
        await peer.stop()


async def test_gc_dry_run_changes_nothing_and_gc_removes_dead(manager: SandboxManager) -> None:
    rec = await manager.create()
    os.kill(int(rec.info["pid"]), signal.SIGKILL)
    for _ in range(100):
        if (await manager.get(rec.id)).state == "dead":
            break
        await asyncio.sleep(0.05)
    assert (await manager.get(rec.id)).state == "dead"
    report = await manager.reconcile(dry_run=True)
    assert any(rec.id in r for r in report.removed)
    assert manager.cgroups.open(rec.id).dirs  # still there
    report = await manager.reconcile()
    assert any(rec.id in r for r in report.removed) and not report.errors
    assert manager.cgroups.list_owned() == []
    assert not manager.settings.sandbox_runtime_dir(rec.id).exists()
    assert await manager.store.all() == []


async def test_gc_removes_orphans_the_registry_does_not_know(manager: SandboxManager) -> None:
    rec = await manager.create()
    # Lose the registry row, as if the state file had been wiped.
    await manager.store.delete(rec.id)
    report = await manager.reconcile()
    kinds = " ".join(report.orphans)
    assert "cgroup" in kinds and "runtime directory" in kinds and "process" in kinds
    await asyncio.sleep(0.2)
    assert processes_with_uid_in(UID_BASE, UID_BASE + 16384) == []
    assert manager.cgroups.list_owned() == []


async def test_warm_pool_gives_final_id_limits_and_policy(manager: SandboxManager) -> None:
    peer = await PeerHost.start((8080, 8081))
    try:
        template = {"network": {"allow": ["127.0.0.1/32:9/udp"]}}
        assert await manager.fill_pool(template, size=2) == 2
        assert await manager.warm(template) == 2
        spec = {"network": {"allow": [f"{peer.ip}:8080"]}, "limits": {"memory_mib": 200}}
        rec = await manager.create(spec, sandbox_id="warm-one")
        r = await manager.exec(rec.id, ["echo", "warm"])
        assert r.stdout == b"warm\n"
        assert rec.id == "warm-one" and rec.rid.startswith("pool-") and rec.state == "running"
        assert await manager.warm(template) == 1
        cg = manager.cgroups.open(rec.rid)
        mem = next(d for d in cg.dirs if "memory" in d.controllers)
        assert int((mem.path / "memory.limit_in_bytes").read_text()) == 200 * 1024 * 1024
        net = rec.info["network"]
        got = await probe(net["netns_name"], [(peer.ip, 8080), (peer.ip, 8081)])
        assert got[f"{peer.ip}:8080"] == peer.reply(8080)
        assert got[f"{peer.ip}:8081"].startswith("err:")
        await manager.destroy("warm-one")
        assert rec.rid not in manager.cgroups.list_owned()
        assert not manager.settings.sandbox_runtime_dir(rec.rid).exists()
    finally:
        await peer.stop()


async def test_graceful_shutdown_removes_the_sandboxes_of_a_signalled_service(
    ironclaw_home: Path,
) -> None:
    script = (
        "import asyncio\n"
        "from ironclaw.host.manager import SandboxManager\n"
        "from ironclaw.host.lifecycle import run_until_signalled\n"
        "async def main():\n"
        "    async with SandboxManager() as m:\n"
        "        async def serve():\n"
        "            for i in range(2):\n"
        "                await m.create(sandbox_id=f'svc-{i}')\n"
        "            print('READY', flush=True)\n"
        "            await asyncio.Event().wait()\n"
        "        await run_until_signalled(m, serve)\n"
        "asyncio.run(main())\n"
    )
    before = await system_scan(ironclaw_home)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "IRONCLAW_HOME": str(ironclaw_home)},
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        assert (await proc.stdout.readline()).strip() == b"READY"
    assert len((await system_scan(ironclaw_home))["cgroups"]) > len(before["cgroups"])
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        await proc.wait()
    assert proc.returncode == 0
    assert leaks(before, await system_scan(ironclaw_home)) == {}


async def test_loop_lag_monitor_names_what_blocked_the_loop() -> None:
    def blocking_helper_for_test() -> None:
        time.sleep(0.08)

    async with LoopLagMonitor(threshold_ms=20) as mon:
        await asyncio.sleep(0.05)
        blocking_helper_for_test()
        await asyncio.sleep(0.05)
    assert mon.max_ms >= 60
    assert any("blocking_helper_for_test" in s.stack for s in mon.stalls)


@pytest.mark.slow
async def test_soak_500_cycles_leave_no_leaks_and_flat_resources(
    manager: SandboxManager, ironclaw_home: Path
) -> None:
    before = await system_scan(ironclaw_home)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def rss_kib() -> int:
        # Memory the program still holds: collect, and let the allocator hand back what
        # was freed (glibc keeps freed arena pages otherwise, and RSS then moves in steps
        # of tens of MiB that say nothing about leaks).
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    sem = asyncio.Semaphore(10)

    async def cycle(i: int) -> None:
        async with sem:
            rec = await manager.create({"limits": {"memory_mib": 64}}, use_pool=False)
            r = await manager.exec(rec.id, ["sh", "-c", f"echo {i}"])
            assert r.stdout == f"{i}\n".encode()
            await manager.destroy(rec.id)

    # 100 cycles to warm up (thread pool, malloc arenas), then four rounds of 100: memory
    # and descriptors must be flat across the rounds, not merely bounded.
    await asyncio.gather(*(cycle(i) for i in range(100)))
    samples = []
    for r in range(4):
        await asyncio.gather(*(cycle(100 * r + i) for i in range(100)))
        samples.append((fds(), rss_kib()))
    (fd1, rss1), (_, rss2), (fd4, rss4) = samples[0], samples[1], samples[-1]
    assert fd4 - fd1 <= 2, samples
    # A leak of even 50 KiB per cycle would add 15 MiB over these 300 cycles; the
    # allocator may still settle by a few MiB after the first round.
    assert rss4 - rss1 < 12 * 1024, samples
    assert rss4 - rss2 < 6 * 1024, samples
    assert leaks(before, await system_scan(ironclaw_home)) == {}


async def test_wait_gone_wakes_at_the_exit_and_ignores_a_recycled_pid() -> None:
    import subprocess

    from ironclaw.backends.base import process_start_time, wait_gone

    proc = subprocess.Popen(["sleep", "30"])
    start = process_start_time(proc.pid)
    assert await wait_gone(proc.pid, start, timeout=0.2) is False  # still running
    assert await wait_gone(proc.pid, (start or 0) + 1) is True  # another process's start
    waiter = asyncio.ensure_future(wait_gone(proc.pid, start, timeout=30))
    await asyncio.sleep(0.05)
    proc.kill()
    assert await asyncio.wait_for(waiter, 10) is True
    proc.wait()
