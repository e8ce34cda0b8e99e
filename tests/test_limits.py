"""ResourceLimits validation and its translation to rlimits and cgroup files.

The rlimits are also applied for real in a child to prove the triples are accepted by
the kernel and enforced (a write beyond RLIMIT_FSIZE fails with EFBIG).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ironclaw.policy.limits import (
    ResourceLimits,
    cgroup_v1_settings,
    cgroup_v2_settings,
    rlimits,
)

MIB = 1024 * 1024


def test_defaults() -> None:
    lim = ResourceLimits()
    assert (lim.memory_mib, lim.pids, lim.cpus, lim.nofile) == (512, 256, 1.0, 1024)
    assert (lim.fsize_mib, lim.workspace_mib, lim.tmp_mib, lim.wall_time_s) == (
        1024,
        1024,
        256,
        None,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"memory_mib": 15},
        {"pids": 7},
        {"cpus": 0},
        {"cpus": -1},
        {"wall_time_s": 0},
        {"nofile": 0},
        {"surprise": 1},
    ],
)
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ResourceLimits.model_validate(bad)


def test_frozen() -> None:
    lim = ResourceLimits()
    with pytest.raises(ValidationError):
        lim.memory_mib = 1


def test_rlimits() -> None:
    lim = ResourceLimits(nofile=200, fsize_mib=3)
    assert rlimits(lim) == [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, 200, 200),
        (resource.RLIMIT_FSIZE, 3 * MIB, 3 * MIB),
    ]


def test_cgroup_v1_settings_order_and_values() -> None:
    s = cgroup_v1_settings(ResourceLimits(memory_mib=64, pids=10, cpus=0.25))
    assert list(s["memory"]) == [
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",  # after the limit: memsw >= limit at every step
        "memory.swappiness",
    ]
    assert s["memory"]["memory.limit_in_bytes"] == s["memory"]["memory.memsw.limit_in_bytes"]
    assert s["memory"]["memory.limit_in_bytes"] == str(64 * MIB)
    assert s["pids"] == {"pids.max": "10"}
    assert s["cpu"] == {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "25000"}


def test_cgroup_v2_settings() -> None:
    s = cgroup_v2_settings(ResourceLimits(memory_mib=64, pids=10, cpus=2))
    assert s == {
        "memory.max": str(64 * MIB),
        "memory.swap.max": "0",
        "pids.max": "10",
        "cpu.max": "200000 100000",
    }


def test_tiny_cpu_share_respects_kernel_minimum_quota() -> None:
    s = cgroup_v2_settings(ResourceLimits(cpus=0.001))
    assert s["cpu.max"] == "1000 100000"


def test_rlimits_are_enforced_in_a_child(tmp_path: Path) -> None:
    lim = ResourceLimits(nofile=64, fsize_mib=1)
    triples = rlimits(lim)

    def apply() -> None:
        for res, soft, hard in triples:
            resource.setrlimit(res, (soft, hard))

    code = (
        "import errno, resource, sys\n"
        "get = resource.getrlimit\n"
        "print(get(resource.RLIMIT_NOFILE), get(resource.RLIMIT_CORE))\n"
        "f = open(sys.argv[1], 'wb', buffering=0)\n"
        "f.write(b'x' * (1 << 20))\n"
        "try:\n"
        "    f.write(b'x')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "big")],
        preexec_fn=apply,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["(64, 64) (0, 0)", "EFBIG"]
    assert (tmp_path / "big").stat().st_size == MIB
