"""A QEMU VM's several agent channels: claims, waits and the busy error on real sockets
and locks (unit layer, a socket server standing in for QEMU and the agent), then real
VMs used by several processes at once (vm-marked)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ironclaw.backends.qemu.backend import QemuBackend, QemuInfo
from ironclaw.backends.qemu.channels import (
    AGENT_CHANNELS,
    AGENT_PORT,
    ChannelsBusy,
    channel_run_files,
    channels_of,
    connect_channel,
    holders,
    lock_path,
    port_name,
    socket_path,
    try_claim,
)
from ironclaw.backends.qemu.usersnap import check_compatible
from ironclaw.errors import ConfigError, ConnectError
from ironclaw.host.manager import SandboxManager
from ironclaw.proto import methods
from ironclaw.proto.frames import FrameType, encode_frame
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport import Connection, virtio_serial
from ironclaw.transport._sessions import HELLO_SIZE, ack_frame, hello_frame
from test_qemu_backend import _spec, vm_image, vm_snapshots  # noqa: F401  (fixtures)

# -- unit layer: names, claims ------------------------------------------------------------


def test_channel_files_sit_beside_channel_0(tmp_path: Path) -> None:
    first = tmp_path / "agent.sock"
    assert [socket_path(first, i).name for i in range(3)] == [
        "agent.sock",
        "agent.1.sock",
        "agent.2.sock",
    ]
    assert (port_name(0), port_name(3)) == (AGENT_PORT, AGENT_PORT + ".3")
    assert lock_path(first).name == "agent.sock.lock"
    files = channel_run_files()
    assert len(files) == 2 * AGENT_CHANNELS and "agent.3.sock.lock" in files
    # A VM's channels are counted by their sockets: one started before there were
    # several has agent.sock alone.
    first.touch()
    assert channels_of(first) == 1
    for i in range(1, AGENT_CHANNELS + 2):
        socket_path(first, i).touch()
    assert channels_of(first) == AGENT_CHANNELS


def test_a_claim_is_exclusive_until_closed(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    fd = try_claim(sock)
    assert fd is not None
    assert try_claim(sock) is None  # another descriptor, even in this process
    assert holders(sock, 1) == [os.getpid()]
    os.close(fd)
    again = try_claim(sock)
    assert again is not None
    os.close(again)


_HOLDER = """
import os, sys, time
from pathlib import Path
from ironclaw.backends.qemu.channels import try_claim
fd = try_claim(Path(sys.argv[1]))
print("held" if fd is not None else "busy", flush=True)
time.sleep(600)
"""


def test_a_claim_of_a_killed_process_is_freed(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(sock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        assert try_claim(sock) is None
        assert holders(sock, 1) == [child.pid]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    fd = try_claim(sock)
    assert fd is not None
    os.close(fd)


# -- unit layer: a server standing in for QEMU's sockets and the agent's ports ----------


@pytest.fixture
async def fake_channels(tmp_path: Path) -> AsyncIterator[tuple[Path, list[int]]]:
    """Two channel sockets whose far end acks each hello and counts sessions."""
    first = tmp_path / "agent.sock"
    sessions = [0, 0]
    servers = []

    def handler(
        index: int,
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hello = await reader.readexactly(HELLO_SIZE)
            sessions[index] += 1
            writer.write(ack_frame(hello[-16:]))
            await writer.drain()
            await reader.read()  # until the host leaves
            writer.close()

        return serve

    for i in range(2):
        servers.append(await asyncio.start_unix_server(handler(i), path=socket_path(first, i)))
    try:
        yield first, sessions
    finally:
        for server in servers:
            server.close()


async def test_connections_take_free_channels_then_wait_then_say_who_holds_them(
    fake_channels: tuple[Path, list[int]],
) -> None:
    first, sessions = fake_channels
    assert channels_of(first) == 2
    a = await connect_channel(first, timeout=5, wait_s=0)
    b = await connect_channel(first, timeout=5, wait_s=0)
    assert sessions == [1, 1]
    with pytest.raises(ChannelsBusy) as busy:
        await connect_channel(first, 2, timeout=5, wait_s=0.5)
    text = str(busy.value)
    assert "all 2 agent channels" in text and f"pid {os.getpid()}" in text
    assert "overloaded" not in text
    # One waiting for a channel gets the one let go meanwhile.
    waiting = asyncio.ensure_future(connect_channel(first, 2, timeout=5, wait_s=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await a.aclose()
    c = await asyncio.wait_for(waiting, 10)
    assert sessions == [2, 1]
    assert try_claim(first) is None  # c holds channel 0 now
    for conn in (b, c):
        await conn.aclose()
    fd = try_claim(first)
    assert fd is not None
    os.close(fd)


async def test_a_failed_connect_lets_its_claim_go(tmp_path: Path) -> None:
    first = tmp_path / "agent.sock"  # no socket: QEMU not up yet
    with pytest.raises(ConnectError) as err:
        await connect_channel(first, 2, timeout=1, wait_s=0)
    assert "agent.sock" in str(err.value) and not isinstance(err.value, ChannelsBusy)
    fd = try_claim(first)
    assert fd is not None
    os.close(fd)


def test_a_user_snapshot_of_a_vm_with_other_channels_is_refused() -> None:
    vm = {"image": "i", "qemu": "q", "accel": "tcg", "cpus": 1, "guest_mib": 288, "nic": False}

    def check(doc: dict[str, object]) -> None:
        check_compatible(doc, image="i", qemu="q", accel="tcg", cpus=1, guest_mib=288,
                         network=False)  # fmt: skip

    with pytest.raises(ConfigError, match=r"1 agent channel.*take a new snapshot"):
        check(vm)  # taken of a one-port VM: no "channels" recorded
    check({**vm, "channels": AGENT_CHANNELS})


# -- unit layer: the guest's side, on real character devices (ptys) ---------------------


def test_the_agent_finds_a_ports_siblings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("org.x", "org.x.1", "org.x.10", "org.x.2", "org.x.01", "org.xy.1", "org.x.a"):
        (tmp_path / name).touch()
    monkeypatch.setattr(virtio_serial, "DEVICE_DIR", str(tmp_path))
    assert virtio_serial.port_family("org.x") == [
        str(tmp_path / n) for n in ("org.x", "org.x.1", "org.x.2", "org.x.10")
    ]
    assert virtio_serial.port_family("org.z") == [str(tmp_path / "org.z")]


async def _read_exactly(conn: Connection, n: int) -> bytes:
    buf = b""
    async with asyncio.timeout(10):
        while len(buf) < n:
            chunk = await conn.read(n - len(buf))
            assert chunk, buf
            buf += chunk
    return buf


async def test_the_agent_serves_ports_side_by_side_and_closes_them_safely() -> None:
    pairs = [pty.openpty() for _ in range(2)]
    for _, slave in pairs:
        tty.setraw(slave)  # a virtio port is a raw byte pipe, no line discipline
    ports = await virtio_serial.serve_ports([os.ttyname(s) for _, s in pairs])
    for _, slave in pairs:
        os.close(slave)
    hosts = [await virtio_serial.from_fd(master, initiator=True) for master, _ in pairs]
    try:
        nonces = [os.urandom(16) for _ in hosts]
        for host, nonce in zip(hosts, nonces, strict=True):
            await host.write(hello_frame(nonce))
        sessions = [await asyncio.wait_for(port.accept(), 10) for port in ports]
        for host, nonce in zip(hosts, nonces, strict=True):
            assert await _read_exactly(host, len(ack_frame(nonce))) == ack_frame(nonce)
        # Port 0's host stops mid-frame; port 1's session carries whole frames both ways.
        frame = encode_frame(FrameType.MESSAGE, 0, os.urandom(300))
        await hosts[0].write(frame[:50])
        await hosts[1].write(frame)
        assert await _read_exactly(sessions[1], len(frame)) == frame
        await sessions[1].write(b"reply")
        assert await _read_exactly(hosts[1], 5) == b"reply"
        await hosts[0].write(frame[50:])  # and port 0's frame completes on its own session
        assert await _read_exactly(sessions[0], len(frame)) == frame
    finally:
        await virtio_serial.close_ports(ports)
        for host in hosts:
            await host.aclose()
    # The shared SIGIO handler is gone with the ports, and no port can raise SIGIO.
    assert signal.getsignal(signal.SIGIO) == signal.SIG_DFL


# -- real VMs -----------------------------------------------------------------------------


async def _spawn_exec(sid: str, script: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "sandbox", "exec", sid, "--", "/bin/sh", "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _holders_include(info: QemuInfo, pids: set[int], limit_s: float = 240) -> None:
    """Until every pid in ``pids`` holds one of the VM's channels (bounded)."""
    async with asyncio.timeout(limit_s):
        while not pids <= set(holders(info.socket, AGENT_CHANNELS)):
            await asyncio.sleep(0.1)


