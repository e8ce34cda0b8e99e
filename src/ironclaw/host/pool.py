"""The warm pool's template key: which ready sandbox may serve which request.

A pooled sandbox was launched before the request that takes it existed, so only what can
still change after launch (limits, egress rules, the id) may differ between the two.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ironclaw.spec import SandboxSpec

__all__ = ["pool_key"]


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
