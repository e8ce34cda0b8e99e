"""What the QEMU and Firecracker backends share: supervising one VM process per sandbox.

Both launch a VMM (QEMU, or Firecracker under its jailer) detached into its own session,
inside the sandbox's cgroups and network namespace from its first instruction; both find
the image, bridge a tap to the sandbox's veth, give the guest its address on the kernel
command line, and end the VMM the same way: a polite request over its control socket,
then SIGKILL to the process group, then a pidfd wait that proves it is gone. Only the
polite request and the files to tidy differ, so those are parameters here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ironclaw.backends.base import (
    BackendInfo,
    BackendStatus,
    LaunchContext,
    log_tail,
    same_process,
    wait_gone,
    wall_time_reached,
)
from ironclaw.config import safe_join
from ironclaw.errors import BackendError
from ironclaw.images import ImageArtifacts, find_image
from ironclaw.resources.tap import TAP, attach_tap

__all__ = [
    "VmChildren",
    "VmInfo",
    "attach_sandbox_tap",
    "exited_early",
    "find_vm_image",
    "kernel_ip",
    "remove_run_files",
    "spawn_vmm",
    "stop_vmm",
    "vm_status",
    "vmm_preexec",
]

_CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None


@dataclass(frozen=True, kw_only=True)
class VmInfo(BackendInfo):
    """What every VM sandbox records beside its VMM's pid."""

    run_dir: str
    console_log: str
    tap: str | None = None
    vcpus: int = 1


def find_vm_image(ctx: LaunchContext, artifacts: ImageArtifacts | None) -> ImageArtifacts:
    """The built image the spec names ("host" means the default VM image)."""
    if artifacts is not None:
        return artifacts
    name = "default" if ctx.spec.image == "host" else ctx.spec.image
    found = find_image(ctx.settings, name)
    if found is None:
        raise BackendError(f"no VM image {name!r} is built yet: run `ironclaw image build`")
    return found


async def attach_sandbox_tap(ctx: LaunchContext, uid: int) -> str | None:
    """Bridge a tap owned by ``uid`` to the sandbox's veth; its name, or None (no network)."""
    net = ctx.network
    if net is None:
        return None
    await attach_tap(
        net.netns_path,
        uid=uid,
        gid=uid,
        guest_ifname=net.guest_ifname,
        guest_ip=net.guest_ip,
        prefixlen=net.prefixlen,
    )
    return TAP


def kernel_ip(ctx: LaunchContext) -> str | None:
    """The guest kernel's ``ip=`` value: the sandbox address, the host end as gateway."""
    net = ctx.network
    return f"{net.guest_ip}::{net.host_ip}:{net.prefixlen}::eth0:off" if net else None


def vmm_preexec(
    cgroup_fds: Sequence[int], netns_fd: int | None, *, no_core_dumps: bool = False
) -> Callable[[], None]:
    """Between fork and exec, still root: join the cgroups and the netns (no core dumps)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc

    def preexec() -> None:  # pragma: no cover - runs between fork and exec
        pid = str(os.getpid()).encode()
        for fd in cgroup_fds:
            os.write(fd, pid)
        if netns_fd is not None and libc.setns(netns_fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")
        if no_core_dumps:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return preexec


async def spawn_vmm(
    argv: Sequence[str],
    *,
    output: Path,
    truncate: bool,
    netns_path: str | None,
    cgroup_fds: Sequence[int],
    env: Mapping[str, str] | None = None,
    no_core_dumps: bool = False,
    pass_fds: Sequence[int] = (),
) -> asyncio.subprocess.Process:
    """Start the VMM in its own session, stdout and stderr to ``output``.

    The session lets it outlive the CLI that started it; the cgroup descriptors
    (``cgroup.procs`` opened by root) and ``pass_fds`` (inherited as they are) stay the
    caller's to close.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else os.O_APPEND)
    out_fd = os.open(output, flags, 0o600)
    netns_fd: int | None = None
    try:
        if netns_path is not None:
            netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_fd,
            stderr=out_fd,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            preexec_fn=vmm_preexec(cgroup_fds, netns_fd, no_core_dumps=no_core_dumps),
        )
    except OSError as exc:
        raise BackendError(f"cannot start {argv[0]}: {exc}") from exc
    finally:
        os.close(out_fd)
        if netns_fd is not None:
            os.close(netns_fd)


class VmChildren:
    """VMMs this process started, by pid: awaited so they never linger as zombies."""

    def __init__(self) -> None:
        self._waits: dict[int, Callable[[], Awaitable[object]]] = {}

    def add(self, pid: int, wait: Callable[[], Awaitable[object]]) -> None:
        self._waits[pid] = wait

    async def wait_exited(self, info: BackendInfo) -> None:
        """Return once the VMM has exited (the manager races this against readiness)."""
        wait = self._waits.get(info.pid)
        if wait is not None:
            await wait()
            return
        await wait_gone(info.pid, info.pid_start)

    async def reap(self, pid: int, timeout: float) -> None:
        wait = self._waits.pop(pid, None)
        if wait is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wait(), timeout)


async def stop_vmm(
    info: BackendInfo,
    *,
    name: str,
    graceful: Callable[[], Awaitable[None]],
    children: VmChildren,
    timeout: float,
) -> None:
    """``graceful`` first (half of ``timeout``), then SIGKILL the VMM's process group.

    ``graceful`` must swallow its own failures: a VMM that does not answer is killed.
    Raises only if the process is still there at the end.
    """
    pid, start = info.pid, info.pid_start
    if same_process(pid, start):
        await graceful()
        await wait_gone(pid, start, timeout=timeout / 2)
        if same_process(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    await children.reap(pid, timeout)
    await wait_gone(pid, start, timeout=timeout)
    if same_process(pid, start):
        raise BackendError(f"{name} (pid {pid}) did not exit")


def remove_run_files(run_dir: Path, names: Iterable[str]) -> None:
    """Remove the VMM's sockets and pid file (an unprivileged VMM cannot, in a 0700 dir)."""
    for name in names:
        with contextlib.suppress(OSError):
            safe_join(run_dir, name).unlink()


def exited_early(log: Path) -> BackendError:
    """The error for a VM that exited before its agent answered, with the VMM's last words."""
    tail = log_tail(log, 300)
    return BackendError(
        "the sandbox exited before its agent answered" + (f": {tail}" if tail else "")
    )


def vm_status(
    info: BackendInfo,
    name: str,
    logs: Sequence[str],
    *,
    limit: int,
    wall_time_s: float | None = None,
) -> BackendStatus:
    """Alive while the VMM runs; else why it ended: the wall-time limit, or its last words.

    ``logs`` are tried in order; the first with any text gives the reason its tail.
    """
    if same_process(info.pid, info.pid_start):
        return BackendStatus(alive=True)
    if wall_time_reached(info, wall_time_s):
        return BackendStatus(alive=False, reason="timeout: wall-time limit reached")
    tail = next(filter(None, (log_tail(Path(p), limit) for p in logs)), "")
    return BackendStatus(alive=False, reason=f"{name} exited" + (f": {tail}" if tail else ""))