async def _peer(backend: QemuBackend, info: QemuInfo, timeout: float = 60) -> Peer:
    conn = await backend.open_channel(info, timeout=timeout)
    peer = Peer(conn, name="test", limits=HOST_LIMITS)
    await peer.start()
    return peer


GATE = "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo answer-$$"


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("vm_image")
async def test_four_processes_use_one_vm_at_once_and_a_fifth_is_told_who(
    manager: SandboxManager,
) -> None:
    rec = await manager.create(_spec(), ready_timeout=120)
    info = QemuInfo.of(rec.info)
    assert channels_of(info.socket) == AGENT_CHANNELS
    await manager.exec(rec.id, ["true"])  # this manager holds a channel from now on
    # One exec through a second process while this one holds its channel.
    started = time.monotonic()
    proc = await _spawn_exec(rec.id, "echo second")
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0 and out.decode().strip() == "second", err.decode()
    print(f"\n`sandbox exec` through a second process: {time.monotonic() - started:.2f}s wall")
    # Three more managers in three processes, each waiting inside its command.
    procs = [await _spawn_exec(rec.id, GATE) for _ in range(AGENT_CHANNELS - 1)]
    try:
        await _holders_include(info, {p.pid for p in procs} | {os.getpid()})
        # Every channel held: the next connection waits for its bound, then is told by whom.
        with pytest.raises(ChannelsBusy) as busy:
            await QemuBackend().open_channel(rec.info, timeout=2)
        text = str(busy.value)
        assert f"all {AGENT_CHANNELS} agent channels" in text and "overloaded" not in text
        assert all(f"pid {p.pid}" in text for p in procs), text
        # The first manager still works on its own channel, and lets them all answer.
        await manager.exec(rec.id, ["touch", "/tmp/go"])
        for p in procs:
            out, err = await asyncio.wait_for(p.communicate(), 300)
            assert p.returncode == 0, err.decode()
            assert out.decode().startswith("answer-"), (out, err)
        assert len({p.pid for p in procs}) == len(procs)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("vm_image")
