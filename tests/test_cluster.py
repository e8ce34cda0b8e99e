"""IronClaw on a real local Ray cluster: two ``ray start`` nodes on loopback addresses.

Placement spreads sandboxes over both nodes; exec and files reach each; a killed node's
sandboxes report lost while the other node's keep working and new ones land there; when
the node comes back nothing of its lost sandboxes remains.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from apiserver import start_server
from ironclaw.cluster.placement import NodeCapacity, choose_node, node_selector
from ironclaw.config import Settings
from ironclaw.errors import ConfigError, IronclawError, SandboxError, SandboxLost
from raycluster import RayCluster, node_rows, node_settings, until

pytestmark = pytest.mark.timeout(900)


def _cap(name: str, sandboxes: int = 0, reserved: int = 0, alive: bool = True) -> NodeCapacity:
    return NodeCapacity(name, 8, sandboxes, 4096, reserved, alive)


def test_placement_prefers_the_freest_node_and_honours_affinity() -> None:
    nodes = [_cap("a", sandboxes=2), _cap("b", sandboxes=1)]
    assert choose_node(nodes, 512).name == "b"
    # memory is the scarcer resource on b now
    nodes = [_cap("a", sandboxes=2), _cap("b", sandboxes=1, reserved=3584)]
    assert choose_node(nodes, 256).name == "a"
    assert choose_node(nodes, 256, node="b").name == "b"
    with pytest.raises(SandboxError, match="no cluster node has room"):
        choose_node(nodes, 1024, node="b")
    with pytest.raises(SandboxError, match="no cluster node named 'c'"):
        choose_node(nodes, 256, node="c")


def test_placement_never_picks_a_lost_node() -> None:
    nodes = [_cap("a", sandboxes=7), _cap("b", alive=False)]
    assert choose_node(nodes, 512).name == "a"
    with pytest.raises(SandboxError, match="is lost"):
        choose_node(nodes, 512, node="b")
    nodes[0].sandboxes = 8
    with pytest.raises(SandboxError, match="no cluster node has room"):
        choose_node(nodes, 512)


def test_placement_honours_node_labels() -> None:
    nodes = [_cap("a"), _cap("b", sandboxes=3)]
    nodes[1].labels = {"gpu": "yes", "zone": "two"}
    selector = node_selector({"node/gpu": "yes", "team": "x"})
    assert selector == {"gpu": "yes"}  # only node/ labels select
    assert choose_node(nodes, 512, selector=selector).name == "b"  # though a is freer
    assert choose_node(nodes, 512, selector={}).name == "a"
    with pytest.raises(SandboxError, match="no cluster node has the labels gpu=no"):
        choose_node(nodes, 512, selector={"gpu": "no"})
    nodes[1].alive = False
    with pytest.raises(SandboxError, match="every cluster node labelled gpu=yes is lost"):
        choose_node(nodes, 512, selector=selector)


def test_placement_registry_survives_reopening(tmp_path: Path) -> None:
    from ironclaw.cluster.registry import PlacementStore

    store = PlacementStore(tmp_path / "placements.sqlite3")
    assert store.open() == []
    store.place("s1", "a")
    store.place("s2", "b")
    store.place("s3", "b")
    store.lose("s2", "b", "node b was lost (test)")
    store.forget("s3")
    store.close()
    again = PlacementStore(tmp_path / "placements.sqlite3")
    rows = {r.sandbox_id: (r.node, r.lost_reason) for r in again.open()}
    assert rows == {"s1": ("a", None), "s2": ("b", "node b was lost (test)")}
    again.close()


def test_errors_cross_to_the_head_whole() -> None:
    """A node's error reaches the head pickled (Ray), or as class name and message (the
    guest's calls answered by the head), and is still the same kind of error."""
    import pickle

    from ironclaw.cluster.links import error_from, error_parts
    from ironclaw.errors import BudgetExceeded, LimitExceeded, RpcError

    rpc = pickle.loads(pickle.dumps(RpcError(-32050, "no such file", {"path": "/x"})))
    assert isinstance(rpc, RpcError) and (rpc.code, rpc.message, rpc.data) == (
        -32050,
        "no such file",
        {"path": "/x"},
    )
    limit = pickle.loads(pickle.dumps(LimitExceeded("too big", limit="max_frame", value=9)))
    assert (str(limit), limit.limit, limit.value) == ("too big", "max_frame", 9)
    budget = error_from(*error_parts(BudgetExceeded("max_steps")))
    assert type(budget) is BudgetExceeded and str(budget) == "max_steps"
    other = error_from(*error_parts(KeyError("k")))
    assert type(other) is SandboxError and "KeyError" in str(other)


