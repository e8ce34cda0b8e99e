"""Lifetimes, pause/resume, snapshots, restore/fork and live network policy through a
real ``ironclaw serve``, the remote SDK and real namespace sandboxes (no VM here)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from apiserver import SRC, Server, serve
from ironclaw.client import ApiClient, Sandbox
from ironclaw.config import Settings
from ironclaw.errors import Conflict, InvalidRequest, NotFound, ScopeError
from ironclaw.host.snapshots import ARCHIVE, SnapshotStore
from ironclaw.resources.audit import read_events
from ironclaw.resources.store import Store
from ironclaw.sdk import Sandbox as LocalSandbox
from nethelpers import PROBE, PeerHost
from test_sandbox_controls import WORKSPACE_HASH

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token_id(token: str) -> str:
    return token.removeprefix("icw_").split("_", 1)[0]


async def until(check: Callable[[], Awaitable[bool]], limit: float = 60.0) -> None:
    """Wait for ``check`` to hold (an event, not a timing assertion)."""
    async with asyncio.timeout(limit):
        while not await check():
            await asyncio.sleep(0.2)


async def _cpu_ns(settings: Settings, sandbox_id: str) -> int:
    """The sandbox cgroup's CPU time, read from the kernel (cpuacct, or cpu.stat on v2)."""
    async with Store(settings.registry_path) as store:
        pid = int((await store.get(sandbox_id)).info["pid"])
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/cpuacct{path}/cpuacct.usage").read_text())
        if controllers == "" and Path(f"/sys/fs/cgroup{path}/cpu.stat").exists():
            stat = Path(f"/sys/fs/cgroup{path}/cpu.stat").read_text().split()
            return int(stat[stat.index("usage_usec") + 1]) * 1000
    raise AssertionError(f"no CPU accounting cgroup for pid {pid}")


async def _hash(sb: Sandbox) -> str:
    r = await sb.exec(["python3", "-c", WORKSPACE_HASH])
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode().strip()


def _events(settings: Settings, sid: str, event: str) -> list[dict[str, Any]]:
    return [e for e in read_events(settings, sid) if e["event"] == event]


async def test_pause_stops_cpu_and_resume_continues_it_and_the_audit_names_the_token(
    server: Server, settings: Settings
) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(api_url=server.url, token=token) as sb:
        await sb.files.write("keep.txt", "kept across the pause")
        await sb.exec(["sh", "-c", "while :; do :; done >/dev/null 2>&1 &"], keep_background=True)

        async def cpu_grows() -> bool:
            before = await _cpu_ns(settings, sb.id)
            await asyncio.sleep(0.3)
            return await _cpu_ns(settings, sb.id) > before

        await until(cpu_grows)
        await sb.pause()
        assert sb.record["state"] == "paused"
        frozen = await _cpu_ns(settings, sb.id)
        await asyncio.sleep(1.0)
        assert await _cpu_ns(settings, sb.id) == frozen  # not one nanosecond while paused
        with pytest.raises(Conflict, match="already paused"):
            await sb.pause()
        await sb.resume()
        assert sb.record["state"] == "running"
        with pytest.raises(Conflict, match="not paused"):
            await sb.resume()
        await until(cpu_grows)
        assert await sb.files.read("keep.txt") == b"kept across the pause"
        via = f"api:{_token_id(token)}"
        for event in ("sandbox.pause", "sandbox.resume"):
            got = _events(settings, sb.id, event)
            assert [e["who"]["via"] for e in got] == [via], got


async def test_set_timeout_ends_a_sandbox_and_bad_values_change_nothing(
    server: Server, settings: Settings
) -> None:
    token = server.token("read", "write")
    async with ApiClient(server.url, token) as api:
        sb = await Sandbox.create(client=api)
        path = f"/v1/sandboxes/{sb.id}/timeout"
        for bad in ({"seconds": 0}, {"seconds": -5}, {"seconds": 10**9}, {}, {"seconds": "x"}):
            r = await api.http.post(path, json=bad)
            assert r.status_code == 422, (bad, r.text)
            assert r.headers["content-type"] == "application/problem+json"
        assert _events(settings, sb.id, "sandbox.set_timeout") == []
        deadline = await sb.set_timeout(3600)
        assert deadline is not None
        assert await sb.set_timeout(None) is None
        await sb.pause()
        r = await api.http.post(f"/v1/sandboxes/{sb.id}/resume", json={"timeout": 0})
        assert r.status_code == 422 and (await api.get(sb.id))["state"] == "paused", r.text
        await sb.resume(timeout=1800)  # a new deadline, set before it runs again
        assert sb.record["state"] == "running"
        await sb.set_timeout(0.5)

        async def dead() -> bool:
            return (await api.get(sb.id))["state"] == "dead"

        await until(dead)
        assert (await api.get(sb.id))["reason"] == "timeout: deadline reached"
        got = _events(settings, sb.id, "sandbox.set_timeout")
        assert [e["seconds"] for e in got] == [3600, None, 1800, 0.5]
        assert {e["who"]["via"] for e in got} == {f"api:{_token_id(token)}"}


