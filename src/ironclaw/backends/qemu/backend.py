"""The QEMU backend: one ``microvm`` per sandbox, run as the sandbox's unprivileged host uid.

How a sandbox is launched, and why:

* **QEMU never runs the guest as root.** QEMU starts as root only to open what it needs
  by path (the image files under the 0700 state directory, ``/dev/kvm``, the tap, its
  sockets), then drops to ``ctx.host_uid`` itself (``-runas UID:GID``: numeric, setgroups
  to that gid only, and it refuses to continue if ``setuid(0)`` still works). It starts
  paused (``-S``): the backend checks that every QEMU thread has that uid and gid and no
  capabilities before it lets the guest run (QMP ``cont``). Handing every file over as a
  descriptor instead was rejected: QEMU 7.2 opens ``/dev/kvm`` by path, which that uid
  may not open.
* **QEMU's own seccomp filter.** Every launch carries ``-sandbox on`` with obsolete
  syscalls, fork/exec and scheduler/priority/rlimit changes denied (QEMU dies of SIGSYS
  if it tries to spawn); ``elevateprivileges`` stays allowed only because QEMU 7.2
  installs the filter before ``-runas`` drops root. A QEMU without seccomp support is
  refused unless ``IRONCLAW_QEMU_SANDBOX=off``.
* **Limits before exec.** The child joins the sandbox's cgroups (``cgroup.procs`` opened
  by root in the parent) and its network namespace, and loses core dumps, before it
  execs QEMU, so every QEMU thread is inside the limits from the first instruction.
* **Memory.** The sandbox's memory limit covers the whole QEMU process: the guest gets
  ``memory_mib - QEMU_OVERHEAD_MIB`` (TCG's translation cache is capped at
  :data:`~ironclaw.backends.qemu.vm.TCG_TB_MIB`, so the overhead stays bounded).
* **Network.** With a network policy a tap owned by the sandbox uid is bridged to the
  sandbox's veth inside its namespace (shared with Firecracker), and the guest takes the
  sandbox address from the kernel ``ip=`` argument: the host firewall applies unchanged.
* **Channel.** The agent listens on a virtio-serial port whose host end is a UNIX socket
  in the run directory; the manager's readiness ping goes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

from ironclaw.backends.base import (
    BackendStatus,
    LaunchContext,
    process_start_time,
    same_process,
    wait_gone,
)
from ironclaw.backends.qemu.qmp import QmpClient, QmpError
from ironclaw.backends.qemu.seccomp import sandbox_args
from ironclaw.backends.qemu.vm import Accel, QemuVm, agent_usable, probe_accel, qemu_binary
from ironclaw.config import Settings, safe_join
from ironclaw.errors import BackendError, ConfigError, ConnectError
from ironclaw.images import ImageArtifacts, find_image
from ironclaw.resources.tap import TAP, attach_tap
from ironclaw.resources.watchdog import spawn_watchdog
from ironclaw.transport import Connection, unix

__all__ = ["MIN_GUEST_MIB", "QEMU_OVERHEAD_MIB", "QemuBackend", "guest_memory_mib"]

#: Host memory QEMU itself needs inside the sandbox's memory cgroup, beside guest RAM:
#: the TCG translation cache (64 MiB) plus QEMU's own heap; measured peak in docs/IMAGES.md.
QEMU_OVERHEAD_MIB = 96
#: Below this the guest kernel, the agent and a command do not fit.
MIN_GUEST_MIB = 128
_RUN_FILES = ("agent.sock", "qmp.sock", "qemu.pid")


def guest_memory_mib(memory_mib: int) -> int:
    """Guest RAM for a sandbox memory limit: the rest is QEMU's own overhead."""
    return memory_mib - QEMU_OVERHEAD_MIB


def _vcpus(cpus: float) -> int:
    # The cgroup's CPU quota is the real limit; more vCPUs than that only add threads.
    return max(1, min(math.ceil(cpus), os.cpu_count() or 1, 64))


