"""The one-shot ``ironclaw exec`` as a user runs it: what it imports, what it leaves.

It runs without pydantic, typer or rich and without the modules of features it does not
use, exits without the interpreter's teardown, and must still print everything, return
the command's status and leave nothing behind; a one-shot killed mid-run leaves what
``gc`` (any manager's start) removes. Leaks are checked on the system (cgroupfs,
/proc, the runtime directory) as well as in the registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT, UID_BASE
from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.procs import processes_with_uid_in

pytestmark = pytest.mark.root

#: Not needed by a one-shot with the default spec: each is a feature it does not use.
UNUSED = (
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typer",
    "click",
    "rich",
    "tarfile",
    "ironclaw.spec",
    "ironclaw.policy.network",
    "ironclaw.policy.nftables",
    "ironclaw.policy.seccomp",
    "ironclaw.host.snapshots",
    "ironclaw.resources.net",
    "ironclaw.resources.firewall",
    "ironclaw.resources.proxy",
    "ironclaw.images",
    "ironclaw.backends.qemu",
    "ironclaw.backends.firecracker",
    "ironclaw.cluster",
    "ironclaw.agent",
    "ironclaw.api",
    "ironclaw.client",
)


#: The two ways a one-shot runs: directly (the default), or through the manager and the
#: guest agent (``IRONCLAW_ONESHOT=agent``; also what a warm pool gets).
MODES = ("direct", "agent")


def env_for(mode: str, home: Path) -> dict[str, str]:
    env = {**os.environ, "IRONCLAW_HOME": str(home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
    env.pop("IRONCLAW_ONESHOT", None)
    return {**env, "IRONCLAW_ONESHOT": "agent"} if mode == "agent" else env


def cli(
    *args: str, home: Path, importtime: bool = False, mode: str = "direct"
) -> subprocess.CompletedProcess[bytes]:
    env = env_for(mode, home)
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "ironclaw.cli", *args],
        capture_output=True,
        env=env,
        timeout=120,
    )


def leftovers(home: Path) -> dict[str, list[str]]:
    """This session's cgroups, runtime directories and sandbox processes, as found."""
    cgroups = [
        str(p)
        for ctrl in Path("/sys/fs/cgroup").iterdir()
        if (ctrl / CGROUP_ROOT).is_dir()
        for p in (ctrl / CGROUP_ROOT).iterdir()
        if p.is_dir()
    ]
    run = home / "run" / "sandboxes"
    return {
        "cgroups": sorted(cgroups),
        "run_dirs": sorted(p.name for p in run.iterdir()) if run.is_dir() else [],
        "processes": [str(pid) for pid, _ in processes_with_uid_in(UID_BASE, UID_BASE + 16384)],
    }


async def registry(home: Path) -> list[str]:
    mgr = SandboxManager(Settings.from_env({"IRONCLAW_HOME": str(home)}), reconcile_on_open=False)
    await mgr.open()
    try:
        return [r.id for r in await mgr.store.all()]
    finally:
        await mgr.aclose()


@pytest.mark.parametrize("mode", MODES)
def test_one_shot_imports_only_what_it_uses(ironclaw_home: Path, mode: str) -> None:
    # The first run builds the caches (guest bundle, seccomp programs): later ones read them.
    assert cli("exec", "--", "true", home=ironclaw_home, mode=mode).returncode == 0
    p = cli("exec", "--", "sh", "-c", "echo hi; exit 4", home=ironclaw_home, importtime=True,
            mode=mode)  # fmt: skip
    assert p.returncode == 4, p.stderr[-2000:]
    assert p.stdout == b"hi\n"
    modules = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", p.stderr.decode(), re.M))
    runner = "ironclaw.host.manager" if mode == "agent" else "ironclaw.cli.oneshot"
    assert {runner, "ironclaw.backends.namespace"} <= modules  # it measures
    loaded = sorted(m for m in modules if m.split(".")[0] in UNUSED or m in UNUSED
                    or any(m.startswith(f"{u}.") for u in UNUSED))  # fmt: skip
    assert loaded == [], loaded


@pytest.mark.parametrize("mode", MODES)
async def test_one_shots_print_everything_and_leave_nothing(ironclaw_home: Path, mode: str) -> None:
    before = leftovers(ironclaw_home)
    big = 3 * 1024 * 1024
    p = cli("exec", "--", "sh", "-c", f"head -c {big} /dev/zero; echo done >&2; exit 9",
            home=ironclaw_home, mode=mode)  # fmt: skip
    assert (p.returncode, len(p.stdout), p.stderr) == (9, big, b"done\n")
    # A process left running in the background dies with the sandbox, not after the CLI.
    p = cli("exec", "--json", "--", "sh", "-c", "sleep 300 & echo started", home=ironclaw_home,
            mode=mode)  # fmt: skip
    assert p.returncode == 0 and b'"stdout": "started\\n"' in p.stdout, p.stderr
    assert leftovers(ironclaw_home) == before == {"cgroups": [], "run_dirs": [], "processes": []}
    assert await registry(ironclaw_home) == []


