"""The CLI as a user runs it: a real process, real sandboxes, exit codes and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT

pytestmark = pytest.mark.root


def ironclaw(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IRONCLAW_HOME": str(home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
    return subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_exec_json_prints_one_object_and_propagates_status(ironclaw_home: Path) -> None:
    p = ironclaw(
        "exec", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 3", home=ironclaw_home
    )
    assert p.returncode == 3, p.stderr
    doc = json.loads(p.stdout)
    assert {"id", "backend", "exit_code", "stdout", "stderr", "duration_ms"} <= set(doc)
    assert doc["stdout"] == "out\n" and doc["stderr"] == "err\n" and doc["exit_code"] == 3
    assert doc["backend"] == "namespace"
    # One-shot: nothing of the sandbox remains.
    assert not any((ironclaw_home / "run" / "sandboxes").glob("*"))


def test_exec_streams_plain_output(ironclaw_home: Path) -> None:
    p = ironclaw(
        "exec", "--", "python3", "-c", "print('hi'); import sys; sys.exit(0)", home=ironclaw_home
    )
    assert p.returncode == 0 and p.stdout == "hi\n"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "a/b", "A", "-x", "a" * 64, "", "é"])
def test_bad_ids_are_refused_and_nothing_is_created(ironclaw_home: Path, bad: str) -> None:
    before = (
        sorted(p.name for p in Path(f"/sys/fs/cgroup/memory/{CGROUP_ROOT}").glob("*"))
        if Path(f"/sys/fs/cgroup/memory/{CGROUP_ROOT}").exists()
        else []
    )
    p = ironclaw("sandbox", "create", f"--id={bad}", home=ironclaw_home)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "invalid sandbox id" in (p.stderr + p.stdout)
    run = ironclaw_home / "run" / "sandboxes"
    assert not run.exists() or not any(run.iterdir())
    after = (
        sorted(p.name for p in Path(f"/sys/fs/cgroup/memory/{CGROUP_ROOT}").glob("*"))
        if Path(f"/sys/fs/cgroup/memory/{CGROUP_ROOT}").exists()
        else []
    )
    assert before == after
    assert not Path("/etc/passwd.sock").exists()


def test_long_lived_sandbox_outlives_the_cli(ironclaw_home: Path, tmp_path: Path) -> None:
    p = ironclaw("sandbox", "create", "--id", "keep-1", home=ironclaw_home)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "keep-1"
    try:
        ls = json.loads(ironclaw("sandbox", "ls", "--json", home=ironclaw_home).stdout)
        assert [s["id"] for s in ls["sandboxes"]] == ["keep-1"]
        assert ls["sandboxes"][0]["state"] == "running"
        src = tmp_path / "in.txt"
        src.write_text("payload")
        assert (
            ironclaw("sandbox", "cp", str(src), "keep-1:in.txt", home=ironclaw_home).returncode == 0
        )
        r = ironclaw("sandbox", "exec", "keep-1", "--", "cat", "in.txt", home=ironclaw_home)
        assert r.returncode == 0 and r.stdout == "payload"
        out = tmp_path / "out.txt"
        assert (
            ironclaw("sandbox", "cp", "keep-1:in.txt", str(out), home=ironclaw_home).returncode == 0
        )
        assert out.read_text() == "payload"
        dup = ironclaw("sandbox", "create", "--id", "keep-1", home=ironclaw_home)
        assert dup.returncode == 2 and "already exists" in dup.stderr
    finally:
        rm = ironclaw("sandbox", "rm", "keep-1", home=ironclaw_home)
    assert rm.returncode == 0, rm.stderr
    ls = json.loads(ironclaw("sandbox", "ls", "--json", home=ironclaw_home).stdout)
    assert ls["sandboxes"] == []


def test_doctor_reports_required_pieces(ironclaw_home: Path) -> None:
    p = ironclaw("doctor", "--json", home=ironclaw_home)
    doc = json.loads(p.stdout)
    names = {c["name"]: c for c in doc["checks"]}
    assert names["bwrap"]["ok"] and names["user namespaces"]["ok"] and names["seccomp"]["ok"]
    assert p.returncode == 0
    for c in doc["checks"]:
        if not c["ok"]:
            assert c["fix"], c
