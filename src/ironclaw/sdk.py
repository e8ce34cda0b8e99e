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

from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

from ironclaw.config import Settings
from ironclaw.errors import ConfigError
from ironclaw.host import ports, processes
from ironclaw.host.guest import DEFAULT_READ_LIMIT, ExecResult, OutputSink
from ironclaw.host.manager import SandboxManager
from ironclaw.host.ports import ExposedPort
from ironclaw.host.processes import ProcessHandle
from ironclaw.host.snapshots import Snapshot
from ironclaw.policy.network import NetworkPolicy
from ironclaw.proto import methods
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


class Files:
    """File operations inside one sandbox (paths are relative to /workspace)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

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


class Commands:
    """Detached commands: start, list, and re-attach from any process."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def start(
        self,
        argv: list[str],
        *,
        tag: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        ring_bytes: int = 2**20,
    ) -> ProcessHandle:
        """Start ``argv`` and return at once; its last ``ring_bytes`` of output are kept."""
        guest = await self._sb.manager.guest(self._sb.id)
        return await processes.start_process(
            guest, argv, tag=tag, env=env, cwd=cwd, ring_bytes=ring_bytes
        )

    async def list(self) -> list[methods.ProcInfo]:
        return await processes.list_processes(await self._sb.manager.guest(self._sb.id))

    async def connect(self, target: int | str) -> ProcessHandle:
        """The command with pid (int) or tag (str) ``target``."""
        guest = await self._sb.manager.guest(self._sb.id)
        return await processes.connect_process(guest, target)


class Pty:
    """Interactive terminals: ``h = await sb.pty.create(80, 24)``, then ``h.send``,
    ``h.resize``, ``h.output()`` and ``h.kill``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> ProcessHandle:
        guest = await self._sb.manager.guest(self._sb.id)
        return await processes.start_process(
            guest, argv or ["/bin/sh"], tag=tag, env=env, cwd=cwd, pty=(cols, rows)
        )


class Ports:
    """Servers inside reachable from the host: ``url = await sb.ports.expose(8000)``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

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


class Network:
    """The sandbox's egress policy, changeable while it runs."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def update(
        self,
        *,
        allow: list[str] | None = None,
        allow_domains: list[str] | None = None,
        deny: list[str] | None = None,
        deny_domains: list[str] | None = None,
    ) -> NetworkPolicy:
        """Replace ``allow``/``allow_domains``/``deny_domains`` when given; ``deny`` removes
        allow rules. Applied at once (one firewall transaction, one proxy reload)."""
        return await self._sb.manager.update_network(
            self._sb.id, allow=allow, allow_domains=allow_domains, deny=deny,
            deny_domains=deny_domains,
        )  # fmt: skip


class Sandbox:
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
        self._destroyed = False

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def backend(self) -> str:
        return self.record.backend

    @overload
    @classmethod
    def create(
        cls,
        spec: SandboxSpec | dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        settings: Settings | None = None,
        manager: SandboxManager | None = None,
        from_snapshot: Snapshot | str | None = None,
    ) -> _Creating: ...

    @overload
    @classmethod
    def create(
        cls,
        spec: SandboxSpec | dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        api_url: str,
        token: str | None = None,
    ) -> RemoteCreating: ...

    @classmethod
    def create(
        cls,
        spec: SandboxSpec | dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        settings: Settings | None = None,
        manager: SandboxManager | None = None,
        from_snapshot: Snapshot | str | None = None,
        api_url: str | None = None,
        token: str | None = None,
    ) -> _Creating | RemoteCreating:
        """Create a sandbox: ``await`` it, or use it as ``async with`` (destroyed on exit).

        ``from_snapshot`` restores that snapshot (a VM's memory and disks, or a
        workspace) with the spec it recorded; the fields set in ``spec`` override it
        (not backend or image; see :func:`ironclaw.host.snapshots.restore_spec`).
        With ``api_url`` (and ``token``) it is created by ``ironclaw serve`` there,
        through the remote SDK (:mod:`ironclaw.client`), which has the same surface.
        """
        if api_url is not None:
            if from_snapshot is not None:
                raise ConfigError("from_snapshot is not available through the API yet")
            from ironclaw.client.sandbox import Sandbox as RemoteSandbox

            doc = spec.model_dump() if isinstance(spec, SandboxSpec) else spec
            return RemoteSandbox.create(doc, sandbox_id=sandbox_id, api_url=api_url, token=token)
        return _Creating(spec, sandbox_id, settings, manager, from_snapshot)

    @classmethod
    async def connect(cls, sandbox_id: str, *, settings: Settings | None = None) -> Sandbox:
        manager = SandboxManager(settings)
        await manager.open()
        try:
            record = await manager.get(sandbox_id)
        except BaseException:
            await manager.aclose()
            raise
        return cls(manager, record, owns=True)

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        capture: bool = True,
        keep_background: bool = False,
    ) -> ExecResult:
        return await self.manager.exec(
            self.id,
            argv,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            capture=capture,
            keep_background=keep_background,
        )

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

    async def destroy(self) -> None:
        if not self._destroyed:
            self._destroyed = True
            await self.manager.destroy(self.id)

    async def aclose(self) -> None:
        """Detach without destroying (the sandbox keeps running)."""
        if self._owns_manager:
            await self.manager.aclose()

    async def __aenter__(self) -> Sandbox:
        return self

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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.destroy()
        finally:
            await self.aclose()


class _Creating:
    """Awaitable and async context manager returned by :meth:`Sandbox.create`."""

    def __init__(
        self,
        spec: SandboxSpec | dict[str, Any] | None,
        sandbox_id: str | None,
        settings: Settings | None,
        manager: SandboxManager | None,
        from_snapshot: Snapshot | str | None = None,
    ) -> None:
        self._args = (spec, sandbox_id, settings, manager)
        self._snapshot = from_snapshot
        self._sandbox: Sandbox | None = None

    async def _create(self) -> Sandbox:
        spec, sandbox_id, settings, manager = self._args
        owns = manager is None
        mgr = manager or SandboxManager(settings)
        if owns:
            await mgr.open()
        try:
            if self._snapshot is not None:
                record = await mgr.restore(self._snapshot, spec=spec, sandbox_id=sandbox_id)
            else:
                record = await mgr.create(spec, sandbox_id=sandbox_id)
        except BaseException:
            if owns:
                await mgr.aclose()
            raise
        return Sandbox(mgr, record, owns=owns)

    def __await__(self) -> Generator[Any, None, Sandbox]:
        return self._create().__await__()

    async def __aenter__(self) -> Sandbox:
        self._sandbox = await self._create()
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)
