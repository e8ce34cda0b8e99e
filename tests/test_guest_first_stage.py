"""The guest's first stage: what it answers is right, and its handover loses nothing.

A real agent process (the same boot line as the namespace backend, on an inherited
listening socket) and a real host peer over a Unix socket. Whether the first stage or
the full agent served a request is read from the process itself: the first stage never
loads asyncio's C module, the full agent always does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import ironclaw
from ironclaw.host.guest import GuestClient
from ironclaw.rpc import Peer
from ironclaw.transport import unix

SRC = str(Path(ironclaw.__file__).resolve().parent.parent)
BOOT = (
    f"import sys; sys.path.insert(0, {SRC!r}); "
    "from ironclaw.guest.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


def full_agent_loaded(pid: int) -> bool:
    return "_asyncio" in Path(f"/proc/{pid}/maps").read_text()


needs_dynload = pytest.mark.skipif(
    "_asyncio" in sys.builtin_module_names, reason="asyncio's C module is built in here"
)


@contextlib.asynccontextmanager
async def agent(tmp_path: Path) -> AsyncIterator[tuple[GuestClient, subprocess.Popen[bytes]]]:
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    argv = [sys.executable, "-I", "-S", "-B", "-c", BOOT, "--listen-fd", str(fd)]
    proc = subprocess.Popen([*argv, "--workdir", str(tmp_path)], pass_fds=[fd])
    listener.close()
    try:
        conn = await unix.connect(str(path), timeout=10)
        async with Peer(conn, name="test-host") as peer:
            yield GuestClient(peer), proc
    finally:
        proc.kill()
        proc.wait()


async def test_first_requests_answered_like_the_full_agent(tmp_path: Path) -> None:
    async with agent(tmp_path) as (guest, proc):
        pong = await guest.ping(timeout=10)
        assert pong.pong and pong.pid == proc.pid and pong.workdir == str(tmp_path)
        assert pong.uid == os.getuid() and pong.kernel == os.uname().release
        result = await guest.exec(["sh", "-c", "echo out; echo err >&2; pwd; exit 3"], timeout=10)
        assert (result.exit_code, result.stdout, result.stderr) == (
            3,
            b"out\n" + str(tmp_path).encode() + b"\n",
            b"err\n",
        )
        killed = await guest.exec(["sh", "-c", "kill -TERM $$"])
        assert (killed.exit_code, killed.signal) == (128 + 15, 15)
        slow = await guest.exec(["sleep", "30"], timeout=0.3)
        assert slow.timed_out and slow.signal == 9
        # A command that is not there is the full agent's to report, as a shell would.
        missing = await guest.exec(["no-such-command-here"])
        assert missing.exit_code == 127 and b"command not found" in missing.stderr


async def test_burst_before_the_agent_is_up_loses_no_byte(tmp_path: Path) -> None:
    stdin = os.urandom(300_000)
    blob = os.urandom(200_000)
    async with agent(tmp_path) as (guest, _proc):
        # All sent at once, before the agent has even started: requests, stdin data and
        # file data interleaved on the channel.
        ping1, echo, cat, written, failing, ping2 = await asyncio.wait_for(
            asyncio.gather(
                guest.ping(),
                guest.exec(["echo", "one"]),
                guest.exec(["cat"], stdin=stdin),
                guest.write_file("blob.bin", blob),
                guest.exec(["sh", "-c", "echo two >&2; exit 4"]),
                guest.ping(),
            ),
            30,
        )
        assert ping1.pong and ping2.pong
        assert (echo.exit_code, echo.stdout) == (0, b"one\n")
        assert cat.exit_code == 0 and cat.stdout == stdin
        assert written == len(blob) and (tmp_path / "blob.bin").read_bytes() == blob
        assert (failing.exit_code, failing.stderr) == (4, b"two\n")
        assert await guest.read_file("blob.bin") == blob


@needs_dynload
async def test_running_command_is_adopted_when_more_arrives(tmp_path: Path) -> None:
    async with agent(tmp_path) as (guest, proc):
        await guest.ping(timeout=10)
        first_line = asyncio.Event()
        seen = bytearray()

        async def on_stdout(chunk: bytes) -> None:
            seen.extend(chunk)
            first_line.set()

        script = "echo a; while [ ! -e go ]; do sleep 0.01; done; echo b; exit 5"
        first = asyncio.ensure_future(
            guest.exec(["sh", "-c", script], on_stdout=on_stdout, timeout=30)
        )
        await asyncio.wait_for(first_line.wait(), 10)
        assert not full_agent_loaded(proc.pid), "the first stage runs the first command"
        stdin = os.urandom(100_000)
        # Requests while the first stage's command runs: the full agent takes over.
        cat, pong = await asyncio.wait_for(
            asyncio.gather(guest.exec(["cat"], stdin=stdin), guest.ping()), 30
        )
        assert cat.stdout == stdin and pong.pong
        assert full_agent_loaded(proc.pid)
        assert not first.done(), "the adopted command still runs"
        (tmp_path / "go").touch()
        result = await asyncio.wait_for(first, 30)
        assert result.exit_code == 5 and bytes(seen) == b"a\nb\n"
        # The full agent serves on after the adopted command ended.
        again = await guest.exec(["sh", "-c", "echo again"])
        assert again.stdout == b"again\n"


@needs_dynload
async def test_idle_first_stage_hands_over_and_keeps_serving(tmp_path: Path) -> None:
    async with agent(tmp_path) as (guest, proc):
        await guest.ping(timeout=10)
        for _ in range(200):
            if full_agent_loaded(proc.pid):
                break
            await asyncio.sleep(0.05)
        assert full_agent_loaded(proc.pid), "a quiet first stage hands over"
        assert (await guest.exec(["echo", "hi"])).stdout == b"hi\n"
        # A second connection is served too (by the full agent's listener).
        conn = await unix.connect(str(tmp_path / "agent.sock"), timeout=10)
        async with Peer(conn, name="second") as peer:
            assert (await GuestClient(peer).ping()).pid == proc.pid


@needs_dynload
async def test_host_gone_mid_command_kills_it_and_agent_serves_on(tmp_path: Path) -> None:
    async with agent(tmp_path) as (guest, proc):
        await guest.ping(timeout=10)
        started = asyncio.Event()

        async def on_stdout(chunk: bytes) -> None:
            started.set()

        script = "echo $$ > pid; while :; do echo tick; sleep 0.01; done"
        running = asyncio.ensure_future(guest.exec(["sh", "-c", script], on_stdout=on_stdout))
        await asyncio.wait_for(started.wait(), 10)
        assert not full_agent_loaded(proc.pid)
        await guest.peer.aclose()  # the host goes away while the first stage streams
        with contextlib.suppress(Exception):
            await running
        pid = int((tmp_path / "pid").read_text())
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
                break
            await asyncio.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), "the command was killed"
        conn = await unix.connect(str(tmp_path / "agent.sock"), timeout=10)
        async with Peer(conn, name="again") as peer:
            again = GuestClient(peer)
            assert (await again.exec(["echo", "back"])).stdout == b"back\n"
        assert proc.poll() is None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
