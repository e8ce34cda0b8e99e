"""The scripted agent demo: a real sandbox, real MCP servers, a replayed model.

The model's turns come from :data:`DEMO_TURNS` (also ``examples/demo.json``), so the
demo runs offline and the same way every time; everything else is real. The agent
writes and runs a small program, runs a script that tries the network (the approval
policy lets it run; the sandbox's firewall and egress proxy block it, and their audit
lines land in the trace), then attempts a RED action (a package install) that the demo's
``green-only`` approval refuses; the timeline is printed at the end.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from ironclaw.agent.approval import ApprovalMode, Approver
from ironclaw.agent.gateway import ScriptedProvider
from ironclaw.agent.tasks import TaskOutcome, TaskSpec, run_task
from ironclaw.agent.trace import render_timeline
from ironclaw.host.manager import SandboxManager
from ironclaw.proto.methods import Budget

__all__ = ["DEMO_SANDBOX", "DEMO_TASK", "DEMO_TURNS", "run_agent_demo"]

DEMO_TASK = "Write and run a program that lists the primes below 50, then check the network."
# One allowed domain, so the sandbox gets the egress proxy (and its audit log).
DEMO_SANDBOX: dict[str, Any] = {
    "limits": {"memory_mib": 256, "pids": 128, "wall_time_s": 180},
    "network": {"allow_domains": ["pypi.org"]},
}
_PRIMES = (
    "def primes(n):\n"
    "    return [p for p in range(2, n) if all(p % d for d in range(2, int(p**0.5) + 1))]\n\n"
    "print(primes(50))\n"
)
# Both attempts stay on this machine: the proxy refuses example.com before any lookup,
# and the direct connection goes to the sandbox's own gateway (the host end of its
# veth), where the firewall drops it.
_FETCH = (
    "import os, socket, urllib.request\n"
    "try:\n"
    "    urllib.request.urlopen('http://example.com/', timeout=5)\n"
    "    print('example.com: reached')\n"
    "except Exception as e:\n"
    "    print('example.com via proxy:', e)\n"
    "gateway = os.environ['HTTP_PROXY'].split('//')[1].split(':')[0]\n"
    "try:\n"
    "    socket.create_connection((gateway, 22), timeout=2)\n"
    "    print(gateway + ':22: reached')\n"
    "except OSError as e:\n"
    "    print(gateway + ':22 direct:', e)\n"
)
DEMO_TURNS: list[dict[str, Any]] = [
    {
        "content": "I'll write the program first.",
        "tool_calls": [
            {"name": "files__write_file", "arguments": {"path": "primes.py", "content": _PRIMES}}
        ],
    },
    {"tool_calls": [{"name": "shell__run", "arguments": {"command": "python3 primes.py"}}]},
    {
        "content": "Now the network check.",
        "tool_calls": [
            {"name": "files__write_file", "arguments": {"path": "fetch.py", "content": _FETCH}},
            {"name": "shell__run", "arguments": {"command": "python3 fetch.py"}},
        ],
    },
    {
        "content": "The network is closed; I'll install a client library instead.",
        "tool_calls": [{"name": "shell__run", "arguments": {"command": "pip install requests"}}],
    },
    {"content": "primes.py prints the primes below 50; outbound network and installs are blocked."},
]


async def run_agent_demo(console: Console | None = None) -> tuple[int, TaskOutcome]:
    """Run the demo task; returns (exit status, outcome)."""
    console = console or Console()
    console.rule("[bold]IronClaw agent demo: a scripted model in a real sandbox")
    spec = TaskSpec(
        task=DEMO_TASK,
        model="scripted:demo",
        sandbox=DEMO_SANDBOX,
        budget=Budget(max_steps=10, wall_time_s=120, tool_timeout_s=30),
    )
    approver = Approver(mode=ApprovalMode.GREEN_ONLY)
    async with SandboxManager() as manager:
        with console.status("agent running…"):
            outcome = await run_task(
                manager, spec, provider=ScriptedProvider(DEMO_TURNS, model="demo"),
                approver=approver,
            )  # fmt: skip
    render_timeline(outcome.events, console)
    console.print(f"status [bold]{outcome.status}[/]; trace: ironclaw logs {outcome.sandbox_id}")
    return (0 if outcome.status == "completed" else 1), outcome
