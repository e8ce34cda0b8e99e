"""Root images for sandboxes: a Debian root with Python and IronClaw's guest side.

One build yields every form the backends need: a directory (namespace backend), a
read-only ext4 image, a small initramfs that loads the virtio modules Debian ships as
modules and switches to an overlay root, and the uncompressed ``vmlinux`` (decompressing a
bzImage under TCG costs seconds per boot).

Images are content-addressed: the digest covers every input (suite, mirror, packages,
kernel package version, the guest-side sources copied in, the builder version), so an
unchanged recipe is a cache hit and any change yields a new directory. The slow
debootstrap step is cached separately, keyed only by what it depends on, so editing the
guest agent rebuilds in seconds.

:mod:`.recipe` holds the inputs and the digest, :mod:`.build` the steps, :mod:`.boot`
the kernel, its modules and the initramfs, :mod:`.store` the built images and their names.
"""

from __future__ import annotations

from .boot import _collect_modules as _collect_modules
from .boot import _write_initramfs as _write_initramfs
from .boot import extract_vmlinux
from .build import build_image, make_workspace_image
from .recipe import (
    BUILDER_VERSION,
    DEFAULT_PACKAGES,
    GUEST_INIT_PATH,
    GUEST_PKG_DIR,
    GUEST_SOURCES,
    INITRAMFS_MODULES,
    KERNEL_META_PACKAGE,
    VSOCK_MODULES,
    ImageArtifacts,
    ImageRecipe,
    Progress,
    host_debian_source,
    recipe_digest,
    require_tool,
    resolve_recipe,
)
from .store import find_image, list_images

__all__ = [
    "BUILDER_VERSION",
    "DEFAULT_PACKAGES",
    "GUEST_INIT_PATH",
    "GUEST_PKG_DIR",
    "GUEST_SOURCES",
    "INITRAMFS_MODULES",
    "KERNEL_META_PACKAGE",
    "VSOCK_MODULES",
    "ImageArtifacts",
    "ImageRecipe",
    "Progress",
    "build_image",
    "extract_vmlinux",
    "find_image",
    "host_debian_source",
    "list_images",
    "make_workspace_image",
    "recipe_digest",
    "require_tool",
    "resolve_recipe",
]
