"""QEMU microvm backend: QMP against a real (unbooted) QEMU, then real boots (vm-marked).

The image is built once per machine into a stable cache directory (override with
IRONCLAW_TEST_IMAGE_CACHE) and reused across runs: the builder's content addressing
makes a stale cache impossible, so a change to the guest sources simply rebuilds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import image_cache_settings
from ironclaw import images
from ironclaw.backends.qemu import accel, seccomp
from ironclaw.backends.qemu import vm as qemu
from ironclaw.backends.qemu.qmp import QmpClient, QmpError
from ironclaw.backends.qemu.seccomp import sandbox_args
from ironclaw.backends.qemu.vm import QemuVm
from ironclaw.config import Settings
from ironclaw.errors import ConfigError, SandboxNotFound
from ironclaw.host.doctor import _qemu_sandbox
from ironclaw.images import ImageArtifacts
from ironclaw.resources.procs import is_zombie

_QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86 not installed")


def _kill_leftover(run_dir: Path) -> None:
    """SIGKILL a QEMU a failed test left running (a detached or attached VM)."""
    for pidfile in run_dir.rglob("qemu.pid"):
        try:
            pid = int(pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pidfile.parent).encode() in cmdline:
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # AF_UNIX paths are short: keep the VM's sockets in a short directory of their own.
    path = Path(f"/tmp/icq-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    yield path
    _kill_leftover(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def vm() -> AsyncIterator[QemuVm]:
    machine = QemuVm()
    yield machine
    await machine.kill()


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def _assert_confined(pid: int, *, runas: bool) -> list[bytes]:
    """QEMU's seccomp filter is on (mode 2) with every denial; returns its command line."""
    assert _status(pid)["Seccomp"] == "2"
    assert _status(pid)["NoNewPrivs"] == "1"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    value = cmdline[cmdline.index(b"-sandbox") + 1].decode()
    opts = dict(kv.split("=") for kv in value.split(",")[1:])
    assert value.startswith("on,")
    assert opts == {
        "obsolete": "deny",
        "elevateprivileges": "allow" if runas else "deny",
        "spawn": "deny",
        "resourcecontrol": "deny",
    }
    return cmdline


