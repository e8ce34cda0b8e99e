"""Layout detection from mountinfo text: v1, v2 and hybrid shapes, and why things are unusable.

Pure parsing; the only filesystem read is cgroup2's ``cgroup.controllers``, which these
tests provide in a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

from ironclaw.resources.cgroups import detect_layout, parse_mountinfo

OTHER = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"


def v1_line(n: int, where: str, opts: str, mount_opts: str = "rw,relatime") -> str:
    return f"{n} 31 0:{n} / {where} {mount_opts} shared:{n} - cgroup cgroup rw,{opts}\n"


def v2_line(where: Path, mount_opts: str = "rw,relatime") -> str:
    return f"41 31 0:38 / {where} {mount_opts} - cgroup2 cgroup2 rw,nsdelegate\n"


def cgroup2_dir(tmp_path: Path, controllers: str) -> Path:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    return tmp_path


def test_this_hosts_shape_hybrid_with_empty_unified(tmp_path: Path) -> None:
    unified = cgroup2_dir(tmp_path, "hugetlb")
    text = (
        OTHER
        + v1_line(32, "/sys/fs/cgroup/cpu", "cpu")
        + v1_line(33, "/sys/fs/cgroup/cpuacct", "cpuacct")
        + v1_line(35, "/sys/fs/cgroup/memory", "memory")
        + v1_line(37, "/sys/fs/cgroup/freezer", "freezer")
        + v1_line(39, "/sys/fs/cgroup/pids", "pids")
        + v1_line(40, "/sys/fs/cgroup/systemd", "name=systemd")
        + v2_line(unified)
    )
    layout = detect_layout(text)
    assert layout.mode == "v1"  # cgroup2 carries none of our controllers
    assert layout.usable
    assert layout.unusable == {}
    assert len(layout.hierarchies) == 5
    assert layout.controllers["memory"].mount == Path("/sys/fs/cgroup/memory")
    assert all(h.version == 1 for h in layout.hierarchies)


def test_co_mounted_v1_controllers_share_one_hierarchy() -> None:
    text = (
        v1_line(32, "/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct")
        + v1_line(35, "/sys/fs/cgroup/memory", "memory")
        + v1_line(39, "/sys/fs/cgroup/pids", "pids")
    )
    layout = detect_layout(text)
    assert layout.controllers["cpu"] == layout.controllers["cpuacct"]
    assert layout.controllers["cpu"].controllers == {"cpu", "cpuacct"}
    assert len(layout.hierarchies) == 3
    assert "freezer" in layout.unusable  # optional: destroy falls back to a kill loop
    assert layout.usable


def test_pure_v2(tmp_path: Path) -> None:
    root = cgroup2_dir(tmp_path, "cpuset cpu io memory hugetlb pids rdma misc")
    layout = detect_layout(OTHER + v2_line(root))
    assert layout.mode == "v2"
    (h,) = layout.hierarchies
    assert h.version == 2
    assert h.mount == root
    assert h.controllers == {"memory", "pids", "cpu", "cpuacct", "freezer"}


def test_hybrid_v1_memory_v2_rest(tmp_path: Path) -> None:
    root = cgroup2_dir(tmp_path, "cpu pids")
    layout = detect_layout(v1_line(35, "/sys/fs/cgroup/memory", "memory") + v2_line(root))
    assert layout.mode == "hybrid"
    assert layout.controllers["memory"].version == 1
    assert layout.controllers["pids"].version == 2
    assert layout.controllers["pids"] == layout.controllers["cpu"]


def test_missing_controller_has_a_reason(tmp_path: Path) -> None:
    root = cgroup2_dir(tmp_path, "cpu memory")
    layout = detect_layout(v2_line(root))
    assert not layout.usable
    assert set(layout.missing_required) == {"pids"}
    assert "cgroup.controllers" in layout.unusable["pids"]
    nothing = detect_layout(OTHER)
    assert nothing.mode == "none"
    assert "no cgroup2 is mounted" in nothing.unusable["memory"]


def test_read_only_mount_is_unusable() -> None:
    text = v1_line(35, "/sys/fs/cgroup/memory", "memory", mount_opts="ro,nosuid")
    layout = detect_layout(text)
    assert "read-only" in layout.unusable["memory"]


def test_mountinfo_escapes_and_optional_fields() -> None:
    line = "50 31 0:40 / /mnt/cg\\040v1 rw shared:1 master:2 - cgroup cg rw,pids,memory\n"
    (m,) = parse_mountinfo(line + OTHER + "garbage line\n")
    assert m.mount_point == Path("/mnt/cg v1")
    assert {"pids", "memory"} <= m.super_options
