"""The process, terminal and port surface both SDKs share (``sb.commands``, ``sb.pty``,
``sb.ports``), so code written against :mod:`ironclaw.sdk` runs against the remote SDK.

Handles return the channel's :class:`~ironclaw.proto.proc_methods.ProcInfo` in both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from ironclaw.proto.proc_methods import ProcInfo

__all__ = ["CommandsAPI", "PortLike", "PortsAPI", "ProcessHandleLike", "PtyAPI", "TerminalLike"]


@runtime_checkable
class ProcessHandleLike(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def tag(self) -> str | None: ...
    def output(self, *, replay: bool = True) -> AsyncIterator[bytes]: ...
    async def send_stdin(self, data: bytes | str, *, close: bool = False) -> None: ...
    async def close_stdin(self) -> None: ...
    async def kill(self, signum: int = ...) -> ProcInfo: ...
    async def wait(self, timeout: float | None = None) -> ProcInfo: ...


@runtime_checkable
class CommandsAPI(Protocol):
    async def start(
        self,
        argv: list[str],
        *,
        tag: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        ring_bytes: int = 2**20,
    ) -> ProcessHandleLike: ...
    async def list(self) -> list[ProcInfo]: ...
    async def connect(self, target: int | str) -> ProcessHandleLike: ...


@runtime_checkable
class TerminalLike(Protocol):
    @property
    def pid(self) -> int: ...
    def output(self) -> AsyncIterator[bytes]: ...
    async def send(self, data: bytes | str) -> None: ...
    async def resize(self, cols: int, rows: int) -> None: ...
    async def kill(self, signum: int = ...) -> object: ...


@runtime_checkable
class PtyAPI(Protocol):
    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> TerminalLike: ...


class PortLike(Protocol):
    @property
    def port(self) -> int: ...
    @property
    def host_port(self) -> int: ...
    @property
    def url(self) -> str: ...


@runtime_checkable
class PortsAPI(Protocol):
    async def expose(self, port: int, *, host: str = "127.0.0.1", host_port: int = 0) -> str: ...
    async def list(self) -> Sequence[PortLike]: ...
    async def unexpose(self, port: int) -> None: ...
