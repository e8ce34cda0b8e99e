"""User snapshots of a running QEMU sandbox: memory, devices and workspace disk.

:func:`save` pauses the VM (QMP ``stop``), migrates its RAM and device state to a file
(:meth:`QemuVm.snapshot_save`), copies its workspace disk while it is still paused (so
disk and memory are one instant), and lets it run again. The root disk is the image's
read-only ext4: only its digest is recorded. What a restore must match is recorded too:
image digest, QEMU version, accelerator, vCPUs, guest memory, and which devices the VM
had (workspace disk, NIC, environment disk, how many agent channels): QEMU rebuilds the
same machine, then loads the saved state into it.

:func:`restore` starts a new VM from such a snapshot for a new sandbox: its own copy of
the workspace disk (hashed as it is copied: what is checked is what is used), the
memory file checked through the descriptor QEMU loads, the sandbox's own uid, cgroups,
netns and tap, and a fresh identity (``identity.reset``: seed, hostname, machine id,
address, environment) before anything else reaches it. Processes running at the
snapshot keep running in every copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironclaw.backends.base import LaunchContext, same_process
from ironclaw.backends.qemu.channels import AGENT_CHANNELS
from ironclaw.backends.qemu.cmdline import qemu_binary
from ironclaw.backends.qemu.restore import VmLaunch, identity_probe
from ironclaw.backends.qemu.vm import QemuVm
from ironclaw.backends.restored import SnapshotCorrupt, fresh_identity, open_hashed, sha256_fd
from ironclaw.backends.vm import kernel_ip
from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConfigError
from ironclaw.images import ImageArtifacts

if TYPE_CHECKING:
    from ironclaw.backends.qemu.backend import QemuInfo

__all__ = [
    "DISK",
    "MEMORY",
    "UserSnapshot",
    "check_compatible",
    "copy_hashing",
    "qemu_version",
    "recover_source",
    "restore",
    "save",
]

MEMORY = "memory.state"
DISK = "workspace.ext4"
#: In a snapshot being written: which VM was paused for it, so that ``gc`` can let it
#: run again if the writer dies before it could (see :func:`recover_source`).
SOURCE = "source.json"
_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)


@dataclass(frozen=True)
class UserSnapshot:
    """A stored VM snapshot as the backend restores it: its directory, the recorded
    sha256 of each file, and the machine it was taken from (see :func:`save`)."""

    directory: Path
    files: Mapping[str, str]
    vm: Mapping[str, Any]


@functools.cache
def qemu_version() -> str:
    """``QEMU emulator version …``: a snapshot loads only into the QEMU that wrote it."""
    try:
        out = subprocess.run(
            [qemu_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"cannot ask QEMU its version: {exc}") from None
    return out.splitlines()[0].strip() if out else "unknown"


def copy_hashing(src: Path, dst: Path) -> str:
    """Copy ``src`` to a new private ``dst``, keeping zero runs as holes; its sha256."""
    h = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            if chunk == _ZERO[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate(fout.tell())
        fout.flush()
        os.fsync(fout.fileno())
    return str(h.hexdigest())


def _devices(pid: int) -> dict[str, bool | int]:
    """Which optional devices the running QEMU has, from its command line."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as exc:
        raise BackendError(f"the VM (pid {pid}) is gone: {exc}") from None
    return {
        "workspace": any(b"serial=ironclaw-ws" in a for a in args),
        "env_disk": any(b"serial=ironclaw-cfg" in a for a in args),
        "nic": any(b"virtio-net-device" in a for a in args),
        "channels": sum(a.startswith(b"virtserialport,") for a in args),
    }


