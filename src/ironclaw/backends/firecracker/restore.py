"""Firecracker restores with the same guarantees as QEMU's: checked bytes, fresh identity.

:meth:`FirecrackerBackend.snapshot` writes the VM state, guest memory and workspace disk;
:func:`seal` records their sha256 beside them and :func:`restore_fresh` refuses a
snapshot whose files no longer match (Firecracker opens them by path itself, so they are
checked just before the load), restores it through the backend's snapshot API, and
sends ``identity.reset`` before the sandbox is handed out, so two sandboxes restored
from one snapshot share neither RNG state nor names nor address.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from ironclaw.backends.base import LaunchContext
from ironclaw.backends.firecracker.backend import FirecrackerBackend, FirecrackerInfo, SnapshotFiles
from ironclaw.backends.restored import SnapshotCorrupt, fresh_identity, reset_identity, sha256_fd
from ironclaw.backends.vm import kernel_ip
from ironclaw.config import safe_join

__all__ = ["SEAL_FILE", "restore_fresh", "seal", "verify"]

SEAL_FILE = "sha256.json"


def _files(snap: SnapshotFiles) -> dict[str, Path]:
    files = {"state": snap.state, "memory": snap.memory}
    if snap.workspace.exists():
        files["workspace"] = snap.workspace
    return files


def _hash(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def seal(snap: SnapshotFiles) -> dict[str, str]:
    """Record the sha256 of every file of ``snap`` (call once, right after the snapshot)."""
    sums = {name: _hash(path) for name, path in _files(snap).items()}
    out = safe_join(snap.directory, SEAL_FILE)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(sums, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return sums


def verify(snap: SnapshotFiles) -> None:
    """Raise :class:`SnapshotCorrupt` unless every file still has its sealed sha256."""
    try:
        sums = json.loads(safe_join(snap.directory, SEAL_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotCorrupt(
            f"snapshot {snap.directory} has no readable {SEAL_FILE} ({exc}): seal it after "
            "taking it, or take it again"
        ) from exc
    files = _files(snap)
    if not isinstance(sums, dict) or set(sums) != set(files):
        raise SnapshotCorrupt(f"snapshot {snap.directory}: files do not match its seal")
    for name, path in files.items():
        try:
            found = _hash(path)
        except OSError as exc:
            raise SnapshotCorrupt(f"snapshot file {path} cannot be read: {exc}") from exc
        if found != sums[name]:
            raise SnapshotCorrupt(
                f"snapshot file {path} is corrupt (sha256 {found[:16]}..., sealed "
                f"{str(sums[name])[:16]}...): refusing to restore it; take the snapshot again"
            )


async def restore_fresh(
    backend: FirecrackerBackend, ctx: LaunchContext, snap: SnapshotFiles, *, timeout: float = 30.0
) -> FirecrackerInfo:
    """Check, restore, and give the VM the sandbox's own identity (stopped on failure)."""
    await asyncio.to_thread(verify, snap)
    info = await backend.restore(ctx, snap)
    identity = fresh_identity(
        ctx.sandbox_id,
        hostname=ctx.spec.hostname or ctx.sandbox_id,
        ip=kernel_ip(ctx),
        env={**(ctx.network.env if ctx.network else {}), **ctx.extra_env, **ctx.spec.env},
    )
    try:
        conn = await backend.open_channel(info, timeout=timeout)
        await reset_identity(conn, identity, timeout=timeout)
    except BaseException:
        await backend.stop(info)
        raise
    return info
