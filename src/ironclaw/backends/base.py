"""The one interface every sandbox backend implements.

The manager owns everything a sandbox shares across backends (registry, cgroups,
network namespace and firewall, runtime directory); a backend only turns a prepared
:class:`LaunchContext` into a running isolation boundary with the guest agent inside,
and gives back a channel to it. Whatever a backend must remember across processes (pids,
socket paths) goes into the typed :class:`BackendInfo` it returns; the registry stores
its :meth:`~BackendInfo.to_json` and the backend's :meth:`~Backend.load_info` reads it
back, so the manager never looks inside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, runtime_checkable

from ironclaw.errors import BackendError, ConnectError, IronclawError
from ironclaw.resources.procs import process_start_time, wait_readable

if TYPE_CHECKING:
    from ironclaw.config import Settings
    from ironclaw.resources.cgroups import Cgroup
    from ironclaw.resources.net import SandboxNetwork
    from ironclaw.spec import SandboxSpec
    from ironclaw.transport import Connection

__all__ = [
    "Backend",
    "BackendInfo",
    "BackendStatus",
    "LaunchContext",
    "Pausable",
    "agent_unreachable",
    "log_tail",
    "process_start_time",
    "same_process",
    "wait_gone",
    "wall_time_reached",
]


@dataclass
class LaunchContext:
    """Everything the manager prepared for one sandbox before the backend starts it."""

    sandbox_id: str
    slot: int
    spec: SandboxSpec
    settings: Settings
    run_dir: Path
    host_uid: int
    one_shot: bool = False
    network: SandboxNetwork | None = None
    cgroup: Cgroup | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendStatus:
    """What :meth:`Backend.inspect` found: the sandbox's processes alive, or gone and why
    (the manager records ``reason`` on the sandbox it marks dead)."""

    alive: bool
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class BackendInfo:
    """What a backend remembers of one running sandbox, across processes.

    Every backend has one process that stands for the sandbox (the jail's supervisor,
    QEMU, the jailer): its pid with its start time, so a recycled pid is never taken for
    it. Subclasses add their own fields, all JSON values, under the key names the
    registry has always used, so rows written before the info was typed still load.
    """

    pid: int
    pid_start: int | None = None
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, info: BackendInfo | Mapping[str, Any]) -> Self:
        """``info`` itself, or read from a registry row's info (see :meth:`from_json`)."""
        if isinstance(info, cls):
            return info
        if isinstance(info, BackendInfo):
            raise BackendError(f"{type(info).__name__} given where {cls.__name__} is needed")
        return cls.from_json(info)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Read a registry row's info; keys of other layers (the manager's) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise BackendError(
                f"the registry entry has no usable {cls.__name__} ({exc}); "
                "`ironclaw gc` removes what it left"
            ) from None


InfoT = TypeVar("InfoT", bound=BackendInfo)


@runtime_checkable
class Backend(Protocol[InfoT]):
    """A sandbox implementation: namespace jail, QEMU microvm or Firecracker."""

    name: str

    def load_info(self, data: Mapping[str, Any]) -> InfoT:
        """This backend's info from a registry row (see :meth:`BackendInfo.from_json`)."""

    async def prepare(self, ctx: LaunchContext) -> None:
        """Check the host can run this spec and build what the launch needs."""

    async def start(self, ctx: LaunchContext) -> InfoT:
        """Launch the sandbox with the agent inside; return info to persist."""

    async def wait_exited(self, info: InfoT) -> None:
        """Return once the sandbox's process has exited (raced against readiness)."""

    async def start_failure(self, info: InfoT) -> IronclawError:
        """Why a sandbox that exited before its agent answered failed, for the user."""

    async def open_channel(
        self, info: InfoT | Mapping[str, Any], *, timeout: float = 5.0
    ) -> Connection:
        """Connect to the guest agent of a running sandbox (a registry row's info will do)."""

    async def stop(self, info: InfoT, *, timeout: float = 2.0) -> None:
        """Stop every process of the sandbox (gracefully first, then by force)."""

    async def inspect(self, info: InfoT) -> BackendStatus:
        """Say whether the sandbox's processes are still alive, and if not why."""


@runtime_checkable
class Pausable(Protocol):
    """A backend that pauses its sandboxes itself (a VMM's own stop/continue).

    Backends without it are paused by the manager through the cgroup freezer.
    """

    def load_info(self, data: Mapping[str, Any]) -> Any: ...

    async def pause(self, info: Any) -> None:
        """Stop the sandbox's vCPUs; its memory stays."""

    async def resume(self, info: Any) -> None:
        """Continue a paused sandbox."""


def same_process(pid: int | None, start_time: int | None) -> bool:
    """True if ``pid`` is alive and is the very process that had ``start_time``."""
    if not pid or start_time is None:
        return False
    st = process_start_time(pid)
    if st != start_time:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        state = data[data.rfind(b")") + 2 :].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X") and os.path.exists(f"/proc/{pid}")


async def wait_gone(
    pid: int | None, start_time: int | None, *, timeout: float | None = None
) -> bool:
    """Wait until the process recorded as ``(pid, start_time)`` has exited.

    Returns False if it still runs after ``timeout``. A pidfd wakes the loop at the exit
    itself (no polling); the start time is checked again after opening it, so a pid
    recycled in between is never waited on.
    """
    if pid is None or not same_process(pid, start_time):
        return True
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if not same_process(pid, start_time):
            return True
        try:
            async with asyncio.timeout(timeout):
                await wait_readable(pidfd)
        except TimeoutError:
            return False
        return True
    finally:
        os.close(pidfd)


def log_tail(path: Path, limit: int = 800) -> str:
    """The end of a sandbox's log or console, for an error message ("" if there is none)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()


def agent_unreachable(exc: ConnectError, where: str, *, booting: bool = False) -> ConnectError:
    """The error for a failed connection to a guest agent, with what the user can check."""
    state = "it may still be booting or have stopped" if booting else "it may have stopped"
    return ConnectError(
        f"cannot reach the agent {where} ({exc}); {state}: see `ironclaw sandbox ls`"
    )


def wall_time_reached(info: BackendInfo, wall_time_s: float | None) -> bool:
    """Whether a sandbox that ended had used up its wall-time limit (so that ended it)."""
    return bool(wall_time_s) and time.time() - info.started_at >= float(wall_time_s or 0) - 0.5
