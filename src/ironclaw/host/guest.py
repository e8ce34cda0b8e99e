"""Talking to one sandbox's guest agent: the host's typed client of the channel API.

:class:`GuestClient` wraps one connected :class:`~ironclaw.rpc.Peer` and offers each
host->guest method of :mod:`ironclaw.proto.methods` as a typed coroutine. Every reply is
decoded through ``methods`` as well: the host does not trust what comes out of a
sandbox, so a malformed reply is an :class:`~ironclaw.errors.InvalidParams`, never a
``KeyError`` deep in the caller. :meth:`GuestClient.serve` registers the host's
handlers of guest->host methods behind the same checks.

Whatever the host keeps in memory from a sandbox is bounded: :meth:`GuestClient.read_file`
stops past ``limit`` bytes (a symlink to ``/dev/zero`` is refused by the guest, but a
huge regular file is not), and captured exec output keeps at most ``capture_limit``
bytes per stream, marking the result ``truncated``.

The manager keeps the connection cache (its lifecycle code reuses the connections it
opened) and hands out clients through :meth:`SandboxManager.guest`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar, Unpack

from ironclaw.errors import ConfigError, ResourceLimitExceeded
from ironclaw.proto import methods as m
from ironclaw.proto.surface import ExecOptions, ExecResult, OutputSink, feed
from ironclaw.rpc import CallContext, Handler, Peer

__all__ = ["DEFAULT_CAPTURE_LIMIT", "DEFAULT_READ_LIMIT", "ExecResult", "GuestClient", "OutputSink"]

#: Bytes :meth:`GuestClient.read_file` accepts before refusing the rest.
DEFAULT_READ_LIMIT = 64 * 2**20
#: Bytes of each output stream an exec keeps in memory (the rest is counted, not kept).
DEFAULT_CAPTURE_LIMIT = 16 * 2**20

R = TypeVar("R", bound=m.Record)


def _human(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


class GuestClient:
    """Typed calls to one sandbox's guest agent over ``peer``."""

    def __init__(self, peer: Peer, sandbox_id: str = "") -> None:
        self.peer = peer
        self.sandbox_id = sandbox_id

    async def _call(self, request: m.Record, result: type[R], *, timeout: float | None = None) -> R:
        return await m.call(self.peer, request, result, timeout=timeout)

    def serve(self, method: str, handler: Handler) -> None:
        """Answer the guest's ``method`` with ``handler``.

        The guest's params are decoded (and so checked) before ``handler`` runs; it gets
        them as a JSON object with every field present, and its reply is checked too.
        """
        spec = m.METHODS.get(method)
        if spec is None or spec.to_guest:
            raise ConfigError(f"{method!r} is not a method the guest calls")

        async def run(params: Any, ctx: CallContext) -> Any:
            request = m.decode_request(method, params)
            reply = await handler(m.to_json(request), ctx)
            return m.encode_result(m.decode_result(method, reply))

        self.peer.register(method, run)

    async def ping(self, *, timeout: float | None = None) -> m.PingResult:
        return await self._call(m.PingRequest(), m.PingResult, timeout=timeout)

    async def exec(
        self,
        argv: list[str],
        *,
        exec_id: str | None = None,
        capture_limit: int = DEFAULT_CAPTURE_LIMIT,
        **opts: Unpack[ExecOptions],
    ) -> ExecResult:
        """Run ``argv``, streaming output to the sinks as it comes (see the manager's exec).

        Captured output keeps the first ``capture_limit`` bytes of each stream; the sinks
        still get every byte and the result counts them all.
        """
        stdin, capture = opts.get("stdin"), opts.get("capture", True)
        on_stdout, on_stderr = opts.get("on_stdout"), opts.get("on_stderr")
        if not argv:
            raise ConfigError("nothing to run: give a command")
        peer = self.peer
        out_id, err_id = peer.new_stream_id(), peer.new_stream_id()
        in_id = peer.new_stream_id() if stdin is not None else None
        request = m.ExecRequest(
            argv=tuple(argv),
            env=opts.get("env"),
            cwd=opts.get("cwd"),
            timeout=opts.get("timeout"),
            stdout_stream=out_id,
            stderr_stream=err_id,
            stdin_stream=in_id,
            exec_id=exec_id,
            keep_background=opts.get("keep_background", False),
        )
        out_buf, err_buf = bytearray(), bytearray()
        counts = [0, 0]

        async def drain(stream_id: int, buf: bytearray, sink: OutputSink | None, i: int) -> None:
            async for chunk in peer.open_stream(stream_id):
                counts[i] += len(chunk)
                if capture and len(buf) < capture_limit:
                    buf += chunk[: capture_limit - len(buf)]
                await feed(sink, chunk)

        drains = [
            asyncio.ensure_future(drain(out_id, out_buf, on_stdout, 0)),
            asyncio.ensure_future(drain(err_id, err_buf, on_stderr, 1)),
        ]
        try:
            call = asyncio.ensure_future(self._call(request, m.ExecExit))
            if stdin is not None and in_id is not None:
                await peer.send_bytes(in_id, stdin)
                await peer.end_stream(in_id)
            result = await call
            await asyncio.gather(*drains)
        except BaseException:
            for d in drains:
                d.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            raise
        return ExecResult(
            sandbox_id=self.sandbox_id,
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=bytes(out_buf),
            stderr=bytes(err_buf),
            duration_ms=result.duration_ms,
            status="timeout" if result.timed_out else "exited",
            timed_out=result.timed_out,
            stdout_bytes=counts[0],
            stderr_bytes=counts[1],
            truncated=capture and (len(out_buf) < counts[0] or len(err_buf) < counts[1]),
        )

    async def signal(self, exec_id: str, signum: int = 9) -> bool:
        """Signal a running exec's process group; False if it already ended."""
        request = m.ExecSignalRequest(exec_id=exec_id, signal=signum)
        return (await self._call(request, m.ExecSignalResult)).signalled

    async def write_file(
        self, path: str, data: bytes | str | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        """Write ``data`` (a str is written as UTF-8) to ``path``, streamed."""
        peer = self.peer
        sid = peer.new_stream_id()
        request = m.FilesWriteRequest(path=path, stream=sid, mode=mode)
        call = asyncio.ensure_future(self._call(request, m.FilesTransferResult))
        try:
            if isinstance(data, str):
                await peer.send_bytes(sid, data.encode())
            elif isinstance(data, bytes | bytearray | memoryview):
                await peer.send_bytes(sid, data)
            else:
                async for chunk in data:
                    await peer.send_bytes(sid, chunk)
            await peer.end_stream(sid)
        except BaseException:
            call.cancel()
            raise
        return (await call).size

    async def read_file(
        self, path: str, sink: OutputSink | None = None, *, limit: int | None = DEFAULT_READ_LIMIT
    ) -> bytes:
        """The file's bytes, or b"" with every chunk handed to ``sink`` instead.

        Past ``limit`` bytes (None: no limit) the read stops, the guest is told to stop
        sending, and :class:`ResourceLimitExceeded` names the limit.
        """
        peer = self.peer
        sid = peer.new_stream_id()
        buf = bytearray()
        size = 0

        async def drain() -> None:
            nonlocal size
            async with peer.open_stream(sid) as stream:
                async for chunk in stream:
                    size += len(chunk)
                    if limit is not None and size > limit:
                        if sink is not None and size - len(chunk) < limit:
                            # The sink gets exactly ``limit`` bytes (a prefix is useful).
                            await feed(sink, chunk[: len(chunk) - (size - limit)])
                        raise ResourceLimitExceeded(
                            f"{path} is larger than the read limit of {_human(limit)}: "
                            "raise the limit, or copy it in pieces (split, head -c)"
                        )
                    if sink is None:
                        buf.extend(chunk)
                    else:
                        await feed(sink, chunk)

        reader = asyncio.ensure_future(drain())
        request = m.FilesReadRequest(path=path, stream=sid)
        call = asyncio.ensure_future(self._call(request, m.FilesTransferResult))
        try:
            await asyncio.wait({reader, call}, return_when=asyncio.FIRST_EXCEPTION)
            if reader.done() and reader.exception() is not None:
                call.cancel()  # tells the guest to stop sending
                await asyncio.gather(call, return_exceptions=True)
                await reader  # raises the reader's error
            await call
            await reader
        finally:
            for task in (call, reader):
                if not task.done():
                    task.cancel()
            await asyncio.gather(call, reader, return_exceptions=True)
        return bytes(buf)

    async def list(self, path: str = ".") -> tuple[m.FileEntry, ...]:
        return (await self._call(m.FilesListRequest(path=path), m.FilesListResult)).entries

    async def stat(self, path: str) -> m.FileEntry:
        return await self._call(m.FilesStatRequest(path=path), m.FileEntry)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._call(m.FilesRemoveRequest(path=path, recursive=recursive), m.FilesRemoveResult)

    async def mkdir(self, path: str, *, parents: bool = True) -> None:
        await self._call(m.FilesMkdirRequest(path=path, parents=parents), m.FilesMkdirResult)

    async def shutdown(self) -> bool:
        return (await self._call(m.ShutdownRequest(), m.ShutdownResult)).stopping

    async def run_agent(
        self, request: m.AgentRunRequest, *, timeout: float | None = None
    ) -> m.AgentRunResult:
        return await self._call(request, m.AgentRunResult, timeout=timeout)