async def test_snapshot_fork_restore_remove_and_tampering(
    server: Server, settings: Settings
) -> None:
    token = server.token("read", "write")
    other = server.token("read", "write")
    async with ApiClient(server.url, token) as api:
        src = await Sandbox.create({"labels": {"role": "src"}}, client=api)
        await src.files.write("data/a.txt", "alpha")
        await src.files.write("run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
        want = await _hash(src)
        snap = await src.snapshot("base")
        assert (snap.name, snap.kind, snap.source) == ("base", "workspace", src.id)
        assert len(snap.sha256) == 64 and snap.size > 0
        with pytest.raises(Conflict, match="exists"):
            await src.snapshot("base")
        assert [s.name for s in await api.snapshots.list()] == ["base"]
        assert (await api.snapshots.get("base")).sha256 == snap.sha256

        # Another token neither sees nor restores it.
        async with ApiClient(server.url, other) as theirs:
            assert await theirs.snapshots.list() == []
            with pytest.raises(NotFound):
                await theirs.snapshots.get("base")
            r = await theirs.http.post("/v1/snapshots/base/fork", json={"count": 1})
            assert r.status_code == 404, r.text

        forks = await api.snapshots.fork("base", 2)
        assert len({f["id"] for f in forks}) == 2
        for doc in forks:
            assert doc["spec"]["labels"] == {"role": "src"}
            fork = await Sandbox.connect(doc["id"], api_url=server.url, token=token)
            assert await _hash(fork) == want
            assert (await fork.exec(["./run.sh"])).stdout == b"hi\n"
            await fork.aclose()
        assert _events(settings, forks[0]["id"], "sandbox.restore")[0]["who"]["via"] == (
            f"api:{_token_id(token)}"
        )
        spec = {"labels": {"role": "copy"}}
        async with Sandbox.create(spec, client=api, from_snapshot=snap) as copy:
            assert copy.record["spec"]["labels"] == {"role": "copy"}
            assert await copy.files.read("data/a.txt") == b"alpha"
        # The in-process SDK's create with api_url restores through the service too.
        remote = LocalSandbox.create(from_snapshot="base", api_url=server.url, token=token)
        async with remote as copy2:
            assert await copy2.files.read("data/a.txt") == b"alpha"
            assert copy2.record["spec"]["labels"] == {"role": "src"}

        # Bad input: nothing is made.
        before = {d["id"] for d in await api.list_sandboxes()}
        for path, body, status in (
            ("/v1/snapshots/nope/restore", {}, 404),
            ("/v1/snapshots/base/fork", {"count": 0}, 422),
            ("/v1/snapshots/base/fork", {"count": 65}, 422),
            ("/v1/snapshots/base/restore", {"spec": {"backend": "qemu"}}, 422),
            ("/v1/snapshots/base/restore", {"spec": {"limits": {"memory_mib": -1}}}, 422),
            (f"/v1/sandboxes/{src.id}/snapshots", {"name": "Bad Name"}, 422),
            (f"/v1/sandboxes/{src.id}/snapshots", {"name": "../x"}, 422),
            ("/v1/sandboxes/no-such/snapshots", {"name": "fine"}, 404),
            ("/v1/snapshots/base/restore", {"id": src.id}, 409),
            ("/v1/snapshots/base/restore", {"id": "Not An Id"}, 422),
        ):
            r = await api.http.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
        assert {d["id"] for d in await api.list_sandboxes()} == before
        assert [s.name for s in await api.snapshots.list()] == ["base"]

        # A tampered archive is refused with the manager's message; nothing is made.
        archive = SnapshotStore(settings).path("base") / ARCHIVE
        data = bytearray(archive.read_bytes())
        at = data.index(b"alpha")
        data[at : at + 5] = b"omega"
        archive.write_bytes(bytes(data))
        with pytest.raises(Conflict, match="corrupted"):
            await Sandbox.create(client=api, from_snapshot="base")
        r = await api.http.post("/v1/snapshots/base/fork", json={"count": 2})
        assert r.status_code == 409 and "corrupted" in r.json()["detail"], r.text
        assert {d["id"] for d in await api.list_sandboxes()} == before

        await api.snapshots.remove("base")
        assert await api.snapshots.list() == []
        with pytest.raises(NotFound):
            await api.snapshots.remove("base")


async def test_read_token_cannot_change_a_sandbox(server: Server) -> None:
    writer = server.token("read", "write")
    reader_token = server.token("read")
    async with ApiClient(server.url, writer) as api:
        sb = await Sandbox.create(client=api)
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(reader_token)) as http:
            for method, tail, body in (
                ("POST", "/pause", None),
                ("POST", "/timeout", {"seconds": 5}),
                ("POST", "/snapshots", {"name": "s"}),
                ("PATCH", "/network", {"allow": ["10.0.0.1:80"]}),
            ):
                r = await http.request(method, f"/v1/sandboxes/{sb.id}{tail}", json=body)
                assert r.status_code == 403, (tail, r.text)
        assert (await api.get(sb.id))["state"] == "running"
        reader = ApiClient(server.url, reader_token)
        with pytest.raises(ScopeError):
            await reader.request("POST", f"/v1/sandboxes/{sb.id}/resume")
        await reader.aclose()


