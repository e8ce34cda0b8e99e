"""The Python SDK: one object per sandbox, with ``sb.files`` beside ``sb.exec``.

::

    from ironclaw.sdk import Sandbox

    async with Sandbox.create({"limits": {"memory_mib": 256}}) as sb:
        result = await sb.exec(["python3", "-c", "print(6 * 7)"])
        await sb.files.write("notes.txt", b"hello")
        data = await sb.files.read("notes.txt")

Leaving the ``async with`` block destroys the sandbox; :meth:`Sandbox.connect` attaches
to one that another process created (sandboxes outlive their creator).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypedDict, Unpack, overload

from ironclaw.config import Settings
from ironclaw.host import ports, processes
from ironclaw.host.guest import DEFAULT_READ_LIMIT
from ironclaw.host.manager import SandboxManager
from ironclaw.host.ports import ExposedPort
from ironclaw.host.processes import ProcessHandle
from ironclaw.host.snapshots import Snapshot
from ironclaw.policy.network import NetworkChange, NetworkPolicy
from ironclaw.proto import methods
from ironclaw.proto.lifecycle import or_close
from ironclaw.proto.surface import (
    Creating,
    ExecOptions,
    ExecResult,
    OutputSink,
    PtyOptions,
    SandboxHandle,
    SandboxPart,
    StartOptions,
)
from ironclaw.resources.store import SandboxRecord
from ironclaw.spec import SandboxSpec

if TYPE_CHECKING:
    from ironclaw.client.sandbox import RemoteCreating

__all__ = [
    "Commands",
    "ExecResult",
    "ExposedPort",
    "Files",
    "Network",
    "Ports",
    "ProcessHandle",
    "Pty",
    "Sandbox",
    "Snapshot",
]


SpecLike = SandboxSpec | dict[str, Any] | None


class LocalOptions(TypedDict, total=False):
    """How :meth:`Sandbox.create` makes a sandbox on this host: under which settings or
    manager, and from which snapshot's workspace."""

    settings: Settings | None
    manager: SandboxManager | None
    from_snapshot: Snapshot | str | None


