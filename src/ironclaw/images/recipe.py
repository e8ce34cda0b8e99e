"""What an image is made of: its inputs (the recipe, hashed into its digest) and outputs.

The digest covers every input, so an unchanged recipe is a cache hit and any change
yields a new image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ironclaw
from ironclaw.errors import BackendError, ConfigError

from .boot import _INITRAMFS_INIT

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


_TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "chroot": "coreutils",
}


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
