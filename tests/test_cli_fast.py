"""The CLI's one-shot fast path: it imports no typer or rich, and it is the typer command.

Anything it does not take exactly as typer would (help, other options, bad values) goes
to the full app, so help and errors stay complete.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT
from ironclaw.cli.fast import default_spec, parse_exec
from ironclaw.cli.options import SandboxOptions
from ironclaw.spec import parse_spec


def ironclaw(*args: str, home: Path, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IRONCLAW_HOME": str(home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "ironclaw.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def imported(stderr: str) -> set[str]:
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", stderr, re.M))


def test_default_spec_is_the_exec_commands_spec() -> None:
    assert parse_spec(default_spec()) == SandboxOptions().spec()


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--", "python3", "-c", "pass"], (False, None, None, ["python3", "-c", "pass"])),
        (["ls", "-la"], (False, None, None, ["ls", "-la"])),
        (
            ["--json", "--timeout", "2.5", "--id", "box1", "--", "true"],
            (True, 2.5, "box1", ["true"]),
        ),
        (["--json", "sh", "--", "x"], (True, None, None, ["sh", "--", "x"])),
    ],
)
def test_parse_exec_takes_the_plain_forms(
    argv: list[str], expect: tuple[bool, float | None, str | None, list[str]]
) -> None:
    parsed = parse_exec(argv)
    assert parsed is not None
    assert (parsed.as_json, parsed.timeout, parsed.sandbox_id, parsed.command) == expect


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--"],
        ["--help"],
        ["--memory", "64", "--", "true"],
        ["--timeout", "soon", "--", "true"],
        ["--timeout"],
        ["--id", "--json", "true"],
        ["--timeout=3", "true"],
        ["--json"],
    ],
)
def test_parse_exec_leaves_the_rest_to_typer(argv: list[str]) -> None:
    assert parse_exec(argv) is None


@pytest.mark.root
@pytest.mark.parametrize("mode", ["direct", "agent"])
def test_exec_fast_path_imports_neither_typer_nor_rich(ironclaw_home: Path, mode: str) -> None:
    os.environ["IRONCLAW_ONESHOT"] = mode  # "agent": through the manager and the agent
    try:
        argv = ["exec", "--json", "--", "sh", "-c", "echo hi; exit 3"]
        p = ironclaw(*argv, home=ironclaw_home, importtime=True)
    finally:
        del os.environ["IRONCLAW_ONESHOT"]
    assert p.returncode == 3, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert doc["stdout"] == "hi\n" and doc["exit_code"] == 3 and doc["backend"] == "namespace"
    modules = imported(p.stderr)
    runner = "ironclaw.host.manager" if mode == "agent" else "ironclaw.cli.oneshot"
    assert runner in modules  # the measurement itself works
    heavy = {m for m in modules if m.split(".")[0] in {"typer", "click", "rich"}}
    assert not heavy, sorted(heavy)


@pytest.mark.root
def test_exec_fast_path_reports_errors_like_the_app(ironclaw_home: Path) -> None:
    p = ironclaw("exec", "--id", "Bad/Id", "--", "true", home=ironclaw_home)
    assert p.returncode == 2 and "invalid sandbox id" in p.stderr
    p = ironclaw("exec", "--json", "--id", "Bad/Id", "--", "true", home=ironclaw_home)
    assert p.returncode == 2 and json.loads(p.stdout)["error"] == "InvalidSandboxId"


def test_exec_help_and_bad_options_go_to_typer(tmp_path: Path) -> None:
    p = ironclaw("exec", "--help", home=tmp_path)
    assert p.returncode == 0 and "--memory" in p.stdout and "--timeout" in p.stdout
    p = ironclaw("exec", "--timeout", "soon", "--", "true", home=tmp_path)
    assert p.returncode == 2 and "Invalid value for '--timeout'" in p.stderr
    p = ironclaw("--help", home=tmp_path)
    assert p.returncode == 0 and "exec" in p.stdout and "sandbox" in p.stdout


def test_exec_goes_through_the_service_when_one_is_configured(tmp_path: Path) -> None:
    """With IRONCLAW_API_URL set, exec is the service's, never a local sandbox."""
    os.environ["IRONCLAW_API_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    try:
        p = ironclaw("exec", "--json", "--", "true", home=tmp_path, importtime=True)
    finally:
        del os.environ["IRONCLAW_API_URL"]
    assert p.returncode != 0
    assert "cannot reach the IronClaw API at http://127.0.0.1:9" in p.stdout + p.stderr
    assert any(m.startswith("ironclaw.client") for m in imported(p.stderr))
