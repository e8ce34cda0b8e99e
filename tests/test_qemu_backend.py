"""The QEMU backend end to end: real VMs through the manager and the CLI (vm-marked).

The image comes from the machine-wide test cache (see test_qemu.py); each test's private
IRONCLAW_HOME links to it, so ``find_image`` finds it exactly as in production.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import image_cache_settings
from ironclaw.backends.qemu.accel import probe_accel
from ironclaw.backends.qemu.backend import QEMU_OVERHEAD_MIB, QemuBackend
from ironclaw.backends.qemu.restore import SnapshotKey, SnapshotStore
from ironclaw.backends.qemu.vm import guest_env_script
from ironclaw.errors import BackendError, ConfigError
from ironclaw.host.manager import SandboxManager
from ironclaw.images import ImageArtifacts
from ironclaw.policy.network import sandbox_names
from ironclaw.resources.procs import host_uid, processes_with_uid_in
from ironclaw.resources.watchdog import watchdog_uid
from nethelpers import PROBE, PeerHost, sh

BOOTS_MS: list[float] = []  # boot-to-ready through the manager, reported at the end


@pytest.fixture(scope="session")
def vm_snapshots(image: ImageArtifacts) -> None:
    """The agent-ready snapshots QEMU sandboxes of these tests restore from (restoring is
    the backend's default), made once per image before any test needs one (they stay
    beside the image in the cache): a build inside a create would eat into its bounds."""
    settings = image_cache_settings()
    accel = probe_accel(image, settings)
    store = SnapshotStore(image, settings)
    for network in (False, True):
        key = SnapshotKey(accel=accel, cpus=1, memory_mib=384 - QEMU_OVERHEAD_MIB, network=network)
        asyncio.run(store.ensure(key, timeout=900))


@pytest.fixture
def vm_image(ironclaw_home: Path, image: ImageArtifacts, vm_snapshots: None) -> ImageArtifacts:
    """Make the cached image (and the cached KVM verdict) this home's own.

    Only this session's image is linked in, under a ``default`` name of this home's own:
    the cache's names are shared by every checkout on the machine, and "default" there
    may be another tree's image, whose agent need not speak this tree's channel.
    """
    cache = image_cache_settings().state_dir
    state = ironclaw_home / "state"
    images = state / "images"
    for d in (state, images, images / "names"):
        d.mkdir(mode=0o700, exist_ok=True)
    (images / image.digest).symlink_to(cache / "images" / image.digest)
    (images / "names" / "default").write_text(image.digest + "\n")
    with_probe = cache / "qemu-accel.json"
    if with_probe.exists():
        shutil.copyfile(with_probe, state / "qemu-accel.json")
    return image


def _spec(**extra: object) -> dict[str, object]:
    return {"backend": "qemu", "limits": {"memory_mib": 384, "workspace_mib": 64}, **extra}


def _qemu_pids(run_dir: str) -> list[int]:
    """Every process on the host whose command line names this sandbox's run directory."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if run_dir.encode() in cmdline:
                found.append(int(entry))
    return found


def _assert_unprivileged(mgr: SandboxManager, sid: str, info: dict[str, object]) -> None:
    """No process of the sandbox (QEMU or anything in its cgroup) is root on the host."""
    uid = int(str(info["host_uid"]))
    pids = set(_qemu_pids(str(info["run_dir"]))) | set(mgr.cgroups.open(sid).pids())
    assert int(str(info["pid"])) in pids
    qemu_status = Path(f"/proc/{info['pid']}/status").read_text()
    assert "\nSeccomp:\t2\n" in qemu_status, "QEMU runs without its seccomp filter"
    for pid in pids:
        assert host_uid(pid) == uid, (pid, host_uid(pid))
        status = Path(f"/proc/{pid}/status").read_text()
        cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff"))
        assert int(cap_eff.split()[1], 16) == 0, cap_eff


async def _create_timed(mgr: SandboxManager, spec: dict[str, object]) -> str:
    started = time.monotonic()
    rec = await mgr.create(spec, ready_timeout=60)
    BOOTS_MS.append((time.monotonic() - started) * 1000)
    print(f"\nboot to agent ready via the manager: {BOOTS_MS[-1]:.0f} ms", end=" ")
    print(f"(p50 so far {statistics.median(BOOTS_MS):.0f} ms)")
    return rec.id


# -- without a VM ------------------------------------------------------------------------


async def test_missing_image_says_how_to_build_it(manager: SandboxManager) -> None:
    with pytest.raises(BackendError, match="ironclaw image build"):
        await manager.create({"backend": "qemu"})
    assert await manager.store.all() == []


