"""The surface both SDKs share: exec's options and result, and a sandbox handle's life.

The host's guest client, the in-process SDK (:mod:`ironclaw.sdk`) and the remote SDK
(:mod:`ironclaw.client`) run commands with the same keyword options and return the same
:class:`ExecResult`, and start detached commands and terminals with the same options;
both SDKs' sandboxes are created through :class:`Creating` and destroyed on leaving
``async with`` by :class:`SandboxHandle`, and describe a snapshot as a
:class:`SnapshotInfo`. Declaring these once here, below both ``client`` and ``host``,
keeps the two surfaces from drifting apart.
Standard library only, like the rest of ``proto``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, Self, TypedDict, TypeVar

__all__ = [
    "Creating",
    "ExecOptions",
    "ExecResult",
    "OutputSink",
    "PortInfo",
    "PtyOptions",
    "SandboxHandle",
    "SandboxPart",
    "SnapshotInfo",
    "StartOptions",
    "feed",
]

#: Receives output chunks as they arrive; may be a plain function or a coroutine function.
OutputSink = Callable[[bytes], Awaitable[None] | None]


async def feed(sink: OutputSink | None, chunk: bytes) -> None:
    """Hand ``chunk`` to ``sink`` (awaiting it when it is a coroutine function)."""
    if sink is not None:
        res = sink(chunk)
        if res is not None:
            await res


@dataclass(frozen=True)
class SnapshotInfo:
    """A saved sandbox as both SDKs describe it (what ``sb.snapshot(name)`` returns): the
    host's :class:`~ironclaw.host.snapshots.Snapshot` adds its files, the remote SDK's
    :class:`~ironclaw.client.controls.RemoteSnapshot` is read from the API."""

    name: str
    sha256: str
    size: int
    created_at: float
    source: str
    backend: str
    spec: dict[str, Any]
    kind: str = "workspace"


class ExecOptions(TypedDict, total=False):
    """The keyword options of ``exec`` that every SDK passes through unchanged."""

    env: dict[str, str] | None
    cwd: str | None
    timeout: float | None
    stdin: bytes | None
    on_stdout: OutputSink | None
    on_stderr: OutputSink | None
    capture: bool
    keep_background: bool


class StartOptions(TypedDict, total=False):
    """The keyword options of ``commands.start``: ``tag`` (a name to find it by), ``env``,
    ``cwd``, ``ring_bytes`` (output kept for a later attach; 1 MiB when not given)."""

    tag: str | None
    env: dict[str, str] | None
    cwd: str | None
    ring_bytes: int


class PtyOptions(TypedDict, total=False):
    """The keyword options of ``pty.create``: ``argv`` (a shell when not given), ``env``,
    ``cwd``, ``tag``."""

    argv: list[str] | None
    env: dict[str, str] | None
    cwd: str | None
    tag: str | None


@dataclass
class ExecResult:
    """What one command did. ``status`` says why it ended, in words a user acts on."""

    sandbox_id: str
    exit_code: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration_ms: float
    status: str = "exited"
    timed_out: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False  # some output was counted but not kept (a capture limit)

    def to_json(self, backend: str) -> dict[str, Any]:
        return {
            "id": self.sandbox_id,
            "backend": backend,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "status": self.status,
            "timed_out": self.timed_out,
            "stdout": self.stdout.decode(errors="replace"),
            "stderr": self.stderr.decode(errors="replace"),
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
            "truncated": self.truncated,
            "duration_ms": round(self.duration_ms, 3),
        }


@dataclass(frozen=True)
class PortInfo:
    """An exposed port as both SDKs list it; ``url`` is as seen from the host the
    forwarder runs on (the server's, for the remote SDK)."""

    port: int  # inside the sandbox
    host: str
    host_port: int
    url: str


class SandboxHandle:
    """One sandbox seen from an SDK: ``destroy`` once, ``aclose`` to detach, and
    ``async with`` to do both on the way out."""

    _destroyed = False

    async def _destroy(self) -> None:
        raise NotImplementedError

    async def destroy(self) -> None:
        if not self._destroyed:
            self._destroyed = True
            await self._destroy()

    async def aclose(self) -> None:
        """Detach without destroying (the sandbox keeps running)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.destroy()
        finally:
            await self.aclose()


H = TypeVar("H", bound=SandboxHandle)


class SandboxPart(Generic[H]):
    """One facet of a sandbox (``sb.files``, ``sb.ports``, ...), reaching it as ``_sb``."""

    def __init__(self, sandbox: H) -> None:
        self._sb = sandbox


class Creating(Generic[H]):
    """What ``Sandbox.create`` returns: ``await`` it for the sandbox, or use it as
    ``async with`` to have the sandbox destroyed on exit."""

    def __init__(self, make: Callable[[], Awaitable[H]]) -> None:
        self._make = make
        self._sandbox: H | None = None

    def __await__(self) -> Generator[Any, None, H]:
        return self._make().__await__()

    async def __aenter__(self) -> H:
        self._sandbox = await self._make()
        return self._sandbox

    async def __aexit__(self, *exc: object) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(*exc)
