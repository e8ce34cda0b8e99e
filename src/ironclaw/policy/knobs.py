"""Resource limits translated into kernel knobs (rlimits, cgroup files), standard library only.

Split from :mod:`ironclaw.policy.limits` so the launcher and the cgroup writer load
without pydantic (a one-shot ``ironclaw exec`` pays for every import). The functions
read the limit values through :class:`LimitValues`, which both
:class:`~ironclaw.policy.limits.ResourceLimits` and the plain default record of
:mod:`ironclaw.spec_light` satisfy; :class:`DerivedLimits` gives either its byte and
quota values. Pure: nothing here touches the system.
"""

from __future__ import annotations

import resource
from typing import Protocol

__all__ = [
    "CPU_PERIOD_US",
    "MIB",
    "OPTIONAL_FILES",
    "DerivedLimits",
    "LimitValues",
    "cgroup_v1_settings",
    "cgroup_v2_settings",
    "cpu_quota_us",
    "rlimits",
]

MIB = 1024 * 1024
#: CFS period; 100 ms is the kernel default and keeps throttling granular enough.
CPU_PERIOD_US = 100_000
#: The kernel refuses quotas below 1 ms.
_MIN_QUOTA_US = 1_000

#: Files the writer may skip when the kernel lacks them (swap accounting off).
OPTIONAL_FILES = frozenset({"memory.memsw.limit_in_bytes", "memory.swappiness", "memory.swap.max"})


class LimitValues(Protocol):
    """What the translations read of a sandbox's limits."""

    @property
    def pids(self) -> int: ...
    @property
    def nofile(self) -> int: ...
    @property
    def fsize_mib(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def cpu_quota_us(self) -> int: ...


class _Sizes(Protocol):
    @property
    def memory_mib(self) -> int: ...
    @property
    def cpus(self) -> float: ...


class DerivedLimits:
    """The kernel units of ``memory_mib`` and ``cpus``, computed in one place for every
    limits record (the validated model and the plain default alike)."""

    __slots__ = ()

    @property
    def memory_bytes(self: _Sizes) -> int:
        return self.memory_mib * MIB

    @property
    def cpu_quota_us(self: _Sizes) -> int:
        """CFS quota per :data:`CPU_PERIOD_US`, never below the kernel's 1 ms floor."""
        return cpu_quota_us(self.cpus)


def cpu_quota_us(cpus: float) -> int:
    """CFS quota per :data:`CPU_PERIOD_US`, never below the kernel's 1 ms floor."""
    return max(_MIN_QUOTA_US, round(cpus * CPU_PERIOD_US))


def rlimits(limits: LimitValues) -> list[tuple[int, int, int]]:
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


def cgroup_v1_settings(limits: LimitValues) -> dict[str, dict[str, str]]:
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


def cgroup_v2_settings(limits: LimitValues) -> dict[str, str]:
    """``{file: value}`` for one cgroup v2 directory.

    ``memory.swap.max`` 0 keeps swap from extending the memory limit.
    """
    return {
        "memory.max": str(limits.memory_bytes),
        "memory.swap.max": "0",
        "pids.max": str(limits.pids),
        "cpu.max": f"{limits.cpu_quota_us} {CPU_PERIOD_US}",
    }
