"""The head's view of a Ray cluster: node actors, placements, routing and node loss.

:class:`Cluster` connects to Ray (``auto`` or ``ray://HOST:PORT``), starts one
:class:`~ironclaw.cluster.node.NodeAgent` per node that offers an ``ironclaw_node_NAME``
resource, places each new sandbox (:func:`~ironclaw.cluster.placement.choose_node`),
remembers where it went, and sends every later call to that node. A node whose actor or
raylet dies is *lost*: its sandboxes answer every call with
:class:`~ironclaw.errors.SandboxLost`, new sandboxes go elsewhere, and when the node
comes back its new actor removes what the old one left (``NodeAgent.open``).

The only module that imports ``ray``, and only in :meth:`Cluster.open`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ironclaw.cluster.node import CHUNK, NodeAgent, ServiceLease
from ironclaw.cluster.placement import NODE_RESOURCE_PREFIX, NodeCapacity, choose_node
from ironclaw.errors import (
    ConfigError,
    IronclawError,
    SandboxError,
    SandboxLost,
    SandboxNotFound,
)
from ironclaw.host.guest import ExecResult
from ironclaw.ids import new_sandbox_id, validate_sandbox_id
from ironclaw.resources.store import SandboxRecord
from ironclaw.spec import SandboxSpec, parse_spec

__all__ = ["Cluster", "ClusterNode"]

T = TypeVar("T")
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node
OutputSink = Callable[[bytes], Awaitable[None] | None]


@dataclass
class ClusterNode:
    """One node as the head sees it."""

    name: str
    ray_node_id: str
    actor: Any
    capacity: NodeCapacity
    lost_reason: str | None = None
    #: Bumped when a create or destroy on the node starts or ends: a capacity report
    #: asked for before a bump is stale (it may miss a debit) and is dropped.
    epoch: int = 0


@dataclass
class _Lost:
    node: str
    reason: str
    record: SandboxRecord


@dataclass
class Cluster:
    """Sandboxes on many hosts behind one object. ``async with Cluster("auto") as c``."""

    address: str = "auto"
    health_interval: float = 1.0
    actor_timeout: float = 120.0
    nodes: dict[str, ClusterNode] = field(default_factory=dict)
    placements: dict[str, str] = field(default_factory=dict)  # sandbox id -> node name
    lost: dict[str, _Lost] = field(default_factory=dict)
    _monitor: asyncio.Task[None] | None = None
    _refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _ray: Any = None
    _lease: Any = None

    async def __aenter__(self) -> Cluster:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect to Ray, start the node actors and watch the nodes."""
        try:
            import ray
        except ImportError:
            raise ConfigError("clustering needs Ray: pip install 'ironclaw[ray]'") from None
        self._ray = ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report usage
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    namespace="ironclaw",
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"cannot connect to the Ray cluster at {self.address}: {exc}; "
                    "start one with `ray start --head` (see docs/CLUSTER.md)"
                ) from None
        try:
            # One service per cluster: a second one's node actors would clear the
            # nodes' registries of the first one's sandboxes. The lease is a named
            # actor on the head node; its name is taken while this service lives.
            self._lease = (
                ray.remote(ServiceLease)
                .options(name="service", num_cpus=0, resources={HEAD_RESOURCE: 0.001})
                .remote()
            )
        except ValueError:
            ray.shutdown()
            raise ConfigError(
                "another IronClaw service already drives this Ray cluster: one service "
                "per cluster; stop the other one first"
            ) from None
        await self.refresh()
        if not self.nodes:
            self._ray.kill(self._lease)
            ray.shutdown()
            raise ConfigError(
                "no Ray node offers an ironclaw_node_NAME resource; start nodes with "
                "`ray start ... --resources '{\"ironclaw_node_NAME\": 1}'`"
            )
        self._monitor = asyncio.ensure_future(self._watch())

    async def aclose(self) -> None:
        """Stop watching, end the node actors (their sandboxes go) and disconnect."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for node in self.nodes.values():
            if node.lost_reason is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(node.actor.close.remote(), 60)
                with contextlib.suppress(Exception):
                    self._ray.kill(node.actor)
        self.nodes.clear()
        if self._lease is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(self._lease)
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()

    # -- nodes -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Mark nodes Ray lost as lost; start actors on nodes that are new or back."""
        async with self._refreshing:
            ray_nodes = await asyncio.to_thread(self._ray.nodes)
            alive: dict[str, tuple[str, str]] = {}  # name -> (ray node id, resource)
            for n in ray_nodes:
                for res in n.get("Resources", {}):
                    if res.startswith(NODE_RESOURCE_PREFIX) and n.get("Alive"):
                        alive[res.removeprefix(NODE_RESOURCE_PREFIX)] = (n["NodeID"], res)
            for name, node in self.nodes.items():
                if node.lost_reason is None and alive.get(name, ("",))[0] != node.ray_node_id:
                    self._mark_lost(name, "Ray reports the node dead")
            for name, (node_id, res) in alive.items():
                known = self.nodes.get(name)
                if known is not None and known.lost_reason is None:
                    continue
                await self._start_node(name, node_id, res)

    async def _start_node(self, name: str, node_id: str, resource: str) -> None:
        remote = self._ray.remote(NodeAgent)
        actor = remote.options(num_cpus=0, resources={resource: 0.001}).remote(name)
        try:
            await asyncio.wait_for(actor.open.remote(), self.actor_timeout)
            cap = await asyncio.wait_for(actor.capacity.remote(), self.actor_timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._ray.kill(actor)
            logging.getLogger(__name__).warning("node %s did not start: %s", name, exc)
            return
        self.nodes[name] = ClusterNode(name, node_id, actor, NodeCapacity(**cap))

    def _mark_lost(self, name: str, why: str) -> None:
        node = self.nodes[name]
        if node.lost_reason is not None:
            return
        node.lost_reason = f"node {name} was lost ({why})"
        node.capacity.alive = False
        for sid, where in list(self.placements.items()):
            if where == name:
                del self.placements[sid]
                record = SandboxRecord(id=sid, slot=0, backend="?", state="lost", spec={},
                                       reason=node.lost_reason, updated_at=time.time())  # fmt: skip
                self.lost[sid] = _Lost(name, node.lost_reason, record)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            with contextlib.suppress(Exception):
                await self.refresh()
            for node in list(self.nodes.values()):
                if node.lost_reason is None:
                    with contextlib.suppress(IronclawError, asyncio.TimeoutError):
                        asked = node.epoch
                        cap = await self._on(node.name, node.actor.capacity.remote(), timeout=30)
                        if node.epoch == asked and node.lost_reason is None:
                            node.capacity = NodeCapacity(**cap)

    def capacities(self) -> list[NodeCapacity]:
        return [n.capacity for n in self.nodes.values()]

    # -- routing -----------------------------------------------------------------------

    async def _on(self, name: str, call: Awaitable[T], *, timeout: float | None = None) -> T:
        """Await one actor call on node ``name``; Ray's errors become IronClaw's."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return await asyncio.wait_for(call, timeout)
        except RayActorError as exc:
            self._mark_lost(name, f"its actor died: {type(exc).__name__}")
            raise SandboxLost(self.nodes[name].lost_reason or name) from None
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, IronclawError):
                raise cause from None
            raise SandboxError(f"node {name}: {type(cause).__name__}: {cause}") from None

    def placement(self, sandbox_id: str) -> str:
        """The node that holds the sandbox, or :class:`SandboxLost` / :class:`SandboxNotFound`."""
        lost = self.lost.get(sandbox_id)
        if lost is not None:
            raise SandboxLost(
                f"sandbox {sandbox_id} is lost: {lost.reason}; its processes and files are "
                "gone. Remove it and create a new one"
            )
        name = self.placements.get(sandbox_id)
        if name is None:
            raise SandboxNotFound(f"no sandbox named {sandbox_id!r} in the cluster")
        return name

    def _actor(self, sandbox_id: str) -> tuple[str, Any]:
        name = self.placement(sandbox_id)
        return name, self.nodes[name].actor

    async def create(
        self,
        spec: SandboxSpec | dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        node: str | None = None,
    ) -> SandboxRecord:
        """Create a sandbox on the freest live node (or on ``node``: an affinity)."""
        spec = parse_spec(spec if spec is not None else {})
        sid = validate_sandbox_id(sandbox_id) if sandbox_id is not None else new_sandbox_id()
        if sid in self.placements or sid in self.lost:
            raise ConfigError(f"sandbox {sid} already exists; choose another id")
        target = choose_node(self.capacities(), spec.limits.memory_mib, node=node)
        target.sandboxes += 1  # debited now, so concurrent creates spread out
        target.reserved_mib += spec.limits.memory_mib
        self.placements[sid] = target.name
        owner = self.nodes[target.name]
        owner.epoch += 1
        try:
            return await self._on(target.name, owner.actor.create.remote(spec.model_dump(), sid))
        except BaseException:
            if self.placements.get(sid) == target.name:
                del self.placements[sid]
            target.sandboxes -= 1
            target.reserved_mib -= spec.limits.memory_mib
            raise
        finally:
            owner.epoch += 1

    async def get(self, sandbox_id: str) -> SandboxRecord:
        if sandbox_id in self.lost:
            return self.lost[sandbox_id].record
        name, actor = self._actor(sandbox_id)
        return await self._on(name, actor.get.remote(sandbox_id))

    async def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox of every live node, and the lost ones."""
        out = [lost.record for lost in self.lost.values()]
        for node in list(self.nodes.values()):
            if node.lost_reason is None:
                with contextlib.suppress(SandboxLost):
                    records = await self._on(node.name, node.actor.sandboxes.remote())
                    out.extend(r for r in records if self.placements.get(r.id) == node.name)
        return out

    async def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox; a lost one is only forgotten (its node's next actor removes
        what is left of it)."""
        if self.lost.pop(sandbox_id, None) is not None:
            return
        name, actor = self._actor(sandbox_id)
        node = self.nodes[name]
        node.epoch += 1
        try:
            await self._on(name, actor.destroy.remote(sandbox_id))
        finally:
            node.epoch += 1
        self.placements.pop(sandbox_id, None)
        node.capacity.sandboxes = max(node.capacity.sandboxes - 1, 0)

    async def call(self, sandbox_id: str, method: str, params: Any = None) -> Any:
        name, actor = self._actor(sandbox_id)
        return await self._on(name, actor.call.remote(sandbox_id, method, params))

    async def exec(
        self,
        sandbox_id: str,
        argv: list[str],
        *,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        **options: Any,
    ) -> ExecResult:
        """Run a command on the sandbox's node; output streams back in chunks."""
        name, actor = self._actor(sandbox_id)
        options["stream"] = on_stdout is not None or on_stderr is not None
        gen = actor.exec.options(num_returns="streaming").remote(sandbox_id, argv, options)
        sinks = {"stdout": on_stdout, "stderr": on_stderr}
        async for kind, item in self._stream(name, gen):
            if kind == "result":
                assert isinstance(item, ExecResult)
                return item
            sink = sinks.get(kind)
            if sink is not None:
                maybe = sink(item)
                if maybe is not None:
                    await maybe
        raise SandboxError(f"node {name} ended the command without a result")

    async def _stream(self, name: str, gen: Any) -> AsyncIterator[Any]:
        while True:
            try:
                ref = await self._on(name, gen.__anext__())
            except StopAsyncIteration:
                return
            yield await self._on(name, ref)

    async def read_file(
        self, sandbox_id: str, path: str, sink: OutputSink | None = None, *, limit: int | None
    ) -> bytes:
        """A file's bytes, chunk by chunk into ``sink`` (then ``b""`` is returned)."""
        name, actor = self._actor(sandbox_id)
        gen = actor.read_file.options(num_returns="streaming").remote(sandbox_id, path, limit)
        parts: list[bytes] = []
        async for chunk in self._stream(name, gen):
            if sink is None:
                parts.append(chunk)
            else:
                maybe = sink(chunk)
                if maybe is not None:
                    await maybe
        return b"".join(parts)

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        """Write a file on the sandbox's node in chunks of at most ``CHUNK`` bytes."""
        name, actor = self._actor(sandbox_id)
        handle = await self._on(name, actor.write_open.remote(sandbox_id, path, mode))
        try:
            async for chunk in _rechunk(data):
                await self._on(name, actor.write_chunk.remote(handle, chunk))
        except BaseException:
            with contextlib.suppress(Exception):
                await self._on(name, actor.write_close.remote(handle, abort=True))
            raise
        return int(await self._on(name, actor.write_close.remote(handle)))

    def describe(self) -> list[dict[str, Any]]:
        """The nodes, their capacity and state (for ``/healthz`` and the docs' examples)."""
        return [
            dataclasses.asdict(n.capacity) | {"lost": n.lost_reason} for n in self.nodes.values()
        ]


async def _rechunk(data: bytes | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        for i in range(0, len(data), CHUNK):
            yield data[i : i + CHUNK]
        return
    async for piece in data:
        for i in range(0, len(piece), CHUNK):
            yield piece[i : i + CHUNK]
