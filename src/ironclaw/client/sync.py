"""The remote SDK without ``async``: :class:`SyncSandbox` runs the async client on a
private event loop in a background thread (an anyio blocking portal)::

    with SyncSandbox.create(api_url=URL, token=TOKEN) as sb:
        print(sb.exec(["echo", "hi"]).stdout)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ironclaw.client.api import ExecResult
from ironclaw.client.sandbox import Sandbox

__all__ = ["SyncFiles", "SyncSandbox"]

T = TypeVar("T")


class SyncFiles:
    def __init__(self, sb: SyncSandbox) -> None:
        self._sb = sb

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        return self._sb._call(lambda: self._sb.remote.files.write(path, data, mode=mode))

    def read(self, path: str, sink: Callable[[bytes], None] | None = None) -> bytes:
        return self._sb._call(lambda: self._sb.remote.files.read(path, sink))

    def list(self, path: str = ".") -> list[dict[str, Any]]:
        return self._sb._call(lambda: self._sb.remote.files.list(path))

    def stat(self, path: str) -> dict[str, Any]:
        return self._sb._call(lambda: self._sb.remote.files.stat(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._sb._call(lambda: self._sb.remote.files.remove(path, recursive=recursive))

    def mkdir(self, path: str) -> None:
        self._sb._call(lambda: self._sb.remote.files.mkdir(path))


class SyncSandbox:
    """A remote sandbox with blocking methods; ``with`` destroys it on exit."""

    def __init__(self, remote: Sandbox, portal: BlockingPortal, stop: contextlib.ExitStack):
        self.remote = remote
        self.files = SyncFiles(self)
        self._portal = portal
        self._stop = stop

    @property
    def id(self) -> str:
        return self.remote.id

    @property
    def backend(self) -> str:
        return self.remote.backend

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        async def run() -> T:
            return await fn()

        return self._portal.call(run)

    @classmethod
    def create(
        cls,
        spec: dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        api_url: str | None = None,
        token: str | None = None,
    ) -> SyncSandbox:
        return cls._open(
            lambda: Sandbox.create(
                spec, sandbox_id=sandbox_id, api_url=api_url, token=token
            )._create()
        )

    @classmethod
    def connect(
        cls, sandbox_id: str, *, api_url: str | None = None, token: str | None = None
    ) -> SyncSandbox:
        return cls._open(lambda: Sandbox.connect(sandbox_id, api_url=api_url, token=token))

    @classmethod
    def _open(cls, make: Callable[[], Coroutine[Any, Any, Sandbox]]) -> SyncSandbox:
        stack = contextlib.ExitStack()
        portal = stack.enter_context(start_blocking_portal())
        try:

            async def run() -> Sandbox:
                return await make()

            remote = portal.call(run)
        except BaseException:
            stack.close()
            raise
        return cls(remote, portal, stack)

    def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        capture: bool = True,
        keep_background: bool = False,
    ) -> ExecResult:
        return self._call(
            lambda: self.remote.exec(
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
        )

    def ping(self) -> dict[str, Any]:
        return self._call(self.remote.ping)

    def destroy(self) -> None:
        self._call(self.remote.destroy)

    def close(self) -> None:
        """Detach without destroying, and stop the background loop."""
        try:
            self._call(self.remote.aclose)
        finally:
            self._stop.close()

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.destroy()
        finally:
            self.close()
