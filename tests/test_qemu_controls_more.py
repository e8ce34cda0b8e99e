"""Lifetimes, pause, snapshot forks and a live policy change on real QEMU VMs (TCG).

The VM side of what tests/test_sandbox_controls.py and tests/test_sandbox_net_update.py
show on the namespace backend. Each VM starts by restoring the image's agent-ready
snapshot, so the VMs here are cheap; the bounds are generous for TCG on a busy host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ironclaw.errors import SandboxError, TransportError
from ironclaw.host.manager import SandboxManager
from ironclaw.images import ImageArtifacts
from ironclaw.sdk import Sandbox
from nethelpers import PeerHost, probe_in_sandbox
from test_qemu_backend import vm_image, vm_snapshots  # noqa: F401  (fixtures)
from test_sandbox_controls import WORKSPACE_HASH

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(900)]

SPEC: dict[str, object] = {"backend": "qemu", "limits": {"memory_mib": 384, "workspace_mib": 64}}
READY = 240  # TCG on a loaded host


async def until(check: Callable[[], Awaitable[bool]], limit: float = 240.0) -> None:
    """Wait for ``check`` to hold (an event, not a timing assertion)."""
    async with asyncio.timeout(limit):
        while not await check():
            await asyncio.sleep(0.3)


async def sh(manager: SandboxManager, sid: str, script: str) -> str:
    r = await manager.exec(sid, ["sh", "-c", script], timeout=240)
    assert r.exit_code == 0, (script, r.stderr)
    return r.stdout.decode().strip()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def cpu_ticks(pid: int) -> int:
    """QEMU's CPU time (utime + stime of all its threads, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# -- lifetimes -------------------------------------------------------------------------


async def test_vm_idle_timeout_ends_the_idle_vm_not_the_busy_one_and_connect_is_not_activity(
    manager: SandboxManager,
    vm_image: ImageArtifacts,  # noqa: F811
) -> None:
    life = {"lifetime": {"idle_timeout_s": 12}}  # room for several connects under TCG
    idle = await manager.create({**SPEC, **life}, ready_timeout=READY)
    busy = await manager.create({**SPEC, **life}, ready_timeout=READY)
    # QEMU's channel socket serves one client at a time: this manager lets go of the
    # idle VM's, so that other processes can connect to it.
    await (await manager.peer(idle.id)).aclose()
    connects = 0

    async def idle_is_dead() -> bool:
        nonlocal connects
        await manager.exec(busy.id, ["true"], timeout=240)  # activity on the busy one only
        if (await manager.get(idle.id)).state == "dead":
            return True
        # A fresh channel to the idle VM, as another process would open: not activity.
        other = SandboxManager(manager.settings, reconcile_on_open=False)
        await other.open()
        try:
            # It may end while the channel opens (a reset): what this waits for.
            with contextlib.suppress(SandboxError, TransportError):
                await other.peer(idle.id)
                connects += 1
        finally:
            await other.aclose()
        return False

    await until(idle_is_dead)
    assert connects >= 3  # it was connected to throughout its idle time
    dead = await manager.get(idle.id)
    assert dead.reason == "timeout: idle for 12s"
    await until(lambda: _gone(int(idle.info["pid"])), 60)  # its QEMU ended too
    assert (await manager.get(busy.id)).state == "running"
    assert (await manager.exec(busy.id, ["echo", "alive"], timeout=240)).stdout == b"alive\n"
    assert alive(int(busy.info["pid"]))


async def _gone(pid: int) -> bool:
    return not alive(pid)


async def test_vm_set_timeout_extends_then_shortens(
    manager: SandboxManager,
    vm_image: ImageArtifacts,  # noqa: F811
) -> None:
    # The first deadline is long enough for the VM to come up, then extended.
    rec = await manager.create({**SPEC, "lifetime": {"timeout_s": 30}}, ready_timeout=READY)
    first_deadline = time.time() + 30  # armed during create, so no later than this
    await manager.set_timeout(rec.id, 600)
    await asyncio.sleep(max(0.0, first_deadline - time.time()) + 3)
    assert (await manager.get(rec.id)).state == "running"
    assert await sh(manager, rec.id, "echo still") == "still"
    await manager.set_timeout(rec.id, 0.5)

    async def dead() -> bool:
        return (await manager.get(rec.id)).state == "dead"

    await until(dead)
    assert (await manager.get(rec.id)).reason == "timeout: deadline reached"
    await until(lambda: _gone(int(rec.info["pid"])), 60)


# -- pause / resume --------------------------------------------------------------------

LOOP = (
    "python3 -c 'import os\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    if n % 20000 == 0:\n"
    '        open("/tmp/n.tmp", "w").write(str(n)); os.replace("/tmp/n.tmp", "/tmp/n")\n'
    "' >/dev/null 2>&1 &"
)


