"""VMs restored from an agent-ready snapshot: they run commands, each is its own machine,
and a tampered snapshot is refused (real QEMU boots and restores, vm-marked), plus the
guest's identity parsing and the snapshot bookkeeping as plain unit tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import image_cache_settings
from ironclaw.backends.qemu.accel import probe_accel
from ironclaw.backends.qemu.backend import QEMU_OVERHEAD_MIB
from ironclaw.backends.qemu.restore import (
    SnapshotCorrupt,
    SnapshotKey,
    SnapshotStore,
    VmSnapshot,
    fresh_identity,
    open_verified,
    restore_enabled,
)
from ironclaw.backends.qemu.vm import QemuVm
from ironclaw.errors import BackendError, ConfigError
from ironclaw.guest.identity import parse_kernel_ip
from ironclaw.host.guest import GuestClient
from ironclaw.host.manager import SandboxManager
from ironclaw.images import ImageArtifacts
from ironclaw.proto import methods
from ironclaw.proto.frames import FrameType, encode_frame
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport import unix, virtio_serial
from ironclaw.transport._sessions import hello_frame
from nethelpers import PROBE, PeerHost
from test_qemu_backend import vm_image, vm_snapshots  # noqa: F401  (fixtures)

KEY = SnapshotKey(accel="tcg", cpus=1, memory_mib=256, network=True)


# -- unit layer ---------------------------------------------------------------------------


def test_kernel_ip_is_parsed_as_the_boot_init_reads_it() -> None:
    assert parse_kernel_ip("10.250.0.6::10.250.0.5:30::eth0:off") == (
        "10.250.0.6",
        "10.250.0.5",
        30,
        "eth0",
    )
    assert parse_kernel_ip("10.0.0.2") == ("10.0.0.2", "", 24, "eth0")
    for bad in ("", "::1.2.3.4:24", "10.0.0.2::x:24", "10.0.0.2::10.0.0.1:40", "1.2.3.4:::24::e;x"):
        with pytest.raises(ConfigError):
            parse_kernel_ip(bad)


def test_fresh_identities_differ_and_decode() -> None:
    a, b = fresh_identity("sb-1", ip="10.0.0.2::10.0.0.1:24::eth0:off"), fresh_identity("sb-1")
    assert a.seed != b.seed and a.machine_id != b.machine_id
    assert len(bytes.fromhex(a.seed)) == 64 and len(a.machine_id) == 32
    name, params = methods.encode(a)
    assert name == "identity.reset"
    assert methods.decode_request(name, params) == a


def test_restore_is_the_default_and_can_be_turned_off() -> None:
    assert restore_enabled({})
    assert restore_enabled({"IRONCLAW_QEMU_RESTORE": "1"})
    for off in ("0", "off", "no", "false", " OFF "):
        assert not restore_enabled({"IRONCLAW_QEMU_RESTORE": off})


async def test_a_build_past_its_deadline_is_an_error_and_leaves_no_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hang (here: a build that wrote half its state and stops) becomes a clear error
    at the deadline; the partial file is removed and nothing is recorded."""
    art = ImageArtifacts(
        name="t", digest="d" * 32, rootfs_dir=tmp_path / "root", ext4=tmp_path / "rootfs.ext4",
        initramfs=tmp_path / "initrd", vmlinux=tmp_path / "vmlinux", kernel_release="6",
    )  # fmt: skip
    store = SnapshotStore(art)

    async def hangs(self: SnapshotStore, key: SnapshotKey, dest: Path, timeout: float) -> None:
        dest.write_bytes(b"half a snapshot")
        await asyncio.Event().wait()

    monkeypatch.setattr(SnapshotStore, "_boot_and_save", hangs)
    with pytest.raises(
        BackendError, match=r"did not finish within 0s.*partial snapshot was removed"
    ):
        await store.ensure(KEY, timeout=0.2)
    assert store.load(KEY) is None
    assert sorted(p.name for p in store.root.iterdir()) == [".lock"]


