"""A real local Ray cluster for tests: ``ray start`` processes on loopback addresses.

Every node is its own IronClaw host: its own home, uid range, cgroup root and address
pool, passed in the environment of its ``ray start`` (the node actor reads them), so
two nodes on one machine never collide. Every process of a node carries a tag in its
environment; that tag, not a process name, is how a node is killed and torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ironclaw

if TYPE_CHECKING:
    from ironclaw.config import Settings

RAY = str(Path(sys.executable).with_name("ray"))
SRC = str(Path(ironclaw.__file__).resolve().parents[1])
SMALL = ["--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024),
         "--disable-usage-stats"]  # fmt: skip
# Node loss is noticed in seconds, not the default half minute.
FAST_HEALTH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    # A Ray Client session's server that has not started by then is given up (and the
    # connection retried: Cluster.open), rather than waited for longer.
    "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "45",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tagged(tag: str, cgroup_root: str) -> list[int]:
    """Pids of a node: those whose environment carries ``IRONCLAW_TEST_RAY_NODE=tag``
    and everything below them (Ray's agents and workers rewrite their environment when
    they set their process title), except sandboxes (whatever runs in the node's
    IronClaw cgroups): killing a node leaves its sandboxes behind, as a crashed raylet
    would."""
    needle = f"IRONCLAW_TEST_RAY_NODE={tag}".encode()
    children: dict[int, list[int]] = {}
    roots = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/cgroup") as f:
                cgroups = f.read()
        except OSError:
            continue
        if f"/{cgroup_root}/" in cgroups:
            continue  # a sandbox: neither it nor anything below it
        children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(pid)
        if needle in env.split(b"\0"):
            roots.append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Node:
    name: str
    ip: str
    env: dict[str, str]
    tag: str
    uid_base: int
    cgroup_root: str
    labels: dict[str, str] = field(default_factory=dict)  # Ray node labels


@dataclass
class RayCluster:
    """``start()`` a head, ``add_node`` workers, ``kill``/``restart`` them, ``stop()``."""

    base: Path
    session: str = field(default_factory=lambda: secrets.token_hex(3))
    port: int = field(default_factory=_free_port)
    client_port: int = field(default_factory=_free_port)  # Ray Client (ray://)
    nodes: dict[str, Node] = field(default_factory=dict)
    _uid_base: int = field(default_factory=lambda: 1_500_000_000 + secrets.randbelow(9000) * 40_000)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def _node(self, name: str, ip: str, env: dict[str, str] | None = None) -> Node:
        i = len(self.nodes)
        home = self.base / f"node-{name}"
        home.mkdir(mode=0o700, exist_ok=True)
        uid_base = self._uid_base + 20_000 * i
        cgroup_root = f"ironclaw-test-{self.session}-{name}"
        extra = env or {}
        env = dict(os.environ)
        env.update(FAST_HEALTH)
        env.update(
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=SRC,
            IRONCLAW_HOME=str(home),
            IRONCLAW_UID_BASE=str(uid_base),
            IRONCLAW_CGROUP_ROOT=cgroup_root,
            IRONCLAW_NET_POOL=f"10.{241 + i}.0.0/16",
            IRONCLAW_TEST_RAY_NODE=f"{self.session}-{name}",
        )
        env.update(extra)
        node = Node(name, ip, env, f"{self.session}-{name}", uid_base, cgroup_root)
        self.nodes[name] = node
        return node

    def _ray_start(self, node: Node, head: bool) -> None:
        res = f'{{"ironclaw_node_{node.name}": 1}}'
        if head:
            args = ["--head", "--port", str(self.port), "--include-dashboard=false",
                    "--ray-client-server-port", str(self.client_port),
                    "--temp-dir", str(self.base / "ray")]  # fmt: skip
        else:
            args = ["--address", self.address]
        if node.labels:
            args += ["--labels", ",".join(f"{k}={v}" for k, v in node.labels.items())]
        cmd = [RAY, "start", *args, "--node-ip-address", node.ip, "--resources", res, *SMALL]
        done = subprocess.run(cmd, env=node.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self, name: str = "a", env: dict[str, str] | None = None) -> None:
        self._ray_start(self._node(name, "127.0.0.1", env), head=True)

    def add_node(self, name: str, ip: str, labels: dict[str, str] | None = None) -> Node:
        node = self._node(name, ip)
        node.labels = dict(labels or {})
        self._ray_start(node, head=False)
        return node

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Kill the node's Ray processes (raylet, workers, agents); sandboxes stay."""
        node = self.nodes[name]
        pids = tagged(node.tag, node.cgroup_root)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def restart(self, name: str) -> None:
        self._ray_start(self.nodes[name], head=False)

    def stop(self) -> None:
        """Every node down (workers first): SIGTERM, then SIGKILL to whatever of the
        same processes is left (found before the first signal: orphans lose their tag)."""
        nodes = reversed(list(self.nodes.values()))
        pids = [p for n in nodes for p in tagged(n.tag, n.cgroup_root)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base / "ray", ignore_errors=True)

    def cleanup(self) -> None:
        """After :meth:`stop`: remove what any node's sandboxes left (registry rows,
        cgroups, network namespaces), each with that node's own settings."""
        for node in self.nodes.values():
            _cleanup_node(node)


async def until(check: object, what: str, limit: float = 120.0, step: float = 0.5) -> None:
    """Poll ``check()`` (sync or async) until true; a bounded wait, not a timed check."""
    deadline = time.monotonic() + limit
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(step)


def node_settings(cluster: RayCluster, name: str) -> Settings:
    """The IronClaw settings node ``name``'s actor runs with (its own home)."""
    from ironclaw.config import Settings

    return Settings.from_env(cluster.nodes[name].env)


async def node_rows(cluster: RayCluster, name: str) -> set[str]:
    """The sandbox ids in one node's own registry (read beside its actor)."""
    from ironclaw.resources.store import Store

    async with Store(node_settings(cluster, name).registry_path) as store:
        return {r.id for r in await store.all()}


def _cleanup_node(node: Node) -> None:
    from ironclaw.config import Settings
    from ironclaw.host.manager import SandboxManager

    async def run() -> None:
        mgr = SandboxManager(
            Settings.from_env(node.env),
            uid_base=node.uid_base,
            cgroup_root=node.cgroup_root,
            reconcile_on_open=False,
        )
        await mgr.open()
        try:
            for record in await mgr.store.all():
                with contextlib.suppress(Exception):
                    await mgr.destroy(record.id)
            await mgr.reconcile()
        finally:
            await mgr.aclose()

    old = os.environ.get("IRONCLAW_NET_POOL")
    os.environ["IRONCLAW_NET_POOL"] = node.env["IRONCLAW_NET_POOL"]
    try:
        with contextlib.suppress(Exception):
            asyncio.run(run())
    finally:
        if old is None:
            os.environ.pop("IRONCLAW_NET_POOL", None)
        else:
            os.environ["IRONCLAW_NET_POOL"] = old
    base = Path("/sys/fs/cgroup")
    for root in [base / node.cgroup_root, *(c / node.cgroup_root for c in base.iterdir())]:
        if root.is_dir():
            for sub in sorted(root.rglob("*"), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
