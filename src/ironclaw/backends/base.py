"""The one interface every sandbox backend implements.

The manager owns everything a sandbox shares across backends (registry, cgroups,
network namespace and firewall, runtime directory); a backend only turns a prepared
:class:`LaunchContext` into a running isolation boundary with the guest agent inside,
and gives back a channel to it. Whatever a backend must remember across processes (pids,
socket paths) goes into the ``info`` dict it returns, which the registry stores.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ironclaw.config import Settings
    from ironclaw.resources.cgroups import Cgroup
    from ironclaw.resources.net import SandboxNetwork
    from ironclaw.spec import SandboxSpec
    from ironclaw.transport import Connection

__all__ = [
    "Backend",
    "BackendStatus",
    "LaunchContext",
    "process_start_time",
    "same_process",
    "wait_gone",
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
    alive: bool
    reason: str | None = None
    exit_code: int | None = None


@runtime_checkable
class Backend(Protocol):
    """A sandbox implementation: namespace jail, QEMU microvm or Firecracker."""

    name: str

    async def prepare(self, ctx: LaunchContext) -> None:
        """Check the host can run this spec and build what the launch needs."""

    async def start(self, ctx: LaunchContext) -> dict[str, Any]:
        """Launch the sandbox with the agent inside; return info to persist."""

    async def open_channel(self, info: dict[str, Any], *, timeout: float = 5.0) -> Connection:
        """Connect to the guest agent of a running sandbox."""

    async def stop(self, info: dict[str, Any], *, timeout: float = 2.0) -> None:
        """Stop every process of the sandbox (gracefully first, then by force)."""

    async def inspect(self, info: dict[str, Any]) -> BackendStatus:
        """Say whether the sandbox's processes are still alive, and if not why."""


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat).

    Stored beside a pid so that a recycled pid is never mistaken for our process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


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
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            async with asyncio.timeout(timeout):
                await exited
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(pidfd)
        return True
    finally:
        os.close(pidfd)
