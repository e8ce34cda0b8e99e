"""The remote SDK without ``async``: :class:`SyncSandbox` runs the async client on a
private event loop in a background thread (an anyio blocking portal)::

    with SyncSandbox.create(api_url=URL, token=TOKEN) as sb:
        print(sb.exec(["echo", "hi"]).stdout)

Each blocking method is made from the async method of the same name
(:func:`_blocking`), so the two keep one signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, Unpack

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ironclaw.client.sandbox import CreateOptions, RemoteFiles, Sandbox

__all__ = ["SyncFiles", "SyncSandbox"]

T = TypeVar("T")
P = ParamSpec("P")


class _Blocking:
    """Runs coroutines of an async object on a portal's loop, blocking until done."""

    _portal: BlockingPortal

    def _target(self) -> Any:
        raise NotImplementedError

    def _run(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await fn()

        return self._portal.call(run)


def _blocking(
    fn: Callable[Concatenate[Any, P], Awaitable[T]],
) -> Callable[Concatenate[_Blocking, P], T]:
    """A blocking method that runs the async method ``fn`` names on the wrapped object."""
    name = fn.__name__

    def method(self: _Blocking, /, *args: P.args, **kwargs: P.kwargs) -> T:
        bound: Callable[P, Awaitable[T]] = getattr(self._target(), name)
        return self._run(lambda: bound(*args, **kwargs))

    method.__name__ = method.__qualname__ = name
    method.__doc__ = fn.__doc__
    method.__wrapped__ = fn  # type: ignore[attr-defined]  # help() shows fn's parameters
    return method


class SyncFiles(_Blocking):
    def __init__(self, sb: SyncSandbox) -> None:
        self._sb = sb
        self._portal = sb._portal

    def _target(self) -> RemoteFiles:
        return self._sb.remote.files

    write = _blocking(RemoteFiles.write)
    read = _blocking(RemoteFiles.read)
    list = _blocking(RemoteFiles.list)
    stat = _blocking(RemoteFiles.stat)
    remove = _blocking(RemoteFiles.remove)
    mkdir = _blocking(RemoteFiles.mkdir)


class SyncSandbox(_Blocking):
    """A remote sandbox with blocking methods; ``with`` destroys it on exit."""

    def __init__(self, remote: Sandbox, portal: BlockingPortal, stop: contextlib.ExitStack):
        self.remote = remote
        self.id, self.backend = remote.id, remote.backend  # fixed for a sandbox's life
        self._portal = portal
        self._stop = stop
        self.files = SyncFiles(self)

    def _target(self) -> Sandbox:
        return self.remote

    @classmethod
    def create(
        cls, spec: dict[str, Any] | None = None, **opts: Unpack[CreateOptions]
    ) -> SyncSandbox:
        return cls._open(lambda: Sandbox.create(spec, **opts))

    @classmethod
    def connect(
        cls, sandbox_id: str, *, api_url: str | None = None, token: str | None = None
    ) -> SyncSandbox:
        return cls._open(lambda: Sandbox.connect(sandbox_id, api_url=api_url, token=token))

    @classmethod
    def _open(cls, make: Callable[[], Awaitable[Sandbox]]) -> SyncSandbox:
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

    exec = _blocking(Sandbox.exec)
    ping = _blocking(Sandbox.ping)
    destroy = _blocking(Sandbox.destroy)

    def close(self) -> None:
        """Detach without destroying, and stop the background loop."""
        try:
            self._run(self.remote.aclose)
        finally:
            self._stop.close()

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.destroy()
        finally:
            self.close()
