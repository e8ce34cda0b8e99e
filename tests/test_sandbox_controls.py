"""Lifetimes, labels, pause/resume, snapshots and fork on real namespace sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ironclaw.errors import ConfigError, SandboxError
from ironclaw.host.manager import SandboxManager
from ironclaw.host.snapshots import ARCHIVE, SnapshotCorrupt, SnapshotStore, check_archive
from ironclaw.resources.store import SandboxRecord
from ironclaw.sdk import Sandbox
from ironclaw.spec import parse_spec

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# A digest of /workspace: every path, its type and mode, file contents, link targets.
WORKSPACE_HASH = r"""
import hashlib, os, stat
h = hashlib.sha256()
for root, dirs, files in os.walk("/workspace"):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(root, name)
        st = os.lstat(p)
        h.update(f"{os.path.relpath(p, '/workspace')} {oct(st.st_mode)}\n".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(p).encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(open(p, "rb").read())
print(h.hexdigest())
"""


async def until(check: Callable[[], Awaitable[bool]], limit: float = 30.0) -> None:
    """Wait for ``check`` to hold (an event, not a timing assertion)."""
    async with asyncio.timeout(limit):
        while not await check():
            await asyncio.sleep(0.2)


async def state_of(manager: SandboxManager, sid: str) -> SandboxRecord:
    return await manager.get(sid)


async def workspace_hash(manager: SandboxManager, sid: str) -> str:
    r = await manager.exec(sid, ["python3", "-c", WORKSPACE_HASH])
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode().strip()


# -- labels ----------------------------------------------------------------------------


def test_labels_are_validated() -> None:
    assert parse_spec({"labels": {"team": "x", "app.io/tier": "web-1"}}).labels["team"] == "x"
    for bad in ({"Team": "x"}, {"team": "a b"}, {"": "x"}, {"t": "x" * 64}):
        with pytest.raises(ConfigError, match="label"):
            parse_spec({"labels": bad})


async def test_labels_and_state_filter(manager: SandboxManager) -> None:
    a = await manager.create({"labels": {"team": "x", "env": "dev"}})
    b = await manager.create({"labels": {"team": "y"}})
    await manager.create()
    assert [r.id for r in await manager.select(labels={"team": "x"})] == [a.id]
    assert [r.id for r in await manager.select(labels={"team": "y"}, state="running")] == [b.id]
    assert await manager.select(labels={"team": "x", "env": "prod"}) == []
    await manager.pause(b.id)
    assert [r.id for r in await manager.select(state="paused")] == [b.id]
    assert await manager.select(labels={"team": "y"}, state="running") == []


# -- pause / resume --------------------------------------------------------------------


async def test_pause_stops_a_cpu_bound_loop_and_resume_continues_it(
    manager: SandboxManager,
) -> None:
    rec = await manager.create()
    await manager.write_file(rec.id, "keep.txt", b"kept across the pause")
    await manager.exec(
        rec.id, ["sh", "-c", "while :; do :; done >/dev/null 2>&1 &"], keep_background=True
    )
    cg = manager.cgroups.open(rec.rid)

    async def cpu_grows() -> bool:
        before = cg.stats().cpu_usage_ns
        await asyncio.sleep(0.3)
        return cg.stats().cpu_usage_ns > before

    await until(cpu_grows)
    await manager.pause(rec.id)
    assert (await manager.get(rec.id)).state == "paused"
    frozen = cg.stats().cpu_usage_ns
    await asyncio.sleep(1.0)
    assert cg.stats().cpu_usage_ns == frozen  # not one nanosecond while paused
    assert cg.stats().memory_current_bytes > 0  # its memory is still held
    with pytest.raises(SandboxError, match="paused"):
        await manager.exec(rec.id, ["true"])
    await manager.resume(rec.id)
    await until(cpu_grows)
    assert await manager.read_file(rec.id, "keep.txt") == b"kept across the pause"


# -- lifetimes -------------------------------------------------------------------------


async def test_idle_timeout_ends_an_idle_sandbox_not_a_busy_one_and_connect_is_not_activity(
    manager: SandboxManager, settings: object
) -> None:
    life = {"lifetime": {"idle_timeout_s": 4}}  # room for several connects on a slow host
    idle = await manager.create(life)
    busy = await manager.create(life)
    connects = 0

    async def idle_is_dead() -> bool:
        nonlocal connects
        await manager.exec(busy.id, ["true"])  # activity on the busy one only
        if (await manager.get(idle.id)).state == "dead":
            return True
        # Connecting to the idle one (a fresh channel, as another process would): not activity.
        other = SandboxManager(manager.settings, reconcile_on_open=False)
        await other.open()
        try:
            with contextlib.suppress(SandboxError):
                await other.peer(idle.id)
                connects += 1
        finally:
            await other.aclose()
        return False

    await until(idle_is_dead)
    assert connects >= 3  # it was connected to throughout its idle time
    dead = await manager.get(idle.id)
    assert dead.reason == "timeout: idle for 4s"
    assert (await manager.get(busy.id)).state == "running"
    assert (await manager.exec(busy.id, ["echo", "alive"])).stdout == b"alive\n"
    report = await manager.reconcile(scan=False)  # gc removes the ended one
    assert any(idle.id in line for line in report.removed)


async def test_set_timeout_extends_and_shortens(manager: SandboxManager) -> None:
    rec = await manager.create({"lifetime": {"timeout_s": 2}})
    await manager.set_timeout(rec.id, 60)
    await asyncio.sleep(3.5)  # past the first deadline
    assert (await manager.get(rec.id)).state == "running"
    await manager.set_timeout(rec.id, 0.5)

    async def dead() -> bool:
        return (await manager.get(rec.id)).state == "dead"

    await until(dead)
    assert (await manager.get(rec.id)).reason == "timeout: deadline reached"


async def test_on_timeout_pause_keeps_the_workspace_until_resumed(
    manager: SandboxManager,
) -> None:
    rec = await manager.create({"lifetime": {"timeout_s": 1, "on_timeout": "pause"}})
    await manager.write_file(rec.id, "f.txt", b"still here")

    async def paused() -> bool:
        return (await manager.get(rec.id)).state == "paused"

    await until(paused)
    with pytest.raises(SandboxError, match="new timeout"):
        await manager.resume(rec.id)
    await manager.resume(rec.id, timeout=60)
    assert await manager.read_file(rec.id, "f.txt") == b"still here"


async def test_gc_applies_a_lifetime_whose_watchdog_was_killed(manager: SandboxManager) -> None:
    from ironclaw.resources.lifetime import read_lifetime, write_lifetime

    rec = await manager.create({"lifetime": {"timeout_s": 600}})
    run_dir = manager.settings.sandbox_runtime_dir(rec.rid)
    doc = read_lifetime(run_dir)
    assert doc is not None
    os.kill(doc["watchdog"], signal.SIGKILL)
    doc["deadline"] = 1.0  # long past
    write_lifetime(run_dir, doc)
    report = await manager.reconcile(scan=False)
    assert any(rec.id in line and "deadline" in line for line in report.removed), report


# -- snapshots -------------------------------------------------------------------------


async def test_snapshot_restored_into_three_forks_with_the_same_workspace(
    manager: SandboxManager,
) -> None:
    src = await manager.create({"labels": {"role": "src"}})
    await manager.write_file(src.id, "data/a.txt", b"alpha")
    await manager.write_file(src.id, "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    await manager.exec(
        src.id, ["sh", "-c", "ln -s data/a.txt link && mkdir -m 700 priv && chmod 666 data/a.txt"]
    )
    want = await workspace_hash(manager, src.id)
    snap = await manager.snapshot(src.id, "base")
    assert [s.name for s in manager.snapshots().all()] == ["base"]
    forks = await manager.fork(snap, 3)
    assert len({f.id for f in forks}) == 3
    for f in forks:
        assert await workspace_hash(manager, f.id) == want
        r = await manager.exec(
            f.id, ["sh", "-c", "readlink link; ./run.sh; stat -c %a priv data/a.txt"]
        )
        assert r.stdout == b"data/a.txt\nhi\n700\n666\n"
        assert (await manager.get(f.id)).spec["labels"] == {"role": "src"}
    # Forks are independent: a change in one is not seen in another.
    await manager.write_file(forks[0].id, "data/a.txt", b"changed")
    assert await manager.read_file(forks[1].id, "data/a.txt") == b"alpha"


async def test_sdk_snapshot_and_create_from_snapshot(settings: object) -> None:
    async with Sandbox.create() as sb:
        await sb.files.write("x.txt", "from the sdk")
        snap = await sb.snapshot("sdk-snap")
        async with Sandbox.create(from_snapshot=snap) as copy:
            assert await copy.files.read("x.txt") == b"from the sdk"


async def test_a_tampered_snapshot_is_refused_and_nothing_is_created(
    manager: SandboxManager,
) -> None:
    src = await manager.create()
    await manager.write_file(src.id, "a.txt", b"original content")
    snap = await manager.snapshot(src.id, "tamper")
    archive = manager.snapshots().path("tamper") / ARCHIVE
    data = bytearray(archive.read_bytes())
    at = data.index(b"original")
    data[at : at + 8] = b"tampered"
    archive.write_bytes(bytes(data))
    before = {r.id for r in await manager.store.all()}
    with pytest.raises(SnapshotCorrupt, match="corrupted"):
        await manager.restore(snap)
    assert {r.id for r in await manager.store.all()} == before


def _tar(path: Path, add: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(path, "w") as tar:
        add(tar)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("/etc/passwd"), "outside"),
        (_member("../escape"), "outside"),
        (_member("a/../../escape"), "outside"),
        (_member("dev", tarfile.CHRTYPE), "device"),
        (_member("fifo", tarfile.FIFOTYPE), "device"),
        (_member("l", tarfile.SYMTYPE, "/etc/shadow"), "points outside"),
        (_member("d/l", tarfile.SYMTYPE, "../../x"), "points outside"),
        (_member("h", tarfile.LNKTYPE, "../x"), "points outside"),
    ],
)
def test_unsafe_archive_members_are_refused(
    tmp_path: Path, member: tarfile.TarInfo, why: str
) -> None:
    path = _tar(tmp_path / "bad.tar", lambda t: t.addfile(member))
    with pytest.raises(SnapshotCorrupt, match=why):
        check_archive(path, max_bytes=1 << 20)


def test_archive_size_is_bounded_and_safe_links_pass(tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("big")
        info.size = 4096
        tar.addfile(info, io.BytesIO(b"x" * 4096))
        tar.addfile(_member("d/ok", tarfile.SYMTYPE, "../big"))

    path = _tar(tmp_path / "t.tar", add)
    assert check_archive(path, max_bytes=8192) == 4096
    with pytest.raises(SnapshotCorrupt, match="more than"):
        check_archive(path, max_bytes=1000)


def test_snapshot_store_lists_only_complete_snapshots(settings: object) -> None:
    from ironclaw.config import Settings

    assert isinstance(settings, Settings)
    store = SnapshotStore(settings)
    tmp = store.new_temp("half")
    (tmp / ARCHIVE).write_bytes(b"partial")
    assert store.all() == []  # a temporary is never listed
    snap = store.stamp(tmp, name="half", source="sb-x", backend="namespace", spec={})
    store.commit(tmp, snap)
    assert [s.name for s in store.all()] == ["half"]
    with pytest.raises(ConfigError, match="exists"):
        store.new_temp("half")
    store.remove("half")
    assert store.all() == []
    assert json.dumps([p.name for p in store.root.iterdir()]) == "[]"


async def test_set_timeout_on_a_sandbox_without_a_lifetime_arms_one(
    manager: SandboxManager,
) -> None:
    rec = await manager.create()
    await manager.pause(rec.id)  # a manual pause first: the timer must still be armed
    await manager.resume(rec.id)
    await manager.set_timeout(rec.id, 0.5)

    async def dead() -> bool:
        return (await manager.get(rec.id)).state == "dead"

    await until(dead)
    assert (await manager.get(rec.id)).reason == "timeout: deadline reached"
