"""The node actor: one per Ray node, owning that node's :class:`SandboxManager`.

A plain class: :mod:`.cluster` turns it into a Ray actor pinned to its node (the node's
``ironclaw_node_NAME`` resource, ``num_cpus=0``). Its configuration is the node's own
environment (``IRONCLAW_HOME``, ``IRONCLAW_UID_BASE``, ``IRONCLAW_CGROUP_ROOT``,
``IRONCLAW_NET_POOL``, as ``ray start`` was given them), so two nodes on one machine
never share a registry, a uid range, a cgroup root or an address pool.

Outputs leave the node in chunks (Ray streaming generators for exec and file reads, or
pulled item by item over Ray Client; chunked calls for writes): a large file or a chatty
command is never one object. The guest's calls to the host are relayed to the head
(``link_*``) and interactive execs run here with their stdin fed by calls (``exec_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, TypedDict

from ironclaw.cluster.links import CHUNK, ExecPipe, GuestLink
from ironclaw.cluster.node_controls import NodeControls
from ironclaw.config import Settings
from ironclaw.errors import ConfigError, SandboxNotFound
from ironclaw.host.guest import DEFAULT_CAPTURE_LIMIT
from ironclaw.host.manager import SandboxManager
from ironclaw.proto import methods
from ironclaw.proto.jsonval import JsonObject
from ironclaw.resources.store import SandboxRecord

__all__ = [
    "NodeAgent",
    "ServiceLease",
    "node_labels",
    "node_memory_mib",
    "take_lease",
    "without_ray_labels",
]

_END = object()
_GENERATORS = frozenset({"exec", "read_file", "link_requests", "exec_items"})


def node_memory_mib() -> int:
    """The memory budget for sandboxes' limits: ``IRONCLAW_NODE_MEMORY_MIB`` or MemTotal."""
    configured = os.environ.get("IRONCLAW_NODE_MEMORY_MIB")
    if configured:
        return int(configured)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise ConfigError("cannot read MemTotal from /proc/meminfo; set IRONCLAW_NODE_MEMORY_MIB")


class NodeOpened(TypedDict):
    """What a node actor's ``open`` removed: the sandboxes a previous actor left, and
    the scanning reconcile's report (``gc``, as ``ironclaw gc --json`` prints it)."""

    node: str
    removed: list[str]
    gc: JsonObject


def without_ray_labels(labels: Mapping[str, object]) -> dict[str, str]:
    """A Ray node's labels without Ray's own (``ray.io/...``)."""
    return {k: str(v) for k, v in labels.items() if not k.startswith("ray.io/")}


def node_labels() -> dict[str, str]:
    """This node's labels: its Ray node labels (``ray start --labels``, without Ray's
    own ``ray.io/...``) and ``IRONCLAW_NODE_LABELS`` (``key=value,key=value``)."""
    labels: dict[str, str] = {}
    with contextlib.suppress(Exception):
        import ray

        labels.update(without_ray_labels(ray.get_runtime_context().get_node_labels()))
    for item in os.environ.get("IRONCLAW_NODE_LABELS", "").split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            if item.strip():
                raise ConfigError(f"IRONCLAW_NODE_LABELS: {item!r} is not key=value")
            continue
        labels[key] = value
    return labels


_LIVE = ("running", "creating", "paused")  # a paused sandbox keeps its memory


def _reserved_mib(record: SandboxRecord) -> int:
    """The memory a sandbox holds of its node's budget (its limit, while it is live)."""
    if record.state not in _LIVE:
        return 0
    return int(record.spec.get("limits", {}).get("memory_mib", 512))


class _Upload:
    """A file being written in chunks: the manager reads from the queue as they arrive."""

    def __init__(self, manager: SandboxManager, sid: str, path: str, mode: int) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize=4)
        self.task = asyncio.ensure_future(manager.write_file(sid, path, self._chunks(), mode=mode))

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (item := await self.queue.get()) is not _END:
            assert isinstance(item, bytes)
            yield item


class ServiceLease:
    """Held (as a named actor) by the one service that drives a cluster."""

    def __init__(self, holder: str) -> None:
        self.holder = holder

    def held_by(self) -> str:
        return self.holder


