"""What a sandbox's channel needs beyond plain calls, in pieces that can cross Ray.

* :class:`GuestLink`: the guest's own calls to the host (``model.complete``,
  ``tool.authorize``, ``agent.event``, host tools) queued on the sandbox's node for the
  head, which answers each one; so an agent task's gateway, approvals and trace stay
  with the service while its sandbox runs elsewhere.
* :class:`ExecPipe`: a command with a live stdin: its output as a bounded queue of
  chunks, its stdin fed one chunk at a time. The node runs one per interactive exec
  from the head; the single-host WebSocket exec runs one in the service.

No Ray here: the node actor and the head's stand-ins carry these over actor calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ironclaw import errors
from ironclaw.errors import IronclawError, SandboxError
from ironclaw.rpc import CallContext, Peer

__all__ = ["CHUNK", "ExecPipe", "ExecSession", "GuestLink", "error_from", "error_parts", "rechunk"]

#: The largest piece of output one streamed item carries.
CHUNK = 256 * 1024
#: At most this many of the guest's calls wait on the node for the head to take them.
LINK_QUEUE = 32
#: At most this many output chunks wait for the reader (then the guest's stream waits).
PIPE_QUEUE = 16


def error_parts(exc: BaseException) -> tuple[str, str]:
    """An error as (IronClaw class name, message): what crosses to the other side."""
    if isinstance(exc, IronclawError):
        return type(exc).__name__, str(exc)
    return "SandboxError", f"{type(exc).__name__}: {exc}"


def error_from(name: str, message: str) -> IronclawError:
    """The error :func:`error_parts` described, as its own class where that is known."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, IronclawError):
        with contextlib.suppress(TypeError):
            return cls(message)
    return SandboxError(message)


class GuestLink:
    """The guest's calls on ``methods``, queued for the head, answered by :meth:`reply`."""

    def __init__(self, peer: Peer, methods: list[str]) -> None:
        self.peer = peer
        self.queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue(maxsize=LINK_QUEUE)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.closed = False
        self._ids = itertools.count(1)
        self.add(methods)

    def add(self, methods: list[str]) -> None:
        for method in methods:
            self.peer.register(method, self._relay(method))

    def _relay(self, method: str) -> Any:
        async def relay(params: Any, ctx: CallContext) -> Any:
            if self.closed:
                raise SandboxError(f"{method}: the service no longer answers this sandbox")
            rid = next(self._ids)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.waiting[rid] = fut
            try:
                await self.queue.put((rid, method, params))
                return await fut
            finally:
                self.waiting.pop(rid, None)

        return relay

    def reply(self, rid: int, ok: bool, value: Any) -> None:
        fut = self.waiting.get(rid)
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(error_from(*value))

    async def requests(self) -> AsyncIterator[tuple[int, str, Any]]:
        """The guest's calls as they come, until the channel closes."""
        closed = asyncio.ensure_future(self.peer.wait_closed())
        try:
            while True:
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                yield get.result()
        finally:
            closed.cancel()
            self.close()

    def close(self) -> None:
        self.closed = True
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(SandboxError("the service's link to this sandbox closed"))


class ExecSession(Protocol):
    """A running command with a live stdin, wherever it runs."""

    def items(self) -> AsyncIterator[tuple[str, Any]]:
        """``("stdout"|"stderr", bytes)`` as output comes, then ``("exit", dict)``."""
        ...

    async def send(self, data: bytes) -> None: ...

    async def eof(self) -> None: ...

    async def aclose(self) -> None:
        """End the session; a command still running is cancelled (killed)."""
        ...


class ExecPipe:
    """A guest ``exec`` driven over ``peer`` with its streams: output queued (bounded),
    stdin sent as it comes. ``params`` are the exec call's (argv, env, cwd, ...)."""

    def __init__(self, peer: Peer, params: dict[str, Any], *, stdin: bool) -> None:
        self.peer = peer
        out_id, err_id = peer.new_stream_id(), peer.new_stream_id()
        self.in_id = peer.new_stream_id() if stdin else None
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=PIPE_QUEUE)
        self._pumps = [
            asyncio.ensure_future(self._pump(peer.open_stream(out_id), "stdout")),
            asyncio.ensure_future(self._pump(peer.open_stream(err_id), "stderr")),
        ]
        streams = {"stdout_stream": out_id, "stderr_stream": err_id, "stdin_stream": self.in_id}
        self._call = asyncio.ensure_future(peer.call("exec", {**params, **streams}))
        self._done = asyncio.ensure_future(self._finish())

    async def _pump(self, stream: AsyncIterator[bytes], tag: str) -> None:
        async for chunk in stream:
            await self.queue.put((tag, chunk))

    async def _finish(self) -> None:
        try:
            result = await self._call
            await asyncio.gather(*self._pumps)
            await self.queue.put(("exit", result))
        except Exception as exc:  # handed to the reader
            await self.queue.put(("error", exc))

    async def items(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            kind, item = await self.queue.get()
            if kind == "error":
                raise item
            yield kind, item
            if kind == "exit":
                return

    async def send(self, data: bytes) -> None:
        if self.in_id is not None:
            await self.peer.send_bytes(self.in_id, data)

    async def eof(self) -> None:
        if self.in_id is not None:
            in_id, self.in_id = self.in_id, None
            await self.peer.end_stream(in_id)

    async def aclose(self) -> None:
        with contextlib.suppress(IronclawError):
            await self.eof()
        rest = [self._call, self._done, *self._pumps]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


async def rechunk(data: bytes | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        for i in range(0, len(data), CHUNK):
            yield data[i : i + CHUNK]
        return
    async for piece in data:
        for i in range(0, len(piece), CHUNK):
            yield piece[i : i + CHUNK]