async def save(
    info: QemuInfo, dest: Path, *, timeout: float = 300.0
) -> tuple[dict[str, str], dict[str, Any]]:
    """Snapshot the VM of ``info`` into ``dest``; its files' sha256 and
    what a restore must match. The VM runs again afterwards unless it was paused."""
    run_dir = Path(info.run_dir)
    devices = _devices(info.pid)
    vm = await QemuVm.attach(run_dir)
    was = "unknown"
    saved = False
    try:
        was = await vm.query_status()
        if was == "running":
            marker = {"backend": "qemu", "qmp": info.qmp, "pid": info.pid,
                      "pid_start": info.pid_start}  # fmt: skip
            safe_join(dest, SOURCE).write_text(json.dumps(marker))
            await vm.qmp.execute("stop")
        await vm.snapshot_save(safe_join(dest, MEMORY), limit_s=timeout)
        files: dict[str, str] = {}
        if devices["workspace"]:
            src = safe_join(run_dir, "workspace.ext4")
            files[DISK] = await asyncio.to_thread(copy_hashing, src, safe_join(dest, DISK))
        saved = True
    finally:
        try:
            if not saved:  # a migration still under way would refuse the cont
                with contextlib.suppress(Exception):
                    await vm.qmp.execute("migrate_cancel")
            if was == "running":
                await vm.resume()
        except Exception as exc:
            if saved:  # else the first error is the one to report
                raise BackendError(
                    f"the VM was saved but could not run again ({exc}); "
                    "remove the sandbox (`ironclaw sandbox rm`)"
                ) from None
        finally:
            await vm.detach()
    safe_join(dest, SOURCE).unlink(missing_ok=True)
    fd = os.open(safe_join(dest, MEMORY), os.O_RDONLY | os.O_CLOEXEC)
    try:
        files[MEMORY] = await asyncio.to_thread(sha256_fd, fd)
    finally:
        os.close(fd)
    meta = {
        "image": info.image,
        "kernel_release": info.kernel_release,
        "qemu": await asyncio.to_thread(qemu_version),
        "accel": info.accel,
        "cpus": info.vcpus,
        "guest_mib": info.guest_mib,
        **devices,
    }
    return files, meta


def _qmp_sync(sock: socket.socket, command: str, **arguments: Any) -> Any:
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    sock.sendall(json.dumps(msg).encode() + b"\n")
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise BackendError("QMP closed")
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        doc = json.loads(line)
        if "return" in doc:
            return doc["return"]
        if "error" in doc:
            raise BackendError(f"QMP {command}: {doc['error'].get('desc')}")


def recover_source(directory: Path) -> str | None:
    """After a snapshot writer died: cancel its migration and let the VM it paused run.

    Synchronous (``gc`` calls it from a thread). Only a VM that is still the same
    process and paused is continued; None when there was nothing to do.
    """
    try:
        marker = json.loads(safe_join(directory, SOURCE).read_text())
    except (OSError, ValueError):
        return None
    if not same_process(int(marker["pid"]), marker.get("pid_start")):
        return None
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        try:
            sock.connect(str(marker["qmp"]))
            sock.recv(65536)  # the greeting
            _qmp_sync(sock, "qmp_capabilities")
            _qmp_sync(sock, "migrate_cancel")
            for _ in range(500):
                done = _qmp_sync(sock, "query-migrate").get("status")
                if done not in ("setup", "active", "device", "pre-switchover", "cancelling"):
                    break
                time.sleep(0.02)
            status = _qmp_sync(sock, "query-status").get("status")
            if status not in ("paused", "postmigrate", "finish-migrate"):
                return None
            _qmp_sync(sock, "cont")
        except (OSError, ValueError, BackendError) as exc:
            return f"VM {marker['pid']} paused by a cut-off snapshot could not be resumed: {exc}"
    return f"VM {marker['pid']} resumed (a snapshot of it was cut off)"


