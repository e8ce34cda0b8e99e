"""The head's view of a Ray cluster: node actors, placements, routing and node loss.

:class:`Cluster` connects to Ray (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``), adopts
or starts one detached :class:`~ironclaw.cluster.node.NodeAgent` per node that offers an
``ironclaw_node_NAME`` resource, places each new sandbox
(:func:`~ironclaw.cluster.placement.choose_node`), remembers where it went (in memory and
in a :class:`~ironclaw.cluster.registry.PlacementStore`, so a restarted service finds
it), and sends every later call to that node. A node whose actor or raylet dies is
*lost*: its sandboxes answer every call with :class:`~ironclaw.errors.SandboxLost`, new
sandboxes go elsewhere, and when the node comes back its new actor removes what the old
one left (``NodeAgent.open``).

The head's only import of ``ray`` is in :meth:`Cluster.open`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ironclaw.cluster.links import rechunk
from ironclaw.cluster.node import NodeAgent, take_lease, without_ray_labels
from ironclaw.cluster.node_loss import mark_node_lost, recover_placements
from ironclaw.cluster.placement import (
    NODE_RESOURCE_PREFIX,
    NodeCapacity,
    choose_node,
    node_selector,
)
from ironclaw.cluster.registry import LostSandbox, PlacementStore
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
NAMESPACE = "ironclaw"
OutputSink = Callable[[bytes], Awaitable[None] | None]


@dataclass
class ClusterNode:
    """One node as the head sees it."""

    name: str
    ray_node_id: str
    actor: Any
    capacity: NodeCapacity
    lost_reason: str | None = None
    #: Taken over from a previous service (its sandboxes were kept).
    adopted: bool = False
    #: Bumped when a create or destroy on the node starts or ends: a capacity report
    #: asked for before a bump is stale (it may miss a debit) and is dropped.
    epoch: int = 0


@dataclass
class Cluster:
    """Sandboxes on many hosts behind one object. ``async with Cluster("auto") as c``."""

    address: str = "auto"
    health_interval: float = 1.0
    actor_timeout: float = 120.0
    nodes: dict[str, ClusterNode] = field(default_factory=dict)
    placements: dict[str, str] = field(default_factory=dict)  # sandbox id -> node name
    lost: dict[str, LostSandbox] = field(default_factory=dict)
    _monitor: asyncio.Task[None] | None = None
    _refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The placement registry's file (None: in memory, lost with the service).
    registry_path: Path | None = None
    _ray: Any = None
    _lease: Any = None
    _store: PlacementStore = field(init=False)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._store = PlacementStore(self.registry_path)

    async def __aenter__(self) -> Cluster:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect to Ray, take the service lease, adopt or start the node actors,
        recover the placements a previous service left, and watch the nodes."""
        try:
            import ray
        except ImportError:
            raise ConfigError("clustering needs Ray: pip install 'ironclaw[ray]'") from None
        self._ray = ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report usage
        if not ray.is_initialized():
            await self._connect(ray)
        try:
            self._lease = await take_lease(ray, HEAD_RESOURCE)
            rows = self._store.open()
            await self.refresh(adopt=True)
            if not self.nodes:
                raise ConfigError(
                    "no Ray node offers an ironclaw_node_NAME resource; start nodes with "
                    "`ray start ... --resources '{\"ironclaw_node_NAME\": 1}'`"
                )
            await recover_placements(self, rows)
        except BaseException:
            if self._lease is not None:
                self._ray.kill(self._lease)
            self._store.close()
            ray.shutdown()
            raise
        self._monitor = asyncio.ensure_future(self._watch())

    async def _connect(self, ray: Any, attempts: int = 3) -> None:
        """``ray.init``; over Ray Client a failed start of the head's per-connection
        server (it happens on a loaded head) is retried: the next one gets a new one."""
        for attempt in range(1, attempts + 1):
            try:
                ray.init(
                    address=self.address,
                    namespace=NAMESPACE,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )
                return
            except (ConnectionError, RuntimeError, ValueError) as exc:
                if attempt < attempts and "client server failed" in str(exc):
                    await asyncio.sleep(1)
                    continue
                raise ConfigError(
                    f"cannot connect to the Ray cluster at {self.address}: {exc}; "
                    "start one with `ray start --head` (see docs/CLUSTER.md)"
                ) from None

    def keep(self, job: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``job`` in the background until it ends or the cluster closes."""
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def aclose(self) -> None:
        """Stop watching, end the node actors (their sandboxes go) and disconnect."""
        # The watch ends between rounds (Ray Client mishandles a call cancelled mid-way);
        # the background jobs are cancelled.
        self._closing.set()
        if self._monitor is not None:
            await asyncio.wait({self._monitor}, timeout=self.health_interval + 35)
        jobs = [t for t in (self._monitor, *self._background) if t is not None]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        for node in self.nodes.values():
            if node.lost_reason is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(node.actor.close.remote(), 60)
                with contextlib.suppress(Exception):
                    self._ray.kill(node.actor)
        self.nodes.clear()
        self._store.clear()  # every sandbox went with its node's actor
        self._store.close()
        if self._lease is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(self._lease)
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()

    # -- nodes -------------------------------------------------------------------------

    async def refresh(self, *, adopt: bool = False) -> None:
        """Mark nodes Ray lost as lost; start actors on nodes that are new or back
        (with ``adopt``, a live actor a previous service left is taken over)."""
        async with self._refreshing:
            ray_nodes = await asyncio.to_thread(self._ray.nodes)
            alive: dict[str, tuple[str, str, dict[str, str]]] = {}
            for n in ray_nodes:
                for res in n.get("Resources", {}):
                    if res.startswith(NODE_RESOURCE_PREFIX) and n.get("Alive"):
                        labels = dict(n.get("Labels") or {})
                        name = res.removeprefix(NODE_RESOURCE_PREFIX)
                        alive[name] = (n["NodeID"], res, labels)
            for name, node in self.nodes.items():
                if node.lost_reason is None and alive.get(name, ("",))[0] != node.ray_node_id:
                    mark_node_lost(self, name, "Ray reports the node dead")
            for name, (node_id, res, labels) in alive.items():
                known = self.nodes.get(name)
                if known is not None and known.lost_reason is None:
                    continue
                await self._start_node(name, node_id, res, labels, adopt=adopt)

    async def _start_node(
        self, name: str, node_id: str, resource: str, labels: dict[str, str], *, adopt: bool
    ) -> None:
        log = logging.getLogger(__name__)
        actor = await self._named_actor(name)
        adopted = False
        if actor is not None:
            if not adopt:  # declared lost meanwhile: its sandboxes are gone for the head
                with contextlib.suppress(Exception):
                    self._ray.kill(actor, no_restart=True)
                return  # the name is free at a later refresh
            adopted = True
        else:
            remote = self._ray.remote(NodeAgent)
            try:
                actor = remote.options(
                    name=f"node-{name}",
                    lifetime="detached",  # outlives a crashed service: sandboxes survive
                    num_cpus=0,
                    resources={resource: 0.001},
                ).remote(name)
            except ValueError:  # the dead actor's name is not released yet
                return
        try:
            if not adopted:
                await asyncio.wait_for(actor.open.remote(), self.actor_timeout)
            cap = await asyncio.wait_for(actor.capacity.remote(), self.actor_timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)
            log.warning("node %s did not start: %s", name, exc)
            return
        capacity = NodeCapacity(**cap)
        capacity.labels = without_ray_labels(labels) | capacity.labels
        self.nodes[name] = ClusterNode(name, node_id, actor, capacity, adopted=adopted)

    async def _named_actor(self, name: str) -> Any:
        """The live node actor of ``name`` a service started, or None."""
        try:
            actor = self._ray.get_actor(f"node-{name}", namespace=NAMESPACE)
        except ValueError:
            return None
        try:
            await asyncio.wait_for(actor.capacity.remote(), 30)
        except Exception:
            return None
        return actor

    async def _watch(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.health_interval)
                return
            with contextlib.suppress(Exception):
                await self.refresh()
            for node in list(self.nodes.values()):
                if node.lost_reason is None:
                    with contextlib.suppress(IronclawError, asyncio.TimeoutError):
                        asked = node.epoch
                        cap = await self.on(node.name, node.actor.capacity.remote(), timeout=30)
                        if node.epoch == asked and node.lost_reason is None:
                            node.capacity = NodeCapacity(**cap)

    def capacities(self) -> list[NodeCapacity]:
        return [n.capacity for n in self.nodes.values()]

    # -- routing -----------------------------------------------------------------------

    async def on(self, name: str, call: Awaitable[T], *, timeout: float | None = None) -> T:
        """Await one actor call on node ``name``; Ray's errors become IronClaw's."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return await asyncio.wait_for(call, timeout)
        except RayActorError as exc:
            mark_node_lost(self, name, f"its actor died: {type(exc).__name__}")
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

    def route(self, sandbox_id: str) -> tuple[str, Any]:
        name = self.placement(sandbox_id)
        return name, self.nodes[name].actor

    async def create(
        self,
        spec: SandboxSpec | dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        node: str | None = None,
        node_labels: dict[str, str] | None = None,
    ) -> SandboxRecord:
        """Create a sandbox on the freest live node that matches: ``node`` names one,
        ``node_labels`` and the spec's ``node/KEY`` labels select by the nodes' labels."""
        spec = parse_spec(spec if spec is not None else {})
        sid = validate_sandbox_id(sandbox_id) if sandbox_id is not None else new_sandbox_id()
        if sid in self.placements or sid in self.lost:
            raise ConfigError(f"sandbox {sid} already exists; choose another id")
        selector = node_selector(spec.labels) | dict(node_labels or {})
        target = choose_node(
            self.capacities(), spec.limits.memory_mib, node=node, selector=selector
        )
        memory = spec.limits.memory_mib
        return await self._make(target, sid, memory, "create", spec.model_dump(), sid)

    async def make_on(
        self, node: str, sandbox_id: str, memory_mib: int, method: str, *args: Any
    ) -> SandboxRecord:
        """A new sandbox ``sandbox_id`` made on ``node`` by its actor's ``method`` called
        with ``args`` (a restore from a snapshot that node holds), placed and debited as
        a create is."""
        sid = validate_sandbox_id(sandbox_id)
        if sid in self.placements or sid in self.lost:
            raise ConfigError(f"sandbox {sid} already exists; choose another id")
        target = choose_node(self.capacities(), memory_mib, node=node)
        return await self._make(target, sid, memory_mib, method, *args)

    async def _make(
        self, target: NodeCapacity, sid: str, memory_mib: int, method: str, *args: Any
    ) -> SandboxRecord:
        target.sandboxes += 1  # debited now, so concurrent creates spread out
        target.reserved_mib += memory_mib
        self.placements[sid] = target.name
        self._store.place(sid, target.name)
        owner = self.nodes[target.name]
        owner.epoch += 1
        try:
            return await self.on(target.name, getattr(owner.actor, method).remote(*args))
        except BaseException:
            if self.placements.get(sid) == target.name:
                del self.placements[sid]
                self._store.forget(sid)
            target.sandboxes -= 1
            target.reserved_mib -= memory_mib
            raise
        finally:
            owner.epoch += 1

    async def get(self, sandbox_id: str) -> SandboxRecord:
        if sandbox_id in self.lost:
            return self.lost[sandbox_id].record
        name, actor = self.route(sandbox_id)
        return await self.on(name, actor.get.remote(sandbox_id))

    async def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox of every live node, and the lost ones."""
        out = [lost.record for lost in self.lost.values()]
        for node in list(self.nodes.values()):
            if node.lost_reason is None:
                with contextlib.suppress(SandboxLost):
                    records = await self.on(node.name, node.actor.sandboxes.remote())
                    out.extend(r for r in records if self.placements.get(r.id) == node.name)
        return out

    async def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox; a lost one is only forgotten (its node's next actor removes
        what is left of it)."""
        if self.lost.pop(sandbox_id, None) is not None:
            self._store.forget(sandbox_id)
            return
        name, actor = self.route(sandbox_id)
        node = self.nodes[name]
        node.epoch += 1
        try:
            freed = await self.on(name, actor.destroy.remote(sandbox_id))
        finally:
            node.epoch += 1
        self.placements.pop(sandbox_id, None)
        self._store.forget(sandbox_id)
        node.capacity.sandboxes = max(node.capacity.sandboxes - 1, 0)
        node.capacity.reserved_mib = max(node.capacity.reserved_mib - int(freed), 0)

    async def call(self, sandbox_id: str, method: str, params: Any = None) -> Any:
        name, actor = self.route(sandbox_id)
        return await self.on(name, actor.call.remote(sandbox_id, method, params))

    async def ask(self, sandbox_id: str, method: str, *args: Any) -> Any:
        """The node actor's ``method`` (a control: pause, timeout, ...) on the sandbox's
        node, with the sandbox's id first."""
        name, actor = self.route(sandbox_id)
        return await self.on(name, getattr(actor, method).remote(sandbox_id, *args))

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
        name, actor = self.route(sandbox_id)
        options["stream"] = on_stdout is not None or on_stderr is not None
        sinks = {"stdout": on_stdout, "stderr": on_stderr}
        async for kind, item in self.stream(name, actor, "exec", sandbox_id, argv, options):
            if kind == "result":
                assert isinstance(item, ExecResult)
                return item
            sink = sinks.get(kind)
            if sink is not None:
                maybe = sink(item)
                if maybe is not None:
                    await maybe
        raise SandboxError(f"node {name} ended the command without a result")

    async def stream(
        self, name: str, actor: Any, method: str, *args: Any, backlog: int | None = None
    ) -> AsyncIterator[Any]:
        """The items of the node actor's generator ``method``: a Ray streaming generator
        (at most ``backlog`` items ahead of the reader), or over Ray Client, which has
        none, pulled one item per call (``NodeAgent.pull_next``)."""
        if self.address.startswith("ray://"):
            handle = await self.on(name, actor.pull_open.remote(method, *args))
            try:
                while True:
                    item, more = await self.on(name, actor.pull_next.remote(handle))
                    if not more:
                        return
                    yield item
            finally:
                with contextlib.suppress(Exception):
                    await self.on(name, actor.pull_close.remote(handle))
        options: dict[str, Any] = {"num_returns": "streaming"}
        if backlog is not None:
            options["_generator_backpressure_num_objects"] = backlog
        gen = getattr(actor, method).options(**options).remote(*args)
        while True:
            try:
                ref = await self.on(name, gen.__anext__())
            except StopAsyncIteration:
                return
            yield await self.on(name, ref)

    async def read_file(
        self, sandbox_id: str, path: str, sink: OutputSink | None = None, *, limit: int | None
    ) -> bytes:
        """A file's bytes, chunk by chunk into ``sink`` (then ``b""`` is returned)."""
        name, actor = self.route(sandbox_id)
        parts: list[bytes] = []
        async for chunk in self.stream(name, actor, "read_file", sandbox_id, path, limit):
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
        """Write a file on the sandbox's node in chunks of at most 256 KiB."""
        name, actor = self.route(sandbox_id)
        handle = await self.on(name, actor.write_open.remote(sandbox_id, path, mode))
        try:
            async for chunk in rechunk(data):
                await self.on(name, actor.write_chunk.remote(handle, chunk))
        except BaseException:
            with contextlib.suppress(Exception):
                await self.on(name, actor.write_close.remote(handle, abort=True))
            raise
        return int(await self.on(name, actor.write_close.remote(handle)))

    def describe(self) -> list[dict[str, Any]]:
        """The nodes, their capacity and state (for ``/healthz`` and the docs' examples)."""
        return [
            dataclasses.asdict(n.capacity) | {"lost": n.lost_reason} for n in self.nodes.values()
        ]
