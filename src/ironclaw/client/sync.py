"""The remote SDK without ``async``: :class:`SyncSandbox` runs the async client on a
private event loop in a background thread (an anyio blocking portal)::

    with SyncSandbox.create(api_url=URL, token=TOKEN) as sb:
        print(sb.exec(["echo", "hi"]).stdout)
        h = sb.commands.start(["python3", "-m", "http.server"], tag="web")
        for chunk in h.output():  # a blocking iterator
            ...

Every blocking method is made from the async method of the same name (:func:`_blocking`,
:func:`_wrapped`), so the two keep one signature; a handle the async method returns
comes back as its blocking twin (``SyncProcessHandle``, ``SyncTerminal``), and an async
iterator (output, a watch) as a :class:`BlockingIterator` pulled one item per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, Unpack, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ironclaw.client.controls import RemoteNetwork, RemoteSnapshots
from ironclaw.client.procs import (
    RemoteCommands,
    RemotePorts,
    RemoteProcessHandle,
    RemotePty,
    RemoteTerminal,
    RemoteWatch,
)
from ironclaw.client.sandbox import CreateOptions, RemoteFiles, Sandbox
from ironclaw.proto import methods as m
from ironclaw.proto.proc_methods import ProcView

__all__ = [
    "BlockingIterator",
    "SyncCommands",
    "SyncFiles",
    "SyncNetwork",
    "SyncPorts",
    "SyncProcessHandle",
    "SyncPty",
    "SyncSandbox",
    "SyncSnapshots",
    "SyncTerminal",
    "SyncWatch",
]

T = TypeVar("T")
A = TypeVar("A")
W = TypeVar("W")
R = TypeVar("R")
P = ParamSpec("P")
V = TypeVar("V", RemoteProcessHandle, RemoteTerminal)


class _Blocking(Generic[R]):
    """Runs coroutines of ``remote`` (an async object) on a portal's loop, blocking."""

    def __init__(self, portal: BlockingPortal, remote: R) -> None:
        self._portal = portal
        self.remote = remote

    def _run(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await fn()

        return self._portal.call(run)


def _named(method: Callable[..., Any], fn: Callable[..., Any]) -> None:
    method.__name__ = method.__qualname__ = fn.__name__
    method.__doc__ = fn.__doc__
    method.__wrapped__ = fn  # type: ignore[attr-defined]  # help() shows fn's parameters


@overload
def _blocking(
    fn: Callable[Concatenate[Any, P], Awaitable[T]],
) -> Callable[Concatenate[_Blocking[Any], P], T]: ...
@overload
def _blocking(
    fn: Callable[Concatenate[Any, P], Awaitable[A]], wrap: Callable[[BlockingPortal, A], W]
) -> Callable[Concatenate[_Blocking[Any], P], W]: ...
def _blocking(
    fn: Callable[Concatenate[Any, P], Awaitable[Any]],
    wrap: Callable[[BlockingPortal, Any], Any] | None = None,
) -> Callable[Concatenate[_Blocking[Any], P], Any]:
    """A blocking method that awaits the async method ``fn`` names on ``self.remote``;
    ``wrap`` turns what it returns (an async handle) into its blocking twin."""
    name = fn.__name__

    def method(self: _Blocking[Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        bound: Callable[P, Awaitable[Any]] = getattr(self.remote, name)
        result = self._run(lambda: bound(*args, **kwargs))
        return result if wrap is None else wrap(self._portal, result)

    _named(method, fn)
    return method


def _wrapped(
    fn: Callable[Concatenate[Any, P], A], wrap: Callable[[BlockingPortal, A], W]
) -> Callable[Concatenate[_Blocking[Any], P], W]:
    """A method that calls the plain method ``fn`` names (one that returns an async
    iterator, say) on the loop, and hands back ``wrap`` of what it returns."""
    name = fn.__name__

    def method(self: _Blocking[Any], /, *args: P.args, **kwargs: P.kwargs) -> W:
        bound: Callable[P, A] = getattr(self.remote, name)
        return wrap(self._portal, self._portal.call(lambda: bound(*args, **kwargs)))

    _named(method, fn)
    return method


class BlockingIterator(Generic[T]):
    """An async iterator as a blocking one: each ``next`` awaits one item on the loop
    (nothing is read ahead). ``close()`` (or leaving ``with``) ends it early."""

    def __init__(self, portal: BlockingPortal, source: AsyncIterator[T]) -> None:
        self._portal, self.source = portal, source

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(self.source)
            except StopAsyncIteration:
                return False, None

        more, item = self._portal.call(step)
        if not more:
            raise StopIteration
        return item  # type: ignore[return-value]  # more: an item of the source

    def close(self) -> None:
        aclose = getattr(self.source, "aclose", None)
        if aclose is not None:
            self._portal.call(aclose)

    def __enter__(self) -> BlockingIterator[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncWatch(BlockingIterator[m.WatchEvent]):
    """File events in order: ``for ev in sb.files.watch(p)``; :meth:`start` returns once
    the watch is in place in the guest (a change made after it is reported)."""

    source: RemoteWatch

    def start(self) -> None:
        self._portal.call(self.source.start)

    def __enter__(self) -> SyncWatch:
        return self


class SyncFiles(_Blocking[RemoteFiles]):
    write = _blocking(RemoteFiles.write)
    read = _blocking(RemoteFiles.read)
    list = _blocking(RemoteFiles.list)
    stat = _blocking(RemoteFiles.stat)
    remove = _blocking(RemoteFiles.remove)
    mkdir = _blocking(RemoteFiles.mkdir)
    watch = _wrapped(RemoteFiles.watch, SyncWatch)


class _SyncProcView(_Blocking[V], ProcView):
    """A blocking handle on one command: ``info`` (and so ``pid`` and ``tag``, from
    :class:`ProcView`) is its async twin's latest."""

    @property
    def info(self) -> m.ProcInfo:  # type: ignore[override]  # read-only: the twin updates it
        return self.remote.info


class SyncProcessHandle(_SyncProcView[RemoteProcessHandle]):
    """One detached command: output, stdin, signals, exit status (as its async twin)."""

    output = _wrapped(RemoteProcessHandle.output, BlockingIterator[bytes])
    send_stdin = _blocking(RemoteProcessHandle.send_stdin)
    send = _blocking(RemoteProcessHandle.send)
    close_stdin = _blocking(RemoteProcessHandle.close_stdin)
    kill = _blocking(RemoteProcessHandle.kill)
    wait = _blocking(RemoteProcessHandle.wait)


class SyncCommands(_Blocking[RemoteCommands]):
    start = _blocking(RemoteCommands.start, SyncProcessHandle)
    list = _blocking(RemoteCommands.list)
    connect = _blocking(RemoteCommands.connect, SyncProcessHandle)


class SyncTerminal(_SyncProcView[RemoteTerminal]):
    """A PTY session; closing it (or leaving ``with``) hangs up: the shell is killed."""

    output = _wrapped(RemoteTerminal.output, BlockingIterator[bytes])
    send = _blocking(RemoteTerminal.send)
    send_stdin = _blocking(RemoteTerminal.send_stdin)
    resize = _blocking(RemoteTerminal.resize)
    kill = _blocking(RemoteTerminal.kill)
    wait = _blocking(RemoteTerminal.wait)
    close = _blocking(RemoteTerminal.close)

    def __enter__(self) -> SyncTerminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncPty(_Blocking[RemotePty]):
    create = _blocking(RemotePty.create, SyncTerminal)


class SyncPorts(_Blocking[RemotePorts]):
    expose = _blocking(RemotePorts.expose)
    list = _blocking(RemotePorts.list)
    unexpose = _blocking(RemotePorts.unexpose)


class SyncNetwork(_Blocking[RemoteNetwork]):
    update = _blocking(RemoteNetwork.update)


class SyncSnapshots(_Blocking[RemoteSnapshots]):
    """The caller's snapshots on the server (``sb.snapshots``: the async ``api.snapshots``)."""

    list = _blocking(RemoteSnapshots.list)
    get = _blocking(RemoteSnapshots.get)
    remove = _blocking(RemoteSnapshots.remove)
    create = _blocking(RemoteSnapshots.create)
    fork = _blocking(RemoteSnapshots.fork)


class SyncSandbox(_Blocking[Sandbox]):
    """A remote sandbox with blocking methods; ``with`` destroys it on exit."""

    def __init__(self, remote: Sandbox, portal: BlockingPortal, stop: contextlib.ExitStack):
        super().__init__(portal, remote)
        self._stop = stop
        self.files = SyncFiles(portal, remote.files)
        self.commands = SyncCommands(portal, remote.commands)
        self.pty = SyncPty(portal, remote.pty)
        self.ports = SyncPorts(portal, remote.ports)
        self.network = SyncNetwork(portal, remote.network)
        self.snapshots = SyncSnapshots(portal, remote.api.snapshots)

    @property
    def id(self) -> str:
        return self.remote.id

    @property
    def backend(self) -> str:
        return self.remote.backend

    @classmethod
    def create(
        cls, spec: dict[str, Any] | None = None, **opts: Unpack[CreateOptions]
    ) -> SyncSandbox:
        """Create a sandbox (``from_snapshot`` restores one); ``with`` destroys it on exit."""
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
    snapshot = _blocking(Sandbox.snapshot)
    pause = _blocking(Sandbox.pause)
    resume = _blocking(Sandbox.resume)
    set_timeout = _blocking(Sandbox.set_timeout)

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
