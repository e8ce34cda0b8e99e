"""The launcher is born inside its sandbox's cgroups; the orchestrator never stays there.

On cgroup v1 the spawner thread steps into the sandbox's cgroups for the fork and back
out (see ironclaw.backends.namespace.placement). Checked on the real cgroupfs: the
sandbox's processes are in every one of its cgroups, no thread of this process is in
any of them afterwards (a cgroup kill would otherwise reach the orchestrator), and the
limits hold for what runs inside.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT
from ironclaw.backends.namespace.placement import ThreadPlacement
from ironclaw.host.manager import SandboxManager
from ironclaw.policy.limits import ResourceLimits
from ironclaw.resources.cgroups import CgroupManager
from ironclaw.spec_light import DEFAULT_SPEC

pytestmark = pytest.mark.root


def cgroups_of(path: str) -> set[str]:
    """``controller:path`` for each v1 controller in a /proc cgroup file."""
    out = set()
    for line in Path(path).read_text().splitlines():
        _, names, where = line.split(":", 2)
        for name in names.split(",") if names else ():
            out.add(f"{name}:{where}")
    return out


def threads_inside(rel: str) -> list[str]:
    """This process's threads whose cgroups include ``rel`` in any hierarchy."""
    inside = []
    for tid in os.listdir("/proc/self/task"):
        try:
            entries = cgroups_of(f"/proc/self/task/{tid}/cgroup")
        except FileNotFoundError:  # a worker thread that ended meanwhile
            continue
        if any(e.endswith(":" + rel) for e in entries):
            inside.append(tid)
    return inside


def v1_only(manager: CgroupManager) -> None:
    if not any(h.version == 1 for h in manager.layout().hierarchies):
        pytest.skip("no cgroup v1 hierarchy here: the launcher's pid is written instead")


async def test_a_thread_steps_in_forks_and_steps_back() -> None:
    manager = CgroupManager(CGROUP_ROOT)
    v1_only(manager)
    cg = await manager.create("placement-1", ResourceLimits())
    rel = f"/{CGROUP_ROOT}/placement-1"
    seen: dict[str, object] = {}

    def spawn() -> None:
        placement = ThreadPlacement.for_thread(cg)
        assert placement is not None
        before = cgroups_of("/proc/thread-self/cgroup")
        try:
            placement.enter()
            seen["inside"] = cgroups_of("/proc/thread-self/cgroup")
            pid = os.fork()
            if pid == 0:  # the child: stays until the cgroup's destroy kills it
                try:
                    while True:
                        time.sleep(3600)
                finally:
                    os._exit(0)
            seen["child"] = pid
            placement.leave()
        finally:
            placement.close()
        seen["back"] = cgroups_of("/proc/thread-self/cgroup") == before

    t = threading.Thread(target=spawn)
    t.start()
    t.join()
    child = seen["child"]
    assert isinstance(child, int)
    v1 = [d for d in cg.dirs if ThreadPlacement.places(d)]  # not cpu: see places()
    wanted = {f"{c}:{rel}" for d in v1 for c in d.controllers}
    assert wanted <= seen["inside"]  # type: ignore[operator]
    assert wanted <= cgroups_of(f"/proc/{child}/cgroup")
    assert seen["back"] is True and threads_inside(rel) == []
    assert cg.pids() == [child]  # the child, and not this process
    await manager.destroy("placement-1")
    assert os.waitpid(child, 0)[1] != 0


async def test_every_sandbox_process_is_in_its_cgroups_and_the_orchestrator_is_not(
    manager: SandboxManager,
) -> None:
    v1_only(manager.cgroups)
    rec = await manager.create(DEFAULT_SPEC, one_shot=True)  # type: ignore[arg-type]
    rel = f"/{CGROUP_ROOT}/{rec.rid}"
    cg = manager.cgroups.open(rec.rid)
    members = cg.pids()
    assert int(rec.info["pid"]) in members and len(members) >= 3  # timeout, bwrap, agent
    wanted = {f"{c}:{rel}" for d in cg.dirs for c in d.controllers if d.version == 1}
    checked = 0
    for pid in members:
        try:
            entries = cgroups_of(f"/proc/{pid}/cgroup")
        except FileNotFoundError:  # a short-lived process of the jail's start, gone
            continue
        assert wanted <= entries, pid
        checked += 1
    assert checked >= 3
    assert os.getpid() not in members and threads_inside(rel) == []
    # What runs inside is held by the limits (pids.max 256 for the default spec).
    result = await manager.exec(
        rec.id, ["sh", "-c", "for i in $(seq 400); do sleep 5 & done 2>/dev/null; echo x"]
    )
    assert result.status == "pids limit", result
    await manager.destroy(rec.id)
