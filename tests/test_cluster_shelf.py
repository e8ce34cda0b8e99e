"""The head's snapshot shelf over the nodes, as a unit (an extra layer under the real
two-node tests in test_cluster.py): which node a snapshot call goes to, how listings
merge, what a lost node or a taken name does. The nodes here are stand-ins."""

from __future__ import annotations

from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

import pytest

from ironclaw.cluster.shelf import ClusterShelf
from ironclaw.errors import Conflict, SandboxLost
from ironclaw.host.snapshots import Snapshot, SnapshotCorrupt, SnapshotNotFound


def _snap(name: str, memory: int = 256) -> Snapshot:
    spec = {"limits": {"memory_mib": memory}}
    return Snapshot(name, "0" * 64, 1, 0.0, "src", "namespace", spec)


class _Node:
    """A node actor's snapshot methods over a dict: name -> (snapshot, owner)."""

    def __init__(self, name: str, snaps: dict[str, tuple[Snapshot, str | None]]) -> None:
        self.name, self.snaps, self.calls, self.broken = name, snaps, [], False

    def __getattr__(self, method: str) -> Any:
        async def call(*args: Any) -> Any:
            self.calls.append((method, *args))
            if self.broken:
                raise SandboxLost(f"node {self.name} was lost (test)")
            return getattr(self, f"_{method}")(*args)

        return SimpleNamespace(remote=call)

    def _snapshot_find(self, name: str, owner: str | None) -> Snapshot:
        if name == "bad":
            raise SnapshotCorrupt("snapshot 'bad' is corrupted")
        snap, by = self.snaps.get(name, (None, None))
        if snap is None or (owner is not None and by != owner):
            raise SnapshotNotFound(name)
        return snap

    def _snapshot_list(self, owner: str | None) -> list[Snapshot]:
        return [s for s, by in self.snaps.values() if owner is None or by == owner]

    def _snapshot_remove(self, name: str) -> None:
        del self.snaps[name]

    def _snapshot_create(self, sid: str, name: str, owner: str | None, via: str | None) -> Snapshot:
        self.snaps[name] = (_snap(name), owner)
        return self.snaps[name][0]


def _cluster(*nodes: _Node) -> Any:
    made: list[tuple[Any, ...]] = []

    async def on(name: str, call: Awaitable[Any]) -> Any:
        return await call

    async def make_on(node: str, sid: str, memory: int, method: str, *args: Any) -> Any:
        made.append((node, sid, memory, method, *args))
        return SimpleNamespace(id=sid)

    return SimpleNamespace(
        nodes={n.name: SimpleNamespace(name=n.name, actor=n, lost_reason=None) for n in nodes},
        on=on,
        make_on=make_on,
        route=lambda sid: ("b", nodes[1]),
        made=made,
    )


async def test_a_snapshot_is_found_listed_and_restored_on_its_own_node() -> None:
    a = _Node("a", {"zeta": (_snap("zeta"), "t1"), "mine-a": (_snap("mine-a"), "t2")})
    b = _Node("b", {"alpha": (_snap("alpha", 128), "t1")})
    cluster = _cluster(a, b)
    shelf = ClusterShelf(cluster)
    assert [s.name for s in await shelf.listing("t1")] == ["alpha", "zeta"]  # merged, by name
    assert [s.name for s in await shelf.listing(None)] == ["alpha", "mine-a", "zeta"]
    with pytest.raises(SnapshotNotFound):
        await shelf.find("alpha", "t2")  # another token's is not found
    assert (await shelf.find("alpha", "t1")).name == "alpha"
    record = await shelf.restore("alpha", {"limits": {"memory_mib": 192}}, "sb-new")
    assert record.id == "sb-new"
    assert cluster.made == [("b", "sb-new", 192, "restore", "alpha", {"limits":
                            {"memory_mib": 192}}, "sb-new", None)]  # fmt: skip
    await shelf.remove("zeta")
    assert "zeta" not in a.snaps and not any(c[0] == "snapshot_remove" for c in b.calls)


async def test_a_lost_node_is_left_out_and_a_taken_name_is_refused() -> None:
    a = _Node("a", {"base": (_snap("base"), "t1")})
    b = _Node("b", {"other": (_snap("other"), "t1")})
    cluster = _cluster(a, b)
    shelf = ClusterShelf(cluster)
    with pytest.raises(Conflict, match="'base' exists"):
        await shelf.create("sb-on-b", "base", "t1")  # a has it: taken for b too
    with pytest.raises(Conflict, match="'bad' exists"):
        await shelf.create("sb-on-b", "bad", "t1")  # a corrupt one still holds its name
    assert (await shelf.create("sb-on-b", "new", "t1")).name == "new"
    assert "new" in b.snaps and "new" not in a.snaps  # on the sandbox's node
    b.broken = True  # lost while asked
    assert [s.name for s in await shelf.listing("t1")] == ["base"]
    cluster.nodes["a"].lost_reason = "node a was lost (test)"
    assert await shelf.listing(None) == []
    with pytest.raises(SnapshotNotFound, match="on any live node"):
        await shelf.find("base")
