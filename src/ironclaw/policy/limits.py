"""Resource limits of one sandbox, and their translation into kernel knobs.

Pure: nothing here touches the system. The launcher applies :func:`rlimits` in the child
before exec, and :mod:`ironclaw.resources.cgroups` writes the cgroup settings; both
translations live in :mod:`ironclaw.policy.knobs` (no pydantic) and are re-exported
here. Limits that a per-process rlimit cannot enforce across a process tree (memory,
pids, cpu) live only in cgroups; rlimits cover what cgroups cannot (core dumps, open
files, file size).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ironclaw.policy.knobs import (
    CPU_PERIOD_US,
    OPTIONAL_FILES,
    DerivedLimits,
    cgroup_v1_settings,
    cgroup_v2_settings,
    rlimits,
)

__all__ = [
    "CPU_PERIOD_US",
    "OPTIONAL_FILES",
    "ResourceLimits",
    "cgroup_v1_settings",
    "cgroup_v2_settings",
    "rlimits",
]


class ResourceLimits(BaseModel, DerivedLimits):
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
