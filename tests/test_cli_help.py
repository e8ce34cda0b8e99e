"""``--help`` works for every command and subcommand, found by walking the command tree.

Option help such as ``CIDR[:PORT[/PROTO]]`` once crashed the help of ``exec``,
``sandbox create`` and ``run`` (read as Rich markup); nothing here lists the commands
by hand, so a command added later is covered too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ironclaw.cli.main import app


def _walk(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        found += _walk(sub, (*path, name))
    return found


TREE = _walk(typer.main.get_command(app))
PATHS = [path for path, _ in TREE]


def _option_names(command: Any) -> list[str]:
    return [opt for p in command.params if p.param_type_name == "option" for opt in p.opts]


def test_the_walk_finds_the_commands_and_groups() -> None:
    assert {("exec",), ("sandbox", "create"), ("run",), ("pool", "fill"), ("image", "ls")} <= set(
        PATHS
    )
    assert len(PATHS) >= 18


@pytest.mark.parametrize(("path", "command"), TREE, ids=[" ".join(p) or "ironclaw" for p in PATHS])
def test_help_exits_0_and_lists_every_option(path: tuple[str, ...], command: Any) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="ironclaw")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output.startswith(f"Usage: ironclaw {' '.join(path)}".rstrip())
    for name in _option_names(command):
        assert name in result.output, name
    for sub in getattr(command, "commands", {}):
        assert sub in result.output, sub


@pytest.mark.parametrize("path", [(), ("exec",), ("sandbox", "create"), ("run",)])
def test_help_in_a_real_process(path: tuple[str, ...]) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", *path, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    if path:
        assert "CIDR[:PORT[/PROTO]]" in p.stdout  # printed as written, not read as markup
        assert "--allow-domain" in p.stdout
