"""QEMU's command line, built in one place: the machine, the guest kernel, the devices.

Pure functions of their arguments (apart from reading the host's TSC rate), so a change
to how QEMU is started is one edit to :func:`qemu_argv`, testable without a boot.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ironclaw.backends.qemu.channels import AGENT_CHANNELS, AGENT_PORT, port_name, socket_path
from ironclaw.errors import ConfigError
from ironclaw.images import ImageArtifacts, require_tool

__all__ = [
    "AGENT_CHANNELS",
    "AGENT_PORT",
    "TCG_TB_MIB",
    "Accel",
    "QemuPaths",
    "boot_argv",
    "guest_env_script",
    "kernel_cmdline",
    "machine_args",
    "qemu_argv",
    "qemu_binary",
    "shell_quote",
]

Accel = Literal["kvm", "tcg"]
_QEMU = "qemu-system-x86_64"
_QEMU_PACKAGE = "qemu-system-x86"
#: TCG's translation cache, bounded: QEMU's default (up to 1 GiB, filled as code is
#: translated) would let a long-running guest push QEMU past its memory cgroup.
TCG_TB_MIB = 64
#: The guest NIC's MAC comes from this (each VM is alone on its tap, in its own netns):
#: fixed so that a snapshot restores onto any sandbox's tap with the MAC it saved.
NIC_MAC_SEED = b"tap0"  # the sandbox tap's name, as before


def qemu_binary() -> str:
    return require_tool(_QEMU, _QEMU_PACKAGE)


def _tsc_khz() -> int | None:
    """The host TSC rate: TCG's guest TSC ticks with the host's, and telling the guest
    kernel so skips a calibration that hangs at random under TCG."""
    with contextlib.suppress(OSError):
        m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return int(float(m.group(1)) * 1000)
    return None


def kernel_cmdline(
    accel: Accel, *, hostname: str = "sandbox", ip: str | None = None, extra: tuple[str, ...] = ()
) -> str:
    """The guest kernel's command line (virtio-mmio devices are found through ACPI)."""
    args = [
        "console=ttyS0",
        "reboot=t",
        "panic=-1",
        "quiet",
        "loglevel=4",
        "random.trust_cpu=on",
        "i8042.noaux",
        "i8042.nokbd",
        f"ironclaw.hostname={hostname}",
    ]
    if accel == "tcg":
        khz = _tsc_khz()
        if khz:
            args.append(f"tsc_early_khz={khz}")
    if ip:
        args.append(f"ip={ip}")
    return " ".join([*args, *extra])


