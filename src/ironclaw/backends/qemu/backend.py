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
  :data:`~ironclaw.backends.qemu.cmdline.TCG_TB_MIB`, so the overhead stays bounded).
* **Network.** With a network policy a tap owned by the sandbox uid is bridged to the
  sandbox's veth inside its namespace (shared with Firecracker), and the guest takes the
  sandbox address from the kernel ``ip=`` argument: the host firewall applies unchanged.
* **Restore** (the default; ``IRONCLAW_QEMU_RESTORE=0`` boots instead). A sandbox starts
  from its image's agent-ready snapshot (made on first use, per image and VM size) and
  gets its own identity right after (:mod:`.restore`); its ``/workspace`` is then a
  tmpfs of ``workspace_mib``. Restoring takes well under a second where a TCG boot
  takes seconds.
* **User snapshots.** :meth:`QemuBackend.save_snapshot` saves a running sandbox's
  memory, devices and workspace disk; a sandbox whose start was given a snapshot with
  :meth:`QemuBackend.plan_restore` is restored from it (:mod:`.usersnap`).
* **Channel.** The agent serves :data:`~.channels.AGENT_CHANNELS` virtio-serial ports,
  each with a UNIX socket in the run directory that takes one host connection at a
  time; a connection claims a free one with a lock the kernel drops when its holder
  ends (:mod:`.channels`), so several processes use one VM at once. Each connection is
  a session that starts with a hello the agent acknowledges
  (``transport.virtio_serial.connect``), so nothing of an earlier connection, or of the
  one a snapshot was saved in, can leak into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ironclaw.backends.base import (
    BackendStatus,
    LaunchContext,
    agent_unreachable,
    process_start_time,
    same_process,
)
from ironclaw.backends.qemu import usersnap
from ironclaw.backends.qemu.accel import probe_accel
from ironclaw.backends.qemu.channels import ChannelsBusy, connect_channel
from ironclaw.backends.qemu.cmdline import Accel, qemu_binary
from ironclaw.backends.qemu.qmp import QmpClient, QmpError
from ironclaw.backends.qemu.ready import agent_usable
from ironclaw.backends.qemu.restore import VmLaunch, restore_enabled, restore_sandbox
from ironclaw.backends.qemu.seccomp import sandbox_args
from ironclaw.backends.qemu.vm import RUN_FILES, QemuVm
from ironclaw.backends.vm import (
    VmChildren,
    VmInfo,
    attach_sandbox_tap,
    exited_early,
    find_vm_image,
    kernel_ip,
    remove_run_files,
    stop_vmm,
    vm_status,
)
from ironclaw.config import Settings, safe_join
from ironclaw.errors import BackendError, ConfigError, ConnectError, IronclawError
from ironclaw.images import ImageArtifacts, find_image
from ironclaw.resources.watchdog import spawn_watchdog
from ironclaw.spec import SandboxSpec
from ironclaw.transport import Connection

__all__ = ["MIN_GUEST_MIB", "QEMU_OVERHEAD_MIB", "QemuBackend", "QemuInfo", "guest_memory_mib"]

#: Host memory QEMU itself needs inside the sandbox's memory cgroup, beside guest RAM:
#: the TCG translation cache (64 MiB) plus QEMU's own heap; measured peak in docs/IMAGES.md.
QEMU_OVERHEAD_MIB = 96
#: Below this the guest kernel, the agent and a command do not fit.
MIN_GUEST_MIB = 128


