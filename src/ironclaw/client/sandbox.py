"""The remote SDK's sandbox: :class:`Sandbox` with ``sb.files`` beside ``sb.exec``,
the same surface as :class:`ironclaw.sdk.Sandbox` (both satisfy
:class:`~ironclaw.client.protocol.SandboxAPI`)::

    from ironclaw.client import Sandbox

    async with Sandbox.create({"limits": {"memory_mib": 256}},
                              api_url="http://127.0.0.1:8000", token=TOKEN) as sb:
        result = await sb.exec(["python3", "-c", "print(6 * 7)"])
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from types import TracebackType
from typing import Any

from ironclaw.client.api import ApiClient, ExecResult
from ironclaw.client.procs import RemoteCommands, RemotePorts, RemotePty, RemoteWatch
from ironclaw.client.protocol import OutputSink

__all__ = ["RemoteFiles", "Sandbox"]


class RemoteFiles:
    """File operations inside one remote sandbox (paths are relative to /workspace)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def write(
        self, path: str, data: bytes | str | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        payload = data.encode() if isinstance(data, str) else data
        return await self._sb.api.write_file(self._sb.id, path, payload, mode=mode)

    async def read(self, path: str, sink: OutputSink | None = None) -> bytes:
        return await self._sb.api.read_file(self._sb.id, path, sink)

    async def list(self, path: str = ".") -> list[dict[str, Any]]:
        return await self._sb.api.list_files(self._sb.id, path)

    async def stat(self, path: str) -> dict[str, Any]:
        return await self._sb.api.stat(self._sb.id, path)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._sb.api.remove(self._sb.id, path, recursive=recursive)

    async def mkdir(self, path: str) -> None:
        await self._sb.api.mkdir(self._sb.id, path)

    def watch(
        self, path: str = ".", *, recursive: bool = True, max_queue: int = 4096
    ) -> RemoteWatch:
        """Changes under ``path`` in order (see :class:`~ironclaw.client.procs.RemoteWatch`)."""
        return RemoteWatch(self._sb.api, self._sb.id, path, recursive, max_queue)


class Sandbox:
    """A sandbox served by ``ironclaw serve``. Build with :meth:`create` or :meth:`connect`."""

    def __init__(self, api: ApiClient, record: dict[str, Any], *, owns: bool) -> None:
        self.api = api
        self.record = record
        self.files = RemoteFiles(self)
        self.commands = RemoteCommands(api, self.id)
        self.pty = RemotePty(api, self.id)
        self.ports = RemotePorts(api, self.id)
        self._owns_client = owns
        self._destroyed = False

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
        sandbox_id: str | None = None,
        api_url: str | None = None,
        token: str | None = None,
        client: ApiClient | None = None,
    ) -> RemoteCreating:
        """Create a sandbox: ``await`` it, or use it as ``async with`` (destroyed on exit).

        Without ``api_url``/``token``, ``IRONCLAW_API_URL``/``IRONCLAW_API_TOKEN`` apply.
        """
        return RemoteCreating(spec, sandbox_id, api_url, token, client)

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, api_url: str | None = None, token: str | None = None
    ) -> Sandbox:
        api = ApiClient(api_url, token)
        try:
            record = await api.get(sandbox_id)
        except BaseException:
            await api.aclose()
            raise
        return cls(api, record, owns=True)

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
        """Short commands go as one request; with sinks (or ``capture=False``) the output
        streams over the WebSocket as it is printed."""
        if on_stdout is None and on_stderr is None and capture:
            return await self.api.exec(
                self.id,
                argv,
                env=env,
                cwd=cwd,
                timeout=timeout,
                stdin=stdin,
                keep_background=keep_background,
            )
        return await self.api.exec_stream(
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
        """The sandbox's agent answers through the server (uid, pid, version)."""
        return await self.api.ping(self.id)

    async def destroy(self) -> None:
        if not self._destroyed:
            self._destroyed = True
            await self.api.delete(self.id)

    async def aclose(self) -> None:
        """Detach without destroying (the sandbox keeps running)."""
        if self._owns_client:
            await self.api.aclose()

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


class RemoteCreating:
    """Awaitable and async context manager returned by :meth:`Sandbox.create`."""

    def __init__(
        self,
        spec: dict[str, Any] | None,
        sandbox_id: str | None,
        api_url: str | None,
        token: str | None,
        client: ApiClient | None,
    ) -> None:
        self._args = (spec, sandbox_id, api_url, token, client)
        self._sandbox: Sandbox | None = None

    async def _create(self) -> Sandbox:
        spec, sandbox_id, api_url, token, client = self._args
        api = client or ApiClient(api_url, token)
        try:
            record = await api.create(spec, sandbox_id=sandbox_id)
        except BaseException:
            if client is None:
                await api.aclose()
            raise
        return Sandbox(api, record, owns=client is None)

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
