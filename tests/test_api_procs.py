"""Detached commands, PTYs, ports and file watches through a real ``ironclaw serve`` with
real namespace sandboxes (issue 14 over the HTTP API and the remote SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from websockets.asyncio.client import connect

from apiserver import SRC, Server, serve
from ironclaw.client import Sandbox
from ironclaw.client.procs import RemoteWatch
from ironclaw.config import Settings
from ironclaw.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RpcError,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

SERVER = (
    "sleep 1000 & echo child=$!; echo ready; "
    "exec python3 -c 'import time\nwhile True: time.sleep(1)'"
)
SERVE = "import http.server as h, sys; h.HTTPServer(('127.0.0.1', int(sys.argv[1])), h.SimpleHTTPRequestHandler).serve_forever()"  # noqa: E501
NET = {"network": {"allow": ["192.0.2.0/24"]}}


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _until(chunks: AsyncIterator[bytes], marker: bytes) -> bytes:
    seen = b""
    async with contextlib.aclosing(chunks) as it:  # type: ignore[type-var]
        async for chunk in it:
            seen += chunk
            if marker in seen:
                return seen
    raise AssertionError(f"{marker!r} never came: {seen!r}")


async def _drain(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


async def _alive(sb: Sandbox, pid: int) -> bool:
    r = await sb.exec(
        ["sh", "-c", f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status"]
    )
    return r.exit_code == 0


async def test_background_server_started_listed_attached_elsewhere_and_killed(
    server: Server,
) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(sandbox_id="api-procs", api_url=server.url, token=token) as sb:
        h = await sb.commands.start(["sh", "-c", SERVER], tag="web")
        seen = await _until(h.output(), b"ready")
        child = int(seen.split(b"child=")[1].split()[0])
        listed = await sb.commands.list()
        assert [(p.pid, p.tag, p.running) for p in listed] == [(h.pid, "web", True)]
        # A second client (its own connection) attaches by tag: the output is replayed.
        other = await Sandbox.connect("api-procs", api_url=server.url, token=token)
        try:
            again = await other.commands.connect("web")
            assert again.pid == h.pid
            got = bytearray()

            async def follow() -> None:
                async for chunk in again.output():
                    got.extend(chunk)

            follower = asyncio.ensure_future(follow())
            for _ in range(600):
                if b"ready" in got:
                    break
                await asyncio.sleep(0.05)
            assert bytes(got) == f"child={child}\nready\n".encode()
            assert await _alive(sb, child)
            info = await h.kill()
            await asyncio.wait_for(follower, 30)
            assert again.info.running is False and again.info.exit_code == 137
            assert (await h.wait(30)).signal == 9 and info.pid == h.pid
            assert not await _alive(sb, child)  # its children are gone with it
        finally:
            await other.aclose()
        # stdin over REST, and the exit status through wait.
        cat = await sb.commands.start(["sh", "-c", "read a; echo got $a; exit 4"])
        await cat.send_stdin("one\n", close=True)
        assert (await cat.wait(30)).exit_code == 4
        assert await _until(cat.output(), b"got one") == b"got one\n"
        # Output closed before the command ends: the attach waits for its exit status.
        quiet = await sb.commands.start(["sh", "-c", "exec >&- 2>&-; read x; exit 3"])
        follower = asyncio.ensure_future(_drain(quiet.output()))
        await quiet.send_stdin("go\n")
        assert await asyncio.wait_for(follower, 30) == b""
        assert (quiet.info.running, quiet.info.exit_code) == (False, 3)


async def test_pty_over_the_websocket_sees_its_size_and_a_resize(server: Server) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(api_url=server.url, token=token) as sb:
        term = await sb.pty.create(100, 30, argv=["/bin/sh"], tag="shell")
        async with term:
            out = bytearray()

            async def read_until(marker: bytes) -> None:
                async for chunk in term.output():
                    out.extend(chunk)
                    if marker in out:
                        return

            await term.send(b"stty size\n")
            await asyncio.wait_for(read_until(b"30 100"), 30)
            await term.resize(120, 40)
            out.clear()
            await term.send(b"stty size\n")
            await asyncio.wait_for(read_until(b"40 120"), 30)
            await term.send(b"exit 5\n")
            info = await asyncio.wait_for(term.wait(), 30)
            assert info.exit_code == 5 and info.pty and info.tag == "shell"


async def test_a_terminal_whose_client_leaves_is_hung_up(server: Server) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(api_url=server.url, token=token) as sb:
        term = await sb.pty.create(argv=["/bin/sh"], tag="gone")
        await term.close()
        h = await sb.commands.connect("gone")
        assert (await h.wait(30)).running is False


async def _serving(sb: Sandbox, port: int) -> None:
    await sb.commands.start(["python3", "-c", SERVE, str(port)], tag=f"http{port}")
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
    for _ in range(200):
        if (await sb.exec(["python3", "-c", probe])).exit_code == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"server on {port} did not start")


def _probe(host: str, port: int) -> None:
    import socket

    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        if not s.recv(1):
            raise ConnectionResetError("closed without an answer")


async def test_port_exposed_through_the_api_and_bad_ports_refused(server: Server) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(NET, api_url=server.url, token=token) as sb:
        await sb.files.write("index.html", "hello from inside")
        await _serving(sb, 8000)
        await _serving(sb, 8001)
        url = await sb.ports.expose(8000)
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(url + "/index.html")
            assert r.status_code == 200 and r.text == "hello from inside"
        listed = await sb.ports.list()
        assert [(p.port, p.url) for p in listed] == [(8000, url)]
        # 8001 listens inside too, but nothing leads to it: not the sandbox's address.
        who = "import socket; s = socket.socket(2, 2); s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])"  # noqa: E501
        inner_ip = (await sb.exec(["python3", "-c", who])).stdout.decode().strip()
        for port in (8000, 8001):
            with pytest.raises(OSError):
                _probe(inner_ip, port)
        # Bad input: a clear status and nothing changed.
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(token)) as http:
            for bad in (0, 70000, -1):
                r = await http.post(f"/v1/sandboxes/{sb.id}/ports", json={"port": bad})
                assert r.status_code == 422, r.text
                assert r.headers["content-type"] == "application/problem+json"
            r = await http.post(f"/v1/sandboxes/{sb.id}/ports", json={"port": 8000, "bind": "x"})
            assert r.status_code == 422
            assert (await http.delete(f"/v1/sandboxes/{sb.id}/ports/70000")).status_code == 422
            # Beyond loopback only with an admin token.
            r = await http.post(
                f"/v1/sandboxes/{sb.id}/ports", json={"port": 8001, "bind": "0.0.0.0"}
            )
            assert r.status_code == 403 and r.json()["error"] == "ScopeError"
        with pytest.raises(Conflict, match="already exposed"):
            await sb.ports.expose(8000)
        with pytest.raises(NotFound, match="not exposed"):
            await sb.ports.unexpose(8001)
        assert [(p.port, p.url) for p in await sb.ports.list()] == [(8000, url)]
        await sb.ports.unexpose(8000)
        assert await sb.ports.list() == []


async def test_watch_events_in_order_and_bad_paths_refused(server: Server) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(api_url=server.url, token=token) as sb:
        await sb.files.mkdir("w")
        watch = sb.files.watch("w", recursive=True)
        assert isinstance(watch, RemoteWatch)
        await watch.start()  # returns once the guest's watch is in place
        script = "mkdir -p w/d && echo 1 > w/d/a && mv w/d/a w/d/b && rm w/d/b"
        assert (await sb.exec(["sh", "-c", script])).exit_code == 0
        seen = []
        async for ev in watch:
            seen.append((ev.type, ev.path.removeprefix("/workspace/"), ev.dest))
            if ev.type == "deleted":
                break
        await watch.aclose()
        kinds = [(t, p) for t, p, _ in seen if t != "modified"]
        assert kinds == [
            ("created", "w/d"),
            ("created", "w/d/a"),
            ("moved", "w/d/a"),
            ("deleted", "w/d/b"),
        ], seen
        assert [d for t, _, d in seen if t == "moved"] == ["/workspace/w/d/b"]
        # Outside the workspace (by name, or through a symlink): 422; missing: 404.
        await sb.exec(["ln", "-s", "/etc", "out"])
        for bad in ("/etc", "../..", "w/../../x", "out"):
            with pytest.raises(InvalidRequest, match="outside the workspace"):
                await sb.files.watch(bad).start()
        with pytest.raises(RpcError) as info:
            await sb.files.watch("missing").start()
        assert info.value.code == -32050
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(token)) as http:
            r = await http.get(f"/v1/sandboxes/{sb.id}/watch", params={"path": "/etc"})
            assert r.status_code == 422 and r.json()["error"] == "InvalidRequest"


async def test_bad_process_targets_get_404_and_change_nothing(server: Server) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(api_url=server.url, token=token) as sb:
        await sb.commands.start(["sleep", "100"], tag="one")
        before = await sb.commands.list()
        for target in ("nope", 4000000, "999999999999"):
            with pytest.raises(NotFound, match="no command with"):
                await sb.commands.connect(target)
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(token)) as http:
            base = f"/v1/sandboxes/{sb.id}/processes"
            for method, tail, body in (
                ("POST", "/nope/kill", {}),
                ("POST", "/nope/stdin", {"data": "x"}),
                ("GET", "/nope", None),
            ):
                r = await http.request(method, base + tail, json=body)
                assert r.status_code == 404, r.text
                assert r.json()["error"] == "NotFound"
            r = await http.post(base + "/one/kill", json={"signal": 99})
            assert r.status_code == 422
            r = await http.post(base, json={"argv": []})
            assert r.status_code == 422
            r = await http.post(base, json={"argv": ["true"], "ring_bytes": 10})
            assert r.status_code == 422
            r = await http.get("/v1/sandboxes/no-such/processes")
            assert r.status_code == 404
        ws_url = server.url.replace("http", "ws", 1)
        async with connect(
            f"{ws_url}/v1/sandboxes/{sb.id}/processes/nope/attach", additional_headers=_auth(token)
        ) as ws:
            doc = json.loads(await ws.recv())
            assert doc["type"] == "error" and doc["status"] == 404
            await ws.wait_closed()
            assert ws.close_code == 4404
        assert await sb.commands.list() == before
        assert (await sb.commands.connect("one")).info.running


async def test_hostile_clients_are_bounded(server: Server) -> None:
    token = server.token("read", "write")
    ws_url = server.url.replace("http", "ws", 1)
    async with Sandbox.create(api_url=server.url, token=token) as sb:
        h = await sb.commands.start(["cat"], tag="cat")
        # An oversized stdin frame: refused with 4413, the command unharmed.
        async with connect(
            f"{ws_url}/v1/sandboxes/{sb.id}/processes/cat/attach",
            additional_headers=_auth(token),
            max_size=None,
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "started"
            await ws.send(b"x" * (1024 * 1024))
            doc = json.loads(await ws.recv())
            assert doc["type"] == "error" and doc["status"] == 413
            await ws.wait_closed()
            assert ws.close_code == 4413
        # Past the server's WebSocket message limit the connection itself is closed (1009).
        async with connect(
            f"{ws_url}/v1/sandboxes/{sb.id}/processes/cat/attach",
            additional_headers=_auth(token),
            max_size=None,
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "started"
            with contextlib.suppress(Exception):
                await ws.send(b"x" * (4 * 1024 * 1024))
            await ws.wait_closed()
            assert ws.close_code == 1009
        # No token on the upgrade: 4401.
        async with connect(f"{ws_url}/v1/sandboxes/{sb.id}/pty") as ws:
            assert json.loads(await ws.recv())["status"] == 401
            await ws.wait_closed()
            assert ws.close_code == 4401
        assert (await h.wait(0)).running
        # Too many streams for one token: the 17th is refused, and a closed one frees a slot.
        watches: list[RemoteWatch] = []
        try:
            for _ in range(16):
                w = sb.files.watch(".")
                await w.start()
                watches.append(w)
            with pytest.raises(QuotaExceeded, match="streams open"):
                await sb.files.watch(".").start()
            async with connect(
                f"{ws_url}/v1/sandboxes/{sb.id}/processes/cat/attach",
                additional_headers=_auth(token),
            ) as ws:
                doc = json.loads(await ws.recv())
                assert doc["status"] == 403 and doc["error"] == "QuotaExceeded"
            # Another token is not held back by this one's streams, up to the sandbox's cap.
            other = server.token("read", "write", "admin")
            async with httpx.AsyncClient(base_url=server.url, headers=_auth(other)) as http:
                r = await http.get(f"/v1/sandboxes/{sb.id}/processes")
                assert r.status_code == 200
            sb2 = await Sandbox.connect(sb.id, api_url=server.url, token=other)
            try:
                for _ in range(16):
                    w = sb2.files.watch(".")
                    await w.start()
                    watches.append(w)
                third = await Sandbox.connect(
                    sb.id, api_url=server.url, token=server.token("read", "admin")
                )
                try:
                    with pytest.raises(QuotaExceeded, match="has 32 streams open"):
                        await third.files.watch(".").start()
                finally:
                    await third.aclose()
                for _ in range(16):
                    await watches.pop().aclose()
            finally:
                await sb2.aclose()
            await watches.pop().aclose()
            for _ in range(100):  # the server notices the closed stream
                w = sb.files.watch(".")
                try:
                    await w.start()
                except QuotaExceeded:
                    await asyncio.sleep(0.05)
                    continue
                watches.append(w)
                break
            else:
                raise AssertionError("a closed stream never gave its slot back")
        finally:
            for w in watches:
                await w.aclose()
        await h.kill()


def test_routes_are_in_the_openapi_schema(server: Server) -> None:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in (
        "/v1/sandboxes/{sandbox_id}/processes",
        "/v1/sandboxes/{sandbox_id}/processes/{target}",
        "/v1/sandboxes/{sandbox_id}/processes/{target}/kill",
        "/v1/sandboxes/{sandbox_id}/processes/{target}/stdin",
        "/v1/sandboxes/{sandbox_id}/ports",
        "/v1/sandboxes/{sandbox_id}/ports/{port}",
        "/v1/sandboxes/{sandbox_id}/watch",
    ):
        assert path in paths, path


async def test_cli_commands_run_through_the_api(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    token = server.token("read", "write")
    # An empty home of its own: only the API can know the server's sandboxes.
    home = tmp_path_factory.mktemp("clihome")
    env = {**os.environ, "PYTHONPATH": SRC, "IRONCLAW_HOME": str(home), "IRONCLAW_API_TOKEN": token}
    base = [sys.executable, "-m", "ironclaw.cli", "--api", server.url]

    def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == code, proc.stderr
        return proc

    async with Sandbox.create(
        NET, sandbox_id="api-cli-procs", api_url=server.url, token=token
    ) as sb:
        pid = int(
            cli("sandbox", "run", "-d", "--tag", "web", sb.id, "--", "sh", "-c", SERVER).stdout
        )
        [row] = json.loads(cli("sandbox", "ps", "--json", sb.id).stdout)["procs"]
        assert (row["pid"], row["tag"], row["running"]) == (pid, "web", True)
        attach = subprocess.Popen(
            [*base, "sandbox", "attach", sb.id, "web"], stdout=subprocess.PIPE, env=env
        )
        assert attach.stdout is not None
        first = await asyncio.to_thread(attach.stdout.readline)
        assert first.startswith(b"child=")
        info = json.loads(cli("sandbox", "kill", "--json", sb.id, str(pid)).stdout)
        assert info["running"] is False and info["exit_code"] == 137
        assert await asyncio.to_thread(attach.stdout.read) == b"ready\n"
        assert await asyncio.to_thread(attach.wait, 30) == 137
        cli("sandbox", "kill", sb.id, "nope", code=1)
        # Ports: expose, list, refuse a second time, remove.
        await _serving(sb, 8000)
        made = json.loads(cli("sandbox", "port", "--json", sb.id, "8000").stdout)
        assert made["port"] == 8000 and made["url"].startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(made["url"] + "/")).status_code == 200
        assert cli("sandbox", "port", sb.id).stdout == f"8000\t{made['url']}\n"
        again = cli("sandbox", "port", sb.id, "8000", code=2)  # bad input, as in-process
        assert "already exposed" in again.stderr
        cli("sandbox", "port", "--rm", sb.id, "8000")
        assert json.loads(cli("sandbox", "port", "--json", sb.id).stdout) == {"ports": []}


async def test_cli_exec_t_through_the_api_is_a_terminal_that_follows_resizes(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import pexpect

    token = server.token("read", "write")
    home = tmp_path_factory.mktemp("ttyhome")
    env = {**os.environ, "PYTHONPATH": SRC, "IRONCLAW_HOME": str(home),
           "IRONCLAW_API_TOKEN": token, "PS1": "$ "}  # fmt: skip
    async with Sandbox.create(sandbox_id="api-tty", api_url=server.url, token=token) as sb:
        child = pexpect.spawn(
            sys.executable, ["-m", "ironclaw.cli", "--api", server.url, "sandbox", "exec", "-t",
                             sb.id, "--", "/bin/sh"], env=env, dimensions=(24, 80), timeout=30,
        )  # fmt: skip
        try:
            child.sendline("stty size")
            await asyncio.to_thread(child.expect, "24 80")
            child.setwinsize(40, 120)  # the CLI gets SIGWINCH and sends a resize frame
            child.sendline("stty size")
            await asyncio.to_thread(child.expect, "40 120")
            child.sendline("tty; exit 7")
            await asyncio.to_thread(child.expect, "/dev/pts/")
            await asyncio.to_thread(child.expect, pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 7


def test_the_http_process_model_has_the_channel_records_fields() -> None:
    from ironclaw.api.processes import ProcessOut, out
    from ironclaw.proto import methods as m

    assert tuple(ProcessOut.model_fields) == m.ProcInfo._fields
    info = m.ProcInfo(
        pid=7, tag="t", argv=("sleep", "9"), pty=True, running=False, exit_code=137,
        signal=9, started_at=1.5, output_bytes=42,
    )  # fmt: skip
    assert out(info).model_dump() == m.to_json(info)
