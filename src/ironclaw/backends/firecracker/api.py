"""Every request body IronClaw sends to Firecracker, built from typed models.

The models mirror the subset of Firecracker's API that IronClaw uses and forbid unknown
fields exactly as Firecracker's deserialiser does, so a misspelt field fails here, in
Python, not at boot. The tests check every body these builders emit, for every
configuration the backend supports, against Firecracker's own Swagger spec
(:mod:`.schema`). Paths inside bodies are as Firecracker sees them: under the jailer
they are relative to its chroot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ironclaw.errors import ConfigError
from ironclaw.ids import validate_sandbox_id

__all__ = [
    "AGENT_VSOCK_PORT",
    "MAX_BOOT_ARGS",
    "ROOT_DRIVE",
    "WORKSPACE_DRIVE",
    "ApiRequest",
    "BootSource",
    "Drive",
    "InstanceAction",
    "MachineConfig",
    "MemoryBackend",
    "NetworkInterface",
    "NetworkOverride",
    "NicConfig",
    "SnapshotCreate",
    "SnapshotLoad",
    "SnapshotType",
    "VmConfig",
    "VmState",
    "Vsock",
    "VsockOverride",
    "boot_requests",
    "ctrl_alt_del_request",
    "guest_mac",
    "kernel_boot_args",
    "snapshot_create_request",
    "snapshot_load_request",
    "vm_state_request",
]

#: Guest vsock port the agent listens on; the host reaches it with ``CONNECT 1024``.
AGENT_VSOCK_PORT = 1024
#: x86 kernels take 2048 bytes of command line and Firecracker appends its own device
#: parameters to ours, so ours stays well below that.
MAX_BOOT_ARGS = 1536
ROOT_DRIVE = "ironclaw-root"
WORKSPACE_DRIVE = "ironclaw-ws"
GUEST_IFACE = "eth0"

SnapshotType = Literal["Full", "Diff"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The endpoint a body is sent to; a ``{field}`` in its path is that field's value
    #: (``/drives/{drive_id}``). Unset on the parts of another body.
    endpoint: ClassVar[tuple[Literal["PUT", "PATCH"], str]]

    def body(self) -> dict[str, Any]:
        """The JSON object Firecracker receives (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def request(cls, **fields: Any) -> ApiRequest:
        """The call that sends a body of ``fields`` to :attr:`endpoint`; a value
        Firecracker would refuse is a :class:`ConfigError` naming the field."""
        try:
            body = cls(**fields).body()
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise ConfigError(
                f"invalid Firecracker {cls.__name__}: {loc + ': ' if loc else ''}{first['msg']}"
            ) from None
        method, path = cls.endpoint
        return ApiRequest(method, path.format(**body), body)


class BootSource(_Body):
    """The guest kernel, its initramfs and its command line."""

    endpoint = ("PUT", "/boot-source")

    kernel_image_path: str = Field(min_length=1)
    initrd_path: str | None = None
    boot_args: str | None = Field(default=None, max_length=MAX_BOOT_ARGS)


class Drive(_Body):
    """One virtio-blk disk; drives appear in the guest in the order they are put."""

    endpoint = ("PUT", "/drives/{drive_id}")

    drive_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    is_root_device: bool
    is_read_only: bool
    path_on_host: str = Field(min_length=1)
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None


class MachineConfig(_Body):
    """vCPUs and memory; ``track_dirty_pages`` makes ``Diff`` snapshots possible."""

    endpoint = ("PUT", "/machine-config")

    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int = Field(ge=64)
    smt: bool = False
    track_dirty_pages: bool = False

    @model_validator(mode="after")
    def _even_with_smt(self) -> MachineConfig:
        # Firecracker refuses an odd count above 1 once SMT pairs vCPUs into siblings.
        if self.smt and self.vcpu_count > 1 and self.vcpu_count % 2:
            raise ValueError("with smt, vcpu_count must be 1 or even")
        return self


class NetworkInterface(_Body):
    """A virtio-net NIC backed by the host tap ``host_dev_name``."""

    endpoint = ("PUT", "/network-interfaces/{iface_id}")

    iface_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    host_dev_name: str = Field(min_length=1, max_length=15)
    guest_mac: str | None = Field(default=None, pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class Vsock(_Body):
    """The virtio-vsock device; the host side is the Unix socket ``uds_path`` (hybrid
    vsock: the host writes ``CONNECT <port>`` to reach a guest port)."""

    endpoint = ("PUT", "/vsock")

    guest_cid: int = Field(ge=3, le=2**32 - 2)
    uds_path: str = Field(min_length=1)


class InstanceAction(_Body):
    """Boot the configured VM, or press Ctrl-Alt-Del in it."""

    endpoint = ("PUT", "/actions")

    action_type: Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]


class VmState(_Body):
    """Pause or resume the vCPUs."""

    endpoint = ("PATCH", "/vm")

    state: Literal["Paused", "Resumed"]


class SnapshotCreate(_Body):
    """Write a paused VM's device state to ``snapshot_path`` and its memory to
    ``mem_file_path``."""

    endpoint = ("PUT", "/snapshot/create")

    snapshot_path: str = Field(min_length=1)
    mem_file_path: str = Field(min_length=1)
    snapshot_type: SnapshotType = "Full"


class MemoryBackend(_Body):
    """Part of :class:`SnapshotLoad`: where the guest memory comes from, a file or the
    socket of a userfaultfd page-fault handler."""

    backend_type: Literal["File", "Uffd"]
    backend_path: str = Field(min_length=1)


class NetworkOverride(_Body):
    """Part of :class:`SnapshotLoad`: the restored NIC ``iface_id`` on another tap."""

    iface_id: str
    host_dev_name: str = Field(min_length=1, max_length=15)


class VsockOverride(_Body):
    """Part of :class:`SnapshotLoad`: the restored vsock device on another socket."""

    uds_path: str = Field(min_length=1)


class SnapshotLoad(_Body):
    """Restore a snapshot into a Firecracker process that has nothing configured yet."""

    endpoint = ("PUT", "/snapshot/load")

    snapshot_path: str = Field(min_length=1)
    # Always mem_backend: Firecracker deprecates mem_file_path and refuses both at once.
    mem_backend: MemoryBackend
    track_dirty_pages: bool | None = None
    resume_vm: bool | None = None
    network_overrides: tuple[NetworkOverride, ...] | None = None
    vsock_override: VsockOverride | None = None


@dataclass(frozen=True)
class ApiRequest:
    """One call of the API: what the client sends and what the schema tests check."""

    method: Literal["GET", "PUT", "PATCH"]
    path: str
    body: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class NicConfig:
    """The VM's one NIC: a tap device in the sandbox's network namespace."""

    tap: str
    mac: str
    iface_id: str = GUEST_IFACE


@dataclass(frozen=True)
class VmConfig:
    """Everything one boot needs; paths are as Firecracker sees them (chroot-relative)."""

    kernel: str
    rootfs: str
    vsock_uds: str
    boot_args: str
    initrd: str | None = None
    workspace: str | None = None
    vcpus: int = 1
    mem_mib: int = 512
    smt: bool = False
    track_dirty_pages: bool = False
    nic: NicConfig | None = None
    guest_cid: int = 3


def _drive(drive_id: str, path: str, *, read_only: bool, **extra: Any) -> ApiRequest:
    """A disk, attached in call order (``/dev/vda``, ``/dev/vdb``); never the kernel's
    root device: the initramfs mounts the root."""
    return Drive.request(
        drive_id=drive_id,
        is_root_device=False,
        is_read_only=read_only,
        path_on_host=path,
        **extra,
    )


def guest_mac(sandbox_id: str) -> str:
    """A stable, locally administered unicast MAC derived from the full sandbox id."""
    digest = hashlib.blake2b(
        validate_sandbox_id(sandbox_id).encode(), digest_size=5, person=b"ironclaw-mac"
    ).digest()
    return "06:" + ":".join(f"{b:02x}" for b in digest)


def kernel_boot_args(
    *,
    console: bool,
    hostname: str,
    vsock_port: int = AGENT_VSOCK_PORT,
    ip: str | None = None,
    workspace: bool = False,
    extra: tuple[str, ...] = (),
) -> str:
    """The guest command line.

    Firecracker's virtio-blk reports no serial the initramfs could match, so the disks
    are named by their attach order (``ironclaw.root``, ``ironclaw.workspace``). Without
    ``console`` the serial port is disabled outright: the 8250 driver costs boot time
    and a console the host does not read is only attack surface.
    """
    args = ["reboot=k", "panic=-1", "pci=off", "quiet", "loglevel=4", "random.trust_cpu=on"]
    args += ["i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd"]
    args += ["console=ttyS0"] if console else ["8250.nr_uarts=0"]
    args += [f"ironclaw.hostname={hostname}", f"ironclaw.channel=vsock:{vsock_port}"]
    args.append("ironclaw.root=/dev/vda")
    if workspace:
        args.append("ironclaw.workspace=/dev/vdb")
    if ip:
        args.append(f"ip={ip}")
    args += extra
    for arg in args:
        if not arg or not arg.isascii() or not arg.isprintable() or " " in arg:
            raise ConfigError(f"kernel argument {arg!r} must be printable ASCII without spaces")
    line = " ".join(args)
    if len(line) > MAX_BOOT_ARGS:
        raise ConfigError(f"kernel command line is {len(line)} bytes; at most {MAX_BOOT_ARGS}")
    return line


def boot_requests(cfg: VmConfig) -> list[ApiRequest]:
    """The boot sequence, in order: configure everything, then ``InstanceStart``.

    The root drive is attached first so the guest sees it as ``/dev/vda`` and the
    workspace as ``/dev/vdb``; neither is Firecracker's "root device" because the
    initramfs, not the kernel, mounts the root (read-only, under a tmpfs overlay).
    """
    reqs = [
        BootSource.request(
            kernel_image_path=cfg.kernel, initrd_path=cfg.initrd, boot_args=cfg.boot_args
        ),
        MachineConfig.request(
            vcpu_count=cfg.vcpus,
            mem_size_mib=cfg.mem_mib,
            smt=cfg.smt,
            track_dirty_pages=cfg.track_dirty_pages,
        ),
        _drive(ROOT_DRIVE, cfg.rootfs, read_only=True),
    ]
    if cfg.workspace is not None:
        reqs.append(_drive(WORKSPACE_DRIVE, cfg.workspace, read_only=False, cache_type="Unsafe"))
    if cfg.nic is not None:
        nic = cfg.nic
        reqs.append(
            NetworkInterface.request(
                iface_id=nic.iface_id, host_dev_name=nic.tap, guest_mac=nic.mac
            )
        )
    reqs.append(Vsock.request(guest_cid=cfg.guest_cid, uds_path=cfg.vsock_uds))
    reqs.append(InstanceAction.request(action_type="InstanceStart"))
    return reqs


def vm_state_request(state: Literal["Paused", "Resumed"]) -> ApiRequest:
    """Pause or resume the vCPUs (a snapshot is taken of a paused VM)."""
    return VmState.request(state=state)


def ctrl_alt_del_request() -> ApiRequest:
    """Ask the guest to reboot, which ``reboot=k`` plus Firecracker turn into an exit."""
    return InstanceAction.request(action_type="SendCtrlAltDel")


def snapshot_create_request(
    snapshot_path: str, mem_path: str, kind: SnapshotType = "Full"
) -> ApiRequest:
    """Write VM state and memory; Firecracker wants the VM paused first.

    A ``Diff`` snapshot holds only pages dirtied since the last one and needs
    ``track_dirty_pages`` in the machine config.
    """
    return SnapshotCreate.request(
        snapshot_path=snapshot_path, mem_file_path=mem_path, snapshot_type=kind
    )


def snapshot_load_request(
    snapshot_path: str,
    mem_path: str,
    *,
    mem_backend: Literal["File", "Uffd"] = "File",
    resume: bool = True,
    track_dirty_pages: bool | None = None,
    nic: NicConfig | None = None,
    vsock_uds: str | None = None,
) -> ApiRequest:
    """Restore into a fresh Firecracker process (nothing configured before it).

    The restored VM may live in another sandbox, so its tap and vsock socket are
    overridden with the new sandbox's; ``Uffd`` makes ``mem_path`` the socket of a
    page-fault handler instead of a memory file.
    """
    return SnapshotLoad.request(
        snapshot_path=snapshot_path,
        mem_backend={"backend_type": mem_backend, "backend_path": mem_path},
        track_dirty_pages=track_dirty_pages,
        resume_vm=resume,
        network_overrides=(
            None if nic is None else ({"iface_id": nic.iface_id, "host_dev_name": nic.tap},)
        ),
        vsock_override=None if vsock_uds is None else {"uds_path": vsock_uds},
    )
