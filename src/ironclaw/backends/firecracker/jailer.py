"""Firecracker's jailer: its command line and the chroot it builds.

The jailer creates ``<chroot_base>/<exec name>/<id>/root``, chroots there, enters the
given network namespace, drops to ``uid``/``gid`` and execs Firecracker, whose API
socket then lands at ``root/run/firecracker.socket``. Everything the VM opens (kernel,
initramfs, disks) must be inside that root and is named to Firecracker by its
chroot-relative path; :class:`JailLayout` keeps both views of every path together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConfigError

__all__ = [
    "API_SOCKET",
    "JailLayout",
    "LaunchPaths",
    "jailer_argv",
    "link_into",
    "validate_jailer_id",
]

#: Where the jailed Firecracker puts its API socket, relative to the chroot.
API_SOCKET = "run/firecracker.socket"
_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def validate_jailer_id(value: str) -> str:
    """The jailer accepts 1-64 alphanumerics and hyphens; every sandbox id qualifies."""
    if _ID.fullmatch(value) is None:
        raise ConfigError(f"invalid jailer id {value!r}: 1-64 of A-Z, a-z, 0-9 and '-'")
    return value


@dataclass(frozen=True)
class JailLayout:
    """The chroot of one jailed Firecracker and the host path of each file in it."""

    chroot_base: Path
    jail_id: str
    exec_name: str = "firecracker"

    def __post_init__(self) -> None:
        validate_jailer_id(self.jail_id)
        if "firecracker" not in self.exec_name:
            raise ConfigError("the jailer only runs an exec file whose name has 'firecracker'")

    @property
    def instance_dir(self) -> Path:
        return safe_join(self.chroot_base, self.exec_name, self.jail_id)

    @property
    def root(self) -> Path:
        return safe_join(self.instance_dir, "root")

    @property
    def api_socket(self) -> Path:
        return self.host_path("/" + API_SOCKET)

    def host_path(self, jailed: str) -> Path:
        """Host path of a chroot-relative path such as ``/rootfs.ext4``."""
        if not jailed.startswith("/"):
            raise ConfigError(f"jailed path {jailed!r} must be absolute inside the chroot")
        return safe_join(self.root, *[p for p in jailed.split("/") if p])

    def remove(self) -> None:
        """Delete the whole instance directory (the jailer never removes it itself)."""
        shutil.rmtree(self.instance_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.instance_dir.parent.rmdir()


def jailer_argv(
    *,
    jailer: str,
    firecracker: str,
    layout: JailLayout,
    uid: int,
    gid: int,
    netns: str | None = None,
    cgroup_version: int = 2,
    cgroups: dict[str, str] | None = None,
    firecracker_args: tuple[str, ...] = (),
) -> list[str]:
    """The jailer command line; Firecracker's own arguments follow ``--``.

    The jailer starts inside the sandbox's cgroups (the manager made them), so its
    ``--cgroup`` settings only add per-VM limits on top and are optional.
    """
    if Path(firecracker).name != layout.exec_name:
        raise ConfigError(f"exec file {firecracker} does not match the layout's {layout.exec_name}")
    if uid <= 0 or gid <= 0:
        raise ConfigError("the jailer must drop to a non-root uid and gid")
    if cgroup_version not in (1, 2):
        raise ConfigError(f"cgroup version must be 1 or 2, not {cgroup_version}")
    argv = [
        jailer,
        "--id",
        layout.jail_id,
        "--exec-file",
        firecracker,
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--chroot-base-dir",
        str(layout.chroot_base),
        "--cgroup-version",
        str(cgroup_version),
    ]
    for key, value in sorted((cgroups or {}).items()):
        if not re.fullmatch(r"[a-z_]+\.[a-z_.]+", key) or "\n" in value:
            raise ConfigError(f"bad cgroup setting {key}={value!r}")
        argv += ["--cgroup", f"{key}={value}"]
    if netns is not None:
        argv += ["--netns", netns]
    if firecracker_args:
        argv += ["--", *firecracker_args]
    return argv


def link_into(layout: JailLayout, source: Path, jailed: str, *, mode: int = 0o444) -> str:
    """Hard-link ``source`` into the chroot (copy across filesystems); return the jailed path.

    A hard link shares the inode, so a read-only image is never copied and the VM's
    uid needs only read permission on it; the image files are made world-readable
    once (they hold nothing secret: the same root serves every sandbox).
    """
    dest = layout.host_path(jailed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM):  # EPERM: protected_hardlinks
            raise BackendError(f"cannot link {source} into the jail: {exc}") from exc
        shutil.copyfile(source, dest)
    if os.stat(dest).st_mode & 0o777 != mode:
        os.chmod(dest, mode)
    return jailed


@dataclass
class LaunchPaths:
    """Host and Firecracker views of every path of one launch, jailed or not."""

    layout: JailLayout | None
    run_dir: Path
    uid: int
    gid: int

    def vm_path(self, jailed: str, host: Path) -> str:
        return jailed if self.layout is not None else str(host)

    def host(self, jailed: str) -> Path:
        if self.layout is not None:
            return self.layout.host_path(jailed)
        return safe_join(self.run_dir, jailed.lstrip("/"))

    @property
    def api_link(self) -> Path:
        return safe_join(self.run_dir, "api.sock")

    @property
    def vsock_link(self) -> Path:
        return safe_join(self.run_dir, "vsock.sock")