async def test_vm_pause_stops_a_cpu_bound_loop_and_resume_continues_it(
    manager: SandboxManager,
    vm_image: ImageArtifacts,  # noqa: F811
) -> None:
    rec = await manager.create(SPEC, ready_timeout=READY)
    pid = int(rec.info["pid"])
    r = await manager.exec(rec.id, ["sh", "-c", LOOP], keep_background=True, timeout=240)
    assert r.exit_code == 0, r.stderr

    async def counter() -> int:
        return int(await sh(manager, rec.id, "cat /tmp/n 2>/dev/null || echo 0"))

    async def counting() -> bool:
        return await counter() > 0

    await until(counting)

    async def cpu_grows() -> bool:
        before = cpu_ticks(pid)
        await asyncio.sleep(1.0)
        return cpu_ticks(pid) > before

    await until(cpu_grows)
    at_pause = await counter()
    await manager.pause(rec.id)
    assert (await manager.get(rec.id)).state == "paused"
    frozen = cpu_ticks(pid)
    await asyncio.sleep(2.0)
    assert cpu_ticks(pid) - frozen <= 1, (frozen, cpu_ticks(pid))  # a stopped guest burns nothing
    assert alive(pid)  # paused, not ended: its memory is held
    with pytest.raises(SandboxError, match="paused"):
        await manager.exec(rec.id, ["true"])

    await manager.resume(rec.id)
    await until(cpu_grows)

    async def went_on() -> bool:
        return await counter() > at_pause

    await until(went_on)  # the same loop, counting on from where it stopped


# -- snapshot forks --------------------------------------------------------------------


async def test_vm_snapshot_forks_into_three_with_the_same_workspace(
    manager: SandboxManager,
    vm_image: ImageArtifacts,  # noqa: F811
) -> None:
    src = await manager.create(SPEC, ready_timeout=READY)
    await manager.write_file(src.id, "notes/a.txt", b"in the vm")
    await manager.write_file(src.id, "data.bin", os.urandom(4096))
    await sh(manager, src.id, "cd /workspace && ln -s notes/a.txt link && chmod 600 data.bin")

    async def ws_hash(sid: str) -> str:
        r = await manager.exec(sid, ["python3", "-c", WORKSPACE_HASH], timeout=240)
        assert r.exit_code == 0, r.stderr
        return r.stdout.decode().strip()

    def sums(sid: str) -> Awaitable[str]:
        return sh(manager, sid, "cd /workspace && find . -type f | sort | xargs sha256sum")

    src_hash, src_sums = await ws_hash(src.id), await sums(src.id)
    assert "data.bin" in src_sums and "notes/a.txt" in src_sums
    snap = await manager.snapshot(src.id, "vm-three")
    assert snap.kind == "vm" and snap.backend == "qemu"  # memory and devices, not files
    forks = [await manager.restore(snap, ready_timeout=READY) for _ in range(3)]
    assert len({f.id for f in forks} | {src.id}) == 4
    for fork in forks:
        assert fork.backend == "qemu"
        assert await ws_hash(fork.id) == src_hash
        assert await sums(fork.id) == src_sums
    # Each fork is its own machine: a change in one is nowhere else, the source unchanged.
    await sh(manager, forks[0].id, "echo mine > /workspace/notes/a.txt")
    for other in (forks[1].id, forks[2].id, src.id):
        assert await ws_hash(other) == src_hash
    assert await ws_hash(forks[0].id) != src_hash


# -- live network policy ---------------------------------------------------------------


@pytest.fixture
async def peer() -> AsyncIterator[PeerHost]:
    a = await PeerHost.start((8080, 8081, 8082))
    yield a
    await a.stop()


async def probe_in(mgr: SandboxManager, sid: str, targets: list[tuple[str, int]]) -> dict[str, str]:
    """TCP connects from inside the guest (python3 sockets): what each target answered."""
    return await probe_in_sandbox(mgr, sid, targets, wait=5, limit=240)


async def test_vm_live_policy_change_opens_one_peer_port_and_closes_another(
    manager: SandboxManager,
    vm_image: ImageArtifacts,  # noqa: F811
    peer: PeerHost,
) -> None:
    a = peer
    net = {"allow": [f"{a.ip}:8080/tcp", f"{a.ip}:8082/tcp"]}
    rec = await manager.create({**SPEC, "network": net}, ready_timeout=READY)
    other = await manager.create(
        {**SPEC, "network": {"allow": [f"{a.ip}:8080/tcp"]}}, ready_timeout=READY
    )
    ports = [(a.ip, 8080), (a.ip, 8081), (a.ip, 8082)]
    before = await probe_in(manager, rec.id, ports)
    assert before[f"{a.ip}:8080"] == a.reply(8080), before
    assert before[f"{a.ip}:8081"].startswith("err:"), before
    assert before[f"{a.ip}:8082"] == a.reply(8082), before
    theirs_before = await probe_in(manager, other.id, ports)

    sb = Sandbox(manager, rec, owns=False)
    policy = await sb.network.update(allow=[f"{a.ip}:8081/tcp", f"{a.ip}:8082/tcp"])
    assert [str(r.port) for r in policy.allow] == ["8081", "8082"]

    after = await probe_in(manager, rec.id, ports)
    assert after[f"{a.ip}:8080"].startswith("err:"), after  # closed
    assert after[f"{a.ip}:8081"] == a.reply(8081), after  # opened
    assert after[f"{a.ip}:8082"] == a.reply(8082), after  # unchanged
    # Nothing else changed: the other VM keeps its own rules, packet for packet.
    theirs = await probe_in(manager, other.id, ports)
    assert theirs == theirs_before
    assert theirs[f"{a.ip}:8080"] == a.reply(8080), theirs
    assert theirs[f"{a.ip}:8081"].startswith("err:"), theirs
    assert theirs[f"{a.ip}:8082"].startswith("err:"), theirs
    stored = (await manager.get(rec.id)).spec["network"]["allow"]
    assert [r["port"] for r in stored] == [8081, 8082]
    assert [r["port"] for r in (await manager.get(other.id)).spec["network"]["allow"]] == [8080]
