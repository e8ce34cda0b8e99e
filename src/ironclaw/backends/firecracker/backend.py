"""The Firecracker backend: one microVM per sandbox, jailed when the jailer is installed.

Launch order, and why:

* **Files first.** Under the jailer, the kernel, initramfs and read-only root are
  hard-linked into the chroot and a fresh ext4 workspace is made there, owned by the VM's
  uid; Firecracker is told chroot-relative paths. Without the jailer the same files are
  used in place (development hosts; Firecracker then runs as root).
* **Network before the VMM.** With a network policy, a tap owned by the VM's uid is
  bridged to the sandbox's veth inside its namespace (:mod:`.tap`), and Firecracker
  starts in that namespace, so the host firewall and proxy apply unchanged.
* **A detached process.** The jailer (or Firecracker) runs in its own session inside the
  sandbox's cgroups, so it outlives the CLI that started it; its pid and start time go
  into ``info``, and the API and vsock sockets are reached through short symlinks in
  the run directory (a chroot path can exceed ``sun_path``).
* **Boot over the API**, every body built by :mod:`.api`; the channel is hybrid vsock
  with retries, since the host always connects while the guest still boots.
* **User snapshots** through the manager (:mod:`.usersnap`): :meth:`save_snapshot`,
  and a start planned with :meth:`plan_restore` restores instead of booting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironclaw.backends import vm
from ironclaw.backends.base import (
    BackendStatus,
    LaunchContext,
    agent_unreachable,
    log_tail,
    process_start_time,
)
from ironclaw.backends.firecracker import usersnap
from ironclaw.backends.firecracker.api import (
    AGENT_VSOCK_PORT,
    NicConfig,
    SnapshotType,
    VmConfig,
    boot_requests,
    ctrl_alt_del_request,
    guest_mac,
    kernel_boot_args,
    snapshot_load_request,
    vm_state_request,
)
from ironclaw.backends.firecracker.client import FirecrackerApi, RequestCheck
from ironclaw.backends.firecracker.jailer import JailLayout, LaunchPaths, jailer_argv, link_into
from ironclaw.backends.firecracker.snapshot import (
    SNAP_MEM,
    SNAP_STATE,
    SnapshotFiles,
    take_snapshot,
)
from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConfigError, ConnectError, IronclawError
from ironclaw.images import ImageArtifacts, make_workspace_image
from ironclaw.resources.tap import TAP
from ironclaw.spec import SandboxSpec
from ironclaw.transport import Connection, SocketConnection, hybrid_vsock

__all__ = [
    "VMM_OVERHEAD_MIB",
    "FirecrackerBackend",
    "FirecrackerInfo",
    "SnapshotFiles",
    "connect_agent",
    "probe_firecracker",
]

#: Memory the VMM itself needs inside the sandbox's memory cgroup, beside guest RAM.
VMM_OVERHEAD_MIB = 32
_JAILED_KERNEL = "/vmlinux"
_JAILED_INITRD = "/initramfs.cpio"
_JAILED_ROOTFS = "/rootfs.ext4"
_JAILED_WORKSPACE = "/workspace.ext4"
_JAILED_VSOCK = "/v.sock"


def _binary(explicit: str | None, env: str, name: str) -> str | None:
    found = explicit or os.environ.get(env) or shutil.which(name)
    return found if found and os.access(found, os.X_OK) else None


def probe_firecracker(
    *, firecracker: str | None = None, jailer: str | None = None, kvm: str = "/dev/kvm"
) -> tuple[bool, str]:
    """For ``ironclaw doctor``: are firecracker, the jailer and a usable KVM present?

    Whether KVM can actually boot a guest is only known from a boot; this says so
    rather than claiming it (the QEMU backend's cached boot probe covers that question).
    """
    fc = _binary(firecracker, "IRONCLAW_FIRECRACKER", "firecracker")
    jl = _binary(jailer, "IRONCLAW_JAILER", "jailer")
    missing = [n for n, p in (("firecracker", fc), ("jailer", jl)) if p is None]
    if not os.path.exists(kvm):
        missing.append(f"{kvm} (no hardware virtualisation)")
    elif not os.access(kvm, os.R_OK | os.W_OK):
        missing.append(f"access to {kvm}")
    if missing:
        return False, "missing: " + ", ".join(missing)
    return True, f"firecracker {fc}, jailer {jl}, {kvm} present; bootability not verified"


async def connect_agent(
    uds_path: str | os.PathLike[str], port: int = AGENT_VSOCK_PORT, *, deadline: float = 10.0
) -> SocketConnection:
    """Hybrid vsock to the guest agent, with boot-race retries, ready for a Peer."""
    return await hybrid_vsock.connect(uds_path, port, deadline=deadline)


@dataclass(frozen=True, kw_only=True)
class FirecrackerInfo(vm.VmInfo):
    """One Firecracker sandbox as the registry keeps it."""

    api_socket: str
    vsock_uds: str
    uid: int
    gid: int
    vsock_port: int = AGENT_VSOCK_PORT
    chroot_base: str | None = None
    jail_id: str | None = None
    jailed: bool = False
    mem_mib: int = 0
    track_dirty_pages: bool = False


class FirecrackerBackend:
    """Firecracker microVMs behind the :class:`~ironclaw.backends.base.Backend` protocol."""

    name = "firecracker"

    def __init__(
        self,
        *,
        firecracker: str | None = None,
        jailer: str | None = None,
        use_jailer: bool | None = None,
        chroot_base: Path | None = None,
        artifacts: ImageArtifacts | None = None,
        console: bool = False,
        workspace_disk: bool = True,
        track_dirty_pages: bool = False,
        check: RequestCheck | None = None,
        kvm: str = "/dev/kvm",
        api_timeout: float = 10.0,
    ) -> None:
        self.firecracker = _binary(firecracker, "IRONCLAW_FIRECRACKER", "firecracker")
        self.jailer = _binary(jailer, "IRONCLAW_JAILER", "jailer")
        self.use_jailer = self.jailer is not None if use_jailer is None else use_jailer
        self.chroot_base = chroot_base
        self.artifacts = artifacts
        self.console = console
        self.workspace_disk = workspace_disk
        self.track_dirty_pages = track_dirty_pages
        self.check = check
        self.kvm = kvm
        self.api_timeout = api_timeout
        self._children = vm.VmChildren()
        self._planned: dict[str, tuple[Path, dict[str, str]]] = {}  # sandbox id -> snapshot

    # -- protocol ------------------------------------------------------------------------

    def load_info(self, data: Mapping[str, Any]) -> FirecrackerInfo:
        return FirecrackerInfo.from_json(data)

    async def prepare(self, ctx: LaunchContext) -> None:
        if self.firecracker is None:
            raise BackendError(
                "firecracker is not installed: put the release binary on PATH or set "
                "IRONCLAW_FIRECRACKER (`ironclaw doctor` lists what this host lacks)"
            )
        if self.use_jailer and self.jailer is None:
            raise BackendError("the jailer is not installed: put it on PATH or set IRONCLAW_JAILER")
        if not os.access(self.kvm, os.R_OK | os.W_OK):
            raise BackendError(f"{self.kvm} is missing or not accessible: Firecracker needs KVM")
        if ctx.spec.mounts:
            raise BackendError("host mounts are not available in a VM; copy files in instead")
        vm.find_vm_image(ctx, self.artifacts)
        if ctx.spec.limits.memory_mib - VMM_OVERHEAD_MIB < 64:
            raise ConfigError(
                f"memory_mib {ctx.spec.limits.memory_mib} leaves the guest under 64 MiB "
                f"after the VMM's {VMM_OVERHEAD_MIB} MiB"
            )

    async def start(self, ctx: LaunchContext) -> FirecrackerInfo:
        planned = self._planned.pop(ctx.sandbox_id, None)
        if planned is not None:
            return await usersnap.restore(self, ctx, *planned)
        return await self._launch(ctx, snapshot=None)

    # -- user snapshots (see .usersnap) --------------------------------------------------

    async def save_snapshot(
        self, info: FirecrackerInfo, dest: Path
    ) -> tuple[dict[str, str], dict[str, Any]]:
        return await usersnap.save(self, info, dest)

    def plan_restore(
        self, sandbox_id: str, directory: Path | None, files: Mapping[str, str],
        vm: Mapping[str, Any],
    ) -> None:  # fmt: skip
        """Make the next start of ``sandbox_id`` a restore of the snapshot in ``directory``."""
        if directory is None:
            self._planned.pop(sandbox_id, None)
        else:
            self._planned[sandbox_id] = (directory, dict(files))

    async def check_snapshot(self, vm: Mapping[str, Any], spec: SandboxSpec, settings: Any) -> None:
        lim = spec.limits
        usersnap.check_compatible(
            vm, vcpus=min(32, max(1, -(-int(lim.cpus * 1000) // 1000))),
            mem_mib=lim.memory_mib - VMM_OVERHEAD_MIB, network=spec.network.needs_network,
        )  # fmt: skip

    async def restore(self, ctx: LaunchContext, snapshot: SnapshotFiles) -> FirecrackerInfo:
        """Start the sandbox from a snapshot instead of booting (prepare first)."""
        if self.layout_for(ctx) is None:
            raise BackendError("restoring a snapshot needs the jailer (stable chroot paths)")
        return await self._launch(ctx, snapshot=snapshot)

    async def open_channel(
        self, info: FirecrackerInfo | Mapping[str, Any], *, timeout: float = 5.0
    ) -> Connection:
        info = FirecrackerInfo.of(info)
        try:
            return await connect_agent(info.vsock_uds, info.vsock_port, deadline=timeout)
        except ConnectError as exc:
            raise agent_unreachable(exc, "in this VM", booting=True) from exc

    async def stop(self, info: FirecrackerInfo, *, timeout: float = 2.0) -> None:
        """Ctrl-Alt-Del first (the guest syncs its workspace), then SIGKILL; then clean up."""

        async def ctrl_alt_del() -> None:
            with contextlib.suppress(IronclawError):
                async with self._api(info, timeout=min(1.0, timeout)) as api:
                    await api.request(ctrl_alt_del_request())

        await vm.stop_vmm(
            info,
            name="Firecracker",
            graceful=ctrl_alt_del,
            children=self._children,
            timeout=timeout,
        )
        if info.chroot_base:
            JailLayout(Path(info.chroot_base), str(info.jail_id)).remove()
        for path in (info.api_socket, info.vsock_uds):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    async def inspect(self, info: FirecrackerInfo) -> BackendStatus:
        return vm.vm_status(info, "firecracker", [info.console_log], limit=800)

    async def wait_exited(self, info: FirecrackerInfo) -> None:
        await self._children.wait_exited(info)

    async def start_failure(self, info: FirecrackerInfo) -> IronclawError:
        return vm.exited_early(Path(info.console_log))

    # -- VM controls ---------------------------------------------------------------------

    async def pause(self, info: FirecrackerInfo) -> None:
        async with self._api(info) as api:
            await api.request(vm_state_request("Paused"))

    async def resume(self, info: FirecrackerInfo) -> None:
        async with self._api(info) as api:
            await api.request(vm_state_request("Resumed"))

    async def snapshot(
        self, info: FirecrackerInfo, dest: Path, *, kind: SnapshotType = "Full", resume: bool = True
    ) -> SnapshotFiles:
        """Pause, write state and memory, move them (and the workspace) to ``dest``.

        A ``Diff`` snapshot needs a VM started with ``track_dirty_pages``.
        """
        if kind == "Diff" and not info.track_dirty_pages:
            raise ConfigError("a Diff snapshot needs a VM started with track_dirty_pages")
        plan = self._plan_from(info)
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        async with self._api(info, timeout=120.0) as api:
            return await take_snapshot(
                api, plan, dest, kind, workspace=plan.host(_JAILED_WORKSPACE), resume=resume
            )

    # -- internals -----------------------------------------------------------------------

    def layout_for(self, ctx: LaunchContext) -> JailLayout | None:
        if not self.use_jailer:
            return None
        base = self.chroot_base or safe_join(ctx.settings.state_dir, "jailer")
        return JailLayout(base, ctx.sandbox_id)

    def _plan_from(self, info: FirecrackerInfo) -> LaunchPaths:
        layout = None
        if info.chroot_base:
            layout = JailLayout(Path(info.chroot_base), str(info.jail_id))
        return LaunchPaths(layout, Path(info.run_dir), info.uid, info.gid)

    def _api(self, info: FirecrackerInfo, *, timeout: float | None = None) -> FirecrackerApi:
        return FirecrackerApi(
            info.api_socket, timeout=timeout or self.api_timeout, check=self.check
        )

    async def _launch(self, ctx: LaunchContext, snapshot: SnapshotFiles | None) -> FirecrackerInfo:
        assert self.firecracker is not None
        art = vm.find_vm_image(ctx, self.artifacts)
        layout = self.layout_for(ctx)
        uid = gid = ctx.host_uid
        plan = LaunchPaths(layout, ctx.run_dir, uid, gid)
        try:
            cfg = await self._stage(ctx, plan, art, snapshot)
            tap = await vm.attach_sandbox_tap(ctx, uid)
            proc = await self._spawn(ctx, plan)
        except BaseException:
            if layout is not None:
                layout.remove()
            raise
        info = FirecrackerInfo(
            pid=proc.pid,
            pid_start=process_start_time(proc.pid),
            api_socket=str(plan.api_link),
            vsock_uds=str(plan.vsock_link),
            vsock_port=AGENT_VSOCK_PORT,
            run_dir=str(ctx.run_dir),
            console_log=str(safe_join(ctx.run_dir, "console.log")),
            chroot_base=str(layout.chroot_base) if layout else None,
            jail_id=layout.jail_id if layout else None,
            uid=uid,
            gid=gid,
            jailed=layout is not None,
            tap=tap,
            vcpus=cfg.vcpus,
            mem_mib=cfg.mem_mib,
            track_dirty_pages=cfg.track_dirty_pages,
            started_at=time.time(),
        )
        self._children.add(proc.pid, proc.wait)
        try:
            async with self._api(info) as api:
                await api.wait_ready(self.api_timeout, alive=lambda: proc.returncode is None)
                if snapshot is None:
                    await api.run(boot_requests(cfg))
                else:
                    await api.request(
                        snapshot_load_request(
                            "/" + SNAP_STATE,
                            "/" + SNAP_MEM,
                            resume=True,
                            track_dirty_pages=cfg.track_dirty_pages or None,
                            nic=cfg.nic,
                            vsock_uds=cfg.vsock_uds,
                        )
                    )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self.stop(info, timeout=1.0)
            if isinstance(exc, BackendError):
                tail = log_tail(Path(info.console_log))
                raise BackendError(
                    f"{exc}" + (f"; Firecracker said: {tail}" if tail else "")
                ) from exc
            raise
        return info

    async def _stage(
        self,
        ctx: LaunchContext,
        plan: LaunchPaths,
        art: ImageArtifacts,
        snapshot: SnapshotFiles | None,
    ) -> VmConfig:
        """Put every file where Firecracker will look, and describe the VM."""
        limits = ctx.spec.limits
        layout = plan.layout
        if layout is not None:
            if layout.instance_dir.exists():
                raise BackendError(f"jail {layout.instance_dir} exists already; run `ironclaw gc`")
            layout.root.mkdir(parents=True, mode=0o755)
            run = layout.host_path("/run")
            run.mkdir(mode=0o755)
            os.chown(run, plan.uid, plan.gid)
            await asyncio.to_thread(link_into, layout, art.vmlinux, _JAILED_KERNEL)
            await asyncio.to_thread(link_into, layout, art.initramfs, _JAILED_INITRD)
            await asyncio.to_thread(link_into, layout, art.ext4, _JAILED_ROOTFS)
            if snapshot is not None:
                for src, name in ((snapshot.state, SNAP_STATE), (snapshot.memory, SNAP_MEM)):
                    await asyncio.to_thread(link_into, layout, src, "/" + name, mode=0o400)
                    os.chown(layout.host_path("/" + name), plan.uid, plan.gid)
        workspace: str | None = None
        if self.workspace_disk:
            ws_host = plan.host(_JAILED_WORKSPACE)
            if snapshot is not None and snapshot.workspace.exists():
                await asyncio.to_thread(shutil.copyfile, snapshot.workspace, ws_host)
            else:
                await make_workspace_image(ws_host, limits.workspace_mib)
            os.chown(ws_host, plan.uid, plan.gid)
            workspace = plan.vm_path(_JAILED_WORKSPACE, ws_host)
        for link, target in (
            (plan.api_link, layout.api_socket if layout else plan.host("/api.socket")),
            (plan.vsock_link, plan.host(_JAILED_VSOCK)),
        ):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            if layout is not None:
                link.symlink_to(target)
        net = ctx.network
        boot_args = kernel_boot_args(
            console=self.console,
            hostname=ctx.spec.hostname or ctx.sandbox_id,
            ip=vm.kernel_ip(ctx),
            workspace=workspace is not None,
        )
        return VmConfig(
            kernel=plan.vm_path(_JAILED_KERNEL, art.vmlinux),
            initrd=plan.vm_path(_JAILED_INITRD, art.initramfs),
            rootfs=plan.vm_path(_JAILED_ROOTFS, art.ext4),
            workspace=workspace,
            vsock_uds=plan.vm_path(_JAILED_VSOCK, plan.vsock_link),
            boot_args=boot_args,
            vcpus=min(32, max(1, -(-int(limits.cpus * 1000) // 1000))),
            mem_mib=limits.memory_mib - VMM_OVERHEAD_MIB,
            track_dirty_pages=self.track_dirty_pages,
            nic=NicConfig(tap=TAP, mac=guest_mac(ctx.sandbox_id)) if net else None,
            guest_cid=3 + ctx.slot,
        )

    async def _spawn(self, ctx: LaunchContext, plan: LaunchPaths) -> asyncio.subprocess.Process:
        assert self.firecracker is not None
        net = ctx.network
        if plan.layout is not None:
            assert self.jailer is not None
            argv = jailer_argv(
                jailer=self.jailer,
                firecracker=self.firecracker,
                layout=plan.layout,
                uid=plan.uid,
                gid=plan.gid,
                netns=net.netns_path if net else None,
                cgroup_version=_cgroup_version(),
            )
        else:
            argv = [self.firecracker, "--api-sock", str(plan.api_link), "--id", ctx.sandbox_id]
        cgroup_fds = ctx.cgroup.attach_fds() if ctx.cgroup is not None else []
        try:
            return await vm.spawn_vmm(
                argv,
                output=safe_join(ctx.run_dir, "console.log"),
                truncate=False,
                # The jailer enters the namespace itself (its --netns).
                netns_path=net.netns_path if net is not None and plan.layout is None else None,
                cgroup_fds=cgroup_fds,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        finally:
            for fd in cgroup_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _cgroup_version() -> int:
    return 2 if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else 1
