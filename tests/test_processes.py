"""Detached commands, PTYs and file watching in real sandboxes (issue 14)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT
from ironclaw.config import Settings
from ironclaw.errors import ConfigError
from ironclaw.sdk import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

SERVER = (
    "sleep 1000 & echo child=$!; echo ready; "
    "exec python3 -c 'import time\nwhile True: time.sleep(1)'"
)


def cli(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IRONCLAW_HOME": str(home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
    return subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


async def _alive(sb: Sandbox, pid: int) -> bool:
    r = await sb.exec(["sh", "-c", f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status"])
    return r.exit_code == 0


async def test_background_server_listed_reattached_from_another_process_and_killed(
    settings: Settings, ironclaw_home: Path
) -> None:
    sb = await Sandbox.create(sandbox_id="procs-a", settings=settings)
    try:
        h = await sb.commands.start(["sh", "-c", SERVER], tag="web")
        seen = b""
        async for chunk in h.output():
            seen += chunk
            if b"ready" in seen:
                break
        child = int(seen.split(b"child=")[1].split()[0])
        listed = await sb.commands.list()
        assert [(p.pid, p.tag, p.running) for p in listed] == [(h.pid, "web", True)]
        # A second OS process re-attaches by tag and gets the earlier output replayed.
        ps = cli("sandbox", "ps", "--json", "procs-a", home=ironclaw_home)
        assert ps.returncode == 0, ps.stderr
        assert json.loads(ps.stdout)["procs"][0]["tag"] == "web"
        attach = subprocess.Popen(
            [sys.executable, "-m", "ironclaw.cli", "sandbox", "attach", "procs-a", "web"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "IRONCLAW_HOME": str(ironclaw_home)},
        )  # fmt: skip
        assert attach.stdout is not None
        first = await asyncio.to_thread(attach.stdout.readline)
        assert first == f"child={child}\n".encode()
        assert await _alive(sb, child)
        killed = cli("sandbox", "kill", "--json", "procs-a", "web", home=ironclaw_home)
        assert killed.returncode == 0, killed.stderr
        info = json.loads(killed.stdout)
        assert info["running"] is False and info["signal"] == 9 and info["exit_code"] == 137
        rest = await asyncio.to_thread(attach.stdout.read)
        assert rest == b"ready\n", rest
        assert await asyncio.to_thread(attach.wait, 30) == 137
        assert not await _alive(sb, child)  # its children are gone with it
        assert not (await sb.commands.list())[0].running
    finally:
        await sb.destroy()
        await sb.aclose()


async def test_stdin_wait_and_bad_targets(settings: Settings) -> None:
    async with Sandbox.create(settings=settings) as sb:
        h = await sb.commands.start(["sh", "-c", "read a; read b; echo got $a $b; exit 3"])
        await h.send_stdin(b"one\n")
        await h.send_stdin("two\n", close=True)
        info = await h.wait(timeout=30)
        assert (info.running, info.exit_code) == (False, 3)
        out = b"".join([c async for c in h.output()])
        assert out == b"got one two\n"
        before = await sb.commands.list()
        with pytest.raises(ConfigError, match="no command with pid 4000000"):
            await sb.commands.connect(4000000)
        with pytest.raises(ConfigError, match="no command with tag 'nope'"):
            await sb.commands.connect("nope")
        with pytest.raises(ConfigError, match="command not found|No such file"):
            await sb.commands.start(["/no/such/binary"])
        with pytest.raises(ConfigError):
            await sb.commands.start(["true"], ring_bytes=10)
        assert await sb.commands.list() == before


async def test_ring_keeps_only_the_newest_output(settings: Settings) -> None:
    async with Sandbox.create(settings=settings) as sb:
        script = "import sys\nfor i in range(20000): print(f'line {i:05d}')"
        h = await sb.commands.start(["python3", "-c", script], ring_bytes=8192)
        await h.wait(timeout=30)
        out = b"".join([c async for c in h.output()])
        assert len(out) == 8192 and out.endswith(b"line 19999\n")
        assert h.info.output_bytes == 20000 * 11


async def test_pty_create_resize_and_exit_status(settings: Settings) -> None:
    async with Sandbox.create(settings=settings) as sb:
        h = await sb.pty.create(100, 30, argv=["/bin/sh"])
        out = bytearray()

        async def read_until(marker: bytes) -> None:
            async for chunk in h.output(replay=False):
                out.extend(chunk)
                if marker in out:
                    return

        reader = asyncio.ensure_future(read_until(b"30 100"))
        await h.send_stdin(b"stty size\n")
        await asyncio.wait_for(reader, 30)
        await h.resize(120, 40)
        out.clear()
        reader = asyncio.ensure_future(read_until(b"40 120"))
        await h.send_stdin(b"stty size\n")
        await asyncio.wait_for(reader, 30)
        await h.send_stdin(b"exit 5\n")
        info = await h.wait(timeout=30)
        assert info.exit_code == 5 and info.pty
