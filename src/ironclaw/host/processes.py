"""The host's side of detached commands, PTYs and file watches (``proc.*``, ``files.watch``).

A :class:`ProcessHandle` names one command in a sandbox by pid; any process on the host
can make one (:func:`connect_process`), since the guest keeps the command and its output
ring, not the connection that started it. Everything the host holds from these streams
is bounded: output chunks pass through the channel's per-stream and per-connection
budgets (``HOST_LIMITS``), and a watch's partial line is capped at
:data:`~ironclaw.proto.proc_methods.MAX_WATCH_LINE` bytes, past which the guest is
treated as broken (:class:`ProtocolError`) rather than buffered.
"""

from __future__ import annotations

import asyncio
import json
import signal as _signal
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ironclaw.errors import ConfigError, ProtocolError
from ironclaw.host.guest import GuestClient
from ironclaw.proto import methods as m
from ironclaw.proto.proc_methods import MAX_WATCH_LINE, ProcView
from ironclaw.rpc import ByteStream

__all__ = ["ProcessHandle", "connect_process", "list_processes", "start_process", "watch"]


def proc_ref(target: int | str) -> m.ProcRef:
    """A pid (an int, or a string of digits) or a tag."""
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        pid = int(target)
        if not 0 < pid < 2**22:
            raise ConfigError(f"{pid} is not a process id")
        return m.ProcRef(pid=pid)
    if not target or len(target) > 128:
        raise ConfigError("a tag is 1 to 128 characters")
    return m.ProcRef(tag=target)


