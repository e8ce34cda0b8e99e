"""``identity.reset``: turn a VM restored from a shared snapshot into a machine of its own.

Every VM restored from one snapshot wakes up with the same kernel RNG state, the same
hostname, machine id and network address, because all of that was in the saved RAM
(``boot_id`` too, once read: the kernel draws it on first read). The host sends fresh
values right after the restore and this module applies them, as root inside the VM:

* the seed is mixed into the kernel's input pool (``RNDADDENTROPY``, credited) and the
  kernel's CRNG is reseeded at once (``RNDRESEEDCRNG``), so the next read of
  ``/dev/urandom`` in any process already differs between two restored VMs;
* hostname and ``/etc/machine-id``, ``/etc/hostname`` are rewritten;
* eth0 gets the sandbox's address and default route (the snapshot's were the builder's);
* the agent's environment gets the sandbox's variables (the snapshot's init read none);
* a tmpfs ``/workspace`` gets the sandbox's size limit.

Imported on first use only: a booted sandbox never needs it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct

from ironclaw.errors import ConfigError
from ironclaw.proto import methods as m

__all__ = ["apply_identity", "parse_kernel_ip"]

#: ``_IOW('R', 0x03, int[2])`` and ``_IO('R', 0x07)`` from <linux/random.h>.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
_BUSYBOX = "/bin/busybox"
#: <linux/sockios.h>, <linux/if.h>, <linux/route.h>, <sys/mount.h>.
SIOCADDRT, SIOCGIFFLAGS, SIOCSIFFLAGS = 0x890B, 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK = 0x8916, 0x891C
IFF_UP, RTF_UP, RTF_GATEWAY = 0x1, 0x1, 0x2
MS_NOSUID, MS_NODEV, MS_REMOUNT = 0x2, 0x4, 0x20


def parse_kernel_ip(value: str) -> tuple[str, str, int, str]:
    """``client::gw:prefix::dev:off`` (the kernel ``ip=`` form) -> (addr, gw, prefix, dev)."""
    parts = [*value.split(":"), "", "", "", "", ""][:7]
    if not parts[0]:
        raise ConfigError(f"bad address {value!r}: want client::gateway:prefix::dev:off")
    try:
        socket.inet_aton(parts[0])
        if parts[2]:
            socket.inet_aton(parts[2])
        prefix = int(parts[3] or "24")
    except (OSError, ValueError):
        raise ConfigError(f"bad address {value!r}: want client::gateway:prefix::dev:off") from None
    dev = parts[5] or "eth0"
    if not 0 < prefix <= 32 or not dev.isalnum():
        raise ConfigError(f"bad address {value!r}: prefix 1-32 and a plain device name")
    return parts[0], parts[2], prefix, dev


def _reseed(seed: bytes) -> None:
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _sockaddr(addr: str) -> bytes:
    return struct.pack("=H2x4s8x", socket.AF_INET, socket.inet_aton(addr))


_ANY = struct.pack("=H14x", socket.AF_INET)  # 0.0.0.0: the default route's dst and mask


def _set_address(dev: str, addr: str, prefix: int) -> None:
    """Address, netmask and up, by ioctl: every process start costs ~100 ms under TCG."""
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    name = dev.encode().ljust(16, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFADDR, name + _sockaddr(addr))
        fcntl.ioctl(s, SIOCSIFNETMASK, name + _sockaddr(mask))
        flags = struct.unpack_from("=H", fcntl.ioctl(s, SIOCGIFFLAGS, name + bytes(16)), 16)[0]
        fcntl.ioctl(s, SIOCSIFFLAGS, name + struct.pack("=H14x", flags | IFF_UP))


def _add_default_route(gw: str) -> None:
    """``struct rtentry`` (native layout): dst and genmask 0.0.0.0, via ``gw``, up."""
    entry = struct.pack(
        "@L16s16s16sHhLPhPLLH0L",
        0, _ANY, _sockaddr(gw), _ANY,
        RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCADDRT, entry)


def _remount_workspace(mib: int) -> None:
    import ctypes  # only here: a restored VM with a sized workspace

    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"size={mib}m,mode=0755".encode()
    flags = MS_REMOUNT | MS_NOSUID | MS_NODEV
    if libc.mount(b"workspace", b"/workspace", b"tmpfs", flags, opts) != 0:
        err = ctypes.get_errno()
        raise ConfigError(f"identity.reset cannot size /workspace: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise ConfigError(f"{' '.join(argv[1:])} failed: {err.decode(errors='replace').strip()}")


async def apply_identity(req: m.IdentityResetRequest) -> m.IdentityResetResult:
    """Apply ``req`` inside a VM; refused elsewhere."""
    # In a VM the agent is root and the child of the guest's init; anywhere else (a
    # namespace sandbox, a test harness on a host) this would rename the wrong machine.
    if os.geteuid() != 0 or os.getppid() != 1:
        raise ConfigError("identity.reset is for a restored VM, whose agent is init's root child")
    try:
        seed = bytes.fromhex(req.seed)
        int(req.machine_id, 16)
    except ValueError:
        raise ConfigError("identity.reset: seed and machine_id must be hex") from None
    if len(seed) < 32 or len(req.machine_id) != 32:
        raise ConfigError("identity.reset: seed needs 32+ bytes, machine_id 32 hex digits")
    try:
        _reseed(seed)
        socket.sethostname(req.hostname)
        _write("/etc/hostname", req.hostname + "\n")
        _write("/etc/machine-id", req.machine_id.lower() + "\n")
    except OSError as exc:
        raise ConfigError(f"identity.reset failed: {exc}") from exc
    os.environ["HOSTNAME"] = req.hostname
    os.environ["IRONCLAW_SANDBOX_ID"] = req.sandbox_id
    if req.env:
        os.environ.update(req.env)
    if req.ip:
        addr, gw, prefix, dev = parse_kernel_ip(req.ip)
        try:
            _set_address(dev, addr, prefix)
            if gw:
                _add_default_route(gw)
        except FileExistsError:
            await _run(_BUSYBOX, "ip", "route", "replace", "default", "via", gw, "dev", dev)
        except OSError as exc:
            raise ConfigError(f"identity.reset cannot give {dev} {addr}/{prefix}: {exc}") from exc
    if req.workspace_mib:
        _remount_workspace(req.workspace_mib)
    return m.IdentityResetResult(
        hostname=req.hostname, machine_id=req.machine_id.lower(), reseeded=True
    )
