"""The warm pool: which ready sandbox may serve which request, and handing one over.

A pooled sandbox was launched before the request that takes it existed, so only what can
still change after launch (limits, egress rules, the id) may differ between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ironclaw.host.manager import SandboxManager
    from ironclaw.resources.store import SandboxRecord
    from ironclaw.spec import SandboxSpec

__all__ = ["acquire_pooled", "pool_key"]


def pool_key(spec: SandboxSpec) -> str:
    """What a warm sandbox must share with a request to serve it.

    Everything fixed at launch (backend, image, seccomp, mounts, env, hostname, whether
    there is a network at all, tmpfs sizes, the wall-time supervisor) is in the key;
    memory, pids, cpu and the egress rules are applied on acquire.
    """
    lim = spec.limits
    fixed = {
        "backend": spec.backend,
        "image": spec.image,
        "seccomp": spec.seccomp,
        "mounts": [m.model_dump() for m in spec.mounts],
        "env": spec.env,
        "hostname": spec.hostname,
        "network": spec.network.needs_network,
        "proxy": bool(spec.network.allow_domains),
        "workspace_mib": lim.workspace_mib,
        "tmp_mib": lim.tmp_mib,
        "wall_time_s": lim.wall_time_s,
        "nofile": lim.nofile,
        "fsize_mib": lim.fsize_mib,
    }
    blob = json.dumps(fixed, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


async def acquire_pooled(
    mgr: SandboxManager, spec: SandboxSpec, sid: str, one_shot: bool
) -> SandboxRecord | None:
    """Give a pooled sandbox its final id, limits and egress rules, or return None."""
    key = pool_key(spec)
    record = await mgr.store.claim_pooled(
        key,
        sid,
        spec=spec.model_dump(mode="json"),
        owner=dict(mgr._me),
        owner_pid=os.getpid(),
        one_shot=one_shot,
    )
    if record is None:
        return None
    mgr._owned.add(sid)
    mgr._rids[sid] = record.rid
    try:
        rid = record.rid
        peer = mgr._peers.pop(rid, None)
        if peer is not None:
            mgr._peers[sid] = peer
        await mgr.cgroups.update(rid, spec.limits)
        if spec.network.needs_network:
            await mgr.net.update_policy(rid, spec.network, slot=record.slot)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await asyncio.shield(mgr._teardown(record, reason=f"failed: {exc}"))
        raise
    return record