class QemuBackend:
    """QEMU microvms behind the :class:`~ironclaw.backends.base.Backend` protocol."""

    name = "qemu"

    def __init__(
        self,
        *,
        artifacts: ImageArtifacts | None = None,
        accel: Literal["auto", "kvm", "tcg"] = "auto",
    ) -> None:
        self.artifacts = artifacts
        self.accel = accel
        # VMs this process started: awaited so they never linger as zombies.
        self._vms: dict[int, QemuVm] = {}
        self._accel_cache: dict[tuple[Path, str], Accel] = {}

    # -- protocol ------------------------------------------------------------------------

    async def prepare(self, ctx: LaunchContext) -> None:
        try:
            await asyncio.to_thread(sandbox_args, qemu_binary(), runas=True)
        except ConfigError as exc:
            raise BackendError(str(exc)) from None
        if ctx.spec.mounts:
            raise BackendError("host mounts are not available in a VM; copy files in instead")
        art = self._image(ctx)
        if not agent_usable(art):
            raise BackendError(
                f"image {art.name!r} has no guest agent: rebuild it with `ironclaw image build`"
            )
        guest = guest_memory_mib(ctx.spec.limits.memory_mib)
        if guest < MIN_GUEST_MIB:
            raise ConfigError(
                f"memory limit {ctx.spec.limits.memory_mib} MiB is too small for a VM: it needs "
                f"{MIN_GUEST_MIB + QEMU_OVERHEAD_MIB} MiB ({MIN_GUEST_MIB} for the guest, "
                f"{QEMU_OVERHEAD_MIB} for QEMU)"
            )

    async def start(self, ctx: LaunchContext) -> dict[str, Any]:
        spec, lim = ctx.spec, ctx.spec.limits
        art = self._image(ctx)
        accel = await self._accel(art, ctx.settings)
        hostname = spec.hostname or ctx.sandbox_id
        net = ctx.network
        guest_ip = None
        if net is not None:
            await attach_tap(
                net.netns_path,
                uid=ctx.host_uid,
                gid=ctx.host_uid,
                guest_ifname=net.guest_ifname,
                guest_ip=net.guest_ip,
                prefixlen=net.prefixlen,
            )
            guest_ip = f"{net.guest_ip}::{net.host_ip}:{net.prefixlen}::eth0:off"
        env = {**(net.env if net else {}), **ctx.extra_env, **spec.env}
        cgroup_fds = ctx.cgroup.attach_fds() if ctx.cgroup is not None else []
        vm = QemuVm()
        try:
            await vm.start(
                art,
                ctx.run_dir,
                cpus=_vcpus(lim.cpus),
                memory_mib=guest_memory_mib(lim.memory_mib),
                accel=accel,
                netns_path=net.netns_path if net else None,
                tap_ifname=TAP if net else None,
                workspace_mib=lim.workspace_mib,
                hostname=hostname,
                guest_ip=guest_ip,
                settings=ctx.settings,
                run_as=ctx.host_uid,
                cgroup_fds=cgroup_fds,
                guest_env=env,
            )
            await vm.close_qmp()
        except BaseException:
            await vm.kill()
            raise
        finally:
            for fd in cgroup_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        pid = vm.pid
        assert pid is not None
        self._vms[pid] = vm
        # -runas clears the parent-death signal and QEMU has no supervisor: a watchdog
        # enforces the wall-time limit and ends a one-shot VM with its owner. It runs as
        # a uid of its own, which QEMU's uid cannot signal.
        watchdog = await asyncio.to_thread(
            spawn_watchdog,
            pid,
            uid=ctx.host_uid,
            wall_time_s=lim.wall_time_s,
            owner_pid=os.getpid() if ctx.one_shot else None,
        )
        return {
            "watchdog_pid": watchdog,
            "wall_time_s": lim.wall_time_s,
            "pid": pid,
            "pid_start": process_start_time(pid),
            "socket": str(vm.channel_path),
            "qmp": str(vm.qmp_path),
            "console_log": str(vm.console_log),
            "stderr_log": str(safe_join(ctx.run_dir, "qemu.stderr")),
            "run_dir": str(ctx.run_dir),
            "image": art.digest,
            "kernel_release": art.kernel_release,
            "accel": accel,
            "vcpus": _vcpus(lim.cpus),
            "guest_mib": guest_memory_mib(lim.memory_mib),
            "tap": TAP if net else None,
            "host_uid": ctx.host_uid,
            "started_at": time.time(),
        }

    async def wait_exited(self, info: dict[str, Any]) -> None:
        """Return once QEMU has exited (the manager races this against readiness)."""
        vm = self._vms.get(int(info["pid"]))
        if vm is not None:
            await vm.wait_exit()
            return
        await wait_gone(info.get("pid"), info.get("pid_start"))

    async def open_channel(self, info: dict[str, Any], *, timeout: float = 5.0) -> Connection:
        """Connect to the agent's virtio-serial socket, retrying while QEMU creates it.

        Bytes sent before the guest opens its port wait in the socket, so a booting VM
        is simply slow to answer, not unreachable.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await unix.connect(info["socket"], timeout=max(0.1, timeout))
            except ConnectError as exc:
                alive = same_process(info.get("pid"), info.get("pid_start"))
                if not alive or time.monotonic() >= deadline:
                    raise ConnectError(
                        f"cannot reach the agent in this VM ({exc}); it may have stopped: "
                        "see `ironclaw sandbox ls`"
                    ) from exc
            await asyncio.sleep(0.02)

    async def stop(self, info: dict[str, Any], *, timeout: float = 2.0) -> None:
        """QMP ``quit`` (QEMU exits at once; the workspace is scratch), then SIGKILL."""
        pid, start = info.get("pid"), info.get("pid_start")
        if same_process(pid, start):
            assert isinstance(pid, int)
            with contextlib.suppress(QmpError, OSError):
                qmp = await QmpClient.connect(Path(info["qmp"]), limit_s=min(1.0, timeout))
                try:
                    await qmp.execute("quit", limit_s=min(1.0, timeout))
                finally:
                    await qmp.close()
            await wait_gone(pid, start, timeout=timeout / 2)
            if same_process(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        vm = self._vms.pop(int(pid), None) if pid else None
        if vm is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vm.wait_exit(), timeout)
        await wait_gone(pid, start, timeout=timeout)
        if same_process(pid, start):
            raise BackendError(f"QEMU (pid {pid}) did not exit")
        # QEMU ran unprivileged and could not remove its own files from the 0700 run dir.
        run_dir = Path(str(info.get("run_dir", "")))
        if info.get("run_dir"):
            for name in _RUN_FILES:
                with contextlib.suppress(OSError):
                    safe_join(run_dir, name).unlink()

    async def inspect(self, info: dict[str, Any]) -> BackendStatus:
        if same_process(info.get("pid"), info.get("pid_start")):
            return BackendStatus(alive=True)
        tail = ""
        for key in ("stderr_log", "console_log"):
            with contextlib.suppress(OSError, KeyError):
                text = Path(str(info[key])).read_text(errors="replace").strip()
                if text:
                    tail = text[-300:]
                    break
        wall, started = info.get("wall_time_s"), float(info.get("started_at", 0.0))
        if wall and time.time() - started >= float(wall) - 0.5:
            return BackendStatus(alive=False, reason="timeout: wall-time limit reached")
        return BackendStatus(alive=False, reason="qemu exited" + (f": {tail}" if tail else ""))

    # -- internals -----------------------------------------------------------------------

    def _image(self, ctx: LaunchContext) -> ImageArtifacts:
        if self.artifacts is not None:
            return self.artifacts
        name = "default" if ctx.spec.image == "host" else ctx.spec.image
        found = find_image(ctx.settings, name)
        if found is None:
            raise BackendError(f"no VM image {name!r} is built yet: run `ironclaw image build`")
        return found

    async def _accel(self, art: ImageArtifacts, settings: Settings) -> Accel:
        """KVM when a probe boot works there; the verdict is cached on disk and here."""
        if self.accel != "auto":
            return "kvm" if self.accel == "kvm" else "tcg"
        key = (settings.state_dir, art.digest)
        found = self._accel_cache.get(key)
        if found is None:
            found = self._accel_cache[key] = await asyncio.to_thread(probe_accel, art, settings)
        return found
