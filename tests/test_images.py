"""Image builder pieces that need no debootstrap: digests, sources, kernels, initramfs."""

from __future__ import annotations

import dataclasses
import lzma
import os
import struct
from pathlib import Path

import pytest

from ironclaw import images
from ironclaw.config import Settings
from ironclaw.errors import BackendError, ConfigError
from ironclaw.images import ImageRecipe, recipe_digest


def _recipe(**changes: object) -> ImageRecipe:
    base = ImageRecipe(
        suite="bookworm",
        mirror="http://deb.debian.org/debian",
        arch="amd64",
        packages=("busybox-static", "python3"),
        kernel_package="linux-image-6.1.0-57-amd64",
        kernel_version="6.1.192-3",
        modules=images.INITRAMFS_MODULES,
        guest_files=(("errors.py", "a" * 64), ("guest/agent.py", "b" * 64)),
    )
    return dataclasses.replace(base, **changes)


def test_digest_is_stable_and_covers_every_input() -> None:
    ref = recipe_digest(_recipe())
    assert recipe_digest(_recipe()) == ref
    variants = [
        _recipe(suite="trixie"),
        _recipe(mirror="http://mirror.example/debian"),
        _recipe(packages=("busybox-static", "python3", "curl")),
        _recipe(kernel_version="6.1.192-4"),
        _recipe(guest_files=(("errors.py", "a" * 64), ("guest/agent.py", "c" * 64))),
        _recipe(modules=(*images.INITRAMFS_MODULES, "vsock")),
        _recipe(builder_version="999"),
    ]
    digests = {recipe_digest(r) for r in variants}
    assert ref not in digests
    assert len(digests) == len(variants)


def test_base_digest_ignores_guest_and_kernel() -> None:
    """Editing the agent or bumping the kernel must not redo debootstrap."""
    ref = _recipe().base_digest()
    assert _recipe(kernel_version="9").base_digest() == ref
    assert _recipe(guest_files=()).base_digest() == ref
    assert _recipe(packages=("python3",)).base_digest() != ref


async def test_recipe_tracks_guest_sources() -> None:
    recipe = await images.resolve_recipe()
    names = {rel for rel, _ in recipe.guest_files}
    assert {"errors.py", "guest/init.sh", "config.py"} <= names
    assert recipe.kernel_package.startswith("linux-image-")
    assert recipe.kernel_version


def test_host_debian_source_reads_deb822_and_one_line(tmp_path: Path) -> None:
    osr = tmp_path / "os-release"
    osr.write_text('NAME="Debian"\nVERSION_CODENAME=bookworm\n')
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://other.example/x\nSuites: sid\nComponents: main\n\n"
        "Types: deb deb-src\n# comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert images.host_debian_source([deb822], osr) == ("http://mirror.example/debian", "bookworm")
    one = tmp_path / "sources.list"
    one.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"
    )
    assert images.host_debian_source([one], osr) == ("http://one.example/debian", "bookworm")
    assert images.host_debian_source([tmp_path / "missing"], osr)[1] == "bookworm"


async def test_missing_tool_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    settings = Settings(runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match=r"'debootstrap'.*apt-get install debootstrap"):
        await images.build_image(settings)
    assert not (tmp_path / "state").exists()
    with pytest.raises(ConfigError, match="apt-get install e2fsprogs"):
        images.require_tool("mkfs.ext4")


def _fake_bzimage(payload: bytes) -> bytes:
    setup_sects = 3
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    offset = 64
    struct.pack_into("<II", head, 0x248, offset, len(payload))
    return bytes(head) + b"\0" * offset + payload + b"\x12\x34\x56\x78"


def test_extract_vmlinux_from_xz_bzimage(tmp_path: Path) -> None:
    elf = b"\x7fELF" + os.urandom(3000)
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(_fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ)))
    out = tmp_path / "vmlinux"
    images.extract_vmlinux(bz, out)
    assert out.read_bytes() == elf


def test_extract_vmlinux_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"MZ" + b"\0" * 4096)
    with pytest.raises(BackendError, match="not an x86 bzImage"):
        images.extract_vmlinux(bad, tmp_path / "out")
    odd = tmp_path / "odd"
    odd.write_bytes(_fake_bzimage(b"BZh9" + b"\0" * 100))
    with pytest.raises(BackendError, match="unsupported kernel compression"):
        images.extract_vmlinux(odd, tmp_path / "out")


def _ko(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")


def test_modules_are_ordered_after_their_dependencies(tmp_path: Path) -> None:
    mods = tmp_path / "lib/modules/6.1.0"
    _ko(mods / "kernel/drivers/virtio/virtio_ring.ko", "")
    _ko(mods / "kernel/drivers/virtio/virtio.ko", "virtio_ring")
    _ko(mods / "kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring")
    _ko(mods / "kernel/arch/x86/crypto/crc32c-intel.ko", "")
    out = tmp_path / "out"
    images._collect_modules(mods, ["virtio_blk", "crc32c-intel"], out)
    order = (out / "order").read_text().split()
    assert order == ["virtio_ring", "virtio", "virtio_blk", "crc32c_intel"]
    assert sorted(p.name for p in out.glob("*.ko")) == sorted(f"{m}.ko" for m in order)
    with pytest.raises(BackendError, match="'nosuch' not found"):
        images._collect_modules(mods, ["nosuch"], tmp_path / "out2")


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (rmaj, rmin))


def test_initramfs_is_valid_newc(tmp_path: Path) -> None:
    rootfs = tmp_path / "root"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin/busybox").write_bytes(b"\x7fELF busybox")
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "virtio.ko").write_bytes(b"\x7fELF virtio")
    (mods / "order").write_text("virtio\n")
    out = tmp_path / "initramfs.cpio"
    images._write_initramfs(out, rootfs, mods)
    entries = _parse_newc(out.read_bytes())
    assert entries["init"][0] == 0o100755
    assert entries["init"][1].startswith(b"#!/bin/busybox sh\n")
    assert entries["bin/busybox"][1] == b"\x7fELF busybox"
    assert entries["lib/modules/virtio.ko"][1] == b"\x7fELF virtio"
    assert entries["lib/modules/order"][1] == b"virtio\n"
    assert entries["dev/console"][0] == 0o020600
    assert entries["dev/console"][2] == (5, 1)
    (rootfs / "bin/busybox").unlink()
    with pytest.raises(BackendError, match="busybox"):
        images._write_initramfs(out, rootfs, mods)


def test_find_image_without_build_is_none(tmp_path: Path) -> None:
    settings = Settings(runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    assert images.find_image(settings) is None
    with pytest.raises(ConfigError):
        images.find_image(settings, "../evil")