async def test_memory_too_small_for_a_vm(manager: SandboxManager, vm_image: ImageArtifacts) -> None:
    with pytest.raises(ConfigError, match=f"{QEMU_OVERHEAD_MIB} for QEMU"):
        await manager.create({"backend": "qemu", "limits": {"memory_mib": 128}})


def test_guest_env_script_round_trips_through_a_shell(tmp_path: Path) -> None:
    env = {"A": "plain", "B": 'it\'s "quoted" $HOME `x`', "C": "two\nlines", "D": ""}
    script = guest_env_script(env)
    assert len(script) % 512 == 0 and b"\0" not in script
    (tmp_path / "env.sh").write_bytes(script)
    dump = "import json, os; print(json.dumps({k: os.environ[k] for k in 'ABCD'}))"
    out = subprocess.run(
        ["sh", "-c", f'. "$1" && exec {sys.executable} -c "$2"', "sh", tmp_path / "env.sh", dump],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        check=True,
        timeout=10,
    )
    assert json.loads(out.stdout) == env
    with pytest.raises(ConfigError):
        guest_env_script({"1BAD": "x"})


# -- real VMs ----------------------------------------------------------------------------

ZOMBIES = r"""
import os
z = []
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        s = open(f"/proc/{p}/stat").read()
    except OSError:
        continue
    if s[s.rfind(")") + 2] == "Z":
        z.append(p)
print(len(z))
"""


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(300)
async def test_vm_sandbox_runs_commands_unprivileged_and_reaps(
    vm_image: ImageArtifacts, manager: SandboxManager
) -> None:
    sid = await _create_timed(manager, _spec(env={"GREETING": "hello vm"}))
    record = await manager.get(sid)
    info = record.info
    assert record.state == "running"
    _assert_unprivileged(manager, sid, info)

    r = await manager.exec(sid, ["uname", "-r"], timeout=30)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().strip() == vm_image.kernel_release != platform.release()
    r = await manager.exec(sid, ["sh", "-c", 'echo "$GREETING"; hostname'], timeout=30)
    assert r.stdout.decode().split("\n")[:2] == ["hello vm", sid]

    payload = os.urandom(300_000)
    await manager.write_file(sid, "blob.bin", payload)
    assert await manager.read_file(sid, "blob.bin") == payload
    r = await manager.exec(sid, ["sha256sum", "/workspace/blob.bin"], timeout=30)
    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()

    # An orphan killed with its command's group is reparented to PID 1 (init.sh), which
    # must reap it: the agent only reaps its own children.
    r = await manager.exec(sid, ["sh", "-c", "(sleep 30 &) ; sleep 0.2"], timeout=30)
    assert r.exit_code == 0
    zombies = "?"
    async with asyncio.timeout(10):
        while zombies != "0":
            zombies = (await manager.exec(sid, ["python3", "-c", ZOMBIES])).stdout.decode().strip()
            await asyncio.sleep(0.2)

    # The whole QEMU stays inside the sandbox's memory cgroup, even with guest RAM full:
    # the guest's own OOM killer may end the command, the host's must not end QEMU.
    await manager.exec(sid, ["python3", "-c", "b = b'x' * (280 * 2**20)"], timeout=60)
    backend = manager.backend("qemu")
    assert (await backend.inspect(backend.load_info(info))).alive
    stats = manager.cgroups.open(sid).stats()
    if stats.memory_peak_bytes is not None:
        print(f"\nmemory peak {stats.memory_peak_bytes / 2**20:.0f} MiB of 384 MiB")
        assert stats.memory_peak_bytes <= 384 * 2**20
    assert stats.oom_kills == 0

    pid = int(info["pid"])
    await manager.destroy(sid)
    assert _qemu_pids(str(info["run_dir"])) == []
    assert not Path(str(info["run_dir"])).exists()
    assert not Path(f"/proc/{pid}").exists() or host_uid(pid) != int(info["host_uid"])


@pytest.fixture
async def peer() -> AsyncIterator[PeerHost]:
    p = await PeerHost.start((8080, 8081))
    yield p
    await p.stop()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(300)
