"""Credentialed tools run on the host: the agent uses them, the sandbox never sees the secret.

A real MCP server (``host_secret_server.py``, the official SDK) runs on the host with a
random secret in its environment. The agent, scripted, in a real sandbox, calls its GREEN
``whoami`` (answer derived from the secret), its careless ``leak`` (the host redacts),
searches its whole sandbox for the secret (nothing), and calls the RED ``delete_repo``,
which waits for an API decision: denied, the host-side marker file never appears;
approved, it does. A unit layer drives the same server without a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw.agent.approval import ApprovalMode, ApprovalPolicy, Approver, Color, Rule
from ironclaw.agent.gateway import ScriptedProvider
from ironclaw.agent.host_tools import (
    HostServerSpec,
    HostTools,
    load_host_tools,
    parse_host_mcp,
)
from ironclaw.agent.tasks import TaskSpec, run_task
from ironclaw.errors import ConfigError, ProtocolError
from ironclaw.guest.agent_loop import AgentLoop, ToolCall
from ironclaw.host.manager import SandboxManager
from ironclaw.proto.host_tools_methods import (
    HOSTTOOLS_CALL,
    HOSTTOOLS_LIST,
    HostToolsCallRequest,
    HostToolsCallResult,
    HostToolsListRequest,
    HostToolsListResult,
)
from ironclaw.proto.methods import AgentRunRequest
from ironclaw.rpc import CallContext, Peer
from ironclaw.transport import unix

SERVER = Path(__file__).with_name("host_secret_server.py")
DELETE = "host__secretsrv__delete_repo"


def derived(secret: str) -> str:
    return "user-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@pytest.fixture
def secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "IRONCLAW_TEST_SECRET": "tok-" + secrets.token_hex(16),
        "IRONCLAW_TEST_MARKER": str(tmp_path / "deleted.txt"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def server_spec(**extra: Any) -> HostServerSpec:
    return HostServerSpec.from_json(
        {"name": "secretsrv", "command": sys.executable, "args": [str(SERVER)],
         "env": ["IRONCLAW_TEST_SECRET", "IRONCLAW_TEST_MARKER"], **extra}
    )  # fmt: skip


def req(tool: str, args: dict[str, Any] | None = None) -> HostToolsCallRequest:
    return HostToolsCallRequest("c1", f"host__secretsrv__{tool}", args or {}, 10.0)


# -- the agent in a real sandbox ------------------------------------------------------------

# Run inside the sandbox by the agent's python tool. The secret is given in two halves
# (never whole on a command line or in a file); a canary written to the workspace shows
# that the same search does find what is there. /usr is the host's read-only /usr (only
# /usr/local is searched: the agent runtime lives there).
SEARCH = """
import os
key = ({a!r} + {b!r}).encode()
canary = ({c!r} + {d!r}).encode()
with open('/workspace/canary.txt', 'wb') as f:
    f.write(b'<' + canary + b'>')
hits, scanned = {{'key': [], 'canary': []}}, 0
def check(path, data):
    for name, needle in (('key', key), ('canary', canary)):
        if needle in data:
            hits[name].append(path)
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    for f in ('environ', 'cmdline'):
        try:
            data = open('/proc/%s/%s' % (pid, f), 'rb').read()
        except OSError:
            continue
        scanned += 1
        check('/proc/%s/%s' % (pid, f), data)
roots = ['/' + n for n in os.listdir('/') if n not in ('proc', 'sys', 'dev', 'usr')]
for root in [r for r in roots if not os.path.islink(r)] + ['/usr/local']:
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            try:
                if os.path.islink(p) or os.path.getsize(p) > 64 << 20:
                    continue
                data = open(p, 'rb').read()
            except OSError:
                continue
            scanned += 1
            check(p, data)
