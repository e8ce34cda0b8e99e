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
    r = await sb.exec(
        ["sh", "-c", f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status"]
    )
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
        with pytest.raises(ConfigError, match=r"command not found|No such file"):
            await sb.commands.start(["/no/such/binary"])
        with pytest.raises(ConfigError):
            await sb.commands.start(["true"], ring_bytes=10)
        await sb.commands.start(["sleep", "100"], tag="one")
        before = await sb.commands.list()
        with pytest.raises(ConfigError, match="already has tag 'one'"):
            await sb.commands.start(["sleep", "100"], tag="one")
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


async def test_watch_reports_events_in_order_and_refuses_outside_paths(settings: Settings) -> None:
    async with Sandbox.create(settings=settings) as sb:
        await sb.files.mkdir("w")
        events: list[tuple[str, str, str | None]] = []

        async def collect() -> None:
            async for ev in sb.files.watch("w", recursive=True):
                events.append((ev.type, ev.path, ev.dest))
                if ev.type == "deleted" and ev.path.endswith("b.txt"):
                    return

        watcher = asyncio.ensure_future(collect())
        # The watch is installed once the guest answered anything after it: ping twice.
        await sb.ping()
        await sb.ping()
        script = (
            "mkdir w/sub && echo 1 > w/sub/a.txt && mv w/sub/a.txt w/b.txt "
            "&& echo 2 >> w/b.txt && rm w/b.txt"
        )
        r = await sb.exec(["sh", "-c", script])
        assert r.exit_code == 0, r.stderr
        await asyncio.wait_for(watcher, 30)
        ws = "/workspace/w"
        assert events == [
            ("created", f"{ws}/sub", None),
            ("created", f"{ws}/sub/a.txt", None),
            ("modified", f"{ws}/sub/a.txt", None),
            ("moved", f"{ws}/sub/a.txt", f"{ws}/b.txt"),
            ("modified", f"{ws}/b.txt", None),
            ("deleted", f"{ws}/b.txt", None),
        ]
        for bad in ("/etc", "../..", "/workspace/../tmp"):
            with pytest.raises(ConfigError, match="outside the workspace"):
                async for _ in sb.files.watch(bad):
                    pass


async def test_watch_overflow_is_marked_and_the_watch_goes_on(settings: Settings) -> None:
    async with Sandbox.create(settings=settings) as sb:
        await sb.files.mkdir("flood")
        seen: list[str] = []

        async def collect() -> None:
            async for ev in sb.files.watch("flood", max_queue=1):
                seen.append(ev.type if ev.type == "overflow" else ev.path.rsplit("/", 1)[1])
                if seen[-1] == "after":
                    return

        watcher = asyncio.ensure_future(collect())
        await sb.ping()
        burst = "import os\nfor i in range(3000): os.close(os.open(f'flood/f{i}', os.O_CREAT))"
        assert (await sb.exec(["python3", "-c", burst])).exit_code == 0
        await sb.exec(["sh", "-c", "sleep 0.5; : > flood/after"])
        await asyncio.wait_for(watcher, 30)
        assert "overflow" in seen and len(seen) < 3000 and seen[-1] == "after"


async def test_cli_exec_t_is_a_terminal_that_follows_resizes(
    settings: Settings, ironclaw_home: Path
) -> None:
    import pexpect

    sb = await Sandbox.create(sandbox_id="procs-tty", settings=settings)
    try:
        env = {**os.environ, "IRONCLAW_HOME": str(ironclaw_home), "PS1": "$ "}
        child = pexpect.spawn(
            sys.executable, ["-m", "ironclaw.cli", "sandbox", "exec", "-t", "procs-tty", "--",
                             "/bin/sh"], env=env, dimensions=(24, 80), timeout=30,
        )  # fmt: skip
        try:
            child.sendline("stty size")
            await asyncio.to_thread(child.expect, "24 80")
            child.setwinsize(40, 120)  # the CLI gets SIGWINCH and resizes the sandbox's PTY
            child.sendline("stty size")
            await asyncio.to_thread(child.expect, "40 120")
            child.sendline("tty; exit 7")
            await asyncio.to_thread(child.expect, "/dev/pts/")
            await asyncio.to_thread(child.expect, pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 7
    finally:
        await sb.destroy()
        await sb.aclose()


async def test_cli_run_detached_returns_the_pid_and_attach_replays(
    settings: Settings, ironclaw_home: Path
) -> None:
    sb = await Sandbox.create(sandbox_id="procs-cli", settings=settings)
    try:
        started = cli("sandbox", "run", "-d", "--tag", "job", "procs-cli", "--",
                      "sh", "-c", "echo one; echo two >&2; exit 4", home=ironclaw_home)  # fmt: skip
        assert started.returncode == 0, started.stderr
        pid = int(started.stdout)
        h = await sb.commands.connect(pid)
        assert h.tag == "job" and (await h.wait(timeout=30)).exit_code == 4
        again = cli("sandbox", "attach", "procs-cli", str(pid), home=ironclaw_home)
        assert (again.returncode, again.stdout, again.stderr) == (4, "one\ntwo\n", "")
        for bad in ("4000000", "nope"):
            p = cli("sandbox", "kill", "procs-cli", bad, home=ironclaw_home)
            assert p.returncode == 2 and "no command with" in p.stderr
        p = cli("sandbox", "kill", "--signal", "BOGUS", "procs-cli", "job", home=ironclaw_home)
        assert p.returncode == 2 and "unknown signal" in p.stderr
    finally:
        await sb.destroy()
        await sb.aclose()
