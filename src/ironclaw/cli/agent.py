"""``ironclaw run`` (an agent task in a fresh sandbox) and ``ironclaw logs`` (its trace)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.prompt import Confirm
from rich.text import Text

from ironclaw.cli import remote as via_api
from ironclaw.cli.common import fail, run_code
from ironclaw.cli.options import JsonOpt, SandboxOptions, sandbox_options
from ironclaw.errors import ConfigError, IronclawError

__all__ = ["register"]

_console = Console(stderr=True)


def _progress(ev: dict[str, Any]) -> None:
    from ironclaw.agent.trace import event_line

    seq = Text(f"#{ev.get('seq')!s:<3} ", style="dim")
    _console.print(Text.assemble(seq, event_line(ev)), highlight=False)


async def _ask(req: Any) -> bool:
    """The interactive decision on a RED call: its diff card, then yes/no.

    Card, tool name and reason come from the sandbox: shown literally (no markup,
    control characters escaped), so what is approved is what is seen.
    """
    from ironclaw.agent.render import literal

    title = Text.assemble(("RED: ", "bold red"), literal(req.name), ": ",
                          literal(req.classification.reason))  # fmt: skip
    _console.print(Panel(literal(req.card), title=title), highlight=False)
    return bool(await asyncio.to_thread(Confirm.ask, "approve this action?", default=False))


@sandbox_options("allow", "allow_domain")
def run_cmd(
    task: Annotated[str, typer.Argument(help="What the agent should do.")],
    *,
    model: Annotated[
        str | None,
        typer.Option("--model", help="PROVIDER:MODEL: openai:NAME, anthropic:NAME, scripted:FILE."),
    ] = None,
    approve: Annotated[
        str | None,
        typer.Option("--approve", help="RED calls: prompt, green-only, all or never."),
    ] = None,
    mcp: Annotated[
        list[str] | None, typer.Option("--mcp", help="Extra MCP server: 'cmd args' (repeatable).")
    ] = None,
    host_mcp: Annotated[
        list[str] | None,
        typer.Option("--host-mcp", help="MCP server run on the host: 'NAME=cmd args' (RED)."),
    ] = None,
    host_tools: Annotated[
        Path | None,
        typer.Option("--host-tools", help="Host MCP servers with secrets (JSON/YAML file)."),
    ] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="Approval rules (JSON).")] = None,
    max_steps: Annotated[
        int, typer.Option("--max-steps", help="Model calls the agent may make.")
    ] = 20,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Tokens, sent and received, the task may use.")
    ] = 200_000,
    wall_time: Annotated[float, typer.Option("--wall-time", help="Task time limit (s).")] = 600.0,
    tool_timeout: Annotated[
        float, typer.Option("--tool-timeout", help="Time limit of one tool call (s).")
    ] = 120.0,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the sandbox afterwards.")] = False,
    as_json: JsonOpt = False,
    opts: SandboxOptions,
) -> None:
    """Run an AI agent on TASK inside a fresh sandbox, with live progress."""
    from ironclaw.agent.approval import ApprovalPolicy, Approver
    from ironclaw.agent.host_tools import load_host_tools, parse_host_mcp
    from ironclaw.agent.tasks import TaskSpec, parse_mcp, run_task
    from ironclaw.host.manager import SandboxManager
    from ironclaw.proto import methods
    from ironclaw.proto.methods import Budget

    interactive = sys.stdin.isatty() and not as_json
    mode = approve or ("prompt" if interactive else "green-only")

    async def main() -> int:
        approver = Approver(
            ApprovalPolicy.from_file(policy) if policy else None,
            mode,
            prompt=_ask if interactive and mode == "prompt" else None,
        )
        spec = TaskSpec(
            task=task,
            model=model or os.environ.get("IRONCLAW_MODEL", "openai:gpt-4o-mini"),
            # The task takes its sandbox as a mapping: the validated spec, as given.
            sandbox=opts.spec().model_dump(mode="json", exclude_unset=True),
            mcp=[parse_mcp(m, i) for i, m in enumerate(mcp or [], 1)],
            host_tools=(load_host_tools(host_tools) if host_tools else [])
            + [parse_host_mcp(m) for m in host_mcp or []],
            budget=Budget.from_json(
                {
                    "max_steps": max_steps,
                    "max_tokens": max_tokens,
                    "wall_time_s": wall_time,
                    "tool_timeout_s": tool_timeout,
                }
            ),
        )
        if via_api.active():
            if mcp or policy:
                raise ConfigError("--mcp and --policy apply to local runs; the server uses its own")
            return await via_api.run_task(
                task, model=spec.model, approve=mode, sandbox=spec.sandbox,
                budget=methods.to_json(spec.budget), keep=keep, as_json=as_json,
                progress=None if as_json else _progress,
                ask=_ask if interactive and mode == "prompt" else None,
            )  # fmt: skip
        async with SandboxManager() as manager:
            outcome = await run_task(
                manager, spec, approver=approver, keep=keep,
                on_event=None if as_json else _progress,
            )  # fmt: skip
        if as_json:
            print(json.dumps(outcome.to_json()))
        else:
            if outcome.answer:
                from ironclaw.agent.render import literal

                Console().print(Panel(literal(outcome.answer), title="answer"), highlight=False)
            _console.print(f"trace: ironclaw logs {outcome.sandbox_id}")
        return 0 if outcome.status == "completed" else 1

    run_code(main(), as_json)


def logs_cmd(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id of the task.")],
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON lines.")] = False,
) -> None:
    """Show an agent task's trace as a timeline (or raw with --json)."""
    from ironclaw.agent.trace import read_trace, render_timeline, state_trace_path
    from ironclaw.config import Settings

    try:
        path = state_trace_path(Settings.from_env(), sandbox_id)
        events = read_trace(path)
    except IronclawError as exc:
        raise typer.Exit(fail(exc, as_json)) from None
    if as_json:
        for ev in events:
            print(json.dumps(ev))
    else:
        render_timeline(events, Console())


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("logs")(logs_cmd)
