"""Building an image: debootstrap (cached), the guest sources, the kernel, ext4, initramfs.

The slow debootstrap step is cached by what it alone depends on, so editing the guest
agent rebuilds in seconds. Concurrent builders serialise on a lock file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import ironclaw
from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import BackendError

from .boot import _collect_modules, _write_initramfs, extract_vmlinux
from .recipe import (
    _TOOLS,
    GUEST_INIT_PATH,
    GUEST_PKG_DIR,
    VSOCK_MODULES,
    ImageArtifacts,
    ImageRecipe,
    Progress,
    _guest_files,
    _run,
    recipe_digest,
    require_tool,
    resolve_recipe,
)
from .store import _check_name, _images_root, _load_artifacts, _set_name

# Paths a sandbox never needs; dropping them shrinks the image by more than half.
_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)


async def build_image(
    settings: Settings,
    *,
    name: str = "default",
    progress: Progress | None = None,
    force: bool = False,
) -> ImageArtifacts:
    """Build (or find in the cache) the image for the current recipe and name it ``name``.

    Concurrent builders serialise on a lock file; the image directory appears by an atomic
    rename, so a reader never sees half an image.
    """
    _check_name(name)

    def report(step: str, frac: float) -> None:
        if progress is not None:
            progress(step, frac)

    for tool in _TOOLS:
        require_tool(tool)
    report("resolving inputs", 0.0)
    recipe = await resolve_recipe()
    digest = recipe_digest(recipe)
    root = ensure_private_dir(_images_root(settings))
    lock = safe_join(root, ".lock")
    fd = await asyncio.to_thread(os.open, lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        if not force:
            art = _load_artifacts(settings, name, digest)
            if art is not None:
                _set_name(root, name, digest)
                report("cached", 1.0)
                return art
        await _build(root, recipe, digest, force, report)
        _set_name(root, name, digest)
    finally:
        os.close(fd)
    art = _load_artifacts(settings, name, digest)
    if art is None:
        raise BackendError(f"image {digest} is incomplete after building it")
    report("done", 1.0)
    return art


async def _build(
    root: Path,
    recipe: ImageRecipe,
    digest: str,
    force: bool,
    report: Progress,
) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".build-{digest[:8]}-", dir=root))
    try:
        report("debootstrap (cached per suite and package list)", 0.05)
        base = await _base_rootfs(root, recipe, force)
        report("copying root", 0.55)
        rootfs = work / "rootfs"
        await _run("cp", "-a", "--reflink=auto", str(base), str(rootfs), what="copy base root")
        report("installing guest sources", 0.6)
        await _install_guest(rootfs)
        report("kernel", 0.65)
        release = await _kernel(root, recipe, work)
        report("ext4 image", 0.8)
        await _mkfs(rootfs, work / "rootfs.ext4")
        report("initramfs", 0.95)
        _write_initramfs(work / "initramfs.cpio", rootfs, work / "modules")
        shutil.rmtree(work / "modules")
        (work / "manifest.json").write_text(
            json.dumps({"kernel_release": release, "recipe": asdict(recipe)}, indent=1) + "\n"
        )
        final = safe_join(root, digest)
        if final.exists():
            await asyncio.to_thread(shutil.rmtree, final)
        os.rename(work, final)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _base_rootfs(root: Path, recipe: ImageRecipe, force: bool) -> Path:
    base_dir = ensure_private_dir(safe_join(root, "base"))
    done = safe_join(base_dir, recipe.base_digest())
    if done.is_dir() and not force:
        return done
    tmp = Path(tempfile.mkdtemp(prefix=".debootstrap-", dir=base_dir))
    try:
        target = tmp / "rootfs"
        await _run(
            "debootstrap",
            "--variant=minbase",
            f"--arch={recipe.arch}",
            f"--include={','.join(recipe.packages)}",
            recipe.suite,
            str(target),
            recipe.mirror,
            what="debootstrap",
        )
        for rel in _TRIM:
            p = target / rel
            if p.is_dir():
                await asyncio.to_thread(shutil.rmtree, p)
                p.mkdir(mode=0o755)
        if done.exists():
            await asyncio.to_thread(shutil.rmtree, done)
        os.rename(target, done)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return done


async def _install_guest(rootfs: Path) -> None:
    dest = rootfs / GUEST_PKG_DIR
    if dest.exists():
        shutil.rmtree(dest)
    for rel, src in _guest_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    init_src = Path(ironclaw.__file__).parent / "guest" / "init.sh"
    init = rootfs / GUEST_INIT_PATH
    shutil.copyfile(init_src, init)
    init.chmod(0o755)
    (rootfs / "workspace").mkdir(exist_ok=True)
    # Byte-compile with the guest's own interpreter: each cold import under TCG is slow.
    await _run(
        "chroot",
        str(rootfs),
        "python3",
        "-m",
        "compileall",
        "-q",
        "/" + GUEST_PKG_DIR,
        what="byte-compiling guest sources",
    )


async def _kernel(root: Path, recipe: ImageRecipe, work: Path) -> str:
    """Fetch the kernel .deb, write ``vmlinux`` and the initramfs modules; return the release."""
    cache = ensure_private_dir(safe_join(root, "debs"))
    debs = sorted(cache.glob(f"{recipe.kernel_package}_*.deb"))
    want = [d for d in debs if _deb_version(d) == recipe.kernel_version]
    if not want:
        for old in debs:
            old.unlink()
        await _download(cache, recipe)
        want = [
            d
            for d in cache.glob(f"{recipe.kernel_package}_*.deb")
            if _deb_version(d) == recipe.kernel_version
        ]
        if not want:
            raise BackendError(f"apt-get download produced no {recipe.kernel_package} .deb")
    kdir = work / "kernel"
    await _run("dpkg-deb", "-x", str(want[0]), str(kdir), what="dpkg-deb -x (kernel)")
    vmlinuz = sorted((kdir / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise BackendError(f"{want[0].name} holds no /boot/vmlinuz-*")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    await asyncio.to_thread(extract_vmlinux, vmlinuz[0], work / "vmlinux")
    candidates = [kdir / p / "modules" / release for p in ("lib", "usr/lib")]
    moddir = next((c for c in candidates if c.is_dir()), candidates[0])
    base = tuple(m for m in recipe.modules if m not in VSOCK_MODULES)
    optional = tuple(m for m in recipe.modules if m in VSOCK_MODULES)
    _collect_modules(moddir, base, work / "modules", extra={"vsock": optional})
    await asyncio.to_thread(shutil.rmtree, kdir)
    return release


async def _download(cache: Path, recipe: ImageRecipe) -> None:
    # apt's _apt sandbox user cannot write into our 0700 state dir; download as root there.
    await _run(
        "apt-get",
        "download",
        "-q",
        "-o",
        "APT::Sandbox::User=root",
        f"{recipe.kernel_package}={recipe.kernel_version}",
        what=f"apt-get download {recipe.kernel_package}",
        env={**os.environ, "LC_ALL": "C"},
        cwd=cache,
    )


def _deb_version(deb: Path) -> str:
    # apt-get download names files <pkg>_<version with ':' as %3a>_<arch>.deb
    parts = deb.stem.split("_")
    return parts[1].replace("%3a", ":") if len(parts) == 3 else ""


async def _mkfs(rootfs: Path, image: Path) -> None:
    size = await asyncio.to_thread(_tree_size, rootfs)
    mib = int(size * 1.25 / 2**20) + 64
    await _run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "ironclaw-root",
        "-O",
        "^has_journal",
        "-m",
        "0",
        "-E",
        "root_owner=0:0",
        "-d",
        str(rootfs),
        str(image),
        f"{mib}M",
        what="mkfs.ext4 -d",
    )


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
        total += 4096
    return total


async def make_workspace_image(path: Path, mib: int, *, journal: bool = True) -> None:
    """A sparse ext4 disk for a VM's /workspace: blocks are allocated only as the guest
    writes. Without ``journal`` it mounts faster and is fine for a throwaway disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, mib * 2**20)
    finally:
        os.close(fd)
    features = [] if journal else ["-O", "^has_journal"]
    extended = "root_owner=0:0,lazy_itable_init=1" + (",lazy_journal_init=1" if journal else "")
    proc = await asyncio.create_subprocess_exec(
        require_tool("mkfs.ext4", "e2fsprogs"),
        "-q", "-F", "-m", "0", *features, "-E", extended, str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise BackendError(f"mkfs.ext4 of the workspace failed: {out.decode(errors='replace')}")
