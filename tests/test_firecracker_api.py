"""Every body the Firecracker backend sends validates against Firecracker's own spec."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw.backends.firecracker.api import (
    ApiRequest,
    NicConfig,
    VmConfig,
    boot_requests,
    ctrl_alt_del_request,
    guest_mac,
    kernel_boot_args,
    snapshot_create_request,
    snapshot_load_request,
    vm_state_request,
)
from ironclaw.backends.firecracker.client import FirecrackerApi
from ironclaw.backends.firecracker.jailer import JailLayout, jailer_argv
from ironclaw.backends.firecracker.schema import ApiSpec
from ironclaw.errors import BackendError, ConfigError
from test_firecracker_fake import SPEC_PATH, FakeFirecracker

pytestmark = pytest.mark.skipif(not SPEC_PATH.is_file(), reason=f"{SPEC_PATH} is absent")


@pytest.fixture(scope="module")
def spec() -> ApiSpec:
    return ApiSpec.load(SPEC_PATH)


def all_configurations() -> list[tuple[str, list[ApiRequest]]]:
    """Every configuration the backend supports, and every request it can send."""
    out: list[tuple[str, list[ApiRequest]]] = []
    nic = NicConfig(tap="tap0", mac=guest_mac("sb-1"))
    for jailed, net, ws, console, dirty, smt in itertools.product([True, False], repeat=6):
        root = "/" if jailed else "/var/lib/ironclaw/images/abc/"
        args = kernel_boot_args(
            console=console,
            hostname="sb-1",
            ip="10.250.0.2::10.250.0.1:30::eth0:off" if net else None,
            workspace=ws,
        )
        cfg = VmConfig(
            kernel=root + "vmlinux",
            initrd=root + "initramfs.cpio",
            rootfs=root + "rootfs.ext4",
            workspace=(root + "workspace.ext4") if ws else None,
            vsock_uds="/v.sock" if jailed else "/run/ironclaw/sandboxes/sb-1/vsock.sock",
            boot_args=args,
            vcpus=2,
            mem_mib=480,
            smt=smt,
            track_dirty_pages=dirty,
            nic=nic if net else None,
        )
        name = f"jailed={jailed} net={net} ws={ws} console={console} dirty={dirty} smt={smt}"
        out.append((name, boot_requests(cfg)))
    controls = [vm_state_request("Paused"), vm_state_request("Resumed"), ctrl_alt_del_request()]
    kinds: list[Any] = ["Full", "Diff"]
    for kind in kinds:
        controls.append(snapshot_create_request("/vm.state", "/vm.mem", kind))
    backends: list[Any] = ["File", "Uffd"]
    trackings: list[bool | None] = [None, True]
    nics: list[NicConfig | None] = [None, nic]
    for backend, resume, tracking, over, vsock in itertools.product(
        backends, [True, False], trackings, nics, [None, "/v.sock"]
    ):
        controls.append(
            snapshot_load_request(
                "/vm.state",
                "/vm.mem",
                mem_backend=backend,
                resume=resume,
                track_dirty_pages=tracking,
                nic=over,
                vsock_uds=vsock,
            )
        )
    out.append(("controls and snapshots", controls))
    return out


@pytest.mark.parametrize(("name", "requests"), all_configurations(), ids=lambda v: str(v)[:60])
def test_every_body_validates_against_firecrackers_spec(
    spec: ApiSpec, name: str, requests: list[ApiRequest]
) -> None:
    for req in requests:
        assert spec.validate_request(req.method, req.path, req.body) == [], f"{name}: {req}"


def test_boot_sequence_order_and_content() -> None:
    cfg = VmConfig(
        kernel="/vmlinux",
        rootfs="/rootfs.ext4",
        workspace="/workspace.ext4",
        vsock_uds="/v.sock",
        boot_args="console=ttyS0",
        nic=NicConfig(tap="tap0", mac="06:00:00:00:00:01"),
    )
    reqs = boot_requests(cfg)
    assert [str(r) for r in reqs] == [
        "PUT /boot-source",
        "PUT /machine-config",
        "PUT /drives/ironclaw-root",
        "PUT /drives/ironclaw-ws",
        "PUT /network-interfaces/eth0",
        "PUT /vsock",
        "PUT /actions",
    ]
    assert reqs[2].body == {
        "drive_id": "ironclaw-root",
        "is_root_device": False,
        "is_read_only": True,
        "path_on_host": "/rootfs.ext4",
    }
    assert reqs[5].body == {"guest_cid": 3, "uds_path": "/v.sock"}
    assert reqs[-1].body == {"action_type": "InstanceStart"}


@pytest.mark.parametrize(
    ("method", "path", "body", "complaint"),
    [
        # The old design's mistakes: each must be caught.
        (
            "PUT",
            "/machine-config",
            {"vcpu_count": 2, "mem_size_mib": 512, "ht_enabled": False},
            "ht_enabled",
        ),
        ("PUT", "/vsock", {"guest_cid": 3, "socket_path": "/v.sock"}, "socket_path"),
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "seccomp": {}}, "seccomp"),
        # And the schema's other rules.
        ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v.sock"}, "minimum"),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 512}, "maximum"),
        ("PUT", "/machine-config", {"vcpu_count": True, "mem_size_mib": 512}, "integer"),
        ("PATCH", "/vm", {"state": "Stopped"}, "not one of"),
        ("PUT", "/drives/a", {"drive_id": "b", "is_root_device": False}, "differs"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {}}, "backend_type"),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0"}, "host_dev_name"),
        ("PUT", "/nowhere", {}, "no such operation"),
        ("PATCH", "/balloon/hinting/stop", {"x": 1}, "takes no body"),
    ],
)
def test_bad_bodies_are_rejected(
    spec: ApiSpec, method: str, path: str, body: Any, complaint: str
) -> None:
    errors = spec.validate_request(method, path, body)
    assert errors
    assert complaint in "; ".join(errors)


def test_validator_honours_additional_properties(spec: ApiSpec) -> None:
    assert spec.validate_request("PUT", "/mmds", {"anything": {"goes": 1}}) == []
    ok = {"metrics_path": "/m", "properties": {"k": "v"}}
    assert spec.validate_definition("Metrics", ok) == []
    assert spec.validate_definition("Metrics", {"metrics_path": "/m", "properties": {"k": 1}})


def test_builder_refuses_what_firecracker_would() -> None:
    base = {"kernel": "/k", "rootfs": "/r", "vsock_uds": "/v", "boot_args": "x"}
    with pytest.raises(ConfigError, match="vcpu_count"):
        boot_requests(VmConfig(**base, vcpus=3, smt=True))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="guest_cid"):
        boot_requests(VmConfig(**base, guest_cid=2))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="without spaces"):
        kernel_boot_args(console=True, hostname="a b")
    with pytest.raises(ConfigError, match="at most"):
        kernel_boot_args(console=True, hostname="h", extra=("x" * 2000,))
    assert "console=ttyS0" in kernel_boot_args(console=True, hostname="h")
    assert "8250.nr_uarts=0" in kernel_boot_args(console=False, hostname="h")


def test_jailer_argv_and_layout(tmp_path: Path) -> None:
    layout = JailLayout(tmp_path, "sb-abc")
    argv = jailer_argv(
        jailer="/usr/bin/jailer",
        firecracker="/usr/bin/firecracker",
        layout=layout,
        uid=2000000001,
        gid=2000000001,
        netns="/run/netns/icns-x",
        cgroups={"cpuset.cpus": "0"},
    )
    assert argv[:3] == ["/usr/bin/jailer", "--id", "sb-abc"]
    assert argv[argv.index("--netns") + 1] == "/run/netns/icns-x"
    assert argv[argv.index("--cgroup") + 1] == "cpuset.cpus=0"
    assert layout.api_socket == tmp_path / "firecracker/sb-abc/root/run/firecracker.socket"
    with pytest.raises(ConfigError):
        layout.host_path("/../../etc")
    with pytest.raises(ConfigError):
        JailLayout(tmp_path, "bad_id!")
    with pytest.raises(ConfigError, match="non-root"):
        jailer_argv(jailer="j", firecracker="/f/firecracker", layout=layout, uid=0, gid=0)


# -- the client against a fake API server -------------------------------------------------
@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeFirecracker]:
    (tmp_path / "vmlinux").write_bytes(b"k")
    fc = FakeFirecracker(str(tmp_path / "api.sock"))
    task = asyncio.ensure_future(fc.serve())
    yield fc
    fc.done.set()
    async with asyncio.timeout(5):
        await task


async def test_client_round_trips_and_reports_fault_messages(
    fake: FakeFirecracker, tmp_path: Path, spec: ApiSpec
) -> None:
    async with FirecrackerApi(tmp_path / "api.sock", timeout=5) as api:
        info = await api.wait_ready(5)
        assert info["state"] == "Not started"
        assert (
            await api.put("/boot-source", {"kernel_image_path": str(tmp_path / "vmlinux")}) is None
        )
        with pytest.raises(BackendError, match=r"refused PUT /machine-config \(400\).*ht_enabled"):
            await api.put(
                "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "ht_enabled": True}
            )
        with pytest.raises(BackendError, match="cannot open /nope"):
            await api.put("/boot-source", {"kernel_image_path": "/nope"})
        with pytest.raises(BackendError, match="not started"):
            await api.request(vm_state_request("Paused"))
        assert (await api.get("/vm/config"))["boot-source"]["kernel_image_path"].endswith("vmlinux")
    # A client-side check refuses before sending: nothing reaches the server.
    async with FirecrackerApi(tmp_path / "api.sock", check=spec.validate_request) as api:
        with pytest.raises(ConfigError, match="socket_path"):
            await api.put("/vsock", {"guest_cid": 3, "socket_path": "/v"})


async def test_client_errors_without_a_server(tmp_path: Path) -> None:
    async with FirecrackerApi(tmp_path / "none.sock") as api:
        with pytest.raises(BackendError, match="cannot reach Firecracker"):
            await api.get("/")
        with pytest.raises(BackendError, match="did not answer within"):
            await api.wait_ready(0.1)
