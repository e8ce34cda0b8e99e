"""The manager's side of a sandbox's channel: the cached connection to its agent, the
typed :class:`~ironclaw.host.guest.GuestClient` over it, and exec and file transfer with
the sandbox's limits named in the result.

Mixed into :class:`~ironclaw.host.manager.SandboxManager`: the lifecycle code reuses the
connections it opened while waiting for a sandbox to answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Unpack

from ironclaw.config import Settings, safe_join
from ironclaw.errors import ChannelClosed, ConfigError, IronclawError, SandboxError
from ironclaw.host.guest import DEFAULT_CAPTURE_LIMIT, DEFAULT_READ_LIMIT, GuestClient
from ironclaw.proto.surface import ExecOptions, ExecResult, OutputSink
from ironclaw.resources.audit import append_line
from ironclaw.resources.cgroups import limit_status
from ironclaw.resources.lifetime import read_lifetime, touch_activity
from ironclaw.resources.store import SandboxRecord, Store
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport import Connection

if TYPE_CHECKING:
    from ironclaw.backends.base import Backend
    from ironclaw.resources.cgroups import Cgroup, CgroupManager

__all__ = ["Channel"]


class Channel:
    """Talking to sandboxes' agents; needs the manager's registry, backends and cgroups."""

    settings: Settings
    store: Store
    _peers: dict[str, Peer]
    _rids: dict[str, str]  # sandbox id -> resource id, for pooled ones
    _background: set[asyncio.Future[None]]  # audit writes in flight

    if TYPE_CHECKING:

        @property
        def cgroups(self) -> CgroupManager: ...
        def backend(self, name: str) -> Backend[Any]: ...
        async def get(self, sandbox_id: str) -> SandboxRecord: ...

    async def peer(self, sandbox_id: str) -> Peer:
        """A connected peer to the sandbox's agent (cached per manager)."""
        peer = self._peers.get(sandbox_id)
        if peer is not None and not peer.closed:
            return peer
        record = await self.get(sandbox_id)
        if record.state != "running":
            raise SandboxError(
                f"sandbox {sandbox_id} is {record.state}"
                + (f" ({record.reason})" if record.reason else "")
                + "; remove it with `ironclaw sandbox rm`"
            )
        conn = await self.backend(record.backend).open_channel(record.info)
        peer = self._host_peer(sandbox_id, conn)
        await peer.start()
        self._peers[sandbox_id] = peer
        return peer

    def _host_peer(self, sid: str, conn: Connection) -> Peer:
        """The host's end of a sandbox's channel: strict limits, violations audited.

        A guest that breaks a rule of the channel loses that channel (the peer closes
        it); the violation goes into the sandbox's audit log, which a task's trace
        merges, so a person can see why.
        """

        def record(peer: Peer, error: BaseException) -> None:
            doc = {"event": "channel.violation", "sandbox_id": sid, "ts": time.time(),
                   "error": f"{type(error).__name__}: {error}"}  # fmt: skip
            line = json.dumps(doc)
            path = safe_join(self.settings.sandbox_state_dir(sid), "audit.jsonl")
            task = asyncio.ensure_future(asyncio.to_thread(append_line, path, line))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        return Peer(conn, name=f"host:{sid}", limits=HOST_LIMITS, on_protocol_error=record)

    async def guest(self, sandbox_id: str) -> GuestClient:
        """A typed client of the sandbox's agent, over the cached connection.

        Every call through it is activity for the idle timer (connecting is not).
        """
        run_dir = self.settings.sandbox_runtime_dir(await self._rid(sandbox_id))
        life = read_lifetime(run_dir)
        if life is not None:
            if life.get("paused"):
                raise SandboxError(
                    f"sandbox {sandbox_id} is paused; `ironclaw sandbox resume {sandbox_id}`"
                )
            touch_activity(run_dir)
        return GuestClient(await self.peer(sandbox_id), sandbox_id)

    async def exec(
        self,
        sandbox_id: str,
        argv: list[str],
        *,
        capture_limit: int = DEFAULT_CAPTURE_LIMIT,
        **opts: Unpack[ExecOptions],
    ) -> ExecResult:
        """Run ``argv`` in the sandbox, streaming output to the sinks as it comes.

        With ``capture=False`` output is only streamed, so memory stays bounded however
        much a command prints; captured output keeps ``capture_limit`` bytes per stream
        and says ``truncated`` past that. Processes the command leaves in the background are
        killed when it exits unless ``keep_background``. A command stopped by one of the
        sandbox's cgroup limits says so in ``status``.
        """
        if not argv:
            raise ConfigError("nothing to run: give a command")
        guest = await self.guest(sandbox_id)
        cg = self._cgroup_or_none(await self._rid(sandbox_id))
        before = cg.limit_hits() if cg is not None else None
        try:
            result = await guest.exec(argv, capture_limit=capture_limit, **opts)
        except ChannelClosed:
            record = await self.get(sandbox_id)
            raise SandboxError(
                f"sandbox {sandbox_id} went away during the command"
                + (f": {record.reason}" if record.reason else "")
            ) from None
        if cg is not None and before is not None:
            result.status = limit_status(cg, before) or result.status
        return result

    async def _rid(self, sandbox_id: str) -> str:
        rid = self._rids.get(sandbox_id)
        if rid is None:
            rid = self._rids[sandbox_id] = (await self.store.get(sandbox_id)).rid
        return rid

    def _cgroup_or_none(self, sandbox_id: str) -> Cgroup | None:
        """The sandbox's cgroup, or None where it has none (its limits then go unnamed)."""
        try:
            return self.cgroups.open(sandbox_id)
        except IronclawError:
            return None

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        return await (await self.guest(sandbox_id)).write_file(path, data, mode=mode)

    async def read_file(
        self,
        sandbox_id: str,
        path: str,
        sink: OutputSink | None = None,
        *,
        limit: int | None = DEFAULT_READ_LIMIT,
    ) -> bytes:
        return await (await self.guest(sandbox_id)).read_file(path, sink, limit=limit)