async def test_vm_egress_is_limited_to_the_allowed_peer_port(
    vm_image: ImageArtifacts, manager: SandboxManager, peer: PeerHost
) -> None:
    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"host-service\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(answer, "0.0.0.0", 0)
    host_port = server.sockets[0].getsockname()[1]
    try:
        sid = await _create_timed(manager, _spec(network={"allow": [f"{peer.ip}:8080/tcp"]}))
        info = (await manager.get(sid)).info
        net = info["network"]
        _assert_unprivileged(manager, sid, info)
        targets = [(peer.ip, 8080), (peer.ip, 8081), (net["host_ip"], host_port)]
        r = await manager.exec(sid, ["python3", "-c", PROBE, json.dumps(targets), "2"], timeout=60)
        assert r.exit_code == 0, r.stderr
        got = json.loads(r.stdout)
        assert got[f"{peer.ip}:8080"] == peer.reply(8080), got
        assert got[f"{peer.ip}:8081"].startswith("err:"), got
        assert got[f"{net['host_ip']}:{host_port}"].startswith("err:"), got
        # The traffic came from the VM's own NIC, not from a process in the namespace.
        r = await manager.exec(sid, ["cat", "/sys/class/net/eth0/device/modalias"])
        assert r.stdout.startswith(b"virtio:"), r.stdout
    finally:
        server.close()

    names = sandbox_names(sid)
    await manager.destroy(sid)
    left = json.dumps(await manager.net.list_resources())
    for name in (names.netns, names.host_ifname, names.chain, names.nat_chain):
        assert name not in left
    assert names.netns not in await sh("ip", "netns", "list")
    assert _qemu_pids(str(info["run_dir"])) == []
    uid = int(info["host_uid"])
    assert processes_with_uid_in(uid, uid + 1) == []
    assert not Path(str(info["run_dir"])).exists()


@pytest.fixture
def cli_env(vm_image: ImageArtifacts, ironclaw_home: Path) -> dict[str, str]:
    return {**os.environ, "IRONCLAW_HOME": str(ironclaw_home)}


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(300)
async def test_vm_wall_time_limit_ends_it_with_the_reason(
    manager: SandboxManager, vm_image: ImageArtifacts
) -> None:
    """QEMU has no supervisor (-runas clears the parent-death signal): the watchdog ends it."""
    limits = {"memory_mib": 384, "workspace_mib": 64, "wall_time_s": 20}
    sid = await _create_timed(manager, _spec(limits=limits))
    record = await manager.get(sid)
    watchdog, uid = int(record.info["watchdog_pid"]), int(record.info["host_uid"])
    assert host_uid(watchdog) == watchdog_uid() != uid
    # A guest escaped into QEMU has QEMU's uid, and cannot end the watchdog with it.
    kill = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         "kill", "-9", str(watchdog)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert kill.returncode != 0 and "Operation not permitted" in kill.stderr
    assert host_uid(watchdog) == watchdog_uid()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (await manager.get(sid)).state != "dead":
        await asyncio.sleep(0.5)
    got = await manager.get(sid)
    assert got.state == "dead" and got.reason == "timeout: wall-time limit reached"
    await manager.destroy(sid)
    assert _qemu_pids(str(record.info["run_dir"])) == []


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(300)
async def test_cli_exec_reports_the_guest_kernel(
    cli_env: dict[str, str], vm_image: ImageArtifacts
) -> None:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "exec", "--backend", "qemu", "--json",
        "--memory", "384", "--", "uname", "-r",
        env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    wall = time.monotonic() - started
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["backend"] == "qemu"
    assert doc["stdout"].strip() == vm_image.kernel_release != platform.release()
    print(f"\nexec --backend qemu: total_ms {doc['total_ms']:.0f}, process wall {wall:.1f}s")
    # One-shot: nothing of it is left.
    home = Path(cli_env["IRONCLAW_HOME"])
    assert list((home / "run" / "sandboxes").iterdir()) == []
    assert _qemu_pids(str(home)) == []


def test_backend_satisfies_the_protocol() -> None:
    from ironclaw.backends.base import Backend

    assert isinstance(QemuBackend(), Backend)


# -- the image commands ----------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_image_ls_and_a_cached_build(cli_env: dict[str, str], vm_image: ImageArtifacts) -> None:
    listed = _cli("image", "ls", "--json", env=cli_env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["images"]}
    row = rows["default"]
    assert row["digest"] == vm_image.digest
    assert row["kernel_release"] == vm_image.kernel_release and row["size_mib"] > 10
    # Unchanged recipe: a cache hit, reported through the progress bar's last step. (The
    # builder refuses a symlinked image store, so this runs against the cache itself.)
    cache_home = str(image_cache_settings().state_dir.parent)
    built = _cli("image", "build", env={**cli_env, "IRONCLAW_HOME": cache_home})
    assert built.returncode == 0, built.stderr
    assert vm_image.digest in built.stderr and "cached" in built.stderr


def test_image_build_names_the_missing_package(tmp_path: Path, ironclaw_home: Path) -> None:
    env = {"PATH": str(tmp_path), "IRONCLAW_HOME": str(ironclaw_home)}
    out = _cli("image", "build", "--json", env=env)
    assert out.returncode == 2
    doc = json.loads(out.stdout)
    assert doc["error"] == "ConfigError"
    assert "apt-get install debootstrap" in doc["message"]
    empty = _cli("image", "ls", "--json", env=env)
    assert json.loads(empty.stdout) == {"images": []}
