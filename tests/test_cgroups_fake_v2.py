"""EXTRA LAYER, NOT THE REAL KERNEL: cgroup v2 code paths against a fake cgroupfs tree.

The host that runs this suite mounts cgroup v1 controllers, so v2 cannot be exercised for
real here (tests/test_cgroups.py does that on a v2 host). This stand-in replaces only the
two structural calls of the manager (mkdir/rmdir), filling each new directory with the
interface files cgroup2 would create; every file the manager writes or reads is a plain
file we can inspect. It checks which files get which values, not kernel behaviour.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ironclaw.errors import BackendError
from ironclaw.policy.limits import ResourceLimits
from ironclaw.resources.cgroups import CgroupManager

MIB = 1024 * 1024

INTERFACE = {
    "cgroup.procs": "",
    "cgroup.subtree_control": "",
    "cgroup.kill": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.current": "0\n",
    "memory.peak": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "pids.max": "max\n",
    "pids.current": "0\n",
    "pids.events": "max 0\n",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
}


class FakeCgroup2Manager(CgroupManager):
    """A manager whose mkdir/rmdir act like cgroup2's (files appear, rmdir takes them)."""

    def __init__(self, root: Path, *, swap_accounting: bool = True) -> None:
        mountinfo = root.parent / "mountinfo"
        mountinfo.write_text(
            "22 1 0:21 / /proc rw - proc proc rw\n"
            f"35 24 0:30 / {root} rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        )
        super().__init__("ironclaw-fake", mountinfo=mountinfo)
        self.swap_accounting = swap_accounting
        self.removed: dict[Path, dict[str, str]] = {}

    def _mkdir(self, path: Path, *, exist_ok: bool) -> None:
        fresh = not path.exists()
        path.mkdir(exist_ok=exist_ok)
        if fresh:
            for name, content in INTERFACE.items():
                if name != "memory.swap.max" or self.swap_accounting:
                    (path / name).write_text(content)

    def _rmdir(self, path: Path) -> None:
        self.removed[path] = {p.name: p.read_text() for p in path.iterdir() if p.is_file()}
        shutil.rmtree(path)


@pytest.fixture
def cgroot(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("1\n")
    return root


async def test_v2_create_enables_controllers_and_writes_limits(cgroot: Path) -> None:
    m = FakeCgroup2Manager(cgroot)
    assert m.layout().mode == "v2"
    cg = await m.create("fake-1", ResourceLimits(memory_mib=128, pids=64, cpus=1.5))
    (d,) = cg.dirs
    assert d.path == cgroot / "ironclaw-fake" / "fake-1"
    assert (cgroot / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (cgroot / "ironclaw-fake" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (d.path / "memory.max").read_text() == str(128 * MIB)
    assert (d.path / "memory.swap.max").read_text() == "0"
    assert (d.path / "pids.max").read_text() == "64"
    assert (d.path / "cpu.max").read_text() == "150000 100000"
    assert cg.skipped == ()
    assert m.list_owned() == ["fake-1"]


async def test_v2_without_swap_accounting_skips_swap_max(cgroot: Path) -> None:
    m = FakeCgroup2Manager(cgroot, swap_accounting=False)
    cg = await m.create("fake-2", ResourceLimits())
    assert cg.skipped == ("memory.swap.max",)


async def test_v2_stats_read_the_v2_files(cgroot: Path) -> None:
    m = FakeCgroup2Manager(cgroot)
    cg = await m.create("fake-3", ResourceLimits())
    d = cg.dirs[0].path
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n")
    (d / "memory.current").write_text("4096\n")
    (d / "memory.peak").write_text("65536\n")
    (d / "pids.events").write_text("max 3\n")
    (d / "pids.current").write_text("5\n")
    (d / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (d / "cgroup.procs").write_text("101\n102\n")
    s = cg.stats()
    assert (s.oom_kills, s.memory_failcnt, s.memory_current_bytes) == (2, 7, 4096)
    assert (s.memory_peak_bytes, s.pids_max_hits, s.pids_current) == (65536, 3, 5)
    assert s.cpu_usage_ns == 1_500_000
    assert cg.pids() == [101, 102]
    (d / "memory.peak").unlink()  # kernels before 5.19
    assert cg.stats().memory_peak_bytes is None


async def test_v2_destroy_writes_cgroup_kill_and_removes(cgroot: Path) -> None:
    m = FakeCgroup2Manager(cgroot)
    cg = await m.create("fake-4", ResourceLimits())
    path = cg.dirs[0].path
    await m.destroy("fake-4", wait_s=2)
    assert m.removed[path]["cgroup.kill"] == "1"
    assert not path.exists()
    assert m.list_owned() == []
    await m.destroy("fake-4")
    m.remove_root()
    assert not (cgroot / "ironclaw-fake").exists()


async def test_v2_without_pids_controller_refuses_before_creating(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    m = FakeCgroup2Manager(root)
    with pytest.raises(BackendError, match="pids"):
        await m.create("fake-5", ResourceLimits())
    assert not (root / "ironclaw-fake").exists()