def check_compatible(
    vm: Mapping[str, Any], *, image: str, qemu: str, accel: str, cpus: int, guest_mib: int,
    network: bool,
) -> None:  # fmt: skip
    """Refuse, with what to change, a snapshot this machine and spec cannot load."""
    if vm.get("image") != image:
        raise ConfigError(
            f"the snapshot was made from image {str(vm.get('image'))[:16]}…, not the current "
            f"{image[:16]}…: restore it where that image is, or take a new snapshot"
        )
    if vm.get("qemu") != qemu:
        raise ConfigError(
            f"the snapshot was written by {vm.get('qemu')!r}, this host has {qemu!r}: "
            "QEMU loads only its own snapshots; take a new one"
        )
    if vm.get("accel") != accel:
        raise ConfigError(
            f"the snapshot was made under {vm.get('accel')}, this host runs VMs under {accel}"
        )
    if (vm.get("cpus"), vm.get("guest_mib")) != (cpus, guest_mib):
        raise ConfigError(
            f"the snapshot is of a VM with {vm.get('cpus')} vCPUs and {vm.get('guest_mib')} MiB; "
            f"this spec gives {cpus} and {guest_mib}: keep the snapshot's memory and cpus limits"
        )
    if vm.get("channels", 1) != AGENT_CHANNELS:
        raise ConfigError(
            f"the snapshot's VM had {vm.get('channels', 1)} agent channel(s), this version's "
            f"VMs have {AGENT_CHANNELS}: its devices differ, so it cannot be loaded; take a "
            "new snapshot (of a sandbox started by this version)"
        )
    if bool(vm.get("nic")) != network:
        have = "a network" if vm.get("nic") else "no network"
        raise ConfigError(
            f"the snapshot's VM had {have}: restore it with the same (give --allow rules "
            "exactly when the snapshot's sandbox had them)"
        )


async def restore(
    artifacts: ImageArtifacts,
    ctx: LaunchContext,
    snap: UserSnapshot,
    launch: VmLaunch,
    *,
    timeout: float = 180.0,
) -> QemuVm:
    """A running VM for ``ctx``'s sandbox from ``snap``, its identity already its own."""
    accel, cpus, memory_mib, env = launch.accel, launch.cpus, launch.memory_mib, launch.env
    tap_ifname, cgroup_fds, net = launch.tap_ifname, launch.cgroup_fds, ctx.network
    check_compatible(
        snap.vm, image=artifacts.digest, qemu=await asyncio.to_thread(qemu_version),
        accel=accel, cpus=cpus, guest_mib=memory_mib, network=tap_ifname is not None,
    )  # fmt: skip
    disk: Path | None = None
    if snap.vm.get("workspace"):
        disk = safe_join(ctx.run_dir, "workspace.ext4")
        found = await asyncio.to_thread(copy_hashing, safe_join(snap.directory, DISK), disk)
        if found != snap.files.get(DISK):
            raise SnapshotCorrupt(
                f"snapshot workspace disk is corrupted (sha256 {found[:16]}…, recorded "
                f"{str(snap.files.get(DISK))[:16]}…)"
            )
    memory = safe_join(snap.directory, MEMORY)
    fd = await asyncio.to_thread(open_hashed, memory, snap.files[MEMORY], "snapshot memory file")
    # The environment disk must be there exactly when the saved VM had one (same
    # devices); the variables themselves travel in identity.reset.
    disk_env = (dict(env) or {"IRONCLAW_RESTORED": "1"}) if snap.vm.get("env_disk") else None
    vm = QemuVm()
    try:
        try:
            await vm.start(
                artifacts, ctx.run_dir, cpus=cpus, memory_mib=memory_mib, accel=accel,
                netns_path=net.netns_path if net else None, tap_ifname=tap_ifname,
                settings=ctx.settings, incoming=Path(f"/proc/self/fd/{fd}"),
                run_as=ctx.host_uid, cgroup_fds=cgroup_fds, guest_env=disk_env,
                workspace_disk=disk,
            )  # fmt: skip
        finally:
            os.close(fd)
        async with asyncio.timeout(timeout):
            while (status := await vm.query_status()) == "inmigrate":
                await asyncio.sleep(0.01)
        if status != "running":
            await vm.resume()
        identity = fresh_identity(
            ctx.sandbox_id, hostname=ctx.spec.hostname or ctx.sandbox_id, ip=kernel_ip(ctx),
            env=env,
        )  # fmt: skip
        await vm.wait_ready(timeout, probe=functools.partial(identity_probe, request=identity))
    except BaseException:
        await vm.kill()
        raise
    return vm
