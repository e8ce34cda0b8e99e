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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ironclaw
from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import BackendError, ConfigError

__all__ = [
    "BUILDER_VERSION",
    "GUEST_SOURCES",
    "INITRAMFS_MODULES",
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

#: Bump when the build steps change in a way the other inputs do not capture.
BUILDER_VERSION = "1"

Progress = Callable[[str, float], None]

#: Parts of the ironclaw package the guest runs: standard library only.
GUEST_SOURCES: tuple[str, ...] = (
    "__init__.py",
    "errors.py",
    "ids.py",
    "config.py",
    "proto",
    "transport",
    "rpc",
    "guest",
)

#: Modules the initramfs loads, in this order (dependencies are added from .modinfo).
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "overlay",
)

#: Loaded only when the command line asks for a vsock channel (Firecracker): a QEMU boot
#: does not pay for them.
VSOCK_MODULES: tuple[str, ...] = ("vmw_vsock_virtio_transport",)

DEFAULT_PACKAGES: tuple[str, ...] = ("python3", "busybox-static")
KERNEL_META_PACKAGE = "linux-image-amd64"
GUEST_PKG_DIR = "usr/lib/python3/dist-packages/ironclaw"
GUEST_INIT_PATH = "sbin/ironclaw-init"

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

_TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "chroot": "coreutils",
}

# The initramfs /init: load the modules (virtio-mmio devices come from the microvm's ACPI
# tables: Debian builds virtio_mmio without command-line device support), find the root
# disk by its virtio serial, stack a tmpfs over it, and switch root.
_INITRAMFS_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /lower /upper /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
init=/sbin/ironclaw-init
want_root=""
orders=/lib/modules/order
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ironclaw.init=*) init="${arg#ironclaw.init=}" ;;
        ironclaw.root=*) want_root="${arg#ironclaw.root=}" ;;
        ironclaw.channel=vsock:*) orders="$orders /lib/modules/order-vsock" ;;
        ironclaw.probe=1) echo IRONCLAW-PROBE-OK > /dev/console; reboot -f ;;
    esac
done
for order in $orders; do
    while read -r mod; do
        [ -e "/sys/module/$mod" ] || insmod "/lib/modules/$mod.ko"
    done < "$order"
done
fail() { echo "ironclaw initramfs: $*" > /dev/console; poweroff -f; }
# The root disk: ironclaw.root= names it (VMMs without disk serials), else the virtio disk
# whose serial is "ironclaw-root".
root=""
n=0
while [ -z "$root" ]; do
    if [ -n "$want_root" ]; then
        [ -b "$want_root" ] && root="$want_root"
    else
        for s in /sys/block/vd*/serial; do
            [ -r "$s" ] && [ "$(cat "$s")" = ironclaw-root ] && root="/dev/${s#/sys/block/}"
        done
        root="${root%/serial}"
    fi
    n=$((n + 1))
    [ -n "$root" ] || { [ $n -gt 500 ] && fail "no root disk ${want_root}"; usleep 10000; }
done
mount -t ext4 -o ro "$root" /lower || fail "cannot mount $root"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "cannot mount overlay"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot "$init"
"""


@dataclass(frozen=True)
class ImageArtifacts:
    """Everything one image build produced; all paths live in the image's own directory."""

    name: str
    digest: str
    rootfs_dir: Path
    ext4: Path
    initramfs: Path
    vmlinux: Path
    kernel_release: str


@dataclass(frozen=True)
class ImageRecipe:
    """Every input of a build; :func:`recipe_digest` hashes all of it."""

    suite: str
    mirror: str
    arch: str
    packages: tuple[str, ...]
    kernel_package: str
    kernel_version: str
    modules: tuple[str, ...]
    #: relative path -> sha256 of every guest-side file copied into the root.
    guest_files: tuple[tuple[str, str], ...]
    builder_version: str = BUILDER_VERSION
    extra: tuple[tuple[str, str], ...] = field(default=())

    def base_digest(self) -> str:
        """Digest of what debootstrap alone depends on (its cache key)."""
        data = [self.builder_version, self.suite, self.mirror, self.arch, list(self.packages)]
        return _sha(json.dumps(data).encode())[:32]


def recipe_digest(recipe: ImageRecipe) -> str:
    return _sha(json.dumps(asdict(recipe), sort_keys=True).encode())[:32]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require_tool(tool: str, package: str | None = None) -> str:
    """Path of ``tool`` on PATH, or a ConfigError naming the Debian package to install."""
    found = shutil.which(tool)
    if found is None:
        pkg = package or _TOOLS.get(tool, tool)
        raise ConfigError(
            f"required tool {tool!r} not found on PATH: install it with "
            f"'apt-get install {pkg}' (Debian package {pkg})"
        )
    return found


def host_debian_source(
    sources: Sequence[Path] = (),
    os_release: Path = Path("/etc/os-release"),
) -> tuple[str, str]:
    """(mirror, suite) of the Debian archive the host's apt already uses.

    Using the host's own mirror keeps the build working wherever apt works (proxies,
    internal mirrors) without a second configuration.
    """
    suite = "bookworm"
    with contextlib.suppress(OSError):
        m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", os_release.read_text(), re.M)
        if m:
            suite = m.group(1)
    if not sources:
        apt = Path("/etc/apt")
        sources = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in stanza.splitlines())
                    if not k.startswith("#") and v
                )
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and suite in suites:
                    return fields.get("uris", "").split()[0].rstrip("/"), suite
        else:
            for line in text.splitlines():
                parts = [p for p in re.sub(r"\[[^]]*\]", "", line).split() if p]
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                    return parts[1].rstrip("/"), suite
    return "http://deb.debian.org/debian", suite