@pytest.mark.parametrize("mode", MODES)
async def test_gc_removes_what_a_killed_one_shot_left(ironclaw_home: Path, mode: str) -> None:
    env = env_for(mode, ironclaw_home)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "exec", "--", "sh", "-c", "echo up; sleep 300",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        assert await proc.stdout.readline() == b"up\n"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    left = leftovers(ironclaw_home)
    assert left["cgroups"] and left["run_dirs"], left  # the kill left something to find
    assert len(await registry(ironclaw_home)) == 1
    mgr = SandboxManager(Settings.from_env({"IRONCLAW_HOME": str(ironclaw_home)}))
    await mgr.open()  # a manager's start finishes what crashed processes left (as gc does)
    await mgr.aclose()
    assert await registry(ironclaw_home) == []
    assert leftovers(ironclaw_home) == {"cgroups": [], "run_dirs": [], "processes": []}


async def test_a_warm_sandbox_of_the_default_spec_serves_the_one_shot(ironclaw_home: Path) -> None:
    """`pool fill` makes real-spec sandboxes; the CLI's light spec must find them."""
    settings = Settings.from_env({"IRONCLAW_HOME": str(ironclaw_home)})
    mgr = SandboxManager(settings, cgroup_root=CGROUP_ROOT, uid_base=UID_BASE)
    await mgr.open()
    try:
        assert await mgr.fill_pool({}, size=1) == 1
        [pooled] = await mgr.store.all()
        p = cli("exec", "--json", "--", "cat", "/etc/hostname", home=ironclaw_home)
        assert p.returncode == 0, p.stderr
        assert await mgr.warm({}) == 0  # taken, not built anew
        # The pooled jail kept the name it was built with: the exec ran in that sandbox.
        assert p.stdout.count(f"{pooled.rid}\\n".encode()) == 1, p.stdout
    finally:
        await mgr.aclose()
    assert await registry(ironclaw_home) == []
    assert leftovers(ironclaw_home) == {"cgroups": [], "run_dirs": [], "processes": []}


@pytest.mark.parametrize("mode", MODES)
async def test_an_interrupted_one_shot_exits_130_and_leaves_nothing(
    ironclaw_home: Path, mode: str
) -> None:
    env = env_for(mode, ironclaw_home)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "exec", "--", "sh", "-c", "echo up; sleep 300",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        assert await proc.stdout.readline() == b"up\n"
        proc.send_signal(signal.SIGINT)
        assert await proc.wait() == 130
    assert await registry(ironclaw_home) == []
    assert leftovers(ironclaw_home) == {"cgroups": [], "run_dirs": [], "processes": []}


@pytest.mark.parametrize("mode", MODES)
async def test_a_reader_that_leaves_stops_the_one_shot_quietly(
    ironclaw_home: Path, mode: str
) -> None:
    """``ironclaw exec -- yes | head -1``: EPIPE ends the command as SIGPIPE would, without
    a traceback, with a shell's SIGPIPE status, and the sandbox is still removed."""
    env = env_for(mode, ironclaw_home)
    read_end, write_end = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "exec", "--", "yes",
        stdout=write_end, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        async with asyncio.timeout(60):
            first = await asyncio.to_thread(reader.read, 2)
    assert first == b"y\n"  # and the reader is gone: `yes` would write forever
    async with asyncio.timeout(60):
        _, stderr = await proc.communicate()
    assert (proc.returncode, stderr) == (141, b"")
    assert await registry(ironclaw_home) == []
    assert leftovers(ironclaw_home) == {"cgroups": [], "run_dirs": [], "processes": []}


@pytest.mark.parametrize("mode", MODES)
def test_a_json_reader_that_leaves_gets_no_traceback(ironclaw_home: Path, mode: str) -> None:
    env = env_for(mode, ironclaw_home)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read the result
    p = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", "exec", "--json", "--", "true"],
        stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=120,
    )  # fmt: skip
    os.close(write_end)
    assert (p.returncode, p.stderr) == (141, b"")
    assert leftovers(ironclaw_home) == {"cgroups": [], "run_dirs": [], "processes": []}


@pytest.mark.parametrize("mode", MODES)
def test_timing_marks_name_each_step(ironclaw_home: Path, mode: str) -> None:
    env = {**env_for(mode, ironclaw_home), "IRONCLAW_TIMING": "1"}
    p = subprocess.run([sys.executable, "-m", "ironclaw.cli", "exec", "--", "echo", "hi"],
                       capture_output=True, env=env, timeout=120)  # fmt: skip
    assert (p.returncode, p.stdout) == (0, b"hi\n")
    line = p.stderr.decode().strip()
    assert line.startswith("ironclaw-timing: "), line
    marks = json.loads(line.removeprefix("ironclaw-timing: "))
    steps = ["imports", "open", "create", "exec", "destroy", "close", "exit", "total"]
    assert list(marks) == steps
    assert all(v >= 0 for v in marks.values())
    assert abs(sum(marks[s] for s in steps[:-1]) - marks["total"]) < 0.1