async def take_lease(ray: Any, head_resource: str, *, wait: float = 30.0) -> Any:
    """The lease actor, named ``service`` on the head node: one service per cluster (a
    second one's node actors would clear the nodes' registries of the first one's
    sandboxes). A lease whose holder on this host is dead (a crashed service that Ray
    has not reaped yet) is waited for, up to ``wait`` seconds."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait
    while True:
        try:
            options = {"name": "service", "num_cpus": 0, "resources": {head_resource: 0.001}}
            return ray.remote(ServiceLease).options(**options).remote(me)
        except ValueError:
            pass
        holder = await _lease_holder(ray)
        if (holder is not None and not _gone(holder)) or time.monotonic() > deadline:
            raise ConfigError(
                "another IronClaw service already drives this Ray cluster (its lease is "
                f"held by {holder or 'a service not answering'}): one service per cluster; "
                "stop the other one first"
            )
        await asyncio.sleep(0.5)


async def _lease_holder(ray: Any) -> str | None:
    """Who holds the lease, or None when its actor is gone or not answering."""
    try:
        lease = ray.get_actor("service")
        return str(await asyncio.wait_for(lease.held_by.remote(), 10))
    except Exception:
        return None


def _gone(holder: str) -> bool:
    """A holder on this host whose process has exited."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class NodeAgent(NodeControls):
    """One node's sandboxes, driven by the head through actor calls (the controls and
    snapshots: :class:`~ironclaw.cluster.node_controls.NodeControls`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_sandboxes = int(os.environ.get("IRONCLAW_NODE_MAX_SANDBOXES", "64"))
        self.memory_mib = node_memory_mib()
        self.labels = node_labels()
        self.manager = SandboxManager(Settings.from_env())
        self._uploads: dict[str, _Upload] = {}
        self._links: dict[str, GuestLink] = {}
        self._pipes: dict[str, ExecPipe] = {}
        self._pulls: dict[str, AsyncGenerator[Any, None]] = {}

    async def open(self) -> NodeOpened:
        """Open the registry and remove every sandbox a previous actor of this node left.

        The head declared those lost when that actor died and will never route to them
        again, so none survives: each is destroyed, then a scanning reconcile removes
        whatever no row accounts for.
        """
        await self.manager.open()
        left = [r.id for r in await self.manager.store.all()]
        for sid in left:
            with contextlib.suppress(SandboxNotFound):
                await self.manager.destroy(sid)
        report = await self.manager.reconcile(scan=True)
        return NodeOpened(node=self.name, removed=left, gc=report.to_json())

    async def capacity(self) -> dict[str, Any]:
        live = [r for r in await self.manager.sandboxes() if r.state in _LIVE]
        reserved = sum(_reserved_mib(r) for r in live)
        return {
            "name": self.name,
            "max_sandboxes": self.max_sandboxes,
            "sandboxes": len(live),
            "memory_mib": self.memory_mib,
            "reserved_mib": reserved,
            "labels": self.labels,
        }

    async def create(self, spec: JsonObject, sandbox_id: str) -> SandboxRecord:
        return await self.manager.create(spec, sandbox_id=sandbox_id)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return await self.manager.get(sandbox_id)

    async def sandboxes(self) -> list[SandboxRecord]:
        return await self.manager.sandboxes()

    async def destroy(self, sandbox_id: str) -> int:
        """Remove the sandbox; return its memory limit (the head frees it at once)."""
        record = await self.manager.get(sandbox_id)
        await self.manager.destroy(sandbox_id)
        return _reserved_mib(record)

    async def call(self, sandbox_id: str, method: str, params: Any = None) -> Any:
        """Relay one typed call from the head: the request is decoded here before it
        reaches the guest, and the guest's reply is decoded before it goes back."""
        request = methods.decode_request(method, params)
        guest = await self.manager.guest(sandbox_id)
        reply = await guest.peer.call(method, methods.to_json(request))
        return methods.encode_result(methods.decode_result(method, reply))

    async def exec(
        self, sandbox_id: str, argv: list[str], options: dict[str, Any]
    ) -> AsyncIterator[tuple[str, Any]]:
        """Run a command; yield ``("stdout"|"stderr", bytes)`` as output comes, then
        ``("result", dict)``. Called as a streaming generator."""
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=64)
        stream = bool(options.pop("stream", True))

        def sink(name: str) -> Any:
            async def put(data: bytes) -> None:
                for i in range(0, len(data), CHUNK):
                    await queue.put((name, data[i : i + CHUNK]))

            return put if stream else None

        async def run() -> None:
            try:
                result = await self.manager.exec(
                    sandbox_id,
                    argv,
                    on_stdout=sink("stdout"),
                    on_stderr=sink("stderr"),
                    capture_limit=int(options.pop("capture_limit", DEFAULT_CAPTURE_LIMIT)),
                    **options,
                )
                await queue.put(("result", result))
            except BaseException as exc:  # handed to the caller through the stream
                await queue.put(("error", exc))

        task = asyncio.ensure_future(run())
        try:
            while True:
                kind, item = await queue.get()
                if kind == "error":
                    raise item
                yield kind, item
                if kind == "result":
                    return
        finally:
            task.cancel()

    async def read_file(
        self, sandbox_id: str, path: str, limit: int | None
    ) -> AsyncIterator[bytes]:
        """Yield a file's bytes in chunks (a streaming generator)."""
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=16)

        async def sink(data: bytes) -> None:
            for i in range(0, len(data), CHUNK):
                await queue.put(data[i : i + CHUNK])

        async def run() -> None:
            try:
                await self.manager.read_file(sandbox_id, path, sink, limit=limit)
                await queue.put(_END)
            except BaseException as exc:
                await queue.put(exc)

        task = asyncio.ensure_future(run())
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, bytes)
                yield item
        finally:
            task.cancel()

    async def write_open(self, sandbox_id: str, path: str, mode: int) -> str:
        handle = secrets.token_hex(8)
        self._uploads[handle] = _Upload(self.manager, sandbox_id, path, mode)
        return handle

    async def write_chunk(self, handle: str, data: bytes) -> None:
        upload = self._uploads[handle]
        if upload.task.done():  # failed early: report why
            self._uploads.pop(handle)
            await upload.task
        await upload.queue.put(data)

    async def write_close(self, handle: str, *, abort: bool = False) -> int:
        upload = self._uploads.pop(handle)
        if abort:
            upload.task.cancel()
            return 0
        await upload.queue.put(_END)
        return await upload.task

    # -- the guest's calls to the host, answered by the head ----------------------------

    async def link_open(self, sandbox_id: str, methods: list[str], handle: str | None) -> str:
        """Relay the guest's calls on ``methods`` to the head (a new link, or more
        methods on ``handle``); the head reads them from :meth:`link_requests`."""
        link = self._links.get(handle or "")
        if link is not None:
            link.add(methods)
            return handle or ""
        guest = await self.manager.guest(sandbox_id)
        handle = secrets.token_hex(8)
        self._links[handle] = GuestLink(guest.peer, methods)
        return handle

    async def link_requests(self, handle: str) -> AsyncIterator[tuple[int, str, Any]]:
        """The guest's calls, ``(id, method, params)`` (a streaming generator that ends
        with the sandbox's channel)."""
        try:
            async for request in self._links[handle].requests():
                yield request
        finally:
            self._links.pop(handle, None)

    async def link_reply(self, handle: str, rid: int, ok: bool, value: Any) -> None:
        link = self._links.get(handle)
        if link is not None:
            link.reply(rid, ok, value)

    # -- interactive exec: output out as a stream, stdin in as calls --------------------

    async def exec_open(self, sandbox_id: str, params: dict[str, Any], stdin: bool) -> str:
        guest = await self.manager.guest(sandbox_id)
        handle = secrets.token_hex(8)
        self._pipes[handle] = ExecPipe(guest.peer, params, stdin=stdin)
        return handle

    async def exec_items(self, handle: str) -> AsyncIterator[tuple[str, Any]]:
        """The command's output, then ``("exit", result)`` (a streaming generator; the
        head asks for it with bounded backpressure)."""
        pipe = self._pipes[handle]
        try:
            async for item in pipe.items():
                yield item
        finally:
            self._pipes.pop(handle, None)
            await pipe.aclose()

    async def exec_send(self, handle: str, data: bytes) -> None:
        """Stdin for the command (dropped once it has ended, as a closed pipe would)."""
        pipe = self._pipes.get(handle)
        if pipe is not None:
            await pipe.send(data)

    async def exec_eof(self, handle: str) -> None:
        pipe = self._pipes.get(handle)
        if pipe is not None:
            await pipe.eof()

    async def exec_close(self, handle: str) -> None:
        pipe = self._pipes.pop(handle, None)
        if pipe is not None:
            await pipe.aclose()

    # -- generators pulled item by item (Ray Client has no streaming generators) ---------

    async def pull_open(self, method: str, *args: Any) -> str:
        if method not in _GENERATORS:
            raise ConfigError(f"{method!r} is not a generator of the node actor")
        handle = secrets.token_hex(8)
        self._pulls[handle] = getattr(self, method)(*args)
        return handle

    async def pull_next(self, handle: str) -> tuple[Any, bool]:
        """The next item and True, or (None, False) at the end; an error ends it too."""
        gen = self._pulls[handle]
        try:
            return await gen.__anext__(), True
        except StopAsyncIteration:
            self._pulls.pop(handle, None)
            return None, False
        except BaseException:
            self._pulls.pop(handle, None)
            raise

    async def pull_close(self, handle: str) -> None:
        gen = self._pulls.pop(handle, None)
        if gen is not None:
            await gen.aclose()

    async def reconcile(self) -> dict[str, Any]:
        return (await self.manager.reconcile(scan=True)).to_json()

    async def close(self) -> None:
        await self.manager.aclose(destroy_owned=True)