class Files(SandboxPart["Sandbox"]):
    """File operations inside one sandbox (paths are relative to /workspace)."""

    async def write(
        self, path: str, data: bytes | str | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        payload = data.encode() if isinstance(data, str) else data
        return await self._sb.manager.write_file(self._sb.id, path, payload, mode=mode)

    async def read(
        self, path: str, sink: OutputSink | None = None, *, limit: int | None = DEFAULT_READ_LIMIT
    ) -> bytes:
        """The file's bytes; ResourceLimitExceeded past ``limit`` (None: unbounded)."""
        return await self._sb.manager.read_file(self._sb.id, path, sink, limit=limit)

    async def list(self, path: str = ".") -> list[dict[str, Any]]:
        guest = await self._sb.manager.guest(self._sb.id)
        return [methods.to_json(e) for e in await guest.list(path)]

    async def stat(self, path: str) -> dict[str, Any]:
        guest = await self._sb.manager.guest(self._sb.id)
        return methods.to_json(await guest.stat(path))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await (await self._sb.manager.guest(self._sb.id)).remove(path, recursive=recursive)

    async def mkdir(self, path: str) -> None:
        await (await self._sb.manager.guest(self._sb.id)).mkdir(path)

    async def watch(
        self, path: str = ".", *, recursive: bool = True, max_queue: int = 4096
    ) -> AsyncIterator[methods.WatchEvent]:
        """Changes under ``path`` (inside the workspace) as they happen, in order.

        ``max_queue`` events wait in the guest for a slow reader; past that an
        ``overflow`` event marks the ones dropped.
        """
        guest = await self._sb.manager.guest(self._sb.id)
        async for event in processes.watch(guest, path, recursive=recursive, max_queue=max_queue):
            yield event


class Commands(SandboxPart["Sandbox"]):
    """Detached commands: start, list, and re-attach from any process."""

    async def start(self, argv: list[str], **opts: Unpack[StartOptions]) -> ProcessHandle:
        """Start ``argv`` and return at once; its last ``ring_bytes`` of output are kept."""
        guest = await self._sb.manager.guest(self._sb.id)
        return await processes.start_process(guest, argv, **opts)

    async def list(self) -> list[methods.ProcInfo]:
        return await processes.list_processes(await self._sb.manager.guest(self._sb.id))

    async def connect(self, target: int | str) -> ProcessHandle:
        """The command with pid (int) or tag (str) ``target``."""
        guest = await self._sb.manager.guest(self._sb.id)
        return await processes.connect_process(guest, target)


class Pty(SandboxPart["Sandbox"]):
    """Interactive terminals: ``h = await sb.pty.create(80, 24)``, then ``h.send``,
    ``h.resize``, ``h.output()`` and ``h.kill``."""

    async def create(
        self, cols: int = 80, rows: int = 24, **opts: Unpack[PtyOptions]
    ) -> ProcessHandle:
        guest = await self._sb.manager.guest(self._sb.id)
        return await processes.start_process(
            guest, opts.get("argv") or ["/bin/sh"], tag=opts.get("tag"), env=opts.get("env"),
            cwd=opts.get("cwd"), pty=(cols, rows),
        )  # fmt: skip


class Ports(SandboxPart["Sandbox"]):
    """Servers inside reachable from the host: ``url = await sb.ports.expose(8000)``."""

    async def expose(self, port: int, *, host: str = "127.0.0.1", host_port: int = 0) -> str:
        """The URL on the host (``host``: where to listen; 0: any free ``host_port``)."""
        exposed = await ports.expose(
            self._sb.manager, self._sb.id, port, host=host, host_port=host_port
        )
        return exposed.url

    async def list(self) -> list[ExposedPort]:
        return await ports.list_ports(self._sb.manager, self._sb.id)

    async def unexpose(self, port: int) -> None:
        await ports.unexpose(self._sb.manager, self._sb.id, port)


class Network(SandboxPart["Sandbox"]):
    """The sandbox's egress policy, changeable while it runs."""

    async def update(self, **change: Unpack[NetworkChange]) -> NetworkPolicy:
        """Replace ``allow``/``allow_domains``/``deny_domains`` when given; ``deny`` removes
        allow rules. Applied at once (one firewall transaction, one proxy reload)."""
        return await self._sb.manager.update_network(self._sb.id, **change)


class Sandbox(SandboxHandle):
    """A running sandbox. Build with :meth:`create` or :meth:`connect`."""

    def __init__(self, manager: SandboxManager, record: SandboxRecord, *, owns: bool) -> None:
        self.manager = manager
        self.record = record
        self.files = Files(self)
        self.commands = Commands(self)
        self.pty = Pty(self)
        self.ports = Ports(self)
        self.network = Network(self)
        self._owns_manager = owns

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def backend(self) -> str:
        return self.record.backend

    @overload
    @classmethod
    def create(
        cls, spec: SpecLike = None, *, sandbox_id: str | None = None, **local: Unpack[LocalOptions]
    ) -> Creating[Sandbox]: ...

    @overload
    @classmethod
    def create(
        cls, spec: SpecLike = None, *, sandbox_id: str | None = None, api_url: str,
        token: str | None = None, from_snapshot: str | None = None,
    ) -> RemoteCreating: ...  # fmt: skip

    @classmethod
    def create(
        cls,
        spec: SpecLike = None,
        *,
        sandbox_id: str | None = None,
        api_url: str | None = None,
        token: str | None = None,
        **local: Unpack[LocalOptions],
    ) -> Creating[Sandbox] | RemoteCreating:
        """Create a sandbox: ``await`` it, or use it as ``async with`` (destroyed on exit).

        ``from_snapshot`` restores that snapshot (a VM's memory and disks, or a
        workspace) with the spec it recorded; the fields set in ``spec`` override it
        (not backend or image; see :func:`ironclaw.host.snapshots.restore_spec`).
        With ``api_url`` (and ``token``) it is created by ``ironclaw serve`` there,
        through the remote SDK (:mod:`ironclaw.client`), which has the same surface.
        """
        if api_url is not None:
            from ironclaw.client.sandbox import Sandbox as RemoteSandbox

            snap = local.get("from_snapshot")
            if snap is not None and not isinstance(snap, str):
                snap = snap.name  # the server's snapshot of that name
            doc = (  # a restore overrides only the fields that were set
                spec.model_dump(mode="json", exclude_unset=snap is not None)
                if isinstance(spec, SandboxSpec)
                else spec
            )
            return RemoteSandbox.create(
                doc, sandbox_id=sandbox_id, api_url=api_url, token=token, from_snapshot=snap
            )
        return Creating(lambda: _create(spec, sandbox_id, **local))

    @classmethod
    async def connect(cls, sandbox_id: str, *, settings: Settings | None = None) -> Sandbox:
        manager = SandboxManager(settings)
        await manager.open()
        return cls(manager, await or_close(manager, manager.get(sandbox_id)), owns=True)

    async def exec(self, argv: list[str], **opts: Unpack[ExecOptions]) -> ExecResult:
        return await self.manager.exec(self.id, argv, **opts)

    async def snapshot(self, name: str) -> Snapshot:
        """Save the workspace as ``name`` (see :mod:`ironclaw.host.snapshots`)."""
        return await self.manager.snapshot(self.id, name)

    async def pause(self) -> None:
        """Freeze every process (memory kept, no CPU) until :meth:`resume`."""
        await self.manager.pause(self.id)

    async def resume(self, *, timeout: float | None = None) -> None:
        await self.manager.resume(self.id, timeout=timeout)

    async def set_timeout(self, seconds: float | None) -> float | None:
        """Move the deadline to ``seconds`` from now; return it (epoch seconds)."""
        return await self.manager.set_timeout(self.id, seconds)

    async def refresh(self) -> SandboxRecord:
        self.record = await self.manager.get(self.id)
        return self.record

    async def ping(self) -> dict[str, Any]:
        return methods.to_json(await (await self.manager.guest(self.id)).ping())

    async def _destroy(self) -> None:
        await self.manager.destroy(self.id)

    async def aclose(self) -> None:
        """Detach without destroying (the sandbox keeps running)."""
        if self._owns_manager:
            await self.manager.aclose()

    @classmethod
    async def list(
        cls,
        *,
        labels: dict[str, str] | None = None,
        state: str | None = None,
        settings: Settings | None = None,
    ) -> list[SandboxRecord]:
        """Sandboxes with every label given (and in ``state``, if given)."""
        async with SandboxManager(settings) as manager:
            return await manager.select(labels=labels, state=state)


async def _create(spec: SpecLike, sandbox_id: str | None, **local: Unpack[LocalOptions]) -> Sandbox:
    manager, from_snapshot = local.get("manager"), local.get("from_snapshot")
    owns = manager is None
    mgr = manager or SandboxManager(local.get("settings"))
    if owns:
        await mgr.open()
    if from_snapshot is not None:
        making = mgr.restore(from_snapshot, spec=spec, sandbox_id=sandbox_id)
    else:
        making = mgr.create(spec, sandbox_id=sandbox_id)
    return Sandbox(mgr, await or_close(mgr if owns else None, making), owns=owns)
