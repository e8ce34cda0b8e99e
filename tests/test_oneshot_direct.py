"""The direct one-shot (``ironclaw exec`` without the agent) against the agent path.

Every probe runs twice as a user runs it, through the direct path and through the agent
path (``IRONCLAW_ONESHOT=agent``), in real bubblewrap jails with real cgroups, and must
give the same answers: identity, privileges, cgroup, hostname, environment, working
directory, mounts, network, rlimits, exit statuses, output, ``--json``. Then what the
direct path must keep on its own: the sandbox is in the registry while it runs (so
``gc`` can remove it), its processes never run as host root, a SIGKILLed CLI leaves only
what ``gc`` removes, and two at once share nothing.
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
from typing import Any

import pytest

from conftest import CGROUP_ROOT, UID_BASE
from ironclaw.backends.namespace import NamespaceInfo
from ironclaw.cli.oneshot import CAPTURE_LIMIT
from ironclaw.config import Settings
from ironclaw.host.guest import DEFAULT_CAPTURE_LIMIT
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.procs import processes_with_uid_in

pytestmark = pytest.mark.root

MODES = ("direct", "agent")
#: Probes whose whole output must agree (each runs under ``sh -c``).
PROBES = {
    "id": "id",
    "env": "env | sort",
    "cwd": "pwd; ls -a .",
    "status": "grep -E '^(Uid|Gid|Groups|Seccomp|NoNewPrivs|Cap|SigIgn|SigBlk)' /proc/self/status",
    "cgroup": "cat /proc/self/cgroup",
    # The agent raises a command's score just after starting it: read it a moment later.
    "oom": "sleep 0.3; cat /proc/self/oom_score_adj",
    "hostname": "hostname; cat /etc/hostname /etc/hosts /etc/passwd",
    "mounts": "cat /proc/self/mounts",
    "network": "cut -d: -f1 /proc/net/dev | tail -n +3",
    "rlimits": "cat /proc/self/limits; umask",
    "stdin": "cat; echo eof",
    "fds": "ls /proc/self/fd",
}
#: Timings differ run to run, the id on purpose.
TIMINGS = {"duration_ms", "total_ms"}


def run(
    mode: str, *args: str, home: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", "exec", *args],
        capture_output=True,
        env=env_for(mode, home, extra),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def env_for(mode: str, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "IRONCLAW_HOME": str(home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
    env.pop("IRONCLAW_ONESHOT", None)
    if mode == "agent":
        env["IRONCLAW_ONESHOT"] = "agent"
    return {**env, **(extra or {})}


def members(sid: str) -> list[int]:
    """The pids in the sandbox's cgroup (its first hierarchy that has it)."""
    for ctrl in sorted(Path("/sys/fs/cgroup").iterdir()):
        procs = ctrl / CGROUP_ROOT / sid / "cgroup.procs"
        if procs.is_file():
            return [int(x) for x in procs.read_text().split()]
    raise AssertionError(f"no cgroup for {sid}")


def leftovers(home: Path) -> dict[str, list[str]]:
    cgroups = [
        str(p)
        for ctrl in Path("/sys/fs/cgroup").iterdir()
        if (ctrl / CGROUP_ROOT).is_dir()
        for p in (ctrl / CGROUP_ROOT).iterdir()
        if p.is_dir()
    ]
    run_dir = home / "run" / "sandboxes"
    return {
        "cgroups": sorted(cgroups),
        "run_dirs": sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else [],
        "processes": [str(pid) for pid, _ in processes_with_uid_in(UID_BASE, UID_BASE + 16384)],
    }


NOTHING: dict[str, list[str]] = {"cgroups": [], "run_dirs": [], "processes": []}


async def rows(home: Path) -> list[Any]:
    mgr = SandboxManager(Settings.from_env({"IRONCLAW_HOME": str(home)}), reconcile_on_open=False)
    await mgr.open()
    try:
        return await mgr.store.all()
    finally:
        await mgr.aclose()


def both(*args: str, home: Path) -> dict[str, subprocess.CompletedProcess[bytes]]:
    return {mode: run(mode, *args, home=home) for mode in MODES}