print('SCAN', scanned > 100, sorted(hits['key']), sorted(hits['canary']))
"""


def _results(outcome: Any) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in outcome.events if e["event"] == "tool.result"}


async def _run_until_pending(
    manager: SandboxManager, spec: TaskSpec, provider: ScriptedProvider, approver: Approver
) -> tuple[asyncio.Future[Any], Any]:
    task = asyncio.ensure_future(
        run_task(manager, spec, provider=provider, approver=approver, keep=True)
    )
    async with asyncio.timeout(60):
        while not approver.pending():
            if task.done():
                pytest.fail(f"the task ended without asking: {task.result()}")
            await asyncio.sleep(0.02)
    return task, approver.pending()[0]


@pytest.mark.root
@pytest.mark.timeout(180)
async def test_agent_uses_host_tool_secret_stays_out_red_call_denied(
    manager: SandboxManager, secret_env: dict[str, str]
) -> None:
    token, marker = secret_env["IRONCLAW_TEST_SECRET"], Path(secret_env["IRONCLAW_TEST_MARKER"])
    half = len(token) // 2
    canary = "canary-" + secrets.token_hex(8)
    code = SEARCH.format(a=token[:half], b=token[half:], c=canary[:9], d=canary[9:])
    turns: list[dict[str, Any]] = [
        {"tool_calls": [{"name": "host__secretsrv__whoami", "arguments": {}}]},
        {"tool_calls": [{"name": "host__secretsrv__leak", "arguments": {}}]},
        {"tool_calls": [{"name": "python__run_python", "arguments": {"code": code}}]},
        {"tool_calls": [{"name": DELETE, "arguments": {"repo": "acme/widgets"}}]},
        {"content": "done"},
    ]
    provider = ScriptedProvider(turns)
    approver = Approver(mode=ApprovalMode.PROMPT, api=True)
    spec = TaskSpec(task="t", host_tools=[server_spec(green=["whoami", "leak"])])
    task, pending = await _run_until_pending(manager, spec, provider, approver)
    # The RED call is held on the host: nothing ran yet, the reviewer sees the call.
    assert pending.name == DELETE and pending.classification.color == "RED"
    assert "acme/widgets" in pending.card
    assert not task.done() and not marker.exists()
    approver.decide(pending.id, False)
    out = await asyncio.wait_for(task, 60)
    assert out.status == "completed" and out.answer == "done", out

    results = _results(out)
    # The agent used the credential: the answer is derived from the secret.
    assert results["host__secretsrv__whoami"]["content"] == derived(token)
    assert results["host__secretsrv__whoami"]["executed"]
    leak = results["host__secretsrv__leak"]["content"]
    assert "[redacted]" in leak and token not in leak
    # The search inside the sandbox ran over /proc and the filesystem, found the canary
    # it planted and not the secret.
    search = results["python__run_python"]["content"]
    assert "SCAN True [] ['/workspace/canary.txt']" in search, search
    # Denied: the server never ran it (the marker is written on the host by the server).
    denied = results[DELETE]
    assert not denied["executed"] and "refused" in denied["content"], denied
    assert not marker.exists()
    decisions = [e for e in out.events if e["event"] == "tool.decision"]
    assert [d["decided_by"] for d in decisions] == ["policy", "policy", "policy", "api"]
    # Nothing the guest sent or received carries the secret: every model request (tool
    # schemas, tool results) and the whole trace.
    assert "host__secretsrv__whoami" in {t["name"] for t in provider.requests[0]["tools"]}
    assert token not in json.dumps(provider.requests)
    assert token not in Path(out.trace_path).read_text()


@pytest.mark.root
@pytest.mark.timeout(180)
async def test_red_host_call_runs_once_approved(
    manager: SandboxManager, secret_env: dict[str, str]
) -> None:
    marker = Path(secret_env["IRONCLAW_TEST_MARKER"])
    turns: list[dict[str, Any]] = [
        {"tool_calls": [{"name": DELETE, "arguments": {"repo": "acme/widgets"}}]},
        {"content": "done"},
    ]
    approver = Approver(mode=ApprovalMode.PROMPT, api=True)
    spec = TaskSpec(task="t", host_tools=[server_spec()])
    task, pending = await _run_until_pending(manager, spec, ScriptedProvider(turns), approver)
    assert not marker.exists()
    approver.decide(pending.id, True)
    out = await asyncio.wait_for(task, 60)
    assert out.status == "completed", out
    assert marker.read_text() == "acme/widgets\n"
    result = _results(out)[DELETE]
    assert result["executed"] and result["content"] == "deleted acme/widgets"
    # The host's rules for this task are gone with it.
    assert approver.policy.rules == []


# -- the host side without a sandbox ------------------------------------------------------


async def test_host_tools_decide_redact_and_bound(secret_env: dict[str, str]) -> None:
    token, marker = secret_env["IRONCLAW_TEST_SECRET"], Path(secret_env["IRONCLAW_TEST_MARKER"])
    approver = Approver(mode="green-only")
    spec = server_spec(green=["whoami", "leak", "b*"])
    async with HostTools([spec], approver, max_result_chars=100) as host:
        listing = HostToolsListResult.from_json(await host.handle_list({}, None))  # type: ignore[arg-type]
        names = {t.name for t in listing.tools}
        assert names == {f"host__secretsrv__{n}" for n in ("whoami", "delete_repo", "leak", "big")}
        assert token not in json.dumps(listing.to_json())
        ok = await host.call(req("whoami"))
        assert (ok.content, ok.executed, ok.color) == (derived(token), True, "GREEN")
        assert (await host.call(req("leak"))).content == "token=[redacted] (do not share)"
        big = await host.call(req("big", {"n": 500}))
        assert big.content.startswith("x" * 100) and big.content.endswith("[... 400 chars cut]")
        red = await host.call(req("delete_repo", {"repo": "r"}))
        assert (red.executed, red.is_error, red.color) == (False, True, "RED")
        assert not marker.exists()
        unknown = await host.call(req("nope"))
        assert unknown.is_error and not unknown.executed
    assert approver.policy.rules == []


async def test_user_rules_come_before_host_green_marks(secret_env: dict[str, str]) -> None:
    policy = ApprovalPolicy(rules=[Rule("host__*", Color.RED)])
    approver = Approver(policy, mode="green-only")
    async with HostTools([server_spec(green=["*"])], approver) as host:
        refused = await host.call(req("whoami"))
        assert not refused.executed and refused.color == "RED"
        assert len(approver.policy.rules) == 5  # the user's rule, then one per tool
    assert len(approver.policy.rules) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _http_server(port: int) -> AsyncIterator[None]:
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port)])
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


async def test_streamable_http_server_with_a_secret_header(
    secret_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, port = secret_env["IRONCLAW_TEST_SECRET"], _free_port()
    spec = HostServerSpec.from_json(
        {"name": "secretsrv", "url": f"http://127.0.0.1:{port}/mcp",
         "headers": {"Authorization": "Bearer ${IRONCLAW_TEST_SECRET}"}, "green": ["whoami"]}
    )  # fmt: skip
    async with _http_server(port):
        async with HostTools([spec], Approver(mode="green-only")) as host:
            assert (await host.call(req("whoami"))).content == derived(token)
            assert (await host.call(req("leak"))).color == "RED"
        # A wrong credential: the server refuses and the task cannot start.
        bad = HostTools([spec], Approver(), environ={"IRONCLAW_TEST_SECRET": "wrong-token"})
        with pytest.raises(ConfigError, match="did not start"):
            await bad.start()


def test_specs_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IRONCLAW_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"needs \$IRONCLAW_TEST_SECRET"):
        server_spec().resolve({})
    with pytest.raises(ConfigError, match=r"needs \$IRONCLAW_TEST_SECRET"):
        HostTools([server_spec()], Approver())  # before any server or sandbox starts
    for bad in (
        {"name": "a__b", "command": "x"},
        {"name": "a", "command": "x", "url": "http://h/"},
        {"name": "a"},
        {"name": "a", "command": "x", "secret": "inline"},
        {"name": "a", "command": "x", "env": ["NOT-A-NAME"]},
        {"name": "a", "url": "ftp://h/"},
        {"name": "a", "command": "x", "headers": {"A": "b"}},
    ):
        with pytest.raises(ConfigError):
            HostServerSpec.from_json(bad)
    yml = tmp_path / "tools.yaml"
    yml.write_text("servers:\n  - name: gh\n    command: gh-mcp\n    env: [GH_TOKEN]\n"
                   "    green: [get_*]\n")  # fmt: skip
    (spec,) = load_host_tools(yml)
    assert (spec.name, spec.command, spec.env, spec.green) == ("gh", "gh-mcp", ("GH_TOKEN",),
                                                              ("get_*",))  # fmt: skip
    js = tmp_path / "tools.json"
    js.write_text(json.dumps({"servers": [{"name": "a", "command": "x"}] * 2}))
    with pytest.raises(ConfigError, match="share a name"):
        load_host_tools(js)
    assert parse_host_mcp("pg=pg-mcp --db 'a b'").args == ("--db", "a b")
    with pytest.raises(ConfigError):
        parse_host_mcp("no-name-here")


def test_methods_decode_strictly() -> None:
    call = HostToolsCallRequest("c", "host__a__b", {"x": [1]}, 2)
    bad: Any
    assert HostToolsCallRequest.from_json(call.to_json()) == call
    for bad in (
        {**call.to_json(), "env": {}},
        {k: v for k, v in call.to_json().items() if k != "timeout_s"},
        {**call.to_json(), "timeout_s": True},
        {**call.to_json(), "timeout_s": -1},
        {**call.to_json(), "arguments": []},
        {**call.to_json(), "name": 3},
        [],
    ):
        with pytest.raises(ConfigError):
            HostToolsCallRequest.from_json(bad)
    with pytest.raises(ConfigError):
        HostToolsListRequest.from_json({"all": True})
    result = HostToolsCallResult("t", False, True, "GREEN", "r")
    assert HostToolsCallResult.from_json(result.to_json()) == result
    for bad_result in (
        {**result.to_json(), "executed": "yes"},
        {**result.to_json(), "color": "BLUE"},
        {**result.to_json(), "extra": 1},
    ):
        with pytest.raises(ProtocolError):
            HostToolsCallResult.from_json(bad_result)
    tool = {"name": "host__a__b", "description": "", "input_schema": {}}
    with pytest.raises(ProtocolError, match="share a name"):
        HostToolsListResult.from_json({"tools": [tool, tool]})
    with pytest.raises(ProtocolError):
        HostToolsListResult.from_json({"tools": [{**tool, "input_schema": "{}"}]})


async def test_over_the_channel_guest_loop_and_a_hostile_caller(
    secret_env: dict[str, str],
) -> None:
    """The guest loop's side over a real socketpair; a malformed call is refused whole."""
    token, marker = secret_env["IRONCLAW_TEST_SECRET"], Path(secret_env["IRONCLAW_TEST_MARKER"])
    a, b = socket.socketpair()
    host = Peer(unix.from_socket(a, initiator=True), name="host")
    guest = Peer(unix.from_socket(b, initiator=False), name="guest")
    await host.start()
    await guest.start()
    loop = AgentLoop(AgentRunRequest(task="t"), guest, workdir="/")
    events: list[Any] = []

    async def agent_event(params: Any, ctx: CallContext) -> dict[str, Any]:
        events.append(params)
        return {"ok": True}

    host.register("agent.event", agent_event)
    try:
        # A host without host tools: the loop offers none and goes on.
        assert await loop._list_host_tools() == [] and loop.host_tools == frozenset()
        async with HostTools([server_spec(green=["whoami"])], Approver(mode="green-only")) as tools:
            host.register(HOSTTOOLS_LIST, tools.handle_list)
            host.register(HOSTTOOLS_CALL, tools.handle_call)
            offered = await loop._list_host_tools()
            assert "host__secretsrv__whoami" in {t["name"] for t in offered}
            assert token not in json.dumps(offered)
            deadline = asyncio.get_running_loop().time() + 30
            ok = await loop._host_call(ToolCall("1", "host__secretsrv__whoami", {}), deadline)
            assert (ok.content, ok.is_error) == (derived(token), False)
            red = await loop._host_call(ToolCall("2", DELETE, {"repo": "r"}), deadline)
            assert red.is_error and "refused" in red.content
            # A guest that smuggles an extra field (or skips the loop) gets invalid params.
            bad = {**req("delete_repo", {"repo": "r"}).to_json(), "approved": True}
            with pytest.raises(ConfigError, match="unknown field"):
                await guest.call(HOSTTOOLS_CALL, bad)
        assert not marker.exists()
        assert [(e["name"], e["executed"]) for e in events] == [
            ("host__secretsrv__whoami", True), (DELETE, False)
        ]  # fmt: skip
    finally:
        await guest.aclose()
        await host.aclose()
