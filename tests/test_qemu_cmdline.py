"""QEMU's command line is one pure function: what each launch option puts on it."""

from __future__ import annotations

from pathlib import Path

from ironclaw.backends.qemu.channels import AGENT_CHANNELS, port_name, socket_path
from ironclaw.backends.qemu.cmdline import AGENT_PORT, QemuPaths, qemu_argv
from ironclaw.images import ImageArtifacts


def _argv(tmp_path: Path, **options: object) -> list[str]:
    art = ImageArtifacts(
        "x", "0" * 32, tmp_path, tmp_path / "r.ext4", tmp_path / "k", tmp_path / "i", "6.1"
    )
    paths = QemuPaths(
        channel=tmp_path / "agent.sock",
        qmp=tmp_path / "qmp.sock",
        console_log=tmp_path / "console.log",
        pid_file=tmp_path / "qemu.pid",
    )
    base: dict[str, object] = {
        "accel": "kvm",
        "cpus": 2,
        "memory_mib": 288,
        "hostname": "box",
        "guest_ip": None,
        "agent": True,
    }
    return qemu_argv("/usr/bin/qemu-system-x86_64", art, paths, **{**base, **options})  # type: ignore[arg-type]


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_minimal_vm_has_root_disk_channel_and_qmp_only(tmp_path: Path) -> None:
    argv = _argv(tmp_path)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert _after(argv, "-smp") == ["2"] and _after(argv, "-m") == ["288M"]
    assert _after(argv, "-accel") == ["kvm"]
    drives = _after(argv, "-drive")
    assert len(drives) == 1 and "readonly=on" in drives[0]
    assert f"virtserialport,chardev=agent,name={AGENT_PORT}" in _after(argv, "-device")
    assert _after(argv, "-qmp") == [f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"]
    assert _after(argv, "-pidfile") == [str(tmp_path / "qemu.pid")]
    for absent in ("-netdev", "-runas", "-S", "-incoming"):
        assert absent not in argv
    kernel = _after(argv, "-append")[0]
    assert "ironclaw.hostname=box" in kernel and "ironclaw.agent=off" not in kernel


def test_each_option_adds_its_part(tmp_path: Path) -> None:
    argv = _argv(
        tmp_path,
        accel="tcg",
        agent=False,
        guest_ip="10.0.0.2::10.0.0.1:30::eth0:off",
        workspace=tmp_path / "ws.ext4",
        tap_ifname="tap0",
        env_disk=tmp_path / "env.sh",
        run_as=200001,
    )
    assert _after(argv, "-accel") == ["tcg,tb-size=64"]
    drives = _after(argv, "-drive")
    assert [d.split(",")[0] for d in drives] == ["id=root", "id=ws", "id=cfg"]
    assert _after(argv, "-netdev") == ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
    assert _after(argv, "-runas") == ["200001:200001"] and argv[-1] == "-S"
    kernel = _after(argv, "-append")[0]
    assert "ip=10.0.0.2::10.0.0.1:30::eth0:off" in kernel and "ironclaw.agent=off" in kernel


def test_a_restore_reads_the_snapshot_from_an_inherited_descriptor(tmp_path: Path) -> None:
    argv = _argv(tmp_path, incoming_fd=7)
    assert _after(argv, "-incoming") == ["fd:7"]
    assert not any(a.startswith("exec:") for a in argv)  # a sandboxed QEMU may not spawn


def test_qemus_own_seccomp_sandbox_is_on_the_command_line(tmp_path: Path) -> None:
    sandbox = ("-sandbox", "on,obsolete=deny,spawn=deny")
    argv = _argv(tmp_path, sandbox=sandbox)
    assert argv[1:3] == list(sandbox)


def test_the_agent_gets_one_port_and_socket_per_channel(tmp_path: Path) -> None:
    argv = _argv(tmp_path)
    ports = [d for d in _after(argv, "-device") if d.startswith("virtserialport,")]
    assert [p.rsplit("name=", 1)[1] for p in ports] == [port_name(i) for i in range(AGENT_CHANNELS)]
    chardevs = _after(argv, "-chardev")
    for i in range(AGENT_CHANNELS):
        assert any(f"path={socket_path(tmp_path / 'agent.sock', i)}," in c for c in chardevs)
    # virtio-serial keeps port number 0 for a console: max_ports must exceed the count.
    assert f"virtio-serial-device,max_ports={AGENT_CHANNELS + 1}" in _after(argv, "-device")