def _alive(pid: int) -> bool:
    """Running, that is: a zombie (exited, its parent's child watcher not yet through
    with it) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not is_zombie(pid)


@needs_qemu
async def test_qmp_against_real_qemu(run_dir: Path) -> None:
    """No guest: a paused microvm is enough to exercise QMP commands and events."""
    run_dir.mkdir(mode=0o700)
    sock = run_dir / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(20):
            while not sock.exists():
                await asyncio.sleep(0.01)
            client = await QmpClient.connect(sock)
            status = await client.execute("query-status")
            assert status["status"] == "prelaunch"
            assert status["running"] is False
            with pytest.raises(QmpError, match="CommandNotFound"):
                await client.execute("no-such-command")
            await client.execute("stop")
            await client.execute("cont")
            await client.wait_event("RESUME", 5)
            await client.execute("quit")
            await client.wait_event("SHUTDOWN", 5)
            assert await proc.wait() == 0
            assert client.closed or await asyncio.wait_for(_closed(client), 5)
            with pytest.raises(QmpError):
                await client.execute("query-status")
            await client.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not sock.exists()


async def _spawn_attempt(run_dir: Path, sandbox: list[str]) -> int | None:
    """Start a paused, de-privileged microvm and ask it to fork (an ``exec:`` migration).

    Its exit status if QEMU died of it within a few seconds, else None (it survived).
    """
    run_dir.mkdir(mode=0o700, parents=True)
    sock = run_dir / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", *sandbox, "-M", "microvm", "-accel", "tcg", "-nodefaults",
        "-no-user-config", "-display", "none", "-S", "-runas", "65534:65534",
        "-qmp", f"unix:{sock},server=on,wait=off",
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            while not sock.exists():
                await asyncio.sleep(0.01)
        client = await QmpClient.connect(sock)
        try:
            if sandbox:
                _assert_confined(proc.pid, runas=True)
            with contextlib.suppress(QmpError):
                await client.execute("migrate", {"uri": "exec:true"})
                await asyncio.sleep(0.5)
                await client.execute("query-migrate")
        finally:
            await client.close()
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(proc.wait(), 3)
        return None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@needs_qemu
@pytest.mark.root
async def test_the_sandboxed_qemu_is_killed_when_it_tries_to_spawn(run_dir: Path) -> None:
    """The production flags (with -runas): a fork ends QEMU with SIGSYS. The same QEMU
    without -sandbox forks its migration helper and lives on."""
    assert await _spawn_attempt(run_dir / "on", sandbox_args(_QEMU, runas=True)) == -signal.SIGSYS
    assert await _spawn_attempt(run_dir / "off", []) is None


@needs_qemu
@pytest.mark.root
async def test_elevateprivileges_deny_still_breaks_runas(run_dir: Path) -> None:
    """Why ``elevateprivileges`` stays allowed with -runas: QEMU 7.2 installs its filter
    before -runas drops root, and dies of it. If this starts failing, deny it there too."""
    run_dir.mkdir(mode=0o700)
    out = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-sandbox", seccomp.sandbox_value(runas=False), "-M", "none",
        "-nodefaults", "-display", "none", "-runas", "65534:65534", "-qmp", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await asyncio.wait_for(out.communicate(b'{"execute": "qmp_capabilities"}\n'), 20)
    assert out.returncode == -signal.SIGSYS


@needs_qemu
def test_a_qemu_without_seccomp_is_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in for a QEMU built without libseccomp (it rejects -sandbox as such a build
    does); the opt-out setting lets it run unconfined."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(
        "#!/bin/sh\necho 'qemu-system-x86_64: -sandbox on: "
        "seccomp support is disabled' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv(seccomp.SANDBOX_ENV, raising=False)
    assert "seccomp support is disabled" in (seccomp.sandbox_problem(str(fake)) or "")
    check = _qemu_sandbox()
    assert not check.ok and check.fix is not None and seccomp.SANDBOX_ENV in check.fix
    with pytest.raises(
        ConfigError, match=f"apt-get install qemu-system-x86.*{seccomp.SANDBOX_ENV}=off"
    ):
        sandbox_args(str(fake), runas=True)
    monkeypatch.setenv(seccomp.SANDBOX_ENV, "off")
    assert sandbox_args(str(fake), runas=True) == []
    monkeypatch.setenv("PATH", os.defpath)  # the real QEMU again
    monkeypatch.delenv(seccomp.SANDBOX_ENV)
    assert seccomp.sandbox_problem(_QEMU) is None
    assert _qemu_sandbox().ok


async def _closed(client: QmpClient) -> bool:
    while not client.closed:
        await asyncio.sleep(0.01)
    return True


async def test_missing_qemu_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    art = ImageArtifacts("x", "0" * 32, tmp_path, tmp_path, tmp_path, tmp_path, "6.1")
    with pytest.raises(ConfigError, match="apt-get install qemu-system-x86"):
        await QemuVm().start(art, tmp_path / "run", accel="tcg")


@needs_qemu
def test_probe_verdict_is_cached(tmp_path: Path) -> None:
    """A cached verdict is used as-is; a stale key (other kernel) is not."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm: the probe answers tcg without booting")
    settings = Settings(runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    settings.state_dir.mkdir(parents=True)
    art = ImageArtifacts(
        "x", "0" * 32, tmp_path, tmp_path, tmp_path / "none", tmp_path / "none", "6.1-test"
    )
    cache = settings.state_dir / "qemu-accel.json"
    cache.write_text(json.dumps({"key": accel._probe_key(art), "accel": "kvm"}))
    assert qemu.probe_accel(art, settings, timeout=5) == "kvm"
    cache.write_text(json.dumps({"key": "stale", "accel": "kvm"}))
    # With a missing kernel the probe boot fails at once: the verdict is tcg, and cached.
    assert qemu.probe_accel(art, settings, timeout=5) == "tcg"
    assert json.loads(cache.read_text())["accel"] == "tcg"


async def test_attach_refuses_a_pid_that_is_not_this_vm(tmp_path: Path) -> None:
    (tmp_path / "qemu.pid").write_text(f"{os.getpid()}\n")
    with pytest.raises(SandboxNotFound, match="not this VM's QEMU"):
        await QemuVm.attach(tmp_path)
    (tmp_path / "qemu.pid").unlink()
    with pytest.raises(SandboxNotFound, match="no running VM"):
        await QemuVm.attach(tmp_path)


def test_cmdline_pins_tsc_under_tcg_only() -> None:
    tcg = qemu.kernel_cmdline("tcg", hostname="box", ip="10.0.0.2::10.0.0.1:30::eth0:off")
    assert "tsc_early_khz=" in tcg
    assert "ironclaw.hostname=box" in tcg
    assert "ip=10.0.0.2::10.0.0.1:30::eth0:off" in tcg
    assert "tsc_early_khz=" not in qemu.kernel_cmdline("kvm")


@pytest.mark.vm
@pytest.mark.timeout(900)
async def test_image_build_is_cached(image: ImageArtifacts) -> None:
    steps: list[str] = []
    started = time.monotonic()
    again = await images.build_image(image_cache_settings(), progress=lambda s, f: steps.append(s))
    assert time.monotonic() - started < 10
    assert steps[-1] == "cached"
    assert again == image
    assert images.find_image(image_cache_settings()) == image
    for path in (image.ext4, image.initramfs, image.vmlinux):
        assert path.stat().st_size > 0
    assert (image.rootfs_dir / images.GUEST_PKG_DIR / "errors.py").is_file()
    assert (image.rootfs_dir / "usr/bin/python3").exists()
    assert image.vmlinux.read_bytes()[:4] == b"\x7fELF"


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace holding a tap device (10.77.0.1/30) for the VM's NIC."""
    name = f"icq{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            "tuntap add dev ictap0 mode tap",
            "addr add 10.77.0.1/30 dev ictap0",
            "link set ictap0 up",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


_PROBE_TCP = """
import socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    print("reachable")
"""


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(900)
async def test_boot_reports_guest_kernel_and_stop_leaves_nothing(
    image: ImageArtifacts, run_dir: Path, vm: QemuVm, netns: str
) -> None:
    await vm.start(
        image,
        run_dir,
        memory_mib=384,
        workspace_mib=32,
        settings=image_cache_settings(),
        netns_path=f"/run/netns/{netns}",
        tap_ifname="ictap0",
        guest_ip="10.77.0.2::10.77.0.1:30::eth0:off",
    )
    pid = vm.pid
    assert pid is not None
    assert vm.channel_path.exists()
    assert b"-runas" not in _assert_confined(pid, runas=False)
    info = await vm.wait_ready(90)
    assert info["kernel"] == image.kernel_release
    assert info["kernel"] != platform.release()
    assert await vm.query_status() == "running"
    # The guest kernel answers a TCP SYN to a closed port with RST: the NIC is up, in the
    # namespace, with the address from the command line.
    probe = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        netns,
        sys.executable,
        "-c",
        _PROBE_TCP,
        "10.77.0.2",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(probe.communicate(), 30)
    assert out.decode().strip() == "reachable"
    # A later CLI run takes the VM over from its run directory and stops it.
    await vm.detach()
    other = await QemuVm.attach(run_dir)
    assert other.pid == pid
    assert (await other.wait_ready(60))["kernel"] == image.kernel_release
    await other.stop(graceful_timeout=1)
    assert not _alive(pid)
    leftovers = {p.name for p in run_dir.iterdir() if p.is_socket()}
    assert leftovers == set()
    assert not (run_dir / "qemu.pid").exists()
    assert vm.console_log.exists()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(900)
async def test_snapshot_save_and_restore(image: ImageArtifacts, run_dir: Path) -> None:
    """Both VMs de-privileged and sandboxed: the snapshot file and the restore source are
    descriptors handed to QEMU, which may neither fork a helper nor open them itself."""
    first, second = QemuVm(), QemuVm()
    snap = run_dir.with_name(run_dir.name + ".snap")
    uid = 65534
    try:
        await first.start(
            image, run_dir, memory_mib=256, settings=image_cache_settings(), run_as=uid
        )
        await first.wait_ready(90)
        await first.snapshot_save(snap)
        assert await first.query_status() == "postmigrate"
        assert snap.stat().st_uid == 0 and snap.stat().st_size > 1 << 20
        await first.kill()
        started = time.monotonic()
        await second.start(
            image,
            run_dir / "restored",
            memory_mib=256,
            incoming=snap,
            settings=image_cache_settings(),
            run_as=uid,
        )
        pid = second.pid
        assert pid is not None
        cmdline = _assert_confined(pid, runas=True)
        assert cmdline[cmdline.index(b"-runas") + 1] == f"{uid}:{uid}".encode()
        assert cmdline[cmdline.index(b"-incoming") + 1].startswith(b"fd:")
        assert _status(pid)["Uid"].split() == [str(uid)] * 4
        info = await second.wait_ready(30)
        assert info["kernel"] == image.kernel_release
        # Restoring skips the boot entirely.
        assert time.monotonic() - started < 15
        # The restored QEMU is confined too: asked to fork, it dies of its filter.
        with contextlib.suppress(QmpError):
            await second.qmp.execute("migrate", {"uri": "exec:true"})
        assert await asyncio.wait_for(second.wait_exit(), 10) == -signal.SIGSYS
    finally:
        await first.kill()
        await second.kill()
        snap.unlink(missing_ok=True)
