"""The agent loop end to end in real sandboxes: scripted and HTTP models, real MCP servers."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from ironclaw.agent.approval import ApprovalMode, Approver
from ironclaw.agent.gateway import OpenAIProvider, ScriptedProvider
from ironclaw.agent.tasks import TaskSpec, run_task
from ironclaw.agent.trace import read_trace
from ironclaw.agent_demo import DEMO_TURNS
from ironclaw.host.manager import SandboxManager
from ironclaw.proto.methods import Budget
from test_gateway_http import FakeModelServer

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _events(outcome: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in outcome.events if e["event"] == kind]


async def test_scripted_task_reaches_real_mcp_servers_and_traces_everything(
    manager: SandboxManager,
) -> None:
    turns = [
        {"tool_calls": [{"name": "files__write_file",
                         "arguments": {"path": "a/n.txt", "content": "one\ntwo\n"}}]},
        {"tool_calls": [{"name": "files__edit_file", "arguments": {
            "path": "a/n.txt", "patch": "@@ -1,2 +1,2 @@\n one\n-two\n+2\n"}}]},
        {"tool_calls": [{"name": "shell__run", "arguments": {"command": "cat a/n.txt; id -u"}}]},
        {"tool_calls": [{"name": "python__run_python",
                         "arguments": {"code": "print(sum(range(10)))"}}]},
        {"tool_calls": [{"name": "files__list_dir", "arguments": {"path": "a"}}]},
        {"content": "all done"},
    ]  # fmt: skip
    provider = ScriptedProvider(turns)
    outcome = await run_task(
        manager, TaskSpec(task="edit a file"), provider=provider, keep=True,
        approver=Approver(mode=ApprovalMode.GREEN_ONLY),
    )  # fmt: skip
    assert outcome.status == "completed" and outcome.answer == "all done"
    results = _events(outcome, "tool.result")
    assert [r["is_error"] for r in results] == [False] * 5, results
    assert "one\n2\n1000" in results[2]["content"]  # real file, edited by a real patch, uid 1000
    assert "45" in results[3]["content"]
    assert '"name": "n.txt"' in results[4]["content"]
    # The side effect is in the sandbox, not faked: read it through the agent channel.
    assert await manager.read_file(outcome.sandbox_id, "a/n.txt") == b"one\n2\n"
    # The model saw the tool results it was fed back.
    last = provider.requests[-1]["messages"]
    assert last[-1]["role"] == "tool" and '"n.txt"' in last[-1]["content"]
    # Every event is in the trace on disk, in order, and survives in the state copy.
    disk = read_trace(outcome.trace_path)
    kinds = [e["event"] for e in disk]
    assert kinds[0] == "task.start" and kinds[-1] == "task.end"
    for kind, n in (
        ("model.request", 6),
        ("model.response", 6),
        ("tool.call", 5),
        ("tool.classified", 5),
        ("tool.decision", 5),
        ("tool.result", 5),
    ):
        assert kinds.count(kind) == n, (kind, kinds)  # fmt: skip
    assert [e["seq"] for e in disk] == list(range(1, len(disk) + 1))
    assert disk[-1]["usage"]["requests"] == 6 and disk[-1]["usage"]["total_tokens"] > 0
    run_copy = manager.settings.sandbox_runtime_dir(outcome.sandbox_id) / "trace.jsonl"
    assert read_trace(run_copy) == disk


async def test_red_call_under_never_and_green_only(manager: SandboxManager) -> None:
    turns = [
        {"tool_calls": [{"name": "shell__run", "arguments": {"command": "echo hi > green.txt"}}]},
        {"tool_calls": [{"name": "files__delete_file", "arguments": {"path": "green.txt"}}]},
        {"content": "ok"},
    ]
    # green-only: the GREEN call runs without a prompt, the RED deletion is refused.
    asked: list[str] = []

    async def prompt(req: Any) -> bool:
        asked.append(req.name)
        return True

    green_only = Approver(mode="green-only", prompt=prompt)
    out = await run_task(manager, TaskSpec(task="t"), provider=ScriptedProvider(turns),
                         approver=green_only, keep=True)  # fmt: skip
    assert asked == []
    assert await manager.read_file(out.sandbox_id, "green.txt") == b"hi\n"  # RED never ran
    results = _events(out, "tool.result")
    assert results[0]["executed"] and not results[0]["is_error"]
    assert not results[1]["executed"] and "refused" in results[1]["content"]
    decision = _events(out, "tool.decision")[1]
    assert decision["color"] == "RED" and "--- a/green.txt" in decision["card"]

    # never: the RED call never executes and the model is told so.
    provider = ScriptedProvider(
        [{"tool_calls": [{"name": "shell__run", "arguments": {"command": "rm -f /workspace/x; "
                                                              "touch /workspace/red"}}]},
         {"content": "gave up"}]
    )  # fmt: skip
    out = await run_task(manager, TaskSpec(task="t"), provider=provider,
                         approver=Approver(mode=ApprovalMode.NEVER), keep=True)  # fmt: skip
    listing = await (await manager.guest(out.sandbox_id)).list(".")
    assert "red" not in {e.name for e in listing}
    fed_back = provider.requests[-1]["messages"][-1]
    assert fed_back["is_error"] and "refused" in fed_back["content"]


async def test_api_decision_approves_a_red_call_later(manager: SandboxManager) -> None:
    approver = Approver(mode="prompt", api=True)
    turns = [
        {"tool_calls": [{"name": "files__write_file",
                         "arguments": {"path": "/tmp/outside.txt", "content": "x"}}]},
        {"content": "done"},
    ]  # fmt: skip
    task = asyncio.ensure_future(
        run_task(
            manager,
            TaskSpec(task="t"),
            provider=ScriptedProvider(turns),
            approver=approver,
            keep=True,
        )
    )
    async with asyncio.timeout(30):
        while not approver.pending():
            await asyncio.sleep(0.02)
    req = approver.pending()[0]
    assert req.classification.color == "RED" and "+x" in req.card
    approver.decide(req.id, True)
    out = await asyncio.wait_for(task, 60)
    assert await manager.read_file(out.sandbox_id, "/tmp/outside.txt") == b"x"


async def test_budget_stops_a_looping_model(manager: SandboxManager) -> None:
    looping = ScriptedProvider(
        [{"tool_calls": [{"name": "shell__run", "arguments": {"command": "echo again"}}]}],
        loop=True,
    )
    out = await run_task(manager, TaskSpec(task="loop", budget=Budget(max_steps=3)),
                         provider=looping, approver=Approver(mode="green-only"))  # fmt: skip
    assert (out.status, out.reason, out.steps) == ("budget_exceeded", "max_steps", 3)
    end = read_trace(out.trace_path)[-1]
    assert end["event"] == "task.end" and end["status"] == "budget_exceeded"
    assert end["reason"] == "max_steps"

    tokens = ScriptedProvider(
        [{"tool_calls": [{"name": "shell__run", "arguments": {"command": "true"}}],
          "usage": {"input_tokens": 600, "output_tokens": 10}}], loop=True,
    )  # fmt: skip
    out = await run_task(manager, TaskSpec(task="loop", budget=Budget(max_tokens=1000)),
                         provider=tokens, approver=Approver(mode="green-only"))  # fmt: skip
    assert (out.status, out.reason, out.steps) == ("budget_exceeded", "max_tokens", 2)

    slow = ScriptedProvider(
        [{"tool_calls": [{"name": "shell__run", "arguments": {"command": "sleep 30"}}]}],
        loop=True,
    )
    # Room for the MCP servers to start (about 2 s, more on a loaded machine) and then
    # for several tool calls to hit their 1 s timeout before the wall-time budget ends.
    spec = TaskSpec(task="slow", budget=Budget(wall_time_s=9, tool_timeout_s=1))
    out = await run_task(manager, spec, provider=slow, approver=Approver(mode="all"))
    assert out.status == "budget_exceeded" and out.reason == "wall_time"
    results = [e for e in out.events if e["event"] == "tool.result"]
    assert results and all("timed out" in r["content"] for r in results)


async def test_openai_http_and_credential_isolation(
    manager: SandboxManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-ironclaw-test-" + secrets.token_hex(16)
    dump = "cat /proc/*/environ /proc/*/cmdline > procdump 2>/dev/null; echo dumped"
    responses = [
        {"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant",
            "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "shell__run", "arguments": json.dumps({"command": dump})}}]}}],
         "usage": {"prompt_tokens": 11, "completion_tokens": 7}},
        {"choices": [{"finish_reason": "stop", "message": {"role": "assistant",
                                                           "content": "done"}}],
         "usage": {"prompt_tokens": 20, "completion_tokens": 3}},
    ]  # fmt: skip
    async with FakeModelServer(responses) as server:
        monkeypatch.setenv("OPENAI_API_KEY", key)
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        provider = OpenAIProvider("gpt-4o-mini")
        out = await run_task(manager, TaskSpec(task="dump"), provider=provider, keep=True,
                             approver=Approver(mode="green-only"))  # fmt: skip
    assert out.status == "completed", out
    # The gateway really spoke HTTP with the key; the model saw the tool result.
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 2
    assert all(r["headers"].get("authorization") == f"Bearer {key}" for r in server.requests)
    second = server.requests[1]["body"]["messages"]
    assert second[-1]["role"] == "tool" and "dumped" in second[-1]["content"]
    assert out.usage["input_tokens"] == 31 and out.usage["cost_usd"] is not None
    # Search the sandbox for the key: every process's environ and cmdline (dumped while
    # the MCP servers were alive, and again now), and every writable file. The key goes
    # in on stdin, never on a command line.
    search = (
        "import os, sys\nkey = sys.stdin.read().encode()\nhits = []\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    for f in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            if key in open(f'/proc/{pid}/{f}', 'rb').read(): hits.append(pid + f)\n"
        "        except OSError: pass\n"
        "for root in ('/workspace', '/tmp', '/etc', '/opt'):\n"
        "    for d, _, files in os.walk(root):\n"
        "        for n in files:\n"
        "            try:\n"
        "                if key in open(os.path.join(d, n), 'rb').read(): hits.append(n)\n"
        "            except OSError: pass\n"
        "print('HITS', hits, os.path.getsize('/workspace/procdump') > 0)\n"
    )
    r = await manager.exec(out.sandbox_id, ["python3", "-c", search], stdin=key.encode(),
                           timeout=30)  # fmt: skip
    assert r.stdout.decode().strip() == "HITS [] True", r.stdout + r.stderr
    # Nothing the guest received (model turns, decisions) carried it either.
    assert key not in Path(out.trace_path).read_text()


def test_demo_turns_file_matches_the_module() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "demo.json"
    assert json.loads(path.read_text())["turns"] == DEMO_TURNS
