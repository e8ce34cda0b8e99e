"""The surface the in-process SDK (:mod:`ironclaw.sdk`) and the remote SDK
(:mod:`ironclaw.client`) share, so code written against one runs against the other.

Members are read-only properties and methods: an implementation may return a more
specific type (the SDK's ``Files``). Exec's options and result are shared outright
(:mod:`ironclaw.proto.surface`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Protocol, Unpack, runtime_checkable

from ironclaw.proto.surface import ExecOptions, ExecResult, OutputSink

__all__ = ["ExecResultLike", "FilesAPI", "OutputSink", "SandboxAPI"]

#: Both SDKs return the one :class:`~ironclaw.proto.surface.ExecResult`.
ExecResultLike = ExecResult


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


@runtime_checkable
class SandboxAPI(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def files(self) -> FilesAPI: ...
    async def exec(self, argv: list[str], **opts: Unpack[ExecOptions]) -> ExecResult: ...
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