def comparable(p: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    doc = json.loads(p.stdout)
    return {k: v for k, v in doc.items() if k not in TIMINGS}


def test_probes_answer_the_same_on_both_paths(ironclaw_home: Path) -> None:
    for name, probe in PROBES.items():
        got = both("--json", "--id", "parity-1", "--", "sh", "-c", probe, home=ironclaw_home)
        direct, agent = (comparable(got[m]) for m in MODES)
        assert direct["exit_code"] == 0, (name, direct)
        assert direct == agent, name
    # What the probes said, checked once (the agent path says the same, as above).
    answers = {
        name: comparable(run("direct", "--json", "--", "sh", "-c", probe, home=ironclaw_home))
        for name, probe in PROBES.items()
    }
    assert answers["id"]["stdout"].startswith("uid=1000(sandbox) gid=1000(sandbox)")
    assert "NoNewPrivs:\t1" in answers["status"]["stdout"]
    assert "Seccomp:\t2" in answers["status"]["stdout"]
    assert "CapEff:\t0000000000000000" in answers["status"]["stdout"]
    assert answers["network"]["stdout"].split() == ["lo"]
    assert answers["stdin"]["stdout"] == "eof\n"  # /dev/null, never the CLI's stdin
    assert answers["fds"]["stdout"].split() == ["0", "1", "2", "3"]  # 3: ls's own listing
    assert answers["cwd"]["stdout"] == "/workspace\n.\n..\n"
    assert answers["oom"]["stdout"] == "1000\n"
    assert answers["hostname"]["stdout"].startswith(answers["hostname"]["id"] + "\n")


@pytest.mark.parametrize(
    "command",
    [
        ["true"],
        ["false"],
        ["sh", "-c", "echo out; echo err >&2; exit 42"],
        ["sh", "-c", "kill -9 $$"],
        ["sh", "-c", "kill -TERM $$"],
        ["no-such-command"],
        ["/etc/passwd"],  # exists, not executable
        ["sh", "-c", "printf 'bwrap: execvp' >&2; exit 1"],  # looks like bubblewrap's words
        ["sh", "-c", "head -c 20000000 /dev/zero; head -c 5 /dev/zero >&2"],
        ["python3", "-c", "x = bytearray(700 * 2**20)"],  # past the 512 MiB default
        ["sh", "-c", "for i in $(seq 300); do sleep 5 & done; wait"],  # past 256 pids
    ],
)
def test_exit_statuses_and_output_agree(ironclaw_home: Path, command: list[str]) -> None:
    got = both("--json", "--id", "status-1", "--", *command, home=ironclaw_home)
    assert got["direct"].returncode == got["agent"].returncode
    assert comparable(got["direct"]) == comparable(got["agent"])
    plain = {m: run(m, "--", *command, home=ironclaw_home) for m in MODES}
    assert plain["direct"].returncode == plain["agent"].returncode
    assert plain["direct"].stdout == plain["agent"].stdout
    assert plain["direct"].stderr == plain["agent"].stderr
    if command == ["sh", "-c", "echo out; echo err >&2; exit 42"]:
        assert (plain["direct"].returncode, plain["direct"].stdout) == (42, b"out\n")
        assert plain["direct"].stderr == b"err\n"
    if command == ["no-such-command"]:
        assert plain["direct"].returncode == 127
        assert plain["direct"].stderr == b"no-such-command: command not found\n"
    if command[0] == "python3":
        assert comparable(got["direct"])["status"] == "memory limit exceeded"
    if "seq 300" in command[-1]:
        assert plain["direct"].stderr.endswith(b"ironclaw: pids limit\n")
    if command[-1].startswith("head -c 20000000"):  # past the 16 MiB capture limit
        assert CAPTURE_LIMIT == DEFAULT_CAPTURE_LIMIT == 16 * 2**20
        doc = comparable(got["direct"])
        assert (doc["stdout_bytes"], doc["truncated"]) == (20_000_000, True)
        assert len(doc["stdout"]) == 16 * 2**20
    assert leftovers(ironclaw_home) == NOTHING


def test_a_command_that_outlives_its_timeout(ironclaw_home: Path) -> None:
    got = both("--json", "--timeout", "1", "--", "sh", "-c", "echo a; sleep 30", home=ironclaw_home)
    direct = comparable(got["direct"])
    assert direct == comparable(got["agent"]) | {"id": direct["id"]}
    assert (direct["status"], direct["timed_out"], direct["exit_code"]) == ("timeout", True, 137)
    assert direct["stdout"] == "a\n"
    plain = {m: run(m, "--timeout", "1", "--", "sleep", "30", home=ironclaw_home) for m in MODES}
    assert plain["direct"].returncode == plain["agent"].returncode == 137
    assert plain["direct"].stderr == plain["agent"].stderr == b"ironclaw: timeout\n"
    assert leftovers(ironclaw_home) == NOTHING


def test_fifty_megabytes_stream_through_with_bounded_memory(ironclaw_home: Path) -> None:
    """The CLI copies as it reads: its peak memory stays far below the output's size."""
    size = 50 * 10**6
    measure = (
        "import resource, subprocess, sys\n"
        "n = 0\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)\n"
        "while chunk := p.stdout.read(1 << 20):\n"
        "    n += len(chunk)\n"
        "print(n, p.wait(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    for mode in MODES:
        cli = [
            sys.executable,
            "-m",
            "ironclaw.cli",
            "exec",
            "--",
            "head",
            "-c",
            str(size),
            "/dev/zero",
        ]
        p = subprocess.run(
            [sys.executable, "-c", measure, *cli],
            capture_output=True,
            env=env_for(mode, ironclaw_home),
            timeout=300,
        )
        count, code, max_rss_kib = (int(x) for x in p.stdout.split())
        assert (count, code) == (size, 0), (mode, p.stderr[-2000:])
        assert max_rss_kib < 40 * 1024, (mode, max_rss_kib)  # not 50 MB held
    assert leftovers(ironclaw_home) == NOTHING


def test_the_direct_path_imports_no_event_loop_nor_models(ironclaw_home: Path) -> None:
    # The first run compiles the seccomp programs into the cache; later ones read them.
    assert run("direct", "--", "true", home=ironclaw_home).returncode == 0
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ironclaw.cli", "exec", "--", "echo", "hi"],
        capture_output=True,
        env=env_for("direct", ironclaw_home),
        timeout=120,
    )
    assert (p.returncode, p.stdout) == (0, b"hi\n"), p.stderr[-2000:]
    found = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", p.stderr.decode(), re.M)
    modules = {m.split(".")[0] for m in found} | set(found)
    assert "ironclaw.cli.oneshot" in modules  # the measurement itself works
    heavy = {"asyncio", "pydantic", "typer", "click", "rich", "ironclaw.host", "subprocess"}
    # Defining a dataclass costs about a millisecond and loads inspect (see ARCHITECTURE).
    heavy |= {"dataclasses", "inspect", "concurrent", "logging"}
    assert modules & heavy == set(), sorted(modules & heavy)


async def test_registered_while_it_runs_never_host_root_and_gc_removes_a_killed_one(
    ironclaw_home: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "exec", "--id", "crash-1", "--",
        "sh", "-c", "echo up; sleep 300",
        stdout=asyncio.subprocess.PIPE, env=env_for("direct", ironclaw_home),
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        assert await proc.stdout.readline() == b"up\n"
    [row] = await rows(ironclaw_home)
    assert (row.id, row.state, row.one_shot, row.owner_pid) == (
        "crash-1",
        "running",
        True,
        proc.pid,
    )
    host_uid = row.info["host_uid"]
    assert host_uid == UID_BASE + row.slot
    # The row is the backend's own record: the manager (ls, gc) reads it as it reads its own.
    info = NamespaceInfo.from_json(row.info)
    assert (info.host_uid, info.pid, info.wall_time_s) == (host_uid, row.info["pid"], None)
    assert info.pid_start is not None and info.status_file.endswith("/crash-1/status.json")
    # Invariant 7, seen from the host: every process of the sandbox runs as its own
    # unprivileged uid (all four of real, effective, saved and filesystem uid).
    inside = members("crash-1")
    assert len(inside) >= 3  # timeout, bubblewrap (two) and the command at least
    for pid in inside:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids is not None
        assert {int(u) for u in uids[1].split()} == {host_uid}, (pid, status)
    listing = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", "sandbox", "ls", "--json"],
        capture_output=True,
        env=env_for("direct", ironclaw_home),
        timeout=120,
    )
    [shown] = json.loads(listing.stdout)["sandboxes"]
    assert (shown["id"], shown["state"], shown["pid"]) == ("crash-1", "running", row.info["pid"])
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    left = leftovers(ironclaw_home)
    assert left["cgroups"] and left["run_dirs"] == ["crash-1"], left
    mgr = SandboxManager(Settings.from_env({"IRONCLAW_HOME": str(ironclaw_home)}))
    await mgr.open()  # a manager's start finishes what crashed processes left (as gc does)
    await mgr.aclose()
    assert await rows(ironclaw_home) == []
    assert leftovers(ironclaw_home) == NOTHING


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_interrupted_exits_130_and_leaves_nothing(ironclaw_home: Path, signum: int) -> None:
    for mode in MODES:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ironclaw.cli", "exec", "--", "sh", "-c", "echo up; sleep 300",
            stdout=asyncio.subprocess.PIPE, env=env_for(mode, ironclaw_home),
        )  # fmt: skip
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            assert await proc.stdout.readline() == b"up\n"
            proc.send_signal(signum)
            assert await proc.wait() == 130, mode
        assert await rows(ironclaw_home) == []
        assert leftovers(ironclaw_home) == NOTHING


