"""Drives sandbox lifecycles in parallel until killed: the victim of the crash test.

usage: python lifecycle_driver.py WORKERS [network-peer-ip]
Each worker loops create -> exec -> destroy of sandboxes it owns (one-shot: they end with
their owner), every third with a network policy, so a
SIGKILL lands at random points of creation, use and tear-down.
"""

from __future__ import annotations

import asyncio
import sys

from ironclaw.host.manager import SandboxManager


async def worker(manager: SandboxManager, n: int, peer: str | None) -> None:
    i = 0
    while True:
        i += 1
        spec: dict[str, object] = {"limits": {"memory_mib": 64, "pids": 32}}
        if peer and (n + i) % 3 == 0:
            spec["network"] = {"allow": [f"{peer}:8080"]}
        rec = await manager.create(spec, use_pool=False, one_shot=True)
        await manager.exec(rec.id, ["sh", "-c", "echo hi; sleep 0.05"])
        await manager.destroy(rec.id)


async def main() -> None:
    workers = int(sys.argv[1])
    peer = sys.argv[2] if len(sys.argv) > 2 else None
    async with SandboxManager() as manager:
        print("READY", flush=True)
        await asyncio.gather(*(worker(manager, n, peer) for n in range(workers)))


if __name__ == "__main__":
    asyncio.run(main())
