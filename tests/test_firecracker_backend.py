"""The Firecracker backend end to end: real processes, sockets, namespaces and taps.

Only the VMM is a stand-in (``test_firecracker_fake``): it serves Firecracker's API,
validates every body against Firecracker's spec, and runs the real guest agent behind
hybrid vsock. Real boots need a firecracker binary and a KVM that boots a kernel; they
are skipped, with the reason, where either is missing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw.backends.base import Backend, LaunchContext
from ironclaw.backends.firecracker import FirecrackerBackend, connect_agent, probe_firecracker
from ironclaw.backends.firecracker.api import kernel_boot_args
from ironclaw.backends.firecracker.schema import ApiSpec
from ironclaw.config import Settings
from ironclaw.errors import ConfigError
from ironclaw.images import ImageArtifacts
from ironclaw.resources.net import SandboxNetwork
from ironclaw.resources.tap import attach_tap
from ironclaw.rpc import Peer
from ironclaw.spec import parse_spec
from ironclaw.transport import hybrid_vsock
from test_firecracker_fake import SPEC_PATH, FakeFirecracker, read_record, write_wrappers

pytestmark = pytest.mark.skipif(not SPEC_PATH.is_file(), reason=f"{SPEC_PATH} is absent")
UID = 2_000_000_000 + 4000 + secrets.randbelow(1000)


async def ping(conn: Any, timeout: float = 10.0) -> dict[str, Any]:
    peer = Peer(conn, name="test")
    await peer.start()
    try:
        result: dict[str, Any] = await peer.call("ping", timeout=timeout)
        return result
    finally:
        await peer.aclose()


async def run(peer: Peer, argv: list[str]) -> tuple[dict[str, Any], bytes]:
    out = peer.new_stream_id()
    stream = peer.open_stream(out)
    res, data = await asyncio.wait_for(
        asyncio.gather(peer.call("exec", {"argv": argv, "stdout_stream": out}), stream.read_all()),
        15,
    )
    return res, data


# -- hybrid vsock against the fake muxer and the real agent -----------------------------------
async def test_hybrid_vsock_reaches_the_real_agent_after_boot_race(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"k")
    fc = FakeFirecracker(str(tmp_path / "api.sock"), refuse_first=3)
    server = asyncio.ensure_future(fc.serve())
    try:
        await asyncio.sleep(0)
        await fc.dispatch(
            "PUT", "/boot-source", f'{{"kernel_image_path": "{tmp_path}/vmlinux"}}'.encode()
        )
        uds = str(tmp_path / "v.sock")
        assert (
            await fc.dispatch("PUT", "/vsock", f'{{"guest_cid": 3, "uds_path": "{uds}"}}'.encode())
        )[0] == 204
        assert (await fc.dispatch("PUT", "/actions", b'{"action_type": "InstanceStart"}'))[0] == 204
        conn = await connect_agent(uds, 1024, deadline=15)
        peer = Peer(conn, name="host")
        await peer.start()
        try:
            pong = await peer.call("ping", timeout=10)
            assert pong["pong"] is True
            assert pong["pid"] == fc.guest.pid if fc.guest else False
            res, out = await run(peer, ["sh", "-c", "echo through-vsock"])
            assert res["exit_code"] == 0
            assert out == b"through-vsock\n"
        finally:
            await peer.aclose()
        assert fc.refused >= 3  # the retry path ran: refused while "booting", then OK
        # A port nobody listens on is refused every time, within the deadline.
        with pytest.raises(Exception, match="gave up after"):
            await hybrid_vsock.connect(uds, 5, deadline=0.3, initial_backoff=0.01)
    finally:
        fc.done.set()
        async with asyncio.timeout(5):
            await server


async def test_peer_right_after_a_raw_hybrid_vsock_handshake(tmp_path: Path) -> None:
    """A Peer started right after the handshake gets its replies (a fixed transport bug:
    the handshake's pull-mode reader used to stay armed and starve push mode)."""
    (tmp_path / "vmlinux").write_bytes(b"k")
    fc = FakeFirecracker(str(tmp_path / "api.sock"), refuse_first=0)
    server = asyncio.ensure_future(fc.serve())
    try:
        await asyncio.sleep(0)
        uds = str(tmp_path / "v.sock")
        await fc.dispatch(
            "PUT", "/boot-source", f'{{"kernel_image_path": "{tmp_path}/vmlinux"}}'.encode()
        )
        await fc.dispatch("PUT", "/vsock", f'{{"guest_cid": 3, "uds_path": "{uds}"}}'.encode())
        await fc.dispatch("PUT", "/actions", b'{"action_type": "InstanceStart"}')
        conn = await hybrid_vsock.connect(uds, 1024, deadline=15, initial_backoff=0.01)
        await ping(conn, timeout=3)
    finally:
        fc.done.set()
        async with asyncio.timeout(5):
            await server


# -- the backend -------------------------------------------------------------------------------
@pytest.fixture
def artifacts(tmp_path: Path) -> ImageArtifacts:
    img = tmp_path / "image"
    img.mkdir()
    for name in ("vmlinux", "initramfs.cpio", "rootfs.ext4"):
        (img / name).write_bytes(name.encode())
        (img / name).chmod(0o644)
    (img / "rootfs").mkdir()
    return ImageArtifacts(
        name="default",
        digest="0" * 32,
        rootfs_dir=img / "rootfs",
        ext4=img / "rootfs.ext4",
        initramfs=img / "initramfs.cpio",
        vmlinux=img / "vmlinux",
        kernel_release="6.1.0-fake",
    )


@pytest.fixture
def fake_bins(tmp_path: Path) -> tuple[Path, Path, Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "record.jsonl"
    fc, jl = write_wrappers(bindir, record)
    kvm = tmp_path / "kvm"  # the fake VMM needs no KVM; the backend checks access only
    kvm.write_bytes(b"")
    return fc, jl, record


def make_ctx(
    settings: Settings, sid: str, slot: int, net: SandboxNetwork | None = None
) -> LaunchContext:
    settings.ensure()
    run_dir = settings.sandbox_runtime_dir(sid)
    run_dir.mkdir(parents=True, mode=0o700)
    spec = parse_spec(
        {"backend": "firecracker", "limits": {"workspace_mib": 16, "memory_mib": 256}}
    )
    return LaunchContext(
        sandbox_id=sid,
        slot=slot,
        spec=spec,
        settings=settings,
        run_dir=run_dir,
        host_uid=UID,
        network=net,
    )


def backend_for(
    fake_bins: tuple[Path, Path, Path], artifacts: ImageArtifacts, **kw: Any
) -> FirecrackerBackend:
    fc, jl, _ = fake_bins
    return FirecrackerBackend(
        firecracker=str(fc),
        jailer=str(jl),
        artifacts=artifacts,
        kvm=str(fake_bins[0].parent.parent / "kvm"),
        check=ApiSpec.load(SPEC_PATH).validate_request,
        **kw,
    )


def assert_all_requests_valid(record: Path) -> list[dict[str, Any]]:
    spec = ApiSpec.load(SPEC_PATH)
    api = [e for e in read_record(record) if e["kind"] == "api" and e["method"] != "GET"]
    for e in api:
        assert spec.validate_request(e["method"], e["path"], e["body"]) == [], e
    return api


async def test_plain_firecracker_boot_channel_pause_and_stop(
    settings: Settings, artifacts: ImageArtifacts, fake_bins: tuple[Path, Path, Path]
) -> None:
    backend = backend_for(fake_bins, artifacts, use_jailer=False)
    assert isinstance(backend, Backend)
    ctx = make_ctx(settings, "fc-plain", 1)
    await backend.prepare(ctx)
    info = await backend.start(ctx)
    try:
        assert (await backend.inspect(info)).alive
        assert info.jailed is False
        conn = await backend.open_channel(info, timeout=15)
        peer = Peer(conn, name="host")
        await peer.start()
        try:
            assert (await peer.call("ping", timeout=10))["pong"] is True
            res, out = await run(peer, ["sh", "-c", "echo hi"])
            assert (res["exit_code"], out) == (0, b"hi\n")
            await backend.pause(info)
            with pytest.raises(TimeoutError):
                await peer.call("ping", timeout=0.3)  # stopped vCPUs answer nothing
            await backend.resume(info)
            assert (await peer.call("ping", timeout=10))["pong"] is True
        finally:
            await peer.aclose()
    finally:
        await backend.stop(info, timeout=3)
    status = await backend.inspect(info)
    assert not status.alive
    api = assert_all_requests_valid(fake_bins[2])
    paths = [f"{e['method']} {e['path']}" for e in api]
    assert paths[:7] == [
        "PUT /boot-source",
        "PUT /machine-config",
        "PUT /drives/ironclaw-root",
        "PUT /drives/ironclaw-ws",
        "PUT /vsock",
        "PUT /actions",
        "PATCH /vm",
    ]
    assert api[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert api[1]["body"]["mem_size_mib"] == 256 - 32
    assert api[0]["body"]["kernel_image_path"] == str(artifacts.vmlinux)


@pytest.fixture
def netns() -> Iterator[SandboxNetwork]:
    """A network namespace of this test's own, wired like the network manager's."""
    tag = secrets.token_hex(3)
    name, host_if = f"icfct-{tag}", f"icfv{tag}"
    octet = 100 + secrets.randbelow(100)
    host_ip, guest_ip = f"10.{octet}.77.1", f"10.{octet}.77.2"
    cmds = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", name, "addr", "add", f"{guest_ip}/30", "dev", "eth0"],
        ["ip", "-n", name, "link", "set", "eth0", "up"],
        ["ip", "-n", name, "route", "add", "default", "via", host_ip],
    ]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield SandboxNetwork(
            sandbox_id="fc-net",
            slot=2,
            netns_name=name,
            netns_path=f"/run/netns/{name}",
            host_ifname=host_if,
            guest_ifname="eth0",
            host_ip=host_ip,
            guest_ip=guest_ip,
            prefixlen=30,
        )
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


_TAP_READER = r"""
import ctypes, fcntl, os, struct, sys
netns, uid, want = sys.argv[1], int(sys.argv[2]), bytes(int(x) for x in sys.argv[3].split("."))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.setns(os.open(netns, os.O_RDONLY), 0x40000000) == 0
# The jailer gives Firecracker a /dev/net/tun node it owns; opening as root stands in for
# that. The tap's owner check happens at TUNSETIFF, which runs as the VM's uid.
fd = os.open("/dev/net/tun", os.O_RDWR)
os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"tap0", 0x0002 | 0x1000))  # TAP | NO_PI
print("ATTACHED", flush=True)
while True:
    frame = os.read(fd, 2048)
    if frame[12:14] == b"\x08\x06" and frame[38:42] == want:
        print("ARP", flush=True)
        break
"""


async def test_tap_bridges_the_vm_to_the_sandbox_veth(netns: SandboxNetwork) -> None:
    """The VM's uid can attach the tap, and the host's traffic for the guest reaches it."""
    await attach_tap(
        netns.netns_path,
        uid=UID,
        gid=UID,
        guest_ifname="eth0",
        guest_ip=netns.guest_ip,
        prefixlen=30,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _TAP_READER,
        netns.netns_path,
        str(UID),
        netns.guest_ip,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            assert await proc.stdout.readline() == b"ATTACHED\n"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                line = b""
                while not line:
                    s.sendto(b"x", (netns.guest_ip, 9))  # resolving it sends ARP over the bridge
                    try:
                        line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
                    except TimeoutError:
                        continue
            assert line == b"ARP\n"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_jailed_boot_with_network_snapshot_and_restore(
    settings: Settings,
    artifacts: ImageArtifacts,
    fake_bins: tuple[Path, Path, Path],
    netns: SandboxNetwork,
    tmp_path: Path,
) -> None:
    chroot_base = tmp_path / "jail"
    backend = backend_for(fake_bins, artifacts, chroot_base=chroot_base)
    assert backend.use_jailer
    ctx = make_ctx(settings, "fc-jailed", 2, net=netns)
    await backend.prepare(ctx)
    info = await backend.start(ctx)
    root = chroot_base / "firecracker" / "fc-jailed" / "root"
    snap_dir = tmp_path / "snap"
    try:
        assert info.jailed and Path(info.api_socket).resolve() == root / "run/firecracker.socket"
        assert os.stat(root / "vmlinux").st_ino == artifacts.vmlinux.stat().st_ino  # hard link
        assert os.stat(root / "workspace.ext4").st_uid == UID
        jailer = next(e for e in read_record(fake_bins[2]) if e["kind"] == "jailer")["argv"]
        assert jailer[jailer.index("--netns") + 1] == netns.netns_path
        assert jailer[jailer.index("--uid") + 1] == str(UID)
        assert (await ping(await backend.open_channel(info, timeout=15)))["pong"] is True
        with pytest.raises(ConfigError, match="track_dirty_pages"):
            await backend.snapshot(info, snap_dir, kind="Diff")
        snap = await backend.snapshot(info, snap_dir)
        assert snap.state.exists() and snap.memory.exists() and snap.workspace.exists()
        assert (await ping(await backend.open_channel(info, timeout=15)))["pong"] is True
    finally:
        await backend.stop(info, timeout=3)
    assert not (chroot_base / "firecracker" / "fc-jailed").exists()
    api = assert_all_requests_valid(fake_bins[2])
    net_req = next(e for e in api if e["path"] == "/network-interfaces/eth0")
    assert net_req["body"]["host_dev_name"] == "tap0"
    boot = next(e for e in api if e["path"] == "/boot-source")["body"]
    assert boot["kernel_image_path"] == "/vmlinux"
    assert f"ip={netns.guest_ip}::{netns.host_ip}:30::eth0:off" in boot["boot_args"]
    assert any(
        e["path"] == "/snapshot/create" and e["body"]["snapshot_type"] == "Full" for e in api
    )

    # Restore into a new sandbox: fresh jail, same chroot-relative paths.
    ctx2 = make_ctx(settings, "fc-restored", 3)
    info2 = await backend.restore(ctx2, snap)
    try:
        assert (await ping(await backend.open_channel(info2, timeout=15)))["pong"] is True
    finally:
        await backend.stop(info2, timeout=3)
    load = [e for e in assert_all_requests_valid(fake_bins[2]) if e["path"] == "/snapshot/load"]
    assert load[-1]["body"]["mem_backend"] == {"backend_type": "File", "backend_path": "/vm.mem"}
    assert load[-1]["body"]["resume_vm"] is True


def test_probe_firecracker(tmp_path: Path, fake_bins: tuple[Path, Path, Path]) -> None:
    ok, detail = probe_firecracker(
        firecracker=str(tmp_path / "none"),
        jailer=str(tmp_path / "none"),
        kvm=str(tmp_path / "nokvm"),
    )
    assert not ok
    assert "firecracker" in detail and "nokvm" in detail
    ok, detail = probe_firecracker(
        firecracker=str(fake_bins[0]), jailer=str(fake_bins[1]), kvm=str(tmp_path / "kvm")
    )
    assert ok
    assert "not verified" in detail


async def test_prepare_says_what_is_missing(settings: Settings, tmp_path: Path) -> None:
    backend = FirecrackerBackend(firecracker=str(tmp_path / "none"), jailer=str(tmp_path / "none"))
    if backend.firecracker is not None:
        pytest.skip("a firecracker binary is configured in this environment")
    with pytest.raises(Exception, match="firecracker is not installed"):
        await backend.prepare(make_ctx(settings, "fc-missing", 4))


# -- real boots ------------------------------------------------------------------------------------
def _real_boot_skip_reason(settings: Settings) -> str | None:
    ok, detail = probe_firecracker()
    if not ok:
        return f"real Firecracker boot impossible here: {detail}"
    from ironclaw.images import find_image

    art = find_image(settings, "default")
    if art is None:
        return "no VM image built (`ironclaw image build`)"
    from ironclaw.backends.qemu.vm import probe_accel

    if probe_accel(art, settings) != "kvm":
        return "KVM cannot boot a kernel on this host (the QEMU backend's boot probe says so)"
    return None


@pytest.mark.vm
async def test_real_firecracker_boot(settings: Settings) -> None:
    reason = _real_boot_skip_reason(settings)
    if reason:
        pytest.skip(reason)
    backend = FirecrackerBackend(console=True)
    ctx = make_ctx(settings, "fc-real", 5)
    await backend.prepare(ctx)
    info = await backend.start(ctx)
    try:
        assert "ironclaw.channel=vsock:1024" in kernel_boot_args(console=True, hostname="x")
        pong = await ping(await backend.open_channel(info, timeout=60), timeout=30)
        assert pong["pong"] is True
    finally:
        await backend.stop(info, timeout=5)