async def test_two_at_once_share_nothing(ironclaw_home: Path) -> None:
    script = "echo up; sleep 3"
    procs = []
    for sid in ("pair-a", "pair-b"):
        argv = ["exec", "--id", sid, "--", "sh", "-c", script]
        env = env_for("direct", ironclaw_home)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ironclaw.cli", *argv, stdout=asyncio.subprocess.PIPE, env=env
        )
        procs.append(proc)
    async with asyncio.timeout(60):
        for proc in procs:
            assert proc.stdout is not None
            while (line := await proc.stdout.readline()) != b"up\n":
                assert line, "a one-shot ended before its command printed up"
    both_rows = {r.id: r for r in await rows(ironclaw_home)}
    assert set(both_rows) == {"pair-a", "pair-b"}
    a, b = both_rows["pair-a"], both_rows["pair-b"]
    assert a.slot != b.slot and a.info["host_uid"] != b.info["host_uid"]
    assert a.info["pid"] != b.info["pid"] and a.info["status_file"] != b.info["status_file"]
    for sid in ("pair-a", "pair-b"):
        pids = set(members(sid))
        uids = {u for p, u in processes_with_uid_in(UID_BASE, UID_BASE + 16384) if p in pids}
        assert uids == {both_rows[sid].info["host_uid"]}
    async with asyncio.timeout(60):
        assert [await p.wait() for p in procs] == [0, 0]
    assert await rows(ironclaw_home) == []
    assert leftovers(ironclaw_home) == NOTHING


