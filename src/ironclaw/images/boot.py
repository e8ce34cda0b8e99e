"""What boots a VM from an image: the uncompressed kernel, the modules and the initramfs.

Pure file work (no subprocess), so it is tested against small fixtures; :mod:`.build`
drives it from the kernel package.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from ironclaw.errors import BackendError

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