def test_a_changed_byte_fails_the_check(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "s.state"
    path.write_bytes(b"x" * 3_000_000)
    snap = VmSnapshot(
        path=path,
        key=KEY,
        image="d",
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        size=3_000_000,
        qemu="q",
    )
    os.close(open_verified(snap))
    with path.open("r+b") as f:
        f.seek(2_000_000)
        f.write(b"y")
    with pytest.raises(SnapshotCorrupt, match=r"corrupt.*rebuilt"):
        open_verified(snap)
    path.unlink()
    with pytest.raises(SnapshotCorrupt, match="cannot be read"):
        open_verified(snap)


# -- real VMs -----------------------------------------------------------------------------


@pytest.fixture
def run_root() -> Iterator[Path]:
    path = Path(f"/tmp/icr-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    path.mkdir(mode=0o700)
    yield path
    for pidfile in path.rglob("qemu.pid"):
        try:
            pid = int(pidfile.read_text())
            if str(pidfile.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def store(image: ImageArtifacts) -> SnapshotStore:
    s = SnapshotStore(image, image_cache_settings())
    await s.ensure(KEY, timeout=600)
    return s


async def _client(vm: QemuVm) -> tuple[GuestClient, Peer]:
    conn = await virtio_serial.connect(vm.channel_path, handshake_s=120)
    peer = Peer(conn, name="test", limits=HOST_LIMITS)
    await peer.start()
    return GuestClient(peer), peer


async def _sh(client: GuestClient, script: str) -> str:
    res = await client.exec(["/bin/sh", "-c", script], timeout=60)
    assert res.exit_code == 0, (script, res)
    return res.stdout.decode().strip()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(1200)
async def test_two_restored_vms_run_commands_and_are_different_machines(
    store: SnapshotStore, run_root: Path
) -> None:
    ids = [
        fresh_identity(
            f"sb-{i}",
            ip=f"10.9.{i}.2::10.9.{i}.1:24::eth0:off",
            env={"ICR_MARK": f"m{i}"},
            workspace_mib=8,
        )
        for i in (1, 2)
    ]
    vms = []
    try:
        for i, ident in enumerate(ids):
            vms.append(await store.restore(KEY, run_root / str(i), ident, run_as=65534))
        seen = []
        for vm, ident in zip(vms, ids, strict=True):
            client, peer = await _client(vm)
            try:
                assert await _sh(client, "echo hello; echo $((6*7))") == "hello\n42"
                facts = await _sh(
                    client,
                    "hostname; cat /etc/machine-id; echo $ICR_MARK $IRONCLAW_SANDBOX_ID;"
                    " /bin/busybox ip -4 addr show dev eth0 | grep -o 'inet [0-9./]*';"
                    " /bin/busybox df -k /workspace | tail -1 | awk '{print $2}';"
                    " head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n';"
                    " echo; cat /proc/sys/kernel/random/boot_id",
                )
            finally:
                await peer.aclose()
            host, mid, mark, inet, ws_kib, rand, boot_id = facts.splitlines()
            assert host == ident.hostname
            assert mid == ident.machine_id
            assert mark == f"{ident.env['ICR_MARK'] if ident.env else ''} {ident.sandbox_id}"
            assert inet == f"inet {ident.ip.split(':')[0] if ident.ip else ''}/24"
            assert int(ws_kib) == 8 * 1024
            seen.append((rand, boot_id))
        # The RNG was reseeded with different bytes in each: its output differs, and so
        # does boot_id, which the kernel draws on first read (nothing reads it before
        # the snapshot is taken, so each restored VM draws its own after the reseed).
        assert seen[0][0] != seen[1][0] and len(seen[0][0]) == 32
        assert seen[0][1] != seen[1][1]
    finally:
        for vm in vms:
            await vm.kill()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(1200)
async def test_a_tampered_snapshot_is_refused_and_rebuilt(
    store: SnapshotStore, run_root: Path
) -> None:
    snap = store.load(KEY)
    assert snap is not None
    with snap.path.open("r+b") as f:
        f.seek(snap.size // 2)
        byte = f.read(1)
        f.seek(snap.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotCorrupt, match="corrupt"):
        os.close(open_verified(snap))
    vm = await store.restore(KEY, run_root / "r", fresh_identity("sb-t"), run_as=65534)
    try:
        rebuilt = store.load(KEY)
        assert rebuilt is not None
        os.close(open_verified(rebuilt))
        client, peer = await _client(vm)
        try:
            assert await _sh(client, "hostname") == "sb-t"
        finally:
            await peer.aclose()
    finally:
        await vm.kill()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(2400)
async def test_build_and_restore_in_a_loop_with_connections_cut_mid_frame(
    image: ImageArtifacts, run_root: Path
) -> None:
    """What hung before: the agent closed and reopened its port between host connections,
    and the guest kernel dropped what the next connection had sent meanwhile. Each round
    builds the snapshot (boot, probe, warm-up connection, save) and restores it, then
    cuts connections off mid-frame and right after a request, and the next connection
    must be served from its first byte. A hang fails at the round's bound."""
    store = SnapshotStore(image, image_cache_settings())
    request = encode_frame(FrameType.MESSAGE, 0, json.dumps({
        "jsonrpc": "2.0", "id": 7, "method": "exec",
        "params": {"argv": ["/bin/sh", "-c", "sleep 0.2; echo stale"]},
    }).encode())  # fmt: skip
    for round_ in range(3):
        async with asyncio.timeout(700):
            store.discard(KEY)
            await store.ensure(KEY, timeout=600)
            ident = fresh_identity(f"sb-loop{round_}")
            vm = await store.restore(KEY, run_root / f"l{round_}", ident, run_as=65534)
            try:
                for cut in (0, 5, 9, len(request) - 1, len(request)):
                    raw = await unix.connect(vm.channel_path)
                    await raw.write(hello_frame(os.urandom(16)) + request[:cut])
                    await raw.aclose()  # the whole request: its reply finds no one
                    client, peer = await _client(vm)
                    try:
                        assert await _sh(client, f"echo {round_}.{cut}") == f"{round_}.{cut}"
                    finally:
                        await peer.aclose()
                # Two sessions back to back, the second opened before the first closes.
                _, peer1 = await _client(vm)
                second = asyncio.ensure_future(_client(vm))
                await asyncio.sleep(0.05)
                await peer1.aclose()
                client, peer = await second
                try:
                    assert await _sh(client, "hostname") == ident.hostname
                finally:
                    await peer.aclose()
            finally:
                await vm.kill()


# -- through the manager: restored sandboxes, cold and from the warm pool -------------------


@pytest.fixture
def restore_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRONCLAW_QEMU_RESTORE", "1")


@pytest.fixture
async def peer() -> AsyncIterator[PeerHost]:
    p = await PeerHost.start((8080,))
    yield p
    await p.stop()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(1200)
async def test_manager_sandboxes_restored_cold_and_from_the_pool_are_distinct_and_networked(
    restore_on: None,
    vm_image: ImageArtifacts,  # noqa: F811
    manager: SandboxManager,
    peer: PeerHost,
) -> None:
    settings = image_cache_settings()
    accel = await asyncio.to_thread(probe_accel, vm_image, settings)
    spec = {
        "backend": "qemu",
        "env": {"GREETING": "restored"},
        "limits": {"memory_mib": 384, "workspace_mib": 16},
        "network": {"allow": [f"{peer.ip}:8080/tcp"]},
    }
    # Built here, not inside a sandbox start (the first one would take a boot's time).
    await SnapshotStore(vm_image, settings).ensure(
        SnapshotKey(accel=accel, cpus=1, memory_mib=384 - QEMU_OVERHEAD_MIB, network=True),
        timeout=600,
    )
    assert await manager.fill_pool(spec, size=1) == 1
    assert await manager.warm(spec) == 1
    pooled = (await manager.create(spec, ready_timeout=60)).id
    assert await manager.warm(spec) == 0
    cold = (await manager.create(spec, use_pool=False, ready_timeout=60)).id
    script = (
        'echo "$GREETING"; hostname; cat /etc/machine-id;'
        " /bin/busybox ip -4 addr show dev eth0 | grep -o 'inet [0-9.]*';"
        " head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
        " /bin/busybox df -k /workspace | tail -1 | awk '{print $2}'"
    )
    facts = {}
    for sid in (pooled, cold):
        info = (await manager.get(sid)).info
        assert info["pid"] and "-incoming" in Path(f"/proc/{info['pid']}/cmdline").read_text()
        r = await manager.exec(sid, ["sh", "-c", script], timeout=60)
        assert r.exit_code == 0, r.stderr
        greeting, host, mid, inet, rand, ws_kib = r.stdout.decode().split("\n")[:6]
        assert greeting == "restored" and int(ws_kib) == 16 * 1024
        assert inet == f"inet {info['network']['guest_ip']}"
        # Through the tap and the sandbox's firewall to the allowed peer port.
        targets = [(peer.ip, 8080)]
        r = await manager.exec(sid, ["python3", "-c", PROBE, json.dumps(targets), "5"], timeout=60)
        assert json.loads(r.stdout)[f"{peer.ip}:8080"] == peer.reply(8080), r.stdout
        facts[sid] = (host, mid, inet, rand)
    assert facts[cold][0] == cold
    for i in range(4):
        assert facts[pooled][i] != facts[cold][i], i
