"""The HTTP API against a real ``ironclaw serve`` on a loopback port, with real sandboxes:
lifecycle, streaming exec with stdin, auth, quotas, problem details, SSE, approvals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from apiserver import SRC, Server, serve, start_server
from ironclaw.client import ApiClient, Sandbox, SyncSandbox
from ironclaw.config import Settings
from ironclaw.errors import (
    AuthError,
    ConfigError,
    NotFound,
    QuotaExceeded,
    RpcError,
    SandboxNotFound,
    ScopeError,
)

pytestmark = pytest.mark.root


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_lifecycle_through_the_remote_sdk(server: Server) -> None:
    token = server.token("read", "write")
    spec = {"limits": {"memory_mib": 256}, "labels": {"team": "x"}}
    async with Sandbox.create(spec, sandbox_id="api-life", api_url=server.url, token=token) as sb:
        assert sb.id == "api-life" and sb.backend == "namespace"
        assert (await sb.ping())["uid"] == 1000
        result = await sb.exec(["python3", "-c", "import sys; print(6 * 7); sys.exit(3)"])
        assert (result.exit_code, result.stdout) == (3, b"42\n")
        fed = await sb.exec(["cat"], stdin=b"\x00\xffbinary")
        assert fed.stdout == b"\x00\xffbinary"
        assert await sb.files.write("notes/a.txt", "hello") == 5
        assert await sb.files.read("notes/a.txt") == b"hello"
        assert [e["name"] for e in await sb.files.list("notes")] == ["a.txt"]
        assert (await sb.files.stat("notes/a.txt"))["size"] == 5
        await sb.files.remove("notes", recursive=True)
        assert await sb.files.list(".") == []
        async with ApiClient(server.url, token) as api:
            listed = await api.list_sandboxes(state="running")
            assert [d["id"] for d in listed] == ["api-life"]
            assert await api.list_sandboxes(state="dead") == []
            labelled = await api.list_sandboxes(state="running", labels={"team": "x"})
            assert [d["id"] for d in labelled] == ["api-life"]
            assert await api.list_sandboxes(labels={"team": "y"}) == []
            with pytest.raises(ConfigError, match="KEY=VALUE"):
                await api.request("GET", "/v1/sandboxes", params={"label": "novalue"})
    async with ApiClient(server.url, token) as api:
        with pytest.raises(SandboxNotFound):
            await api.get("api-life")
    assert not server.settings.sandbox_runtime_dir("api-life").exists()


def test_the_sync_sdk_and_the_in_process_sdk_entry_point(server: Server) -> None:
    token = server.token("read", "write")
    with SyncSandbox.create(api_url=server.url, token=token) as sb:
        assert sb.exec(["echo", "sync"]).stdout == b"sync\n"
        sb.files.write("x.bin", b"\x01\x02")
        assert sb.files.read("x.bin") == b"\x01\x02"
        sid = sb.id
    with pytest.raises(SandboxNotFound):
        SyncSandbox.connect(sid, api_url=server.url, token=token)

    from ironclaw.sdk import Sandbox as LocalSandbox

    async def via_sdk() -> bytes:
        async with LocalSandbox.create(api_url=server.url, token=token) as remote:
            return (await remote.exec(["uname", "-s"])).stdout

    assert asyncio.run(via_sdk()) == b"Linux\n"


async def test_websocket_exec_streams_output_and_takes_stdin_while_running(
    server: Server,
) -> None:
    token = server.token("read", "write")
    script = "while read line; do echo got:$line; echo err:$line >&2; done; echo bye"
    async with Sandbox.create(api_url=server.url, token=token) as sb:
        lines: asyncio.Queue[bytes] = asyncio.Queue()
        errs = bytearray()

        async def stdin() -> AsyncIterator[bytes]:
            yield b"one\n"
            # The second line is sent only once the first one's output came back: the
            # command is running with its stdin open, not fed a buffer up front.
            assert await asyncio.wait_for(lines.get(), 30) == b"got:one\n"
            yield b"two\n"
            assert await asyncio.wait_for(lines.get(), 30) == b"got:two\n"

        result = await sb.api.exec_stream(
            sb.id,
            ["sh", "-c", script],
            stdin=stdin(),
            on_stdout=lines.put,
            on_stderr=lambda c: errs.extend(c),
        )
        assert result.exit_code == 0
        assert result.stdout == b"got:one\ngot:two\nbye\n"
        assert bytes(errs) == result.stderr == b"err:one\nerr:two\n"
        # The SDK's own exec streams over the WebSocket when given sinks.
        chunks: list[bytes] = []
        res = await sb.exec(
            ["sh", "-c", "echo a; sleep 0.2; echo b"], on_stdout=chunks.append, capture=False
        )
        assert b"".join(chunks) == b"a\nb\n" and res.stdout == b"" and res.stdout_bytes == 4
        # A client that goes away mid-command takes the command with it (killed).
        async with sb.api._ws(sb.id) as ws:
            await ws.send(
                json.dumps({"argv": ["sh", "-c", "echo up; exec sleep 1000"], "stdin": False})
            )
            assert await ws.recv() == b"\x01up\n"
        ps = ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]
        async with asyncio.timeout(30):
            while b"sleep 1000" in (await sb.exec(ps)).stdout:
                await asyncio.sleep(0.1)


async def test_auth_failures_scopes_and_other_tokens_sandboxes(server: Server) -> None:
    writer, reader = server.token("read", "write"), server.token("read")
    other, admin = server.token("read", "write"), server.token("admin")
    async with httpx.AsyncClient(base_url=server.url) as http:
        for headers in (
            {},
            _auth("icw_nope"),
            _auth("icw_000000000000_wrong"),
            {"Authorization": f"Basic {writer}"},
        ):
            resp = await http.get("/v1/sandboxes", headers=headers)
            assert resp.status_code == 401, headers
            assert resp.headers["content-type"] == "application/problem+json"
            assert resp.headers["www-authenticate"] == "Bearer"
            assert resp.json()["error"] == "AuthError"
        assert (await http.get("/healthz")).json()["status"] == "ok"
        resp = await http.post("/v1/sandboxes", json={}, headers=_auth(reader))
        assert resp.status_code == 403 and resp.json()["error"] == "ScopeError"
        assert "write" in resp.json()["detail"]
        assert (await http.get("/v1/sandboxes", headers=_auth(reader))).json() == []

    async with ApiClient(server.url, writer) as mine, ApiClient(server.url, other) as theirs:
        await mine.create(sandbox_id="api-mine")
        with pytest.raises(SandboxNotFound):
            await theirs.get("api-mine")
        with pytest.raises(SandboxNotFound):
            await theirs.exec("api-mine", ["true"])
        with pytest.raises(SandboxNotFound):
            await theirs.delete("api-mine")
        with pytest.raises(SandboxNotFound):
            await theirs.exec_stream("api-mine", ["true"])
        assert await theirs.list_sandboxes() == []
        async with ApiClient(server.url, admin) as root:
            owner = (await mine.get("api-mine"))["owner"]
            assert [d["owner"] for d in await root.list_sandboxes()] == [owner]
        async with ApiClient(server.url, reader) as ro:
            with pytest.raises(ScopeError):
                await ro.delete("api-mine")
        assert (await mine.get("api-mine"))["state"] == "running"
        await mine.delete("api-mine")
    async with ApiClient(server.url, "icw_x_y") as bad:
        with pytest.raises(AuthError):
            await bad.list_sandboxes()
    # A revoked token stops working at once.
    out = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", "token", "create", "--scope", "read", "--json"],
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    doc = json.loads(out.stdout)
    listed = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", "token", "ls", "--json"],
        capture_output=True, check=True, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    rows = {r["id"]: r for r in json.loads(listed.stdout)["tokens"]}
    assert rows[doc["id"]]["scopes"] == ["read"] and not rows[doc["id"]]["revoked"]
    assert doc["token"] not in listed.stdout.decode()  # never shown again
    async with ApiClient(server.url, doc["token"]) as fresh:
        assert await fresh.list_sandboxes() == []
        subprocess.run(
            [sys.executable, "-m", "ironclaw.cli", "token", "revoke", doc["id"]],
            check=True,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        with pytest.raises(AuthError, match="revoked"):
            await fresh.list_sandboxes()
    listed = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", "token", "ls", "--json"],
        capture_output=True, check=True, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert {r["id"]: r["revoked"] for r in json.loads(listed.stdout)["tokens"]}[doc["id"]]


async def test_quotas_on_sandboxes_and_memory(server: Server) -> None:
    token = server.token("read", "write", max_sandboxes=2, max_memory_mib=600)
    async with ApiClient(server.url, token) as api:
        await api.create({"limits": {"memory_mib": 256}}, sandbox_id="api-q1")
        with pytest.raises(QuotaExceeded, match="memory quota is 600 MiB"):
            await api.create({"limits": {"memory_mib": 512}}, sandbox_id="api-q2")
        await api.create({"limits": {"memory_mib": 128}}, sandbox_id="api-q2")
        with pytest.raises(QuotaExceeded, match="may own 2 sandbox"):
            await api.create({"limits": {"memory_mib": 16}}, sandbox_id="api-q3")
        assert sorted(d["id"] for d in await api.list_sandboxes()) == ["api-q1", "api-q2"]
        await api.delete("api-q1")  # frees quota
        await api.create({"limits": {"memory_mib": 256}}, sandbox_id="api-q3")
        for sid in ("api-q2", "api-q3"):
            await api.delete(sid)


async def test_problem_details_for_bad_input_change_nothing(server: Server) -> None:
    token = server.token("read", "write", "approve")
    async with httpx.AsyncClient(base_url=server.url, headers=_auth(token)) as http:
        resp = await http.post("/v1/sandboxes", json={"spec": {"limits": {"memory_mib": 1}}})
        assert resp.status_code == 400
        doc = resp.json()
        assert doc["type"] == "/problems/bad-request" and doc["status"] == 400
        assert doc["error"] == "ConfigError" and "memory_mib" in doc["detail"]
        resp = await http.post("/v1/sandboxes", json={"id": "Bad_Id"})
        assert resp.status_code == 422 and resp.json()["title"] == "invalid request"
        resp = await http.post(
            "/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert resp.status_code == 422
        resp = await http.post(
            "/v1/sandboxes", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
        )
        assert resp.status_code == 413 and resp.json()["error"] == "BodyTooLarge"
        resp = await http.get("/v1/sandboxes/nope-nope")
        assert resp.status_code == 404 and resp.json()["error"] == "SandboxNotFound"
        resp = await http.get("/v1/tasks/t0")
        assert resp.status_code == 404 and resp.json()["error"] == "NotFound"
        assert (await http.get("/v1/sandboxes")).json() == []  # nothing was created
    async with ApiClient(server.url, token) as api:
        await api.create(sandbox_id="api-pd")
        with pytest.raises(RpcError) as info:
            await api.read_file("api-pd", "missing.txt")
        assert info.value.code == -32050 and "missing.txt" in info.value.message
        with pytest.raises(ConfigError):
            await api.exec("api-pd", [])
        with pytest.raises(ConfigError, match="at most 255 bytes"):
            await api.stat("api-pd", "d/" + "n" * 300)
        with pytest.raises(ConfigError, match="already exists"):
            await api.create(sandbox_id="api-pd")
        with pytest.raises(NotFound):
            await api.decide("t1.a1", True)
        big = b"y" * (3 << 20)
        assert await api.write_file("api-pd", "big.bin", big) == len(big)  # uploads exempt
        await api.delete("api-pd")
    resp = httpx.get(f"{server.url}/metrics", headers=_auth(token))
    assert resp.status_code == 200
    # Counted under the route template, never the raw path (ids would be unbounded).
    assert 'route="/v1/sandboxes/{sandbox_id}",status="404"} 1.0' in resp.text
    assert 'method="POST",route="unmatched",status="413"} 1.0' in resp.text  # refused early
    assert "nope-nope" not in resp.text
    assert "ironclaw_api_sandboxes_created_total 1.0" in resp.text


RED_TURNS = [
    {
        "tool_calls": [
            {
                "name": "files__write_file",
                "arguments": {"path": "/tmp/outside.txt", "content": "approved"},
            }
        ]
    },
    {"tool_calls": [{"name": "shell__run", "arguments": {"command": "rm -f /workspace/keep"}}]},
    {"content": "done"},
]


async def test_agent_task_holds_a_red_call_until_approved_over_the_api(server: Server) -> None:
    # The owner cannot approve (no scope); a token with `approve` but not the owner's
    # cannot see the task; an admin (all scopes, every token's tasks) decides.
    owner, approver_tok = server.token("read", "write"), server.token("admin")
    stranger = server.token("read", "write", "approve")
    async with ApiClient(server.url, owner) as api, ApiClient(server.url, approver_tok) as ok:
        task = await api.start_task("write outside", script=RED_TURNS, keep=True)
        assert task["status"] == "running"
        events: list[dict[str, object]] = []

        async def follow() -> None:
            async for event in api.events(task["id"]):
                events.append(event)

        follower = asyncio.ensure_future(follow())
        async with asyncio.timeout(60):
            while not (pending := await api.approvals()):
                await asyncio.sleep(0.1)
        [held] = pending
        assert held["task_id"] == task["id"] and held["color"] == "RED"
        assert "+approved" in held["card"] and "outside the workspace" in held["reason"]
        async with ApiClient(server.url, stranger) as other:
            assert await other.approvals() == []  # another token's task is not listed
            with pytest.raises(NotFound):
                await other.decide(held["id"], True)
        with pytest.raises(ScopeError):
            await api.decide(held["id"], True)  # the owner lacks the approve scope
        assert (await api.task(task["id"]))["status"] == "running"
        await ok.decide(held["id"], True)
        async with asyncio.timeout(60):
            while not (pending := await ok.approvals()):
                await asyncio.sleep(0.1)
        assert "rm -f" in pending[0]["card"]
        await ok.decide(pending[0]["id"], False)
        await asyncio.wait_for(follower, 60)
        done = await api.task(task["id"])
        assert done["status"] == "completed" and done["answer"] == "done"
        assert await api.read_file(task["sandbox_id"], "/tmp/outside.txt") == b"approved"
        names = [e["event"] for e in events]
        assert names[0] == "task.start" and names[-1] == "task.end"
        decisions = [e for e in events if e["event"] == "tool.decision"]
        assert [(d["approved"], d["decided_by"]) for d in decisions] == [
            (True, "api"),
            (False, "api"),
        ]
        # A late subscriber still gets the whole trace, from the start.
        replay = [e["event"] async for e in api.events(task["id"])]
        assert replay == names
        await api.delete(task["sandbox_id"])


async def test_cancel_a_task_waiting_for_approval(server: Server) -> None:
    token = server.token("read", "write", "approve")
    async with ApiClient(server.url, token) as api:
        task = await api.start_task("t", script=RED_TURNS)
        async with asyncio.timeout(60):
            while not await api.approvals():
                await asyncio.sleep(0.1)
        out = await api.cancel_task(task["id"])
        assert out["status"] == "cancelled"
        assert await api.approvals() == []
        async with asyncio.timeout(30):
            while await api.list_sandboxes():  # the task's sandbox is destroyed
                await asyncio.sleep(0.1)


def test_unix_socket_and_graceful_shutdown(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sock = tmp_path_factory.mktemp("sock") / "api.sock"
    server = start_server(settings, "--socket", str(sock))
    try:
        assert server.extra_urls == [f"unix:{sock}"]
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        token = server.token("read", "write")

        async def run() -> str:
            async with Sandbox.create(api_url=f"unix:{sock}", token=token) as sb:
                assert (await sb.exec(["echo", "uds"])).stdout == b"uds\n"
                res = await sb.exec(["echo", "ws"], on_stdout=lambda c: None)
                assert res.stdout == b"ws\n"
                return sb.id

        sid = asyncio.run(run())
        keep = asyncio.run(_create(f"unix:{sock}", token))
    finally:
        assert server.stop() == 0  # SIGTERM: a graceful shutdown and a clean exit
    assert not sock.exists()
    # Sandboxes outlive the server; a new one reconciles and serves them again.
    again = start_server(settings)
    try:
        assert asyncio.run(_ids(again.url, token)) == [keep]
        assert sid != keep
    finally:
        again.stop()


async def _create(url: str, token: str) -> str:
    async with ApiClient(url, token) as api:
        return str((await api.create())["id"])


async def _ids(url: str, token: str) -> list[str]:
    async with ApiClient(url, token) as api:
        return [d["id"] for d in await api.list_sandboxes()]


def test_cli_runs_through_the_api(server: Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    token = server.token("read", "write")
    # An empty home of its own: only the API can know the server's sandboxes.
    home = tmp_path_factory.mktemp("clihome")
    env = {**os.environ, "PYTHONPATH": SRC, "IRONCLAW_HOME": str(home), "IRONCLAW_API_TOKEN": token}

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            [sys.executable, "-m", "ironclaw.cli", "--api", server.url, *args],
            capture_output=True,
            env=env,
        )
        if check:
            assert proc.returncode == 0, proc.stderr.decode()
        return proc

    made = json.loads(
        cli("sandbox", "create", "--id", "api-cli", "--memory", "128", "--json").stdout
    )
    assert made == {"id": "api-cli", "backend": "namespace", "state": "running"}
    [row] = json.loads(cli("sandbox", "ls", "--json").stdout)["sandboxes"]
    assert row["id"] == "api-cli" and row["owner"] == token.split("_")[1]
    run = cli(
        "sandbox",
        "exec",
        "api-cli",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 4",
        check=False,
    )
    assert (run.returncode, run.stdout, run.stderr) == (4, b"out\n", b"err\n")
    src = home / "in.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    cli("sandbox", "cp", str(src), "api-cli:in.bin")
    cli("sandbox", "cp", "api-cli:in.bin", str(home / "out.bin"))
    assert (home / "out.bin").read_bytes() == src.read_bytes()
    doc = json.loads(cli("sandbox", "exec", "--json", "api-cli", "--", "wc", "-c", "in.bin").stdout)
    assert doc["stdout"] == f"{3 * 1024 * 1024 + 7} in.bin\n"
    one = json.loads(cli("exec", "--json", "--", "echo", "once").stdout)
    assert one["stdout"] == "once\n" and one["exit_code"] == 0
    assert json.loads(cli("sandbox", "rm", "api-cli", "--json").stdout) == {"removed": ["api-cli"]}
    assert json.loads(cli("sandbox", "ls", "--json").stdout)["sandboxes"] == []
    bad = cli("sandbox", "exec", "nope-x", "--", "true", check=False)
    assert bad.returncode == 1 and b"no sandbox named 'nope-x'" in bad.stderr
    env["IRONCLAW_API_TOKEN"] = "icw_bad_token"
    denied = cli("sandbox", "ls", check=False)
    assert denied.returncode == 1 and b"unknown token" in denied.stderr


def test_shutdown_cancels_running_tasks_and_their_sandboxes_go(settings: Settings) -> None:
    server = start_server(settings)
    try:
        token, admin = server.token("read", "write"), server.token("admin")

        async def start() -> tuple[str, str]:
            async with ApiClient(server.url, token) as api:
                kept = (await api.create())["id"]
                task = await api.start_task("t", script=RED_TURNS)  # holds at the RED call
                async with asyncio.timeout(60):
                    while not await api.approvals():
                        await asyncio.sleep(0.1)
                return kept, task["sandbox_id"]

        kept, task_sandbox = asyncio.run(start())
    finally:
        assert server.stop() == 0
    again = start_server(settings)
    try:
        ids = asyncio.run(_ids(again.url, admin))  # admin: every sandbox, owned or not
        assert ids == [kept] and task_sandbox not in ids
    finally:
        again.stop()


def test_cli_run_through_the_api(server: Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    token = server.token("read", "write")
    home = tmp_path_factory.mktemp("runhome")
    script = home / "turns.json"
    script.write_text(json.dumps({"turns": [
        {"tool_calls": [{"name": "shell__run", "arguments": {"command": "echo hi > a.txt"}}]},
        {"tool_calls": [{"name": "shell__run", "arguments": {"command": "rm a.txt"}}]},
        {"content": "finished"},
    ]}))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "IRONCLAW_HOME": str(home),
           "IRONCLAW_API_TOKEN": token}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "ironclaw.cli", "--api", server.url, "run", "--json",
         "--model", f"scripted:{script}", "--approve", "green-only", "--keep", "tidy up"],
        capture_output=True, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    assert doc["status"] == "completed" and doc["answer"] == "finished"
    assert doc["tool_calls"] == 2

    async def check() -> None:
        async with ApiClient(server.url, token) as api:
            # The GREEN write ran; the RED deletion was refused (green-only).
            assert await api.read_file(doc["sandbox_id"], "a.txt") == b"hi\n"
            await api.delete(doc["sandbox_id"])

    asyncio.run(check())