async def _chunks(stream: ByteStream, call: asyncio.Future[Any]) -> AsyncIterator[bytes]:
    """The stream's chunks; if the call fails first (a refused request), its error.

    A guest that refuses a request may never end the stream it was given: waiting on the
    stream alone would hang the host.
    """
    while True:
        nxt = asyncio.ensure_future(stream.__anext__())
        try:
            await asyncio.wait({nxt, call}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done() and call.exception() is not None:
                raise call.exception()  # type: ignore[misc]
            chunk = await nxt
        except StopAsyncIteration:
            return
        finally:
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
        yield chunk


class ProcessHandle(ProcView):
    """One detached command: its output, stdin, signals and exit status."""

    def __init__(self, guest: GuestClient, info: m.ProcInfo) -> None:
        self.guest = guest
        self.info = info

    @property
    def _ref(self) -> m.ProcRef:
        return m.ProcRef(pid=self.info.pid)

    async def output(self, *, replay: bool = True) -> AsyncIterator[bytes]:
        """The output the guest still holds (``replay``), then live output until the end."""
        peer = self.guest.peer
        sid = peer.new_stream_id()
        async with peer.open_stream(sid) as stream:
            request = m.ProcConnectRequest(ref=self._ref, stream=sid, replay=replay)
            call = asyncio.ensure_future(m.call(peer, request, m.ProcInfo))
            try:
                async for chunk in _chunks(stream, call):
                    yield chunk
                self.info = await call
            finally:
                if not call.done():
                    call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    async def send_stdin(self, data: bytes | str, *, close: bool = False) -> None:
        peer = self.guest.peer
        sid = peer.new_stream_id()
        request = m.ProcStdinRequest(ref=self._ref, stream=sid, close=close)
        call = asyncio.ensure_future(m.call(peer, request, m.ProcInfo))
        try:
            if data:
                await peer.send_bytes(sid, data.encode() if isinstance(data, str) else data)
            await peer.end_stream(sid)
        except BaseException:
            call.cancel()
            raise
        self.info = await call

    async def send(self, data: bytes | str) -> None:
        """Keys to a terminal (``send_stdin`` by its PTY name)."""
        await self.send_stdin(data)

    async def stdin_from(self, chunks: AsyncIterator[bytes]) -> None:
        """Feed every chunk of ``chunks`` to stdin over one stream (a terminal session)."""
        peer = self.guest.peer
        sid = peer.new_stream_id()
        request = m.ProcStdinRequest(ref=self._ref, stream=sid)
        call = asyncio.ensure_future(m.call(peer, request, m.ProcInfo))
        try:
            async for chunk in chunks:
                await peer.send_bytes(sid, chunk)
            await peer.end_stream(sid)
        finally:
            if not call.done():
                call.cancel()
            await asyncio.gather(call, return_exceptions=True)

    async def close_stdin(self) -> None:
        await self.send_stdin(b"", close=True)

    async def kill(self, signum: int = _signal.SIGKILL) -> m.ProcInfo:
        """Signal the command's process group (its children too)."""
        self.info = await self.guest._call(
            m.ProcSignalRequest(ref=self._ref, signal=int(signum)), m.ProcInfo
        )
        return self.info

    async def wait(self, timeout: float | None = None) -> m.ProcInfo:
        """The command's info once it ended, or as it is when ``timeout`` passes."""
        self.info = await self.guest._call(
            m.ProcWaitRequest(ref=self._ref, timeout=timeout), m.ProcInfo
        )
        return self.info

    async def resize(self, cols: int, rows: int) -> None:
        request = m.ProcResizeRequest(ref=self._ref, cols=cols, rows=rows)
        self.info = await self.guest._call(request, m.ProcInfo)


async def start_process(
    guest: GuestClient,
    argv: list[str],
    *,
    tag: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    ring_bytes: int = 2**20,
    pty: tuple[int, int] | None = None,
) -> ProcessHandle:
    """Start ``argv`` detached (``pty``: on a terminal of (cols, rows))."""
    if not argv:
        raise ConfigError("nothing to run: give a command")
    cols, rows = pty or (80, 24)
    request = m.ProcStartRequest(
        argv=tuple(argv), env=dict(env) if env else None, cwd=cwd, tag=tag,
        ring_bytes=ring_bytes, pty=pty is not None, cols=cols, rows=rows,
    )  # fmt: skip
    m.decode_request("proc.start", m.to_json(request))  # bad sizes fail here, not remotely
    return ProcessHandle(guest, await guest._call(request, m.ProcInfo))


async def list_processes(guest: GuestClient) -> list[m.ProcInfo]:
    return list((await guest._call(m.ProcListRequest(), m.ProcListResult)).procs)


async def connect_process(guest: GuestClient, target: int | str) -> ProcessHandle:
    """A handle on a command started earlier (by this process or any other)."""
    info = await guest._call(m.ProcWaitRequest(ref=proc_ref(target), timeout=0.0), m.ProcInfo)
    return ProcessHandle(guest, info)


async def watch(
    guest: GuestClient, path: str, *, recursive: bool = True, max_queue: int = 4096
) -> AsyncIterator[m.WatchEvent]:
    """Changes under ``path`` until the caller stops iterating (or the path goes away)."""
    peer = guest.peer
    sid = peer.new_stream_id()
    request = m.WatchRequest(path=path, stream=sid, recursive=recursive, max_queue=max_queue)
    async with peer.open_stream(sid) as stream:
        call = asyncio.ensure_future(m.call(peer, request, m.WatchResult))
        pending = b""
        try:
            async for chunk in _chunks(stream, call):
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > MAX_WATCH_LINE:
                    raise ProtocolError(
                        f"the guest sent a watch event longer than {MAX_WATCH_LINE} bytes"
                    )
                for line in lines:
                    if line:
                        yield _event(line)
            await call
        finally:
            if not call.done():
                call.cancel()
            await asyncio.gather(call, return_exceptions=True)


def _event(line: bytes) -> m.WatchEvent:
    if len(line) > MAX_WATCH_LINE:
        raise ProtocolError(f"the guest sent a watch event longer than {MAX_WATCH_LINE} bytes")
    try:
        doc: Any = json.loads(line)
    except ValueError:
        raise ProtocolError("the guest sent a watch event that is not JSON") from None
    return m.decode(m.WatchEvent, doc, "watch event")