def _guest_files() -> Iterator[tuple[str, Path]]:
    root = Path(ironclaw.__file__).parent
    for entry in GUEST_SOURCES:
        path = root / entry
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts and f.suffix in (".py", ".sh"):
                    yield f.relative_to(root).as_posix(), f
        elif path.is_file():
            yield entry, path


async def _run(
    *argv: str, what: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> str:
    """Run a build step; on failure raise BackendError with the tail of its output."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
    except OSError as exc:
        raise BackendError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise BackendError(f"{what} failed (exit {proc.returncode}): {tail}")
    return text


async def resolve_recipe(packages: Sequence[str] = DEFAULT_PACKAGES) -> ImageRecipe:
    """The recipe the host would build now (queries the local apt cache only)."""
    for tool in ("apt-cache",):
        require_tool(tool)
    mirror, suite = host_debian_source()
    deps = await _run("apt-cache", "depends", KERNEL_META_PACKAGE, what="apt-cache depends")
    m = re.search(r"Depends:\s*(linux-image-\S+)", deps)
    if m is None:
        raise BackendError(f"cannot tell which kernel {KERNEL_META_PACKAGE} depends on")
    kpkg = m.group(1)
    show = await _run("apt-cache", "show", "--no-all-versions", kpkg, what="apt-cache show")
    v = re.search(r"^Version:\s*(\S+)", show, re.M)
    if v is None:
        raise BackendError(f"apt knows no version of {kpkg}; run apt-get update")
    guest = tuple((rel, _sha(p.read_bytes())) for rel, p in _guest_files())
    return ImageRecipe(
        suite=suite,
        mirror=mirror,
        arch="amd64",
        packages=tuple(sorted(set(packages))),
        kernel_package=kpkg,
        kernel_version=v.group(1),
        modules=INITRAMFS_MODULES + VSOCK_MODULES,
        guest_files=guest,
        extra=(("initramfs-init", _sha(_INITRAMFS_INIT.encode())),),
    )


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


def find_image(settings: Settings, name: str = "default") -> ImageArtifacts | None:
    """The image last built under ``name``, if it is still complete on disk."""
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


def _set_name(root: Path, name: str, digest: str) -> None:
    names = ensure_private_dir(safe_join(root, "names"))
    tmp = safe_join(names, f".{name}.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, safe_join(names, name))


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


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the uncompressed ELF kernel held in an x86 bzImage (boot protocol >= 2.08)."""
    data = bzimage.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise BackendError(f"{bzimage} is not an x86 bzImage")
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        raise BackendError(f"{bzimage}: boot protocol {version:#x} lacks payload offsets")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        # The kernel's xz stream is followed by its size; decompress just the stream.
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        elf = dec.decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        import zlib

        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise BackendError(f"{bzimage}: unsupported kernel compression {payload[:4].hex()}")
    if not elf.startswith(b"\x7fELF"):
        raise BackendError(f"{bzimage}: payload did not decompress to an ELF image")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)


def _modinfo_depends(ko: Path) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def _collect_modules(
    moddir: Path, wanted: Sequence[str], out: Path, extra: dict[str, Sequence[str]] | None = None
) -> None:
    """Copy ``wanted`` and their dependencies into ``out`` plus a load order file.

    Each ``extra`` group gets its own ``order-<group>`` file, loaded on demand, holding
    only the modules (and dependencies) the base order lacks.
    """
    index: dict[str, Path] = {}
    for ko in moddir.rglob("*.ko*"):
        index[ko.name.split(".ko")[0].replace("-", "_")] = ko
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in order or key in stack:
            return
        ko = index.get(key)
        if ko is None:
            raise BackendError(f"kernel module {name!r} not found under {moddir}")
        if ko.suffix != ".ko":
            raise BackendError(f"compressed kernel module {ko.name} is not supported yet")
        for dep in _modinfo_depends(ko):
            visit(dep, (*stack, key))
        order.append(key)

    for name in wanted:
        visit(name, ())
    out.mkdir(parents=True)
    base = list(order)
    groups: dict[str, list[str]] = {}
    for group, names in (extra or {}).items():
        for name in names:
            visit(name, ())
        groups[group] = order[len(base) :]
        base = list(order)
    for key in order:
        shutil.copyfile(index[key], out / f"{key}.ko")
    (out / "order").write_text("\n".join(k for k in order if not _in_group(k, groups)) + "\n")
    for group, keys in groups.items():
        (out / f"order-{group}").write_text("".join(f"{k}\n" for k in keys))


def _in_group(key: str, groups: dict[str, list[str]]) -> bool:
    return any(key in keys for keys in groups.values())


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


class _Cpio:
    """Writer for the ``newc`` cpio format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        self.buf += b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
        self.buf += b"\0" * (-len(self.buf) % 4) + data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self.buf)


def _write_initramfs(out: Path, rootfs: Path, modules: Path) -> None:
    """The initramfs: busybox from the image itself, the modules, and the /init above."""
    busybox = rootfs / "bin" / "busybox"
    if not busybox.is_file():
        raise BackendError("the root has no /bin/busybox (package busybox-static)")
    c = _Cpio()
    for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys"):
        c.add(d, 0o040755)
    c.add("dev/console", 0o020600, rdev=(5, 1))
    c.add("dev/null", 0o020666, rdev=(1, 3))
    c.add("bin/busybox", 0o100755, busybox.read_bytes())
    c.add("init", 0o100755, _INITRAMFS_INIT.encode())
    for f in sorted(modules.iterdir()):
        c.add(f"lib/modules/{f.name}", 0o100644, f.read_bytes())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.finish())
    os.replace(tmp, out)


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
