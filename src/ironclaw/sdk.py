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
from ironclaw.host.guest import DEFAULT_READ_LIMIT, ExecResult, OutputSink
from ironclaw.host.manager import SandboxManager
from ironclaw.proto import methods
from ironclaw.resources.store import SandboxRecord
from ironclaw.spec import SandboxSpec

if TYPE_CHECKING:
    from ironclaw.client.sandbox import RemoteCreating

__all__ = ["ExecResult", "Files", "Sandbox"]


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


class Sandbox:
    """A running sandbox. Build with :meth:`create` or :meth:`connect`."""

    def __init__(self, manager: SandboxManager, record: SandboxRecord, *, owns: bool) -> None:
        self.manager = manager
        self.record = record
        self.files = Files(self)
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
        api_url: str | None = None,
        token: str | None = None,
    ) -> _Creating | RemoteCreating:
        """Create a sandbox: ``await`` it, or use it as ``async with`` (destroyed on exit).

        With ``api_url`` (and ``token``) it is created by ``ironclaw serve`` there, through
        the remote SDK (:mod:`ironclaw.client`), which has the same surface.
        """
        if api_url is not None:
            from ironclaw.client.sandbox import Sandbox as RemoteSandbox

            doc = spec.model_dump() if isinstance(spec, SandboxSpec) else spec
            return RemoteSandbox.create(doc, sandbox_id=sandbox_id, api_url=api_url, token=token)
        return _Creating(spec, sandbox_id, settings, manager)

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
    ) -> None:
        self._args = (spec, sandbox_id, settings, manager)
        self._sandbox: Sandbox | None = None

    async def _create(self) -> Sandbox:
        spec, sandbox_id, settings, manager = self._args
        owns = manager is None
        mgr = manager or SandboxManager(settings)
        if owns:
            await mgr.open()
        try:
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