def test_single_host_serve_does_not_import_ray() -> None:
    code = (
        "import sys\n"
        "from ironclaw.cli.main import app\n"
        "from ironclaw.api.app import create_app\n"
        "from ironclaw.api.server import serve\n"
        "create_app()\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "print('no ray')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no ray"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A head (node a, 127.0.0.1, labelled disk=ssd by IRONCLAW_NODE_LABELS) and a
    worker (node b, 127.0.0.2, Ray label zone=two), torn down after."""
    base = tmp_path_factory.mktemp("rc")
    os.chmod(base, 0o700)
    cluster = RayCluster(base)
    try:
        cluster.start("a", env={"IRONCLAW_NODE_LABELS": "disk=ssd"})
        cluster.add_node("b", "127.0.0.2", labels={"zone": "two"})
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: killed, waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:\tZ") for line in f)
    except FileNotFoundError:
        return False


def _procs_of_uid(uid: int) -> list[int]:
    from ironclaw.resources.procs import host_uid

    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [p for p in pids if host_uid(p) == uid and _alive(p)]


async def test_serve_cluster_routes_the_api_to_both_nodes(
    ray_cluster: RayCluster, settings: Settings
) -> None:
    from ironclaw.client import ApiClient
    from ironclaw.cluster.cluster import Cluster
    from ironclaw.sdk import Sandbox

    server = start_server(settings, "--cluster", ray_cluster.address)
    try:
        token = server.token("read", "write")
        async with ApiClient(server.url, token) as api:
            ids = [(await api.create({"limits": {"memory_mib": 128}}))["id"] for _ in range(2)]
            a, b = await node_rows(ray_cluster, "a"), await node_rows(ray_cluster, "b")
            assert len(a & set(ids)) == 1 and len(b & set(ids)) == 1, (ids, a, b)
            for sid in ids:
                result = await api.exec(sid, ["sh", "-c", "echo $0", sid])
                assert (result.exit_code, result.stdout) == (0, f"{sid}\n".encode())
            listed = {d["id"] for d in await api.list_sandboxes(state="running")}
            assert listed == set(ids)
            # a second service would wipe the first one's sandboxes: it is refused
            with pytest.raises(ConfigError, match="another IronClaw service already drives"):
                await Cluster(ray_cluster.address).open()
            assert {d["id"] for d in await api.list_sandboxes(state="running")} == set(ids)
            for sid in ids:
                await api.delete(sid)
            assert not (await node_rows(ray_cluster, "a") | await node_rows(ray_cluster, "b"))
        async with Sandbox.create(sandbox_id="cl-sdk", api_url=server.url, token=token) as sb:
            assert (await sb.ping())["uid"] == 1000
            assert await sb.files.write("notes/a.txt", "hello") == 5
            assert await sb.files.read("notes/a.txt") == b"hello"
            assert [e["name"] for e in await sb.files.list("notes")] == ["a.txt"]
    finally:
        assert server.stop() == 0
    # the service's node actors went with it, and so did their sandboxes
    assert not (await node_rows(ray_cluster, "a") | await node_rows(ray_cluster, "b"))


async def test_two_nodes_spread_route_lose_and_recover(ray_cluster: RayCluster) -> None:
    from ironclaw.cluster.cluster import Cluster

    cluster = Cluster(ray_cluster.address, health_interval=0.5)
    await cluster.open()
    try:
        assert sorted(cluster.nodes) == ["a", "b"]
        spec = {"limits": {"memory_mib": 128}}
        records = [await cluster.create(spec) for _ in range(4)]
        where = {r.id: cluster.placement(r.id) for r in records}
        on = {n: [s for s, w in where.items() if w == n] for n in ("a", "b")}
        assert len(on["a"]) == 2 and len(on["b"]) == 2, where

        # exec and files on each node, each sandbox its own
        for sid in where:
            result = await cluster.exec(sid, ["sh", "-c", "echo $0; echo err >&2", sid])
            assert (result.exit_code, result.stdout, result.stderr) == (
                0,
                f"{sid}\n".encode(),
                b"err\n",
            )
            data = os.urandom(700_000)  # more than two chunks each way
            assert await cluster.write_file(sid, "/tmp/blob", data) == len(data)
            got = bytearray()
            await cluster.read_file(sid, "/tmp/blob", got.extend, limit=None)
            assert bytes(got) == data
        streamed: list[bytes] = []
        result = await cluster.exec(on["b"][0], ["sh", "-c", "head -c 600000 /dev/zero"],
                                    on_stdout=streamed.append)  # fmt: skip
        assert result.exit_code == 0 and sum(map(len, streamed)) == 600_000
        assert len(streamed) >= 3  # it came in pieces, not one object

        # node b dies: its raylet and workers are killed, its sandboxes stay behind
        b_records = {sid: await cluster.get(sid) for sid in on["b"]}
        for record in b_records.values():
            assert _procs_of_uid(record.info["host_uid"]), "the sandbox should be running"
        assert ray_cluster.kill("b")
        await until(lambda: cluster.nodes["b"].lost_reason is not None, "node b lost")
        for sid in on["b"]:
            record = await cluster.get(sid)
            assert record.state == "lost" and "node b was lost" in (record.reason or "")
            with pytest.raises(SandboxLost, match="node b was lost"):
                await cluster.exec(sid, ["true"])
            with pytest.raises(SandboxLost):
                await cluster.read_file(sid, "/tmp/blob", limit=None)
        for sid in on["a"]:
            assert (await cluster.exec(sid, ["echo", "still"])).stdout == b"still\n"
        for record in b_records.values():  # left behind, for the node's return to remove
            assert _alive(record.info["pid"])
        late = await cluster.create(spec)
        assert cluster.placement(late.id) == "a"
        with pytest.raises(SandboxError, match="is lost"):
            await cluster.create(spec, node="b")
        assert {r.id for r in await cluster.sandboxes() if r.state == "lost"} == set(on["b"])

        # node b comes back: its new actor removes everything the dead one left
        ray_cluster.restart("b")
        await until(lambda: cluster.nodes["b"].lost_reason is None, "node b back", limit=240)
        node_b = cluster.nodes["b"].actor
        assert await node_b.sandboxes.remote() == []
        cg = Path("/sys/fs/cgroup") / ray_cluster.nodes["b"].cgroup_root
        for sid, record in b_records.items():
            assert not any(cg.glob(f"**/*{record.rid}*")), sid
            assert not _alive(record.info["pid"]), sid
            assert _procs_of_uid(record.info["host_uid"]) == [], sid
        # lost sandboxes are forgotten on removal; new ones reach node b again
        for sid in on["b"]:
            await cluster.destroy(sid)
        back = await cluster.create(spec, node="b")
        assert (await cluster.exec(back.id, ["echo", "b"])).stdout == b"b\n"
    finally:
        await cluster.aclose()


async def test_ray_client_address(ray_cluster: RayCluster) -> None:
    """``ray://`` (Ray Client): placement, exec, streamed output and files on each node."""
    from ironclaw.cluster.cluster import Cluster

    async with Cluster(ray_cluster.client_address) as cluster:
        assert sorted(cluster.nodes) == ["a", "b"]
        assert cluster.nodes["a"].capacity.labels.get("disk") == "ssd"
        assert cluster.nodes["b"].capacity.labels.get("zone") == "two"
        for node in ("a", "b"):
            record = await cluster.create({"limits": {"memory_mib": 128}}, node=node)
            chunks: list[bytes] = []
            result = await cluster.exec(record.id, ["sh", "-c", "head -c 300000 /dev/zero; echo"],
                                        on_stdout=chunks.append)  # fmt: skip
            assert result.exit_code == 0 and sum(map(len, chunks)) == 300_001
            assert await cluster.write_file(record.id, "/tmp/f", b"via client") == 10
            assert await cluster.read_file(record.id, "/tmp/f", limit=None) == b"via client"
            await cluster.destroy(record.id)


def _events(cluster: RayCluster, node: str, sid: str, event: str) -> list[dict[str, Any]]:
    """A sandbox's audit events as its node wrote them."""
    from ironclaw.resources.audit import read_events

    return [e for e in read_events(node_settings(cluster, node), sid) if e["event"] == event]


async def _state_on(cluster: RayCluster, node: str, sid: str) -> str:
    from ironclaw.resources.store import Store

    async with Store(node_settings(cluster, node).registry_path) as store:
        return (await store.get(sid)).state


async def test_serve_cluster_controls_and_snapshots_on_node_b(
    ray_cluster: RayCluster, settings: Settings
) -> None:
    """Over HTTP, on a sandbox placed on node b: pause/resume, a deadline, a live network
    change and a snapshot forked and restored, each done by node b (its registry, audit
    log and snapshot directory say so); the snapshot lists, and its forks land, there."""
    from ironclaw.client import ApiClient, Sandbox

    server = start_server(settings, "--cluster", ray_cluster.address)
    try:
        token, other = server.token("read", "write"), server.token("read", "write")
        via = "api:" + token.removeprefix("icw_").split("_", 1)[0]
        spec = {"labels": {"node/zone": "two"}, "limits": {"memory_mib": 128},
                "network": {"allow": ["192.0.2.0/24"]}}  # fmt: skip
        async with Sandbox.create(spec, api_url=server.url, token=token) as sb:
            assert sb.id in await node_rows(ray_cluster, "b")
            deadline = await sb.set_timeout(600)
            assert deadline is not None and deadline > time.time() + 500
            [ev] = _events(ray_cluster, "b", sb.id, "sandbox.set_timeout")
            assert ev["seconds"] == 600 and ev["who"]["via"] == via
            await sb.pause()
            assert sb.record["state"] == "paused"
            assert await _state_on(ray_cluster, "b", sb.id) == "paused"
            await sb.resume()
            assert await _state_on(ray_cluster, "b", sb.id) == "running"
            assert (await sb.exec(["echo", "on"])).stdout == b"on\n"
            for event in ("sandbox.pause", "sandbox.resume"):
                assert [e["who"]["via"] for e in _events(ray_cluster, "b", sb.id, event)] == [via]

            policy = await sb.network.update(allow=["192.0.2.9:8081"])
            assert [(str(r.network), r.port) for r in policy.allow] == [("192.0.2.9/32", 8081)]
            assert (await sb.api.get(sb.id))["spec"]["network"]["allow"][0]["port"] == 8081
            assert len(_events(ray_cluster, "b", sb.id, "network.update")) == 1

            await sb.files.write("state.txt", "made on b")
            snap = await sb.snapshot("cl-base")
            assert snap.source == sb.id
            snaps = {n: node_settings(ray_cluster, n).state_dir / "snapshots" for n in "ab"}
            assert (snaps["b"] / "cl-base").is_dir() and not (snaps["a"] / "cl-base").exists()
            assert [s.name for s in await sb.api.snapshots.list()] == ["cl-base"]
            assert (await sb.api.snapshots.get("cl-base")).sha256 == snap.sha256
            with pytest.raises(IronclawError, match="exists"):
                await sb.snapshot("cl-base")
            async with ApiClient(server.url, other) as stranger:
                assert await stranger.snapshots.list() == []  # not its snapshot
            forks = [d["id"] for d in await sb.api.snapshots.fork("cl-base", 2)]
            assert set(forks) <= await node_rows(ray_cluster, "b")
            for sid in forks:
                assert await sb.api.read_file(sid, "state.txt") == b"made on b"
                await sb.api.delete(sid)
            async with Sandbox.create({"labels": {"copy": "1"}}, from_snapshot="cl-base",
                                      api_url=server.url, token=token) as again:  # fmt: skip
                assert again.id in await node_rows(ray_cluster, "b")
                assert await again.files.read("state.txt") == b"made on b"
            await sb.api.snapshots.remove("cl-base")
            assert await sb.api.snapshots.list() == [] and not (snaps["b"] / "cl-base").exists()
    finally:
        assert server.stop() == 0


HELD_TURNS = [  # a RED call (a write outside the workspace) holds the task for a decision
    {"tool_calls": [{"name": "files__write_file",
                     "arguments": {"path": "/tmp/outside.txt", "content": "approved"}}]},
    {"content": "done"},
]  # fmt: skip
ON_B = {"labels": {"node/zone": "two"}}  # the agent's MCP servers want the default memory


async def _settled(api: Any, task_id: str) -> dict[str, Any]:
    async def done() -> bool:
        return (await api.task(task_id))["status"] != "running"

    await until(done, f"task {task_id} to end")
    return dict(await api.task(task_id))


async def test_serve_cluster_tasks_exec_ws_labels_restart_and_node_loss(
    ray_cluster: RayCluster, settings: Settings
) -> None:
    """Over HTTP: label affinity, a WebSocket exec and an agent task on node b, a
    service restart that keeps the placements, then node b lost during a task."""
    from ironclaw.client import ApiClient

    server = start_server(settings, "--cluster", ray_cluster.address)
    try:
        admin = server.token("admin")
        async with ApiClient(server.url, admin) as api:
            on_b = (await api.create(ON_B))["id"]
            on_a = (await api.create({"labels": {"node/disk": "ssd"}}))["id"]
            assert on_b in await node_rows(ray_cluster, "b")
            assert on_a in await node_rows(ray_cluster, "a")
            with pytest.raises(IronclawError, match="no cluster node has the labels zone=three"):
                await api.create({"labels": {"node/zone": "three"}})

            # a WebSocket exec on node b: stdin sent while the command runs
            lines: asyncio.Queue[bytes] = asyncio.Queue()

            async def stdin() -> AsyncIterator[bytes]:
                yield b"one\n"
                assert await asyncio.wait_for(lines.get(), 60) == b"got:one\n"
                yield b"two\n"

            script = "while read l; do echo got:$l; done; head -c 2000000 /dev/zero; echo bye"
            result = await api.exec_stream(on_b, ["sh", "-c", script], stdin=stdin(),
                                           on_stdout=lines.put)  # fmt: skip
            assert result.exit_code == 0 and result.stdout_bytes == 16 + 2_000_000 + 4
            assert result.stdout.startswith(b"got:one\ngot:two\n\0")
            assert result.stdout.endswith(b"\0bye\n")
            # a client that goes away takes the command with it (killed on node b)
            async with api._ws(on_b) as ws:
                argv = ["sh", "-c", "echo up; exec sleep 1000"]
                await ws.send(json.dumps({"argv": argv, "stdin": False}))
                assert await ws.recv() == b"\x01up\n"

            async def sleep_gone() -> bool:
                ps = ["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]
                return b"sleep 1000" not in (await api.exec(on_b, ps)).stdout

            await until(sleep_gone, "the abandoned command to be killed")

            # an agent task on node b; its RED call is decided through the service
            task = await api.start_task("write outside", script=HELD_TURNS, keep=True,
                                        sandbox=ON_B)  # fmt: skip
            await until(api.approvals, "the task's approval")
            [held] = await api.approvals()
            assert held["task_id"] == task["id"] and "+approved" in held["card"]
            assert task["sandbox_id"] in await node_rows(ray_cluster, "b")
            await api.decide(held["id"], True)
            done = await _settled(api, task["id"])
            assert (done["status"], done["answer"]) == ("completed", "done"), done
            assert await api.read_file(task["sandbox_id"], "/tmp/outside.txt") == b"approved"
            names = [e["event"] async for e in api.events(task["id"])]
            assert names[0] == "task.start" and names[-1] == "task.end"
            assert "tool.decision" in names and "model.response" in names, names

        # the service dies (SIGKILL); a new one finds every sandbox where it was
        server.proc.kill()
        server.proc.wait()
        server = start_server(settings, "--cluster", ray_cluster.address)
        async with ApiClient(server.url, admin) as api:
            listed = {d["id"]: d["state"] for d in await api.list_sandboxes()}
            assert listed == {on_a: "running", on_b: "running", task["sandbox_id"]: "running"}
            for sid in (on_a, on_b):
                assert (await api.exec(sid, ["echo", sid])).stdout == f"{sid}\n".encode()

            # node b dies while a task holds and a WebSocket exec runs there
            held_task = await api.start_task("hold", script=HELD_TURNS, sandbox=ON_B)
            await until(api.approvals, "the second task's approval")
            up = asyncio.Event()
            streaming = asyncio.ensure_future(
                api.exec_stream(
                    on_b, ["sh", "-c", "echo up; exec sleep 1000"], on_stdout=lambda _: up.set()
                )
            )
            await asyncio.wait_for(up.wait(), 60)
            assert ray_cluster.kill("b")
            failed = await _settled(api, held_task["id"])
            assert failed["status"] == "error" and "node b was lost" in failed["reason"], failed
            with pytest.raises(IronclawError, match="node b was lost"):
                await asyncio.wait_for(streaming, 120)
            assert await api.approvals() == []
            assert (await api.get(on_b))["state"] == "lost"
            with pytest.raises(IronclawError, match="node b was lost"):
                await api.exec(on_b, ["true"])
            with pytest.raises(IronclawError, match="node b was lost"):
                await api.request("POST", f"/v1/sandboxes/{on_b}/pause")
            with pytest.raises(IronclawError, match="node b was lost"):
                await api.snapshots.create(on_b, "after-loss")
            assert (await api.exec(on_a, ["echo", "a"])).stdout == b"a\n"
    finally:
        assert server.stop() == 0