@pytest.fixture
async def peer() -> AsyncIterator[PeerHost]:
    a = await PeerHost.start((8080, 8081))
    yield a
    await a.stop()


async def _probe(sb: Sandbox, targets: list[tuple[str, int]]) -> dict[str, str]:
    r = await sb.exec(["python3", "-c", PROBE, json.dumps(targets), "1.5"], timeout=30)
    assert r.exit_code == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


async def test_network_patch_opens_one_port_and_closes_another_with_real_packets(
    server: Server, settings: Settings, peer: PeerHost
) -> None:
    a = peer
    token = server.token("read", "write")
    ports = [(a.ip, 8080), (a.ip, 8081)]
    spec = {"network": {"allow": [f"{a.ip}:8080/tcp"]}}
    async with Sandbox.create(spec, api_url=server.url, token=token) as sb:
        before = await _probe(sb, ports)
        assert before[f"{a.ip}:8080"] == a.reply(8080), before
        assert before[f"{a.ip}:8081"].startswith("err:"), before

        # Bad rules are refused (422) and change nothing.
        for bad in (
            {"allow": ["not-an-address"]},
            {"deny": ["10.0.0.1:99999"]},
            {"allow": []},
            {"allow": "10.0.0.1"},
        ):
            r = await sb.api.http.patch(f"/v1/sandboxes/{sb.id}/network", json=bad)
            assert r.status_code == 422, (bad, r.text)
        with pytest.raises(InvalidRequest, match="bad allow rule"):
            await sb.network.update(allow=["10.0.0.1:80", "nonsense"])
        assert _events(settings, sb.id, "network.update") == []
        assert await _probe(sb, ports) == before

        policy = await sb.network.update(allow=[f"{a.ip}:8081/tcp"])
        assert [r.port for r in policy.allow] == [8081]
        after = await _probe(sb, ports)
        assert after[f"{a.ip}:8080"].startswith("err:"), after  # closed
        assert after[f"{a.ip}:8081"] == a.reply(8081), after  # opened
        got = _events(settings, sb.id, "network.update")
        assert [e["who"]["via"] for e in got] == [f"api:{_token_id(token)}"]
        assert (await sb.api.get(sb.id))["spec"]["network"]["allow"][0]["port"] == 8081


def test_cli_through_the_api(server: Server, settings: Settings, tmp_path: Path) -> None:
    """``ironclaw --api URL``: sandbox pause/resume/timeout/net, snapshot create/ls/rm and
    ``sandbox create --from``, each through the service (the audit log says so)."""
    token = server.token("read", "write")
    # An empty home of its own: only the API knows the server's sandboxes and snapshots.
    home = tmp_path / "clihome"
    home.mkdir(mode=0o700)
    env = {**os.environ, "PYTHONPATH": SRC, "IRONCLAW_HOME": str(home), "IRONCLAW_API_TOKEN": token}

    def cli(*args: str, ok: bool = True) -> Any:
        proc = subprocess.run(
            [sys.executable, "-m", "ironclaw.cli", "--api", server.url, *args, "--json"],
            capture_output=True,
            env=env,
        )
        assert (proc.returncode == 0) == ok, proc.stderr.decode() + proc.stdout.decode()
        return json.loads(proc.stdout) if ok else proc

    allow = ["--allow", "10.9.9.9:80/tcp"]
    made = cli("sandbox", "create", "--id", "cli-src", "--label", "role=src", *allow)
    assert made["id"] == "cli-src"
    assert cli("sandbox", "pause", "cli-src") == {"id": "cli-src", "state": "paused"}
    cli("sandbox", "pause", "cli-src", ok=False)  # paused twice: a clear error
    assert cli("sandbox", "resume", "cli-src") == {"id": "cli-src", "state": "running"}
    assert cli("sandbox", "timeout", "cli-src", "600")["deadline"] > 0
    net = cli("sandbox", "net", "cli-src", "--allow", "10.9.9.8:443/tcp")
    assert [r["port"] for r in net["network"]["allow"]] == [443]
    snap = cli("snapshot", "create", "cli-src", "cli-snap")
    assert snap["name"] == "cli-snap" and snap["source"] == "cli-src"
    assert [s["name"] for s in cli("snapshot", "ls")["snapshots"]] == ["cli-snap"]
    copy = cli("sandbox", "create", "--from", "cli-snap", "--id", "cli-copy", "--label", "r=c")
    assert copy["id"] == "cli-copy"
    via = f"api:{_token_id(token)}"
    restored = _events(settings, "cli-copy", "sandbox.restore")
    assert [(e["snapshot"], e["who"]["via"]) for e in restored] == [("cli-snap", via)]
    assert cli("snapshot", "rm", "cli-snap") == {"removed": ["cli-snap"]}
    assert cli("snapshot", "ls") == {"snapshots": []}
    cli("sandbox", "rm", "cli-src", "cli-copy")
