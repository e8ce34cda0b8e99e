"""Start a VM from a snapshot of a booted, agent-ready guest instead of booting it.

A boot under TCG takes seconds; restoring the saved RAM of a guest whose agent already
answers takes well under one. Per image, VM size, accelerator and "has a NIC", one VM is
booted, its agent awaited, and the paused machine migrated to a file stored beside the
image (``<image dir>/snapshots/<key>.state``) with its sha256 and the QEMU that wrote it
(``<key>.json``). Every restore hashes the file it hands to QEMU (through the same open
descriptor, so what is checked is what is loaded); a mismatch is refused with
:class:`SnapshotCorrupt`, and :meth:`SnapshotStore.restore` rebuilds the snapshot once.

What a snapshot may not carry over, and how a restored VM gets its own:

* **Disks.** The root is the image's read-only ext4, identical for every VM. The guest
  kernel of a saved VM has the workspace filesystem mounted, so a fresh ext4 disk cannot
  replace it under a restore: restored VMs use a tmpfs ``/workspace`` (capped at the
  sandbox's ``workspace_mib`` by ``identity.reset``), counted in guest memory. No
  environment disk either: the variables travel in ``identity.reset``.
* **Identity.** RNG state, hostname, machine id and address are in the saved RAM, the
  same for every restored VM. Right after the restore, and as its readiness proof, the
  host calls ``identity.reset`` with fresh seed bytes, the sandbox's names and its
  address (:mod:`ironclaw.guest.identity`); only then does anything else reach the guest.
  ``/proc/sys/kernel/random/boot_id`` is drawn on first read, after the reseed (nothing
  reads it before the snapshot; a value read before would survive the restore).
* **Network.** A snapshot for networked sandboxes is built with its NIC on an unconnected
  hub port; the NIC's backend is not part of the saved state, so each restore plugs the
  sandbox's own tap in its place.

The warm pool of restored VMs is the manager's (``fill_pool``, ``host.pool.acquire_pooled``): with
restoring on, each pooled sandbox is a restored VM with an identity of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ironclaw.backends.base import LaunchContext
from ironclaw.backends.qemu.channels import AGENT_CHANNELS
from ironclaw.backends.qemu.cmdline import Accel, qemu_binary
from ironclaw.backends.qemu.vm import QemuVm
from ironclaw.backends.restored import SnapshotCorrupt, fresh_identity, open_hashed, sha256_fd
from ironclaw.backends.vm import kernel_ip
from ironclaw.config import Settings, safe_join
from ironclaw.errors import BackendError, ConnectError
from ironclaw.images import ImageArtifacts
from ironclaw.proto import methods
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport import virtio_serial

__all__ = [
    "RESTORE_ENV",
    "SnapshotCorrupt",
    "SnapshotKey",
    "SnapshotStore",
    "VmLaunch",
    "VmSnapshot",
    "fresh_identity",
    "identity_probe",
    "open_verified",
    "restore_enabled",
    "restore_sandbox",
]

log = logging.getLogger(__name__)

#: The QEMU backend restores sandboxes from snapshots unless ``IRONCLAW_QEMU_RESTORE=0``.
RESTORE_ENV = "IRONCLAW_QEMU_RESTORE"
#: The uid the builder VM's QEMU drops to: it runs no user code, but QEMU is never root.
BUILDER_UID = 65534


def restore_enabled(env: Mapping[str, str] | None = None) -> bool:
    """On unless turned off (``0``, ``off``, ``no``, ``false``)."""
    value = (os.environ if env is None else env).get(RESTORE_ENV, "")
    return value.strip().lower() not in ("0", "off", "no", "false")


@dataclass(frozen=True)
class VmLaunch:
    """The VM a restore starts, as the backend decided it (image and user snapshots alike)."""

    accel: Accel
    cpus: int
    memory_mib: int
    tap_ifname: str | None
    env: Mapping[str, str]
    cgroup_fds: Sequence[int]


@dataclass(frozen=True)
class SnapshotKey:
    """What a restore must match exactly: QEMU rebuilds the same machine, then loads RAM.

    The agent's channel count is part of the name: a snapshot of a VM with other ports
    is never found (so never loaded into mismatched devices); a new one is built.
    """

    accel: Accel
    cpus: int
    memory_mib: int
    network: bool
    channels: int = AGENT_CHANNELS

    @property
    def name(self) -> str:
        net = "net" if self.network else "nonet"
        return f"{self.accel}-c{self.cpus}-m{self.memory_mib}-{net}-p{self.channels}"


@dataclass(frozen=True)
class VmSnapshot:
    """One stored snapshot and what it was checked against."""

    path: Path
    key: SnapshotKey
    image: str
    sha256: str
    size: int
    qemu: str


async def identity_probe(
    path: Path, *, request: methods.IdentityResetRequest, first_attempt_s: float = 1.0
) -> dict[str, Any]:
    """The readiness probe of a restored VM: the channel handshake, then ``identity.reset``.

    The agent's ack of the handshake proves it runs and reads this session, so no
    ``ping`` goes first. Each handshake is bounded and retried on a new connection (see
    :func:`~ironclaw.backends.qemu.ready.ping_probe`), the bound doubling up to 8 s so a
    slow, loaded TCG guest still gets through; the reset then has all the time it needs.
    """
    attempt_s = first_attempt_s
    while True:
        try:
            conn = await virtio_serial.connect(path, handshake_s=attempt_s)
        except ConnectError:  # no answer in time (or no socket yet: do not spin)
            attempt_s = min(8.0, attempt_s * 2)
            await asyncio.sleep(0.02)
            continue
        peer = Peer(conn, name="qemu-identity", limits=HOST_LIMITS)
        await peer.start()
        try:
            done = await methods.call(peer, request, methods.IdentityResetResult)
            return {**methods.to_json(done), "agent": True}
        finally:
            await peer.aclose()


def _qemu_id() -> str:
    """The QEMU binary that can read a snapshot: the one (path, size, mtime) that wrote it."""
    path = qemu_binary()
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def open_verified(snap: VmSnapshot) -> int:
    """Open the snapshot and check its sha256 through that descriptor; the caller closes it."""
    return open_hashed(
        snap.path,
        snap.sha256,
        f"snapshot {snap.path}",
        "; refusing to restore it; it will be rebuilt",
    )


async def _warm_up(path: Path) -> None:
    """Take the paths a restored VM takes first once before saving: the guest's page
    cache (modules, ``/bin/sh``) is then in the snapshot. TCG's translations are not,
    so every path a restored guest runs for the first time costs; this makes it cheaper."""
    conn = await virtio_serial.connect(path, handshake_s=None)  # within the build deadline
    peer = Peer(conn, name="qemu-snapshot-warm-up", limits=HOST_LIMITS)
    await peer.start()
    try:
        await methods.call(peer, fresh_identity("snapshot"), methods.IdentityResetResult)
        await methods.call(peer, methods.ExecRequest(argv=("/bin/sh", "-c", ":")), methods.ExecExit)
    finally:
        await peer.aclose()


async def _run_when_loaded(vm: QemuVm, timeout: float) -> None:
    """Let the guest run once its RAM is in: it was saved paused, and QEMU keeps a VM
    that was paused at the source paused after an incoming migration, ``cont`` or not."""
    async with asyncio.timeout(timeout):
        while (status := await vm.query_status()) == "inmigrate":
            await asyncio.sleep(0.01)
    if status != "running":
        await vm.resume()


class SnapshotStore:
    """The snapshots of one image, beside it in the image cache; built on first use."""

    def __init__(self, artifacts: ImageArtifacts, settings: Settings | None = None) -> None:
        self.artifacts = artifacts
        self.settings = settings
        self.root = safe_join(artifacts.ext4.parent, "snapshots")

    def _meta_path(self, key: SnapshotKey) -> Path:
        return safe_join(self.root, key.name + ".json")

    def load(self, key: SnapshotKey) -> VmSnapshot | None:
        """The stored snapshot for ``key`` if this QEMU wrote it, else None."""
        try:
            doc = json.loads(self._meta_path(key).read_text())
            snap = VmSnapshot(
                path=safe_join(self.root, key.name + ".state"),
                key=key,
                image=str(doc["image"]),
                sha256=str(doc["sha256"]),
                size=int(doc["size"]),
                qemu=str(doc["qemu"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if snap.image != self.artifacts.digest or snap.qemu != _qemu_id():
            return None
        return snap

    async def ensure(self, key: SnapshotKey, *, timeout: float = 300.0) -> VmSnapshot:
        """The snapshot for ``key``, booting a VM to make it when there is none yet."""
        snap = self.load(key)
        if snap is not None:
            return snap
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(safe_join(self.root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            snap = self.load(key)  # another process may have built it meanwhile
            if snap is None:
                snap = await self._build(key, timeout)
            return snap
        finally:
            os.close(lock)

    def discard(self, key: SnapshotKey) -> None:
        for suffix in (".json", ".state"):
            with contextlib.suppress(FileNotFoundError):
                safe_join(self.root, key.name + suffix).unlink()

    async def _boot_and_save(self, key: SnapshotKey, dest: Path, timeout: float) -> None:
        # AF_UNIX paths are short: the builder's sockets go in a short directory.
        run_dir = Path(tempfile.mkdtemp(prefix="ics-"))
        vm = QemuVm()
        try:
            await vm.start(
                self.artifacts,
                run_dir / "vm",
                cpus=key.cpus,
                memory_mib=key.memory_mib,
                accel=key.accel,
                settings=self.settings,
                run_as=BUILDER_UID,
                nic_placeholder=key.network,
            )
            await vm.wait_ready(timeout)
            await _warm_up(vm.channel_path)
            # Saved paused; a restored copy resumes in the agent's port reader, which
            # tells the next host connection apart by its hello.
            await vm.qmp.execute("stop")
            await vm.snapshot_save(dest, limit_s=timeout)
        finally:
            await vm.kill()
            shutil.rmtree(run_dir, ignore_errors=True)

    async def _build(self, key: SnapshotKey, timeout: float) -> VmSnapshot:
        """Boot, warm up, save; all of it within ``timeout`` or a clear error.

        The state goes to a ``.tmp`` file that becomes the snapshot only once complete and
        hashed; on any failure (the deadline included) it is removed, never left for a
        later restore to find.
        """
        started = time.monotonic()
        state = safe_join(self.root, key.name + ".state")
        tmp_state = state.with_name(state.name + ".tmp")
        try:
            async with asyncio.timeout(timeout):
                await self._boot_and_save(key, tmp_state, timeout)
                fd = os.open(tmp_state, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    digest = await asyncio.to_thread(sha256_fd, fd)
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
        except TimeoutError:
            tmp_state.unlink(missing_ok=True)
            raise BackendError(
                f"building the VM snapshot {key.name} for image {self.artifacts.name!r} did not "
                f"finish within {timeout:.0f}s (the partial snapshot was removed); the host may "
                "be overloaded: retry, or set IRONCLAW_QEMU_RESTORE=0 to boot VMs instead"
            ) from None
        except BaseException:
            tmp_state.unlink(missing_ok=True)
            raise
        os.replace(tmp_state, state)
        snap = VmSnapshot(
            path=state, key=key, image=self.artifacts.digest, sha256=digest, size=size,
            qemu=_qemu_id(),
        )  # fmt: skip
        doc = {k: v for k, v in asdict(snap).items() if k not in ("path", "key")}
        meta = self._meta_path(key)
        meta.with_suffix(".tmp").write_text(json.dumps({**doc, "key": asdict(key)}) + "\n")
        os.replace(meta.with_suffix(".tmp"), meta)
        log.info("built VM snapshot %s in %.1fs (%d MiB)", key.name,
                 time.monotonic() - started, size >> 20)  # fmt: skip
        return snap

    async def restore(
        self,
        key: SnapshotKey,
        run_dir: Path,
        identity: methods.IdentityResetRequest,
        *,
        netns_path: str | None = None,
        tap_ifname: str | None = None,
        run_as: int | None = None,
        cgroup_fds: Sequence[int] = (),
        timeout: float = 60.0,
    ) -> QemuVm:
        """A running VM restored from ``key``'s snapshot, its identity already reset.

        A snapshot that fails its check is discarded, rebuilt and restored once more.
        """
        snap = await self.ensure(key)
        try:
            fd = await asyncio.to_thread(open_verified, snap)
        except SnapshotCorrupt as exc:
            log.warning("%s", exc)
            self.discard(key)
            snap = await self.ensure(key)
            fd = await asyncio.to_thread(open_verified, snap)
        vm = QemuVm()
        try:
            try:
                await vm.start(
                    self.artifacts,
                    run_dir,
                    cpus=key.cpus,
                    memory_mib=key.memory_mib,
                    accel=key.accel,
                    netns_path=netns_path,
                    tap_ifname=tap_ifname,
                    settings=self.settings,
                    # The checked descriptor itself, reopened: what was hashed is loaded.
                    incoming=Path(f"/proc/self/fd/{fd}"),
                    run_as=run_as,
                    cgroup_fds=cgroup_fds,
                    nic_placeholder=key.network and tap_ifname is None,
                )
            finally:
                os.close(fd)
            await _run_when_loaded(vm, timeout)
            probe = functools.partial(identity_probe, request=identity)
            await vm.wait_ready(timeout, probe=probe)
        except BaseException:
            await vm.kill()
            raise
        return vm


async def restore_sandbox(
    artifacts: ImageArtifacts,
    ctx: LaunchContext,
    launch: VmLaunch,
) -> QemuVm:
    """The QEMU backend's start by restore: the sandbox's own uid, cgroups, netns and tap,
    and its names, address, environment and workspace size through ``identity.reset``."""
    net = ctx.network
    key = SnapshotKey(
        accel=launch.accel, cpus=launch.cpus, memory_mib=launch.memory_mib, network=net is not None
    )
    identity = fresh_identity(
        ctx.sandbox_id,
        hostname=ctx.spec.hostname or ctx.sandbox_id,
        ip=kernel_ip(ctx),
        env=launch.env,
        workspace_mib=ctx.spec.limits.workspace_mib,
    )
    return await SnapshotStore(artifacts, ctx.settings).restore(
        key,
        ctx.run_dir,
        identity,
        netns_path=net.netns_path if net else None,
        tap_ifname=launch.tap_ifname,
        run_as=ctx.host_uid,
        cgroup_fds=launch.cgroup_fds,
    )
