"""The surface the in-process SDK (:mod:`ironclaw.sdk`) and the remote SDK
(:mod:`ironclaw.client`) share, so code written against one runs against the other.

Members are read-only properties and methods: an implementation may return a more
specific type (the host's ``ExecResult``, the SDK's ``Files``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from ironclaw.client.proc_protocol import CommandsAPI, PortsAPI, PtyAPI
from ironclaw.proto.proc_methods import WatchEvent

__all__ = ["ExecResultLike", "FilesAPI", "OutputSink", "SandboxAPI"]

OutputSink = Callable[[bytes], Awaitable[None] | None]


@runtime_checkable
class ExecResultLike(Protocol):
    @property
    def sandbox_id(self) -> str: ...
    @property
    def exit_code(self) -> int: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def stdout(self) -> bytes: ...
    @property
    def stderr(self) -> bytes: ...
    @property
    def duration_ms(self) -> float: ...
    @property
    def status(self) -> str: ...
    @property
    def timed_out(self) -> bool: ...


@runtime_checkable
class FilesAPI(Protocol):
    async def write(
        self, path: str, data: bytes | str | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int: ...
    async def read(self, path: str, sink: OutputSink | None = None) -> bytes: ...
    async def list(self, path: str = ".") -> list[dict[str, Any]]: ...
    async def stat(self, path: str) -> dict[str, Any]: ...
    async def remove(self, path: str, *, recursive: bool = False) -> None: ...
    async def mkdir(self, path: str) -> None: ...
    def watch(
        self, path: str = ".", *, recursive: bool = True, max_queue: int = 4096
    ) -> AsyncIterator[WatchEvent]: ...


@runtime_checkable
class SandboxAPI(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def files(self) -> FilesAPI: ...
    @property
    def commands(self) -> CommandsAPI: ...
    @property
    def pty(self) -> PtyAPI: ...
    @property
    def ports(self) -> PortsAPI: ...
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
    ) -> ExecResultLike: ...
    async def ping(self) -> dict[str, Any]: ...
    async def destroy(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> SandboxAPI: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