@dataclass(frozen=True, kw_only=True)
class QemuInfo(VmInfo):
    """One QEMU sandbox as the registry keeps it."""

    socket: str
    qmp: str
    stderr_log: str
    host_uid: int
    watchdog_pid: int | None = None
    wall_time_s: float | None = None
    image: str = ""
    kernel_release: str = ""
    accel: Accel = "tcg"
    guest_mib: int = 0


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
        restore: bool | None = None,
    ) -> None:
        self.artifacts = artifacts
        self.accel = accel
        self.restore = restore_enabled() if restore is None else restore
        self._vms = VmChildren()
        self._accel_cache: dict[tuple[Path, str], Accel] = {}
        self._planned: dict[str, usersnap.UserSnapshot] = {}  # sandbox id -> restore from

    # -- protocol ------------------------------------------------------------------------

    def load_info(self, data: Mapping[str, Any]) -> QemuInfo:
        return QemuInfo.from_json(data)

    async def prepare(self, ctx: LaunchContext) -> None:
        try:
            await asyncio.to_thread(sandbox_args, qemu_binary(), runas=True)
        except ConfigError as exc:
            raise BackendError(str(exc)) from None
        if ctx.spec.mounts:
            raise BackendError("host mounts are not available in a VM; copy files in instead")
        art = find_vm_image(ctx, self.artifacts)
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

    async def start(self, ctx: LaunchContext) -> QemuInfo:
        spec, lim = ctx.spec, ctx.spec.limits
        art = find_vm_image(ctx, self.artifacts)
        planned = self._planned.pop(ctx.sandbox_id, None)
        if planned is not None and self.artifacts is None:  # the build it was taken on
            name = "default" if spec.image == "host" else spec.image
            art = find_image(ctx.settings, name, digest=str(planned.vm.get("image"))) or art
        accel = await self._accel(art, ctx.settings)
        net = ctx.network
        tap = await attach_sandbox_tap(ctx, ctx.host_uid)
        env = {**(net.env if net else {}), **ctx.extra_env, **spec.env}
        cgroup_fds = ctx.cgroup.attach_fds() if ctx.cgroup is not None else []
        launch = VmLaunch(
            accel=accel, cpus=_vcpus(lim.cpus), memory_mib=guest_memory_mib(lim.memory_mib),
            tap_ifname=tap, env=env, cgroup_fds=cgroup_fds,
        )  # fmt: skip
        vm = QemuVm()
        try:
            if planned is not None:
                vm = await usersnap.restore(art, ctx, planned, launch)
            elif self.restore:
                vm = await restore_sandbox(art, ctx, launch)
            else:
                await vm.start(
                    art,
                    ctx.run_dir,
                    cpus=_vcpus(lim.cpus),
                    memory_mib=guest_memory_mib(lim.memory_mib),
                    accel=accel,
                    netns_path=net.netns_path if net else None,
                    tap_ifname=tap,
                    workspace_mib=lim.workspace_mib,
                    hostname=spec.hostname or ctx.sandbox_id,
                    guest_ip=kernel_ip(ctx),
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
        self._vms.add(pid, vm.wait_exit)
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
        return QemuInfo(
            watchdog_pid=watchdog,
            wall_time_s=lim.wall_time_s,
            pid=pid,
            pid_start=process_start_time(pid),
            socket=str(vm.channel_path),
            qmp=str(vm.qmp_path),
            console_log=str(vm.console_log),
            stderr_log=str(safe_join(ctx.run_dir, "qemu.stderr")),
            run_dir=str(ctx.run_dir),
            image=art.digest,
            kernel_release=art.kernel_release,
            accel=accel,
            vcpus=_vcpus(lim.cpus),
            guest_mib=guest_memory_mib(lim.memory_mib),
            tap=tap,
            host_uid=ctx.host_uid,
            started_at=time.time(),
        )

    async def wait_exited(self, info: QemuInfo) -> None:
        await self._vms.wait_exited(info)

    async def start_failure(self, info: QemuInfo) -> IronclawError:
        return exited_early(Path(info.stderr_log))

    async def open_channel(
        self, info: QemuInfo | Mapping[str, Any], *, timeout: float = 5.0
    ) -> Connection:
        """Connect to a free agent channel of the VM, retrying while QEMU creates it.

        Bytes sent before the guest opens its port wait in the socket, so a booting VM
        is simply slow to answer, not unreachable. With every channel held by other
        connections (of this process or others), one is waited for up to ``timeout``,
        then :class:`~.channels.ChannelsBusy` says by whom.
        """
        info = QemuInfo.of(info)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await connect_channel(
                    info.socket, timeout=max(0.1, timeout),
                    handshake_s=max(timeout, 30.0), wait_s=max(0.0, deadline - time.monotonic()),
                )  # fmt: skip
            except ChannelsBusy:
                raise
            except ConnectError as exc:
                alive = same_process(info.pid, info.pid_start)
                if not alive or time.monotonic() >= deadline:
                    raise agent_unreachable(exc, "in this VM") from exc
            await asyncio.sleep(0.02)

    async def stop(self, info: QemuInfo, *, timeout: float = 2.0) -> None:
        """QMP ``quit`` (QEMU exits at once; the workspace is scratch), then SIGKILL."""

        async def quit_vm() -> None:
            with contextlib.suppress(QmpError, OSError):
                qmp = await QmpClient.connect(Path(info.qmp), limit_s=min(1.0, timeout))
                try:
                    await qmp.execute("quit", limit_s=min(1.0, timeout))
                finally:
                    await qmp.close()

        await stop_vmm(info, name="QEMU", graceful=quit_vm, children=self._vms, timeout=timeout)
        # QEMU ran unprivileged and could not remove its own files from the 0700 run dir.
        if info.run_dir:
            remove_run_files(Path(info.run_dir), RUN_FILES)

    async def pause(self, info: QemuInfo) -> None:
        """QMP ``stop``: the vCPUs halt, guest memory stays (QEMU holds it)."""
        await self._qmp(info, "stop")

    async def resume(self, info: QemuInfo) -> None:
        """QMP ``cont``."""
        await self._qmp(info, "cont")

    async def _qmp(self, info: QemuInfo, command: str) -> None:
        try:
            qmp = await QmpClient.connect(Path(info.qmp), limit_s=5.0)
            try:
                await qmp.execute(command, limit_s=5.0)
            finally:
                await qmp.close()
        except (QmpError, OSError) as exc:
            raise BackendError(f"QMP {command} failed: {exc}; is the VM running?") from exc

    # -- user snapshots (see .usersnap) --------------------------------------------------

    async def save_snapshot(
        self, info: QemuInfo, dest: Path
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """Save the VM's memory, devices and workspace disk into ``dest``."""
        return await usersnap.save(info, dest)

    def plan_restore(
        self, sandbox_id: str, directory: Path | None, files: Mapping[str, str],
        vm: Mapping[str, Any],
    ) -> None:  # fmt: skip
        """Make the next start of ``sandbox_id`` a restore of the snapshot in ``directory``
        (``files``: its sha256 per file; ``vm``: what it was taken from). None forgets it."""
        if directory is None:
            self._planned.pop(sandbox_id, None)
        else:
            self._planned[sandbox_id] = usersnap.UserSnapshot(directory, dict(files), dict(vm))

    async def check_snapshot(
        self, vm: Mapping[str, Any], spec: SandboxSpec, settings: Settings
    ) -> None:
        """Refuse (before anything is made) a snapshot this host and spec cannot load."""
        name = "default" if spec.image == "host" else spec.image
        art = self.artifacts or find_image(settings, name, digest=str(vm.get("image")))
        if art is None:
            raise ConfigError(
                f"the snapshot's image ({name}, build {str(vm.get('image'))[:16]}…) is no "
                "longer on this host: rebuilding makes another; take a new snapshot"
            )
        usersnap.check_compatible(
            vm, image=art.digest, qemu=await asyncio.to_thread(usersnap.qemu_version),
            accel=await self._accel(art, settings), cpus=_vcpus(spec.limits.cpus),
            guest_mib=guest_memory_mib(spec.limits.memory_mib),
            network=spec.network.needs_network,
        )  # fmt: skip

    async def inspect(self, info: QemuInfo) -> BackendStatus:
        logs = (info.stderr_log, info.console_log)
        return vm_status(info, "qemu", logs, limit=300, wall_time_s=info.wall_time_s)

    # -- internals -----------------------------------------------------------------------

    async def _accel(self, art: ImageArtifacts, settings: Settings) -> Accel:
        """KVM when a probe boot works there; the verdict is cached on disk and here."""
        if self.accel != "auto":
            return "kvm" if self.accel == "kvm" else "tcg"
        key = (settings.state_dir, art.digest)
        found = self._accel_cache.get(key)
        if found is None:
            found = self._accel_cache[key] = await asyncio.to_thread(probe_accel, art, settings)
        return found
