"""QEMU ``microvm`` launcher: one sandbox VM, controlled over QMP.

The VM boots the image's uncompressed ``vmlinux`` and initramfs directly (no firmware
walk), mounts the image read-only under a tmpfs overlay, and talks to the host over a
few named virtio-serial ports, each backed by a host UNIX socket (``channel_paths``,
one host connection each: :mod:`.channels`): vsock would need ``/dev/vhost-vsock``,
which many hosts lack. QEMU runs in its own session so it
outlives the CLI that started it; ``stop`` ends it for good and removes its sockets.

KVM is used when a real boot under it works: some hosts expose ``/dev/kvm`` but cannot
run a stock kernel with it, so :func:`probe_accel` boots once and caches the verdict.
The command line is built by :mod:`.cmdline`, readiness proven by :mod:`.ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ironclaw.backends.qemu.accel import probe_accel
from ironclaw.backends.qemu.channels import (
    AGENT_CHANNELS,
    CHANNEL_SOCKET,
    channel_run_files,
    socket_path,
)
from ironclaw.backends.qemu.cmdline import (
    AGENT_PORT,
    TCG_TB_MIB,
    Accel,
    QemuPaths,
    guest_env_script,
    kernel_cmdline,
    qemu_argv,
    qemu_binary,
)
from ironclaw.backends.qemu.process import (
    AttachedProc,
    QemuProcess,
    check_dropped,
    wait_exit_within,
)
from ironclaw.backends.qemu.qmp import QmpClient, QmpError
from ironclaw.backends.qemu.ready import ReadyProbe, agent_usable, ping_probe, ready_line_probe
from ironclaw.backends.qemu.seccomp import sandbox_args
from ironclaw.backends.vm import remove_run_files, spawn_vmm
from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import BackendError, ConfigError, SandboxNotFound, SandboxTimeout
from ironclaw.images import ImageArtifacts, make_workspace_image

__all__ = [
    "AGENT_PORT",
    "RUN_FILES",
    "TCG_TB_MIB",
    "Accel",
    "QemuVm",
    "ReadyProbe",
    "agent_usable",
    "check_dropped",
    "guest_env_script",
    "kernel_cmdline",
    "probe_accel",
    "qemu_binary",
]

log = logging.getLogger(__name__)

#: What QEMU leaves in the run directory and ``stop`` removes (QEMU, run unprivileged,
#: cannot remove them itself).
RUN_FILES = (*channel_run_files(), "qmp.sock", "qemu.pid")
_SUN_PATH_MAX = 107
_warned_tcg: list[bool] = []  # warn once per process, not once per VM


class QemuVm:
    """One microVM. ``start`` then ``wait_ready``; ``stop`` or ``kill`` ends it."""

    def __init__(self) -> None:
        self._proc: QemuProcess | None = None
        self._qmp: QmpClient | None = None
        self._run_dir: Path | None = None
        self._agent_in_image = False
        # True once the guest's agent may have seen a host connection come and go.
        self._agent_reconnects = False
        self.accel: Accel | None = None
        self.kernel_release: str | None = None

    # -- paths -------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        if self._run_dir is None:
            raise BackendError("VM not started")
        return safe_join(self._run_dir, name)

    @property
    def channel_path(self) -> Path:
        """Host UNIX socket of the guest agent's first virtio-serial port (channel 0)."""
        return self._path(CHANNEL_SOCKET)

    @property
    def channel_paths(self) -> list[Path]:
        """The sockets of every agent channel (:mod:`.channels`), channel 0 first."""
        return [socket_path(self.channel_path, i) for i in range(AGENT_CHANNELS)]

    @property
    def qmp_path(self) -> Path:
        return self._path("qmp.sock")

    @property
    def console_log(self) -> Path:
        """The guest's serial console (kernel and init messages), kept for the sandbox log."""
        return self._path("console.log")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise BackendError("VM not started")
        return self._qmp

    @classmethod
    async def attach(cls, run_dir: Path) -> QemuVm:
        """Take control of a VM started earlier (by another process) in ``run_dir``.

        The process that started it must have exited or called :meth:`detach`.
        The pid file alone is not trusted: the process must be a QEMU whose command line
        names this run directory's QMP socket, so a recycled pid is never signalled.
        """
        vm = cls()
        vm._run_dir = run_dir
        try:
            pid = int(vm._path("qemu.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError) as exc:
            raise SandboxNotFound(f"no running VM in {run_dir}: {exc}") from exc
        if not any(str(vm.qmp_path).encode() in arg for arg in cmdline):
            raise SandboxNotFound(f"pid {pid} in {run_dir} is not this VM's QEMU")
        vm._proc = AttachedProc(pid)
        vm._agent_reconnects = True
        vm._agent_in_image = b"ironclaw.agent=off" not in b" ".join(cmdline)
        vm._qmp = await QmpClient.connect(vm.qmp_path)
        return vm

    # -- life cycle ----------------------------------------------------------------
    async def start(
        self,
        artifacts: ImageArtifacts,
        run_dir: Path,
        *,
        cpus: int = 1,
        memory_mib: int = 512,
        accel: Literal["auto", "kvm", "tcg"] = "auto",
        netns_path: str | None = None,
        tap_ifname: str | None = None,
        workspace_mib: int = 0,
        hostname: str = "sandbox",
        guest_ip: str | None = None,
        settings: Settings | None = None,
        incoming: Path | None = None,
        run_as: int | None = None,
        cgroup_fds: Sequence[int] = (),
        guest_env: Mapping[str, str] | None = None,
        nic_placeholder: bool = False,
        workspace_disk: Path | None = None,
    ) -> None:
        """Launch QEMU (detached into its own session) and connect QMP.

        ``guest_ip`` is a kernel ``ip=`` value (``client::gw:prefix::eth0:off``) for the
        NIC on ``tap_ifname``; the tap must already exist in ``netns_path`` (QEMU is
        started inside that namespace, so the sandbox's firewall applies to it).
        ``workspace_mib`` > 0 gives a fresh ext4 disk at /workspace, else a tmpfs.
        ``incoming`` restores a snapshot written by :meth:`snapshot_save` (read from a
        descriptor this process opens: QEMU may neither spawn a reader nor open the file).

        ``run_as`` makes QEMU drop to that host uid (and gid) once it has opened its
        files: it starts paused, and the guest runs only after every QEMU thread is seen
        without root and without capabilities. ``cgroup_fds`` (``cgroup.procs`` files
        opened by root) are joined before exec. ``guest_env`` is exported to the agent
        (and so to every command) through a small read-only disk. ``nic_placeholder``
        gives an unconnected NIC (building a snapshot that networked sandboxes restore).
        ``workspace_disk`` is an existing workspace disk (a user snapshot's copy), used
        instead of a fresh one.
        """
        if self._proc is not None:
            raise BackendError("VM already started")
        if not 1 <= cpus <= 64 or not 64 <= memory_mib <= 1 << 20:
            raise ConfigError(f"bad VM size: cpus={cpus} memory_mib={memory_mib}")
        if (tap_ifname is None) != (netns_path is None) and tap_ifname is not None:
            raise ConfigError("tap_ifname needs netns_path (the tap lives in the sandbox netns)")
        if run_as is not None and run_as <= 0:
            raise ConfigError("run_as needs a non-root uid")
        qemu = qemu_binary()
        sandbox = await asyncio.to_thread(sandbox_args, qemu, runas=run_as is not None)
        self._run_dir = ensure_private_dir(run_dir)
        for sock in (*self.channel_paths, self.qmp_path):
            if len(os.fsencode(sock)) > _SUN_PATH_MAX:
                raise ConfigError(f"socket path too long for AF_UNIX: {sock}")
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        chosen: Accel
        if accel == "auto":
            chosen = await asyncio.to_thread(probe_accel, artifacts, settings)
            if chosen == "tcg" and not _warned_tcg:
                _warned_tcg.append(True)
                log.warning("KVM unusable on this host; running VMs under TCG (slower)")
        else:
            chosen = "kvm" if accel == "kvm" else "tcg"
        self.accel = chosen
        self.kernel_release = artifacts.kernel_release
        self._agent_in_image = agent_usable(artifacts)
        workspace: Path | None = workspace_disk
        if workspace is None and workspace_mib > 0:
            workspace = self._path("workspace.ext4")
            await make_workspace_image(workspace, workspace_mib, journal=False)
        env_disk: Path | None = None
        if guest_env:
            env_disk = self._path("guest-env.sh")
            env_disk.write_bytes(guest_env_script(guest_env))
        in_fd = os.open(incoming, os.O_RDONLY | os.O_CLOEXEC) if incoming is not None else None
        # The workspace disk goes over as an fd set (read-write and read-only): QEMU, no
        # longer root, reopens it read-only when a snapshot hands the disk over, and
        # could not reach its path in the 0700 run directory.
        ws_fds = _open_fdset(workspace) if workspace is not None else []
        argv = qemu_argv(
            qemu,
            artifacts,
            QemuPaths(
                channel=self.channel_path,
                qmp=self.qmp_path,
                console_log=self.console_log,
                pid_file=self._path("qemu.pid"),
            ),
            accel=chosen,
            cpus=cpus,
            memory_mib=memory_mib,
            hostname=hostname,
            guest_ip=guest_ip,
            agent=self._agent_in_image,
            workspace=Path(f"/dev/fdset/{_WS_FDSET}") if ws_fds else None,
            tap_ifname=tap_ifname,
            env_disk=env_disk,
            incoming_fd=in_fd,
            run_as=run_as,
            sandbox=sandbox,
            nic_placeholder=nic_placeholder,
        )
        argv += [a for fd in ws_fds for a in ("-add-fd", f"fd={fd},set={_WS_FDSET}")]
        self._agent_reconnects = incoming is not None
        self.console_log.write_bytes(b"")
        stderr_path = self._path("qemu.stderr")
        try:
            self._proc = await spawn_vmm(
                argv,
                output=stderr_path,
                truncate=True,
                netns_path=netns_path,
                cgroup_fds=cgroup_fds,
                no_core_dumps=True,
                pass_fds=(*ws_fds, *(() if in_fd is None else (in_fd,))),
            )
        finally:
            for fd in [*ws_fds, *(() if in_fd is None else (in_fd,))]:
                os.close(fd)
        try:
            self._qmp = await self._connect_qmp(stderr_path, deadline=time.monotonic() + 10)
            if run_as is not None:
                # QMP answers only from QEMU's main loop, which runs after the drop.
                check_dropped(self._proc.pid, run_as)
                await self._qmp.execute("cont")
        except BaseException:
            await self.kill()
            raise

    async def wait_exit(self) -> int | None:
        """Wait until QEMU has exited; its status (-1 for an attached VM), None if never run."""
        proc = self._proc
        if proc is None:
            return None
        return await proc.wait()

    async def _connect_qmp(self, stderr_path: Path, deadline: float) -> QmpClient:
        proc = self._proc
        assert proc is not None
        while True:
            if proc.returncode is not None or (
                await wait_exit_within(proc, 0) and proc.returncode is not None
            ):
                tail = (await asyncio.to_thread(stderr_path.read_text, errors="replace"))[-2000:]
                raise BackendError(f"QEMU exited at start (status {proc.returncode}): {tail}")
            if self.qmp_path.exists():
                with contextlib.suppress(QmpError):
                    return await QmpClient.connect(self.qmp_path, limit_s=5)
            if time.monotonic() > deadline:
                raise BackendError("QEMU did not open its QMP socket in time")
            await asyncio.sleep(0.02)

    async def wait_ready(
        self,
        timeout: float = 60.0,
        probe: ReadyProbe | None = None,
    ) -> dict[str, Any]:
        """Wait until the guest answers on its channel; return what the probe learnt.

        The default probe calls the agent's ``ping`` when the image has an agent, else it
        reads the ``READY <kernel release>`` line the fallback init writes. Raises
        :class:`SandboxTimeout` (with the console's tail) when ``timeout`` passes.
        """
        if probe is None:
            if not self._agent_in_image:
                probe = ready_line_probe
            elif self._agent_reconnects:
                # Not a fresh boot: the agent may be between host connections (see
                # _ping_probe), as after a restore, an attach or an earlier probe.
                probe = functools.partial(ping_probe, attempt_s=3.0)
            else:
                probe = ping_probe
        proc = self._proc
        if proc is None:
            raise BackendError("VM not started")
        try:
            async with asyncio.timeout(timeout):
                task = asyncio.ensure_future(probe(self.channel_path))
                died = asyncio.ensure_future(proc.wait())
                try:
                    done, _ = await asyncio.wait({task, died}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    died.cancel()
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                if task not in done:
                    raise BackendError(
                        f"QEMU exited (status {proc.returncode}) before the guest was ready: "
                        + self._console_tail()
                    )
                self._agent_reconnects = True
                return task.result()
        except TimeoutError as exc:
            raise SandboxTimeout(
                f"guest not ready within {timeout}s; console: {self._console_tail()}"
            ) from exc

    def _console_tail(self, limit: int = 1500) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-limit:]
        except (OSError, BackendError):
            return "<no console>"

    async def query_status(self) -> str:
        ret = await self.qmp.execute("query-status")
        return str(ret.get("status", "unknown"))

    async def close_qmp(self) -> None:
        """Leave QMP free for a later process while this one still watches QEMU exit."""
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None

    async def detach(self) -> None:
        """Let go of a VM that keeps running (QEMU serves one QMP client at a time)."""
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        self._proc = None

    async def stop(self, graceful_timeout: float = 5.0) -> None:
        """Ask the guest to power down, then tell QEMU to quit, then SIGKILL it.

        Sockets and the pid file are removed whichever step ended it.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None and self._qmp is not None and not self._qmp.closed:
            with contextlib.suppress(QmpError):
                await self._qmp.execute("system_powerdown", limit_s=2)
            if not await wait_exit_within(proc, graceful_timeout):
                with contextlib.suppress(QmpError):
                    await self._qmp.execute("quit", limit_s=2)
                await wait_exit_within(proc, 3)
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL the QEMU process group now and clean up."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await wait_exit_within(proc, 10)
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        if self._run_dir is not None:
            remove_run_files(self._run_dir, RUN_FILES)

    # -- snapshots -----------------------------------------------------------------
    async def snapshot_save(self, path: Path, limit_s: float = 120.0) -> None:
        """Write the running VM's full state (RAM, devices, tmpfs root) to ``path``.

        Migration to a file: microvm has no writable qcow2 for ``savevm``. The VM is
        paused afterwards; ``cont`` or :meth:`resume` continues it. The workspace disk
        (if any) is not inside the file: copy ``workspace.ext4`` alongside it. The file
        is opened here and handed over on the QMP socket: a sandboxed QEMU may not spawn
        a writer, and an unprivileged one could not open the path.
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self.qmp.execute("getfd", {"fdname": "snapshot"}, fds=(fd,))
        finally:
            os.close(fd)
        await self.qmp.execute("migrate", {"uri": "fd:snapshot"})
        async with asyncio.timeout(limit_s):
            while True:
                info = await self.qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise BackendError(f"snapshot failed: {info.get('error-desc', status)}")
                await asyncio.sleep(0.05)

    async def resume(self) -> None:
        await self.qmp.execute("cont")


_WS_FDSET = 7


def _open_fdset(path: Path) -> list[int]:
    rw = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return [rw, os.open(path, os.O_RDONLY | os.O_CLOEXEC)]
    except BaseException:
        os.close(rw)
        raise
