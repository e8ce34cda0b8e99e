"""The remote SDK's sandbox: :class:`Sandbox` with ``sb.files`` beside ``sb.exec``,
the same surface as :class:`ironclaw.sdk.Sandbox` (both satisfy
:class:`~ironclaw.client.protocol.SandboxAPI`)::

    from ironclaw.client import Sandbox

    async with Sandbox.create({"limits": {"memory_mib": 256}},
                              api_url="http://127.0.0.1:8000", token=TOKEN) as sb:
        result = await sb.exec(["python3", "-c", "print(6 * 7)"])
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypedDict, Unpack

from ironclaw.client.api import ApiClient, SandboxDoc
from ironclaw.client.controls import RemoteNetwork, RemoteSnapshot, restore_doc, sandbox_path
from ironclaw.client.procs import RemoteCommands, RemotePorts, RemotePty, RemoteWatch
from ironclaw.proto import surface
from ironclaw.proto.lifecycle import or_close
from ironclaw.proto.surface import ExecOptions, ExecResult, OutputSink

__all__ = ["CreateOptions", "RemoteCreating", "RemoteFiles", "Sandbox"]


class CreateOptions(TypedDict, total=False):
    """Where and under what id :meth:`Sandbox.create` makes a sandbox."""

    sandbox_id: str | None
    api_url: str | None
    token: str | None
    from_snapshot: str | RemoteSnapshot | None


class RemoteFiles(surface.SandboxPart["Sandbox"]):
    """File operations inside one remote sandbox (paths are relative to /workspace)."""

    async def write(
        self, path: str, data: bytes | str | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        return await self._sb.api.write_file(self._sb.id, path, data, mode=mode)

    async def read(self, path: str, sink: OutputSink | None = None) -> bytes:
        return await self._sb.api.read_file(self._sb.id, path, sink)

    async def list(self, path: str = ".") -> list[dict[str, Any]]:
        return [dict(e) for e in await self._sb.api.list_files(self._sb.id, path)]

    async def stat(self, path: str) -> dict[str, Any]:
        return dict(await self._sb.api.stat(self._sb.id, path))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._sb.api.remove(self._sb.id, path, recursive=recursive)

    async def mkdir(self, path: str) -> None:
        await self._sb.api.mkdir(self._sb.id, path)

    def watch(
        self, path: str = ".", *, recursive: bool = True, max_queue: int = 4096
    ) -> RemoteWatch:
        """Changes under ``path`` in order (see :class:`~ironclaw.client.procs.RemoteWatch`)."""
        return RemoteWatch(self._sb.api, self._sb.id, path, recursive, max_queue)


class Sandbox(surface.SandboxHandle):
    """A sandbox served by ``ironclaw serve``. Build with :meth:`create` or :meth:`connect`."""

    def __init__(self, api: ApiClient, record: SandboxDoc, *, owns: bool) -> None:
        self.api = api
        self.record = record
        self.files = RemoteFiles(self)
        self.commands = RemoteCommands(api, self.id)
        self.pty = RemotePty(api, self.id)
        self.ports = RemotePorts(api, self.id)
        self.network = RemoteNetwork(api, self.id)
        self._owns_client = owns

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def backend(self) -> str:
        return str(self.record["backend"])

    @classmethod
    def create(
        cls,
        spec: dict[str, Any] | None = None,
        *,
        client: ApiClient | None = None,
        **opts: Unpack[CreateOptions],
    ) -> RemoteCreating:
        """Create a sandbox: ``await`` it, or use it as ``async with`` (destroyed on exit).

        Without ``api_url``/``token``, ``IRONCLAW_API_URL``/``IRONCLAW_API_TOKEN`` apply.
        ``from_snapshot`` restores that snapshot, its recorded spec with ``spec`` on top.
        """

        async def make() -> Sandbox:
            api = client or ApiClient(opts.get("api_url"), opts.get("token"))
            snap, sid = opts.get("from_snapshot"), opts.get("sandbox_id")
            creating = (
                api.create(spec, sandbox_id=sid)
                if snap is None
                else restore_doc(api, snap, spec, sid)
            )
            record = await or_close(api if client is None else None, creating)
            return cls(api, record, owns=client is None)

        return surface.Creating(make)

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, api_url: str | None = None, token: str | None = None
    ) -> Sandbox:
        api = ApiClient(api_url, token)
        return cls(api, await or_close(api, api.get(sandbox_id)), owns=True)

    async def exec(self, argv: list[str], **opts: Unpack[ExecOptions]) -> ExecResult:
        """Short commands go as one request; with sinks (or ``capture=False``) the output
        streams over the WebSocket as it is printed."""
        return await self.api.exec(self.id, argv, **opts)

    async def snapshot(self, name: str) -> RemoteSnapshot:
        """Save the sandbox on the server as ``name`` (``client.snapshots`` lists them)."""
        return await self.api.snapshots.create(self.id, name)

    async def pause(self) -> None:
        """Freeze every process (memory kept, no CPU) until :meth:`resume`."""
        self.record = await self.api.request("POST", sandbox_path(self.id, "pause"))

    async def resume(self, *, timeout: float | None = None) -> None:
        body = {"timeout": timeout} if timeout is not None else None
        self.record = await self.api.request("POST", sandbox_path(self.id, "resume"), json=body)

    async def set_timeout(self, seconds: float | None) -> float | None:
        """Move the deadline to ``seconds`` from now; return it (epoch seconds)."""
        path = sandbox_path(self.id, "timeout")
        doc = await self.api.request("POST", path, json={"seconds": seconds})
        return None if doc["deadline"] is None else float(doc["deadline"])

    async def ping(self) -> dict[str, Any]:
        """The sandbox's agent answers through the server (uid, pid, version)."""
        return await self.api.ping(self.id)

    async def _destroy(self) -> None:
        await self.api.delete(self.id)

    async def aclose(self) -> None:
        """Detach without destroying (the sandbox keeps running)."""
        if self._owns_client:
            await self.api.aclose()


#: Awaitable and async context manager returned by :meth:`Sandbox.create`.
RemoteCreating = surface.Creating[Sandbox]
