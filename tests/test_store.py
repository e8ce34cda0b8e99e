"""The registry: ids and slots claimed atomically, even across processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ironclaw.errors import ConfigError, SandboxNotFound
from ironclaw.resources.store import Batch, BlockingStore, Store


async def test_reserve_get_update_delete(tmp_path: Path) -> None:
    async with Store(tmp_path / "r.sqlite3") as store:
        rec = await store.reserve("a1", backend="namespace", spec={}, owner_pid=1, one_shot=False)
        assert rec.slot == 0 and rec.state == "creating"
        await store.update("a1", state="running", info={"pid": 5})
        await store.update("a1", info={"sock": "x"})
        got = await store.get("a1")
        assert got.state == "running" and got.info == {"pid": 5, "sock": "x"}
        with pytest.raises(ConfigError, match="already exists"):
            await store.reserve("a1", backend="namespace", spec={}, owner_pid=1, one_shot=False)
        rec2 = await store.reserve("a2", backend="namespace", spec={}, owner_pid=1, one_shot=False)
        assert rec2.slot == 1
        await store.delete("a1")
        with pytest.raises(SandboxNotFound):
            await store.get("a1")
        rec3 = await store.reserve("a3", backend="namespace", spec={}, owner_pid=1, one_shot=False)
        assert rec3.slot == 0  # freed slots are reused


async def test_intents_are_recorded_before_creation(tmp_path: Path) -> None:
    async with Store(tmp_path / "r.sqlite3") as store:
        await store.reserve("b1", backend="namespace", spec={}, owner_pid=1, one_shot=False)
        await store.intend("b1", "cgroup", "b1")
        rows = await store.resources("b1")
        assert [(r.kind, r.state) for r in rows] == [("cgroup", "intent")]
        await store.created("b1", "cgroup", "b1")
        assert (await store.resources("b1"))[0].state == "created"
        await store.removed("b1", "cgroup", "b1")
        assert await store.resources("b1") == []


async def test_a_batch_is_one_transaction(tmp_path: Path) -> None:
    async with Store(tmp_path / "r.sqlite3") as store:
        await store.reserve("c1", backend="namespace", spec={}, owner_pid=1, one_shot=False)
        await store.intend("c1", "runtime_dir", "/r")
        made = Batch().created("c1", "runtime_dir", "/r").intend("c1", "cgroup", "c1")
        assert await store.write(made) is None
        rows = await store.resources("c1")
        assert [(r.kind, r.state) for r in rows] == [
            ("runtime_dir", "created"),
            ("cgroup", "intent"),
        ]
        rec = await store.write(
            Batch().created("c1", "cgroup", "c1").update("c1", state="running", info={"p": 1}),
            then_get="c1",
        )
        assert rec is not None and (rec.state, rec.info) == ("running", {"p": 1})
        # A step that fails undoes the whole batch: no half-written progress.
        broken = Batch().removed("c1", "cgroup", "c1").intend("c1", "network", None)  # type: ignore[arg-type]
        with pytest.raises(Exception, match="NOT NULL"):
            await store.write(broken)
        assert [r.kind for r in await store.resources("c1")] == ["runtime_dir", "cgroup"]
        rec, rows = await store.begin_teardown("c1", "destroyed")
        assert (rec.state, rec.reason, len(rows)) == ("stopping", "destroyed", 2)
        await store.write(Batch().removed("c1", "cgroup", "c1").delete("c1"))
        assert await store.resources("c1") == []
        with pytest.raises(SandboxNotFound):
            await store.get("c1")


def test_the_blocking_store_runs_the_same_steps_on_the_calling_thread(tmp_path: Path) -> None:
    store = BlockingStore(tmp_path / "r.sqlite3").open()
    try:
        assert (store.reserve.__name__, store.write.__name__) == ("reserve", "write")
        rec = store.reserve("d1", backend="namespace", spec={}, owner_pid=1, one_shot=True)
        assert (rec.slot, rec.state, rec.one_shot) == (0, "creating", True)
        with pytest.raises(ConfigError, match="already exists"):
            store.reserve("d1", backend="namespace", spec={}, owner_pid=1, one_shot=True)
        assert store.write(Batch().intend("d1", "cgroup", "d1")) is None
        got = store.write(Batch().update("d1", state="running"), then_get="d1")
        assert got is not None and got.state == "running"
        rec, rows = store.begin_teardown("d1", "destroyed")
        assert (rec.state, [r.kind for r in rows]) == ("stopping", ["cgroup"])
        store.delete("d1")
        again = store.reserve("d2", backend="namespace", spec={}, owner_pid=1, one_shot=True)
        assert again.slot == 0  # the slot was freed
    finally:
        store.close()


def _claim(path: str, prefix: str, n: int, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> list[int]:
        async with Store(Path(path)) as store:
            slots = []
            for i in range(n):
                rec = await store.reserve(
                    f"{prefix}-{i}", backend="namespace", spec={}, owner_pid=None, one_shot=False
                )
                slots.append(rec.slot)
            return slots

    q.put(asyncio.run(main()))


def test_slots_are_unique_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(path, f"p{k}", 25, q)) for k in range(4)]
    for p in procs:
        p.start()
    slots = [s for _ in procs for s in q.get(timeout=60)]
    for p in procs:
        p.join(60)
    assert len(slots) == 100
    assert len(set(slots)) == 100


_OPEN_AT = """
import sys, time
from pathlib import Path
from ironclaw.resources.store import BlockingStore
at = float(sys.argv[2])
while time.time() < at:
    pass
BlockingStore(Path(sys.argv[1])).open()
"""


def test_processes_opening_a_new_registry_at_once_all_succeed(tmp_path: Path) -> None:
    # The first opens race to switch a new file to write-ahead logging; SQLite told
    # the losers "database is locked" at once (no busy wait), about one round in two.
    for rnd in range(8):
        path = tmp_path / f"new-{rnd}.sqlite3"
        at = str(time.time() + 0.5)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN_AT, str(path), at], stderr=subprocess.PIPE
            )
            for _ in range(6)
        ]
        errors = [p.communicate(timeout=60)[1].decode()[-300:] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors


async def test_an_older_registry_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE sandboxes (id TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE,"
        " backend TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,"
        " info TEXT NOT NULL DEFAULT '{}', reason TEXT, owner_pid INTEGER,"
        " one_shot INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL);"
        "INSERT INTO sandboxes VALUES ('old-1', 0, 'namespace', 'running', '{}', '{}', NULL,"
        " NULL, 0, 1.0, 1.0);"
    )
    db.close()
    async with Store(path) as store:
        assert (await store.get("old-1")).pool_key is None
        assert (
            await store.claim_pooled("k", "new-1", spec={}, owner={}, owner_pid=1, one_shot=False)
            is None
        )
