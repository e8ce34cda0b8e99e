"""A cluster sandbox's channel as the service sees it: stand-ins over the owning node.

The real channel stays on the sandbox's node. :class:`NodePeer` makes plain calls
through the node actor and serves the guest's calls to the host (``register``) over a
link: the node queues them (:class:`~ironclaw.cluster.links.GuestLink`), a streaming
generator brings them here, and each answer goes back as an actor call. So an agent
task runs as on one host (its gateway, credentials, approvals and trace stay in the
service) while its sandbox runs on another. :class:`NodeGuest` is the typed client over
it, with exec and file transfers on the cluster's chunked routes; :class:`RemoteExec`
is an interactive exec there (output streamed with bounded backpressure, stdin as
actor calls). A node's loss ends each of them with :class:`~ironclaw.errors.SandboxLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from ironclaw.cluster.links import PIPE_QUEUE, error_parts
from ironclaw.errors import IronclawError
from ironclaw.host.guest import DEFAULT_READ_LIMIT, ExecResult, GuestClient, OutputSink
from ironclaw.rpc import CallContext, Handler, Peer

if TYPE_CHECKING:
    from ironclaw.cluster.cluster import Cluster

__all__ = ["NodeGuest", "NodePeer", "RemoteExec"]

log = logging.getLogger(__name__)


class NodePeer:
    """Plain calls to the sandbox's guest, and the guest's calls served here."""

    def __init__(self, cluster: Cluster, sandbox_id: str) -> None:
        self._cluster = cluster
        self._sid = sandbox_id
        self._handlers: dict[str, Handler] = {}
        self._unsent: list[str] = []
        self._handle: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self.closed = False

    def register(self, method: str, handler: Handler) -> None:
        """Serve the guest's ``method`` here; the node learns of it before the next call."""
        self._handlers[method] = handler
        self._unsent.append(method)

    async def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:
        await self._link()
        async with asyncio.timeout(timeout):
            return await self._cluster.call(self._sid, method, params)

    async def _link(self) -> None:
        if not self._unsent:
            return
        methods, self._unsent = self._unsent, []
        name, actor = self._cluster.route(self._sid)
        call = actor.link_open.remote(self._sid, methods, self._handle)
        self._handle = await self._cluster.on(name, call)
        if self._reader is None:
            self._reader = self._cluster.keep(self._read(name, actor))

    async def _read(self, name: str, actor: Any) -> None:
        requests = self._cluster.stream(name, actor, "link_requests", self._handle)
        try:
            async for rid, method, params in requests:
                task = asyncio.ensure_future(self._serve(actor, name, rid, method, params))
                self._serving.add(task)
                task.add_done_callback(self._serving.discard)
        except IronclawError as exc:
            log.info("sandbox %s: the guest's calls no longer reach the service: %s",
                     self._sid, exc)  # fmt: skip
        finally:
            self.closed = True
            for task in list(self._serving):
                task.cancel()

    async def _serve(self, actor: Any, name: str, rid: int, method: str, params: Any) -> None:
        ctx = CallContext(cast(Peer, self), rid, method)
        try:
            ok, value = True, await self._handlers[method](params, ctx)
        except Exception as exc:  # the guest gets it as its call's error
            ok, value = False, error_parts(exc)
        with contextlib.suppress(IronclawError):
            await self._cluster.on(name, actor.link_reply.remote(self._handle, rid, ok, value))


class NodeGuest(GuestClient):
    """The typed client of a cluster sandbox; exec and files take the chunked routes."""

    def __init__(self, cluster: Cluster, sandbox_id: str) -> None:
        super().__init__(cast(Peer, NodePeer(cluster, sandbox_id)), sandbox_id)
        self._cluster = cluster

    async def exec(self, argv: list[str], **options: Any) -> ExecResult:
        return await self._cluster.exec(self.sandbox_id, argv, **options)

    async def read_file(
        self, path: str, sink: OutputSink | None = None, *, limit: int | None = DEFAULT_READ_LIMIT
    ) -> bytes:
        return await self._cluster.read_file(self.sandbox_id, path, sink, limit=limit)

    async def write_file(self, path: str, data: Any, *, mode: int = 0o644) -> int:
        return await self._cluster.write_file(self.sandbox_id, path, data, mode=mode)


class RemoteExec:
    """An interactive exec on the sandbox's node (see :class:`ExecSession`)."""

    def __init__(self, cluster: Cluster, name: str, actor: Any, handle: str) -> None:
        self._cluster, self._name, self._actor, self._handle = cluster, name, actor, handle

    @classmethod
    async def open(
        cls, cluster: Cluster, sandbox_id: str, params: dict[str, Any], *, stdin: bool
    ) -> RemoteExec:
        name, actor = cluster.route(sandbox_id)
        handle = await cluster.on(name, actor.exec_open.remote(sandbox_id, params, stdin))
        return cls(cluster, name, actor, handle)

    async def items(self) -> AsyncIterator[tuple[str, Any]]:
        items = self._cluster.stream(
            self._name, self._actor, "exec_items", self._handle, backlog=PIPE_QUEUE
        )
        async for item in items:
            yield item

    async def send(self, data: bytes) -> None:
        await self._cluster.on(self._name, self._actor.exec_send.remote(self._handle, data))

    async def eof(self) -> None:
        await self._cluster.on(self._name, self._actor.exec_eof.remote(self._handle))

    async def aclose(self) -> None:
        with contextlib.suppress(IronclawError):
            await self._cluster.on(self._name, self._actor.exec_close.remote(self._handle))
