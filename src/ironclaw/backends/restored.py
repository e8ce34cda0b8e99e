"""What every VM restored from a snapshot needs, whichever VMM restores it.

A snapshot is trusted only while its bytes match the sha256 recorded when it was made
(:func:`sha256_fd`, :class:`SnapshotCorrupt`), and every VM restored from it must become
a machine of its own before anything else reaches it: fresh seed bytes, machine id,
names, address and environment, sent in ``identity.reset`` (:func:`fresh_identity`,
:func:`reset_identity`; the guest side is :mod:`ironclaw.guest.identity`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping

from ironclaw.errors import BackendError
from ironclaw.proto import methods
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport import Connection

__all__ = ["SnapshotCorrupt", "fresh_identity", "open_hashed", "reset_identity", "sha256_fd"]

_CHUNK = 1 << 20


class SnapshotCorrupt(BackendError):
    """A stored snapshot no longer matches its recorded sha256: it must not be restored."""


def sha256_fd(fd: int) -> str:
    """The sha256 of the whole file behind ``fd``, left at offset 0 for its next reader."""
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return h.hexdigest()


def open_hashed(path: str | os.PathLike[str], digest: str, what: str, then: str = "") -> int:
    """Open ``path`` and check its sha256 through that very descriptor (what is hashed is
    what gets loaded: no swap between check and use); the caller closes it.

    ``what`` names the file in errors, ``then`` says what happens next to a corrupt one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotCorrupt(f"{what} cannot be read: {exc}") from None
    try:
        found = sha256_fd(fd)
    except OSError as exc:
        os.close(fd)
        raise SnapshotCorrupt(f"{what} cannot be read: {exc}") from None
    if found != digest:
        os.close(fd)
        raise SnapshotCorrupt(
            f"{what} is corrupt (sha256 {found[:16]}..., recorded {digest[:16]}...){then}"
        )
    return fd


def fresh_identity(
    sandbox_id: str,
    *,
    hostname: str | None = None,
    ip: str | None = None,
    env: Mapping[str, str] | None = None,
    workspace_mib: int = 0,
) -> methods.IdentityResetRequest:
    """A new seed and machine id (from the host's CSPRNG) and the sandbox's names.

    ``ip`` is a kernel ``ip=`` value, as a booting VM gets on its command line.
    """
    return methods.IdentityResetRequest(
        seed=secrets.token_hex(64),
        hostname=(hostname or sandbox_id)[:64],
        sandbox_id=sandbox_id,
        machine_id=secrets.token_hex(16),
        ip=ip,
        env=dict(env) if env else None,
        workspace_mib=workspace_mib,
    )


async def reset_identity(
    conn: Connection, request: methods.IdentityResetRequest, *, timeout: float | None = None
) -> methods.IdentityResetResult:
    """Send ``identity.reset`` on a fresh channel connection, then close it."""
    peer = Peer(conn, name="identity-reset", limits=HOST_LIMITS)
    await peer.start()
    try:
        return await methods.call(peer, request, methods.IdentityResetResult, timeout=timeout)
    finally:
        await peer.aclose()
