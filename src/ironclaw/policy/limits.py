"""Resource limits of one sandbox, and their translation into kernel knobs.

Pure: nothing here touches the system. The launcher applies :func:`rlimits` in the child
before exec, and :mod:`ironclaw.resources.cgroups` writes the cgroup settings. Limits that a
per-process rlimit cannot enforce across a process tree (memory, pids, cpu) live only in
cgroups; rlimits cover what cgroups cannot (core dumps, open files, file size).
"""

from __future__ import annotations

import resource

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CPU_PERIOD_US",
    "OPTIONAL_FILES",
    "ResourceLimits",
    "cgroup_v1_settings",
    "cgroup_v2_settings",
    "rlimits",
]

MIB = 1024 * 1024
#: CFS period; 100 ms is the kernel default and keeps throttling granular enough.
CPU_PERIOD_US = 100_000
#: The kernel refuses quotas below 1 ms.
_MIN_QUOTA_US = 1_000


class ResourceLimits(BaseModel):
    """What one sandbox may consume. Frozen so a running sandbox's limits cannot drift."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mib: int = Field(default=512, ge=16)
    pids: int = Field(default=256, ge=8)
    cpus: float = Field(default=1.0, gt=0, le=1024)
    nofile: int = Field(default=1024, ge=16, le=1 << 20)
    fsize_mib: int = Field(default=1024, ge=1)
    workspace_mib: int = Field(default=1024, ge=1)
    tmp_mib: int = Field(default=256, ge=1)
    wall_time_s: float | None = Field(default=None, gt=0)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per :data:`CPU_PERIOD_US`, never below the kernel's 1 ms floor."""
        return max(_MIN_QUOTA_US, round(self.cpus * CPU_PERIOD_US))


def rlimits(limits: ResourceLimits) -> list[tuple[int, int, int]]:
    """``(resource.RLIMIT_*, soft, hard)`` triples to apply in the child before exec.

    Soft equals hard so the sandbox cannot raise them again. No core dumps: they can
    leak memory contents onto the host and fill the disk.
    """
    fsize = limits.fsize_mib * MIB
    return [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, limits.nofile, limits.nofile),
        (resource.RLIMIT_FSIZE, fsize, fsize),
    ]


def cgroup_v1_settings(limits: ResourceLimits) -> dict[str, dict[str, str]]:
    """Controller -> ``{file: value}`` for cgroup v1, in the order they must be written.

    ``memory.limit_in_bytes`` comes before ``memory.memsw.limit_in_bytes`` because the
    kernel requires memsw >= limit at every step. memsw (memory+swap) equal to the memory
    limit means swap cannot be used to exceed it; it exists only with swap accounting, so
    the writer treats it (and ``memory.swappiness``, the fallback) as optional.
    """
    mem = str(limits.memory_bytes)
    return {
        "memory": {
            "memory.limit_in_bytes": mem,
            "memory.memsw.limit_in_bytes": mem,
            "memory.swappiness": "0",
        },
        "pids": {"pids.max": str(limits.pids)},
        "cpu": {
            "cpu.cfs_period_us": str(CPU_PERIOD_US),
            "cpu.cfs_quota_us": str(limits.cpu_quota_us),
        },
    }


#: Files the writer may skip when the kernel lacks them (swap accounting off).
OPTIONAL_FILES = frozenset({"memory.memsw.limit_in_bytes", "memory.swappiness", "memory.swap.max"})


def cgroup_v2_settings(limits: ResourceLimits) -> dict[str, str]:
    """``{file: value}`` for one cgroup v2 directory.

    ``memory.swap.max`` 0 keeps swap from extending the memory limit.
    """
    return {
        "memory.max": str(limits.memory_bytes),
        "memory.swap.max": "0",
        "pids.max": str(limits.pids),
        "cpu.max": f"{limits.cpu_quota_us} {CPU_PERIOD_US}",
    }