def machine_args(accel: Accel, cpus: int, memory_mib: int) -> list[str]:
    # "max" measured fastest under TCG (qemu64 +6%, Nehalem +20% to agent ready).
    cpu = "host" if accel == "kvm" else "max"
    return [
        "-M",
        "microvm,acpi=on,rtc=on,isa-serial=on,x-option-roms=off",
        "-accel",
        accel if accel == "kvm" else f"tcg,tb-size={TCG_TB_MIB}",
        "-cpu",
        cpu,
        "-smp",
        str(cpus),
        "-m",
        f"{memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ]


def boot_argv(
    qemu: str, sandbox: Sequence[str], machine: list[str], artifacts: ImageArtifacts, cmdline: str
) -> list[str]:
    """The start of every QEMU command line (the VM and the accelerator probe): binary,
    its seccomp option, the machine, and the kernel with its initramfs and command line."""
    return [
        qemu,
        *sandbox,
        *machine,
        "-kernel",
        str(artifacts.vmlinux),
        "-initrd",
        str(artifacts.initramfs),
        "-append",
        cmdline,
    ]


@dataclass(frozen=True)
class QemuPaths:
    """The host files of one VM, all in its run directory."""

    channel: Path  # channel 0's socket; channel i's is beside it (channels.socket_path)
    qmp: Path
    console_log: Path
    pid_file: Path


def qemu_argv(
    qemu: str,
    artifacts: ImageArtifacts,
    paths: QemuPaths,
    *,
    accel: Accel,
    cpus: int,
    memory_mib: int,
    hostname: str,
    guest_ip: str | None,
    agent: bool,
    workspace: Path | None = None,
    tap_ifname: str | None = None,
    env_disk: Path | None = None,
    incoming_fd: int | None = None,
    run_as: int | None = None,
    sandbox: Sequence[str] = (),
    nic_placeholder: bool = False,
    channels: int = AGENT_CHANNELS,
) -> list[str]:
    """The whole QEMU command line of one sandbox VM.

    ``workspace`` is a fresh ext4 image for /workspace, ``env_disk`` the guest
    environment script (:func:`guest_env_script`), ``incoming_fd`` an inherited
    descriptor of a snapshot to restore; ``run_as`` makes QEMU drop to that uid and gid
    and start paused (``-S``); ``sandbox`` is QEMU's own seccomp option (:mod:`.seccomp`).
    ``nic_placeholder`` (no ``tap_ifname``) gives the guest its NIC on an unconnected hub
    port: a snapshot built so can be restored onto a real tap (the backend is not saved).
    The agent gets ``channels`` virtio-serial ports, each behind a socket of its own.
    """
    argv = [
        *boot_argv(
            qemu,
            sandbox,
            machine_args(accel, cpus, memory_mib),
            artifacts,
            kernel_cmdline(
                accel,
                hostname=hostname,
                ip=guest_ip,
                extra=() if agent else ("ironclaw.agent=off",),
            ),
        ),
        "-chardev",
        f"file,id=con,path={paths.console_log}",
        "-serial",
        "chardev:con",
        "-drive",
        f"id=root,file={artifacts.ext4},format=raw,if=none,readonly=on",
        "-device",
        "virtio-blk-device,drive=root,serial=ironclaw-root",
        "-device",
        # Port number 0 is kept for a console: the agent's ports are 1..channels.
        f"virtio-serial-device,max_ports={channels + 1}",
    ]
    for i in range(channels):
        chardev = "agent" if i == 0 else f"agent{i}"
        argv += [
            "-chardev",
            f"socket,id={chardev},path={socket_path(paths.channel, i)},server=on,wait=off",
            "-device",
            f"virtserialport,chardev={chardev},name={port_name(i)}",
        ]
    argv += [
        "-qmp",
        f"unix:{paths.qmp},server=on,wait=off",
        "-pidfile",
        str(paths.pid_file),
    ]
    if workspace is not None:
        # No image locking: the disk is this VM's alone, and locks taken through an fd
        # set's descriptors outlive the reopen a snapshot's hand-over makes.
        argv += [
            "-drive",
            f"id=ws,file={workspace},file.locking=off,format=raw,if=none,cache=unsafe,"
            "discard=unmap",
            "-device",
            "virtio-blk-device,drive=ws,serial=ironclaw-ws",
        ]
    if tap_ifname is not None or nic_placeholder:
        mac = "52:54:00:" + ":".join(
            f"{b:02x}" for b in hashlib.blake2b(NIC_MAC_SEED, digest_size=3).digest()
        )
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={tap_ifname},script=no,downscript=no"
            if tap_ifname is not None
            else "hubport,id=net0,hubid=0",
            "-device",
            f"virtio-net-device,netdev=net0,mac={mac}",
        ]
    if env_disk is not None:
        argv += [
            "-drive",
            f"id=cfg,file={env_disk},format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=cfg,serial=ironclaw-cfg",
        ]
    if incoming_fd is not None:
        argv += ["-incoming", f"fd:{incoming_fd}"]
    if run_as is not None:
        argv += ["-runas", f"{run_as}:{run_as}", "-S"]
    return argv


def shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def guest_env_script(env: Mapping[str, str]) -> bytes:
    """The guest init sources this from the ``ironclaw-cfg`` disk: quoted ``export`` lines.

    Padded with newlines (not NULs, which a shell would choke on) to whole sectors.
    """
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name) or "\0" in value:
            raise ConfigError(f"environment variable {name!r} cannot be passed to a VM")
        lines.append(f"export {name}={shell_quote(value)}\n")
    data = "".join(lines).encode()
    return data + b"\n" * (512 - len(data) % 512)
