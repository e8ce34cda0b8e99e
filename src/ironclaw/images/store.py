"""Where built images live: one directory per digest, and names pointing at digests.

A name is a small file holding a digest, replaced atomically, so a reader sees the old
image or the new one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import ConfigError

from .recipe import ImageArtifacts


def _images_root(settings: Settings) -> Path:
    return safe_join(settings.state_dir, "images")


def _load_artifacts(settings: Settings, name: str, digest: str) -> ImageArtifacts | None:
    base = safe_join(_images_root(settings), digest)
    try:
        manifest = json.loads(safe_join(base, "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    art = ImageArtifacts(
        name=name,
        digest=digest,
        rootfs_dir=safe_join(base, "rootfs"),
        ext4=safe_join(base, "rootfs.ext4"),
        initramfs=safe_join(base, "initramfs.cpio"),
        vmlinux=safe_join(base, "vmlinux"),
        kernel_release=str(manifest["kernel_release"]),
    )
    if not all(p.exists() for p in (art.rootfs_dir, art.ext4, art.initramfs, art.vmlinux)):
        return None
    return art


def find_image(
    settings: Settings, name: str = "default", *, digest: str | None = None
) -> ImageArtifacts | None:
    """The image last built under ``name``, if it is still complete on disk; with
    ``digest``, that build of it (what a VM snapshot was taken on), if still complete."""
    if digest is not None:
        ok = re.fullmatch(r"[0-9a-f]{32}", digest)
        return _load_artifacts(settings, _check_name(name), digest) if ok else None
    try:
        digest = safe_join(_images_root(settings), "names", _check_name(name)).read_text().strip()
    except OSError:
        return None
    if not re.fullmatch(r"[0-9a-f]{32}", digest):
        return None
    return _load_artifacts(settings, name, digest)


def list_images(settings: Settings) -> list[ImageArtifacts]:
    """Every named image that is complete on disk, by name."""
    names = safe_join(_images_root(settings), "names")
    try:
        entries = sorted(os.listdir(names))
    except OSError:
        return []
    found = []
    for name in entries:
        if re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
            art = find_image(settings, name)
            if art is not None:
                found.append(art)
    return found


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
        raise ConfigError(f"invalid image name {name!r}: use a-z, 0-9, '.', '_' and '-'")
    return name


def _set_name(root: Path, name: str, digest: str) -> None:
    names = ensure_private_dir(safe_join(root, "names"))
    tmp = safe_join(names, f".{name}.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, safe_join(names, name))
