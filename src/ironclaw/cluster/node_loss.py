"""Node loss as the head handles it: marking a node's sandboxes lost, and recovering a
previous service's placements (kept where the node actor lived on, lost where not).

A lost sandbox stays known (as :class:`~ironclaw.cluster.registry.LostSandbox`) so every
later call on it says what happened instead of "not found".
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ironclaw.cluster.registry import PlacementRow, lost_sandbox
from ironclaw.errors import IronclawError

if TYPE_CHECKING:
    from ironclaw.cluster.cluster import Cluster

__all__ = ["mark_node_lost", "recover_placements"]


def mark_node_lost(cluster: Cluster, name: str, why: str) -> None:
    """Declare node ``name`` lost: each of its sandboxes answers with SandboxLost from now on."""
    node = cluster.nodes[name]
    if node.lost_reason is not None:
        return
    node.lost_reason = f"node {name} was lost ({why})"
    node.capacity.alive = False
    for sid, where in list(cluster.placements.items()):
        if where == name:
            del cluster.placements[sid]
            cluster.lost[sid] = lost_sandbox(sid, name, node.lost_reason)
            cluster._store.lose(sid, name, node.lost_reason)


async def recover_placements(cluster: Cluster, rows: list[PlacementRow]) -> None:
    """Placements of a previous service: kept where its node actor lives on (and
    still has the sandbox), lost where the node or its actor did not survive."""
    kept: dict[str, set[str]] = {}
    for name, node in cluster.nodes.items():
        if node.adopted:
            kept[name] = {r.id for r in await cluster.on(name, node.actor.sandboxes.remote())}
    for row in rows:
        if row.lost_reason is not None:
            cluster.lost[row.sandbox_id] = lost_sandbox(row.sandbox_id, row.node, row.lost_reason)
        elif row.sandbox_id in kept.get(row.node, ()):
            cluster.placements[row.sandbox_id] = row.node
        elif row.node in kept:
            cluster._store.forget(row.sandbox_id)  # removed while the service was down
        else:
            why = f"node {row.node} was lost (its actor did not outlive the service)"
            cluster.lost[row.sandbox_id] = lost_sandbox(row.sandbox_id, row.node, why)
            cluster._store.lose(row.sandbox_id, row.node, why)
    for name, ids in kept.items():  # created by a service that died before recording
        for sid in ids - set(cluster.placements):
            with contextlib.suppress(IronclawError):
                await cluster.on(name, cluster.nodes[name].actor.destroy.remote(sid))