def test_the_same_id_twice_is_refused_without_touching_the_first(ironclaw_home: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "ironclaw.cli", "exec", "--id", "twice", "--", "sh", "-c",
         "echo up; sleep 300"],
        stdout=subprocess.PIPE, env=env_for("direct", ironclaw_home),
    )  # fmt: skip
    try:
        assert first.stdout is not None and first.stdout.readline() == b"up\n"
        p = run("direct", "--json", "--id", "twice", "--", "true", home=ironclaw_home)
        assert p.returncode == 2 and json.loads(p.stdout)["error"] == "ConfigError"
        assert first.poll() is None  # still running, its sandbox untouched
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 130
    assert leftovers(ironclaw_home) == NOTHING


def test_what_the_direct_path_cannot_match_goes_to_the_agent(ironclaw_home: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ironclaw.cli", "exec", "--json", "--", "true"],
        capture_output=True,
        env=env_for("agent", ironclaw_home),
        timeout=120,
    )
    assert p.returncode == 0 and json.loads(p.stdout)["exit_code"] == 0
    assert "ironclaw.host.manager" in p.stderr.decode()  # IRONCLAW_ONESHOT=agent
    assert "ironclaw.cli.oneshot" not in p.stderr.decode()


def test_both_paths_audit_the_same_events(ironclaw_home: Path) -> None:
    from ironclaw.resources.audit import read_events

    settings = Settings.from_env({"IRONCLAW_HOME": str(ironclaw_home)})
    for mode in MODES:
        assert run(mode, "--id", f"audit-{mode}", "--", "true", home=ironclaw_home).returncode == 0
        events = read_events(settings, f"audit-{mode}")
        assert [e["event"] for e in events] == ["sandbox.create", "sandbox.destroy"], mode
        assert events[0]["backend"] == "namespace" and events[0]["who"]["uid"] == 0
