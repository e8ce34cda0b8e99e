"""The node actor: one per Ray node, owning that node's :class:`SandboxManager`.

A plain class: :mod:`.cluster` turns it into a Ray actor pinned to its node (the node's
``ironclaw_node_NAME`` resource, ``num_cpus=0``). Its configuration is the node's own
environment (``IRONCLAW_HOME``, ``IRONCLAW_UID_BASE``, ``IRONCLAW_CGROUP_ROOT``,
``IRONCLAW_NET_POOL``, as ``ray start`` was given them), so two nodes on one machine
never share a registry, a uid range, a cgroup root or an address pool.

Outputs leave the node in chunks (Ray streaming generators for exec and file reads,
chunked calls for writes): a large file or a chatty command is never one object.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

from ironclaw.config import Settings
from ironclaw.errors import ConfigError, SandboxNotFound
from ironclaw.host.guest import DEFAULT_CAPTURE_LIMIT
from ironclaw.host.manager import SandboxManager
from ironclaw.proto import methods
from ironclaw.resources.store import SandboxRecord

__all__ = ["CHUNK", "NodeAgent", "ServiceLease", "node_memory_mib"]

#: The largest piece of output one streamed item carries.
CHUNK = 256 * 1024
_END = object()


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

    def held(self) -> bool:
        return True


class NodeAgent:
    """One node's sandboxes, driven by the head through actor calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_sandboxes = int(os.environ.get("IRONCLAW_NODE_MAX_SANDBOXES", "64"))
        self.memory_mib = node_memory_mib()
        self.manager = SandboxManager(Settings.from_env())
        self._uploads: dict[str, _Upload] = {}

    async def open(self) -> dict[str, Any]:
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
        return {"node": self.name, "removed": left, "gc": report.to_json()}

    async def capacity(self) -> dict[str, Any]:
        live = [r for r in await self.manager.sandboxes() if r.state in ("running", "creating")]
        reserved = sum(int(r.spec.get("limits", {}).get("memory_mib", 512)) for r in live)
        return {
            "name": self.name,
            "max_sandboxes": self.max_sandboxes,
            "sandboxes": len(live),
            "memory_mib": self.memory_mib,
            "reserved_mib": reserved,
        }

    async def create(self, spec: dict[str, Any], sandbox_id: str) -> SandboxRecord:
        return await self.manager.create(spec, sandbox_id=sandbox_id)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return await self.manager.get(sandbox_id)

    async def sandboxes(self) -> list[SandboxRecord]:
        return await self.manager.sandboxes()

    async def destroy(self, sandbox_id: str) -> None:
        await self.manager.destroy(sandbox_id)

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

    async def reconcile(self) -> dict[str, Any]:
        return (await self.manager.reconcile(scan=True)).to_json()

    async def close(self) -> None:
        await self.manager.aclose(destroy_owned=True)