async def test_a_process_killed_holding_a_channel_frees_it(
    manager: SandboxManager,
) -> None:
    rec = await manager.create(_spec(), ready_timeout=120)
    info = QemuInfo.of(rec.info)
    await manager.exec(rec.id, ["true"])
    procs = [await _spawn_exec(rec.id, "sleep 600") for _ in range(AGENT_CHANNELS - 1)]
    try:
        await _holders_include(info, {p.pid for p in procs})
        with pytest.raises(ChannelsBusy):
            await QemuBackend().open_channel(rec.info, timeout=1)
        procs[1].send_signal(signal.SIGKILL)
        await procs[1].wait()
        peer = await _peer(QemuBackend(), info)  # gets the channel the killed one held
        try:
            pong = await methods.call(peer, methods.PingRequest(), methods.PingResult)
            assert pong is not None
            res = await manager.exec(rec.id, ["echo", "still"])
            assert res.stdout.decode().strip() == "still"
        finally:
            await peer.aclose()
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("vm_image")
async def test_a_session_cut_mid_frame_leaves_another_channels_exec_alone(
    manager: SandboxManager,
) -> None:
    rec = await manager.create(_spec(), ready_timeout=120)
    info = QemuInfo.of(rec.info)
    await manager.exec(rec.id, ["true"])  # the manager's channel
    running = asyncio.ensure_future(
        manager.exec(rec.id, ["/bin/sh", "-c", "cat /tmp/gate 2>/dev/null || sleep 3; echo ok"])
    )
    for _ in range(3):  # cut sessions on another channel, mid-frame, while it runs
        raw = await connect_channel(info.socket, timeout=10, handshake_s=120)
        frame = encode_frame(FrameType.MESSAGE, 0, b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
        await raw.write(frame[: len(frame) // 2])
        raw.abort()
    res = await asyncio.wait_for(running, 300)
    assert (res.exit_code, res.stdout.decode().strip()) == (0, "ok")
    # The channel those sessions used serves a whole one next.
    peer = await _peer(QemuBackend(), info)
    try:
        pong = await methods.call(peer, methods.PingRequest(), methods.PingResult)
        assert pong is not None
    finally:
        await peer.aclose()
