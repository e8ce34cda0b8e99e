"""The guest agent: the RPC server that runs inside every sandbox.

It is the only IronClaw code inside the jail or VM, so it imports nothing but the
standard library and IronClaw's own ``proto``/``transport``/``rpc`` layers. Methods:

``ping``            liveness, plus facts about the guest (kernel, uid, pid)
``exec``            run argv; stdout/stderr stream back as binary frames as they come
``exec.signal``     signal a running exec's process group
``files.*``         write/read (streamed in chunks), list, stat, remove, mkdir, watch
                    (:mod:`ironclaw.guest.files`)
``proc.*``          detached commands and PTYs (:mod:`ironclaw.guest.processes`)
``shutdown``        stop the agent; the sandbox ends with it
``identity.reset``  a VM restored from a snapshot takes its own seed, names and address

Every request is decoded through :mod:`ironclaw.proto.methods` before its handler runs
(unknown fields, wrong types and out-of-range values are refused as invalid params), so
handlers take typed requests and return typed results.

Commands run in their own process group (``start_new_session``) so a timeout or a
kill reaches their children too; their ``oom_score_adj`` is raised so that, under
memory pressure, the kernel kills the command rather than the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ironclaw.errors import ConfigError
from ironclaw.guest.adopted import AdoptedProcess, discard
from ironclaw.guest.files import FileMethods, resolve
from ironclaw.proto import methods as m
from ironclaw.rpc import CallContext, Handler, Peer
from ironclaw.transport import Connection

if TYPE_CHECKING:
    from ironclaw.guest.first_stage import Running

__all__ = ["GuestAgent"]

CHUNK = 256 * 1024
# After the main process exits, its pipes may stay open (held by a background child):
# the agent keeps reading while bytes flow and stops after this long without any.
PIPE_IDLE_S = 0.2
DEFAULT_WORKDIR = "/workspace"


_PROC_METHODS = ("proc.start", "proc.list", "proc.connect", "proc.stdin", "proc.signal",
                 "proc.wait", "proc.resize")  # fmt: skip


def _raise_oom_score(pid: int) -> None:
    """Make ``pid`` the OOM killer's first choice in the sandbox (raising needs no privilege).

    Done from the parent right after spawning rather than in a ``preexec_fn``: without a
    Python preexec hook the child is started with vfork, several times faster.
    """
    with contextlib.suppress(OSError), open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write("1000")


async def _fd_ready(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def _read_fd(fd: int) -> bytes:
    """Read what a non-blocking pipe has (b"" at EOF), waiting on the loop, not a thread."""
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            await _fd_ready(fd, write=False)


async def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _fd_ready(fd, write=True)


def _typed(method: str, handler: Callable[[Any, CallContext], Awaitable[m.Record]]) -> Handler:
    """``handler`` behind the typed API: params decoded before it runs, result encoded."""

    async def run(params: Any, ctx: CallContext) -> Any:
        return m.encode_result(await handler(m.decode_request(method, params), ctx))

    return run


async def _agent_run(request: m.AgentRunRequest, ctx: CallContext) -> m.AgentRunResult:
    # Imported on first use: the agent loop is not needed to start a sandbox, and every
    # millisecond of import is start-up latency for every sandbox.
    from ironclaw.guest.agent_loop import handle_agent_run

    return await handle_agent_run(request, ctx)


async def _identity_reset(
    request: m.IdentityResetRequest, ctx: CallContext
) -> m.IdentityResetResult:
    from ironclaw.guest.identity import apply_identity  # only restored VMs need it

    return await apply_identity(request)


class _Exec:
    """One running command."""

    def __init__(self, proc: asyncio.subprocess.Process | AdoptedProcess) -> None:
        self.proc = proc
        self.timed_out = False
        self.last_output = time.monotonic()
        self.sending = 0  # pumps in the middle of handing a chunk to the channel

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)


class GuestAgent:
    """Serves one sandbox. Each accepted connection gets its own :class:`Peer`."""

    def __init__(self, *, workdir: str = DEFAULT_WORKDIR) -> None:
        self.workdir = workdir if os.path.isdir(workdir) else os.getcwd()
        self._execs: dict[str, _Exec] = {}
        self._peers: set[Peer] = set()
        self._stop = asyncio.Event()
        self._exec_counter = 0
        self._procs: Any = None  # guest.processes.ProcessTable, made on first use
        self._adopted: dict[Peer, Running] = {}
        self._files = FileMethods(self.workdir)

    @property
    def handlers(self) -> Mapping[str, Handler]:
        table: dict[str, Callable[[Any, CallContext], Awaitable[m.Record]]] = {
            "ping": self.ping,
            "exec": self.exec,
            "exec.signal": self.exec_signal,
            "files.write": self._files.write,
            "files.read": self._files.read,
            "files.list": self._files.list,
            "files.stat": self._files.stat,
            "files.remove": self._files.remove,
            "files.mkdir": self._files.mkdir,
            "shutdown": self.shutdown,
            "agent.run": _agent_run,
            "files.watch": self._files_watch,
            "identity.reset": _identity_reset,
        }
        table.update({name: self._proc_method(name) for name in _PROC_METHODS})
        return {method: _typed(method, handler) for method, handler in table.items()}

    async def serve_connection(self, conn: Connection, *, adopt: Running | None = None) -> None:
        """Serve ``conn`` until it closes or the agent stops. ``adopt``: a command the
        first stage started for a request it replays into ``conn``; that request adopts it."""
        peer = Peer(conn, handlers=self.handlers, name="guest")
        self._peers.add(peer)
        if adopt is not None:
            self._adopted[peer] = adopt
        try:
            async with peer:
                stop = asyncio.ensure_future(self._stop.wait())
                closed = asyncio.ensure_future(peer.wait_closed())
                try:
                    await asyncio.wait({stop, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    closed.cancel()
        finally:
            self._peers.discard(peer)
            unclaimed = self._adopted.pop(peer, None)
            if unclaimed is not None:  # the channel ended before its request ran
                discard(unclaimed)

    def stop(self) -> None:
        self._stop.set()

    # -- detached commands, PTYs and watches (their modules load on first use) ------------

    def _proc_method(self, name: str) -> Callable[[Any, CallContext], Awaitable[m.Record]]:
        async def run(request: Any, ctx: CallContext) -> m.Record:
            if self._procs is None:
                from ironclaw.guest.processes import ProcessTable

                self._procs = ProcessTable(self.workdir)
            handler = self._procs.handlers()[name]
            result: m.Record = await handler(request, ctx)
            return result

        return run

    async def _files_watch(self, request: m.WatchRequest, ctx: CallContext) -> m.WatchResult:
        from ironclaw.guest.watch import watch

        return await watch(request, ctx, self.workdir)

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    # -- methods -----------------------------------------------------------------------

    async def ping(self, request: m.PingRequest, ctx: CallContext) -> m.PingResult:
        uname = os.uname()  # not platform: its import delays every sandbox
        return m.PingResult(
            pong=True,
            kernel=uname.release,
            uid=os.getuid(),
            gid=os.getgid(),
            pid=os.getpid(),
            hostname=uname.nodename,
            workdir=self.workdir,
            python=sys.version.split()[0],
        )

    async def shutdown(self, request: m.ShutdownRequest, ctx: CallContext) -> m.ShutdownResult:
        for ex in list(self._execs.values()):
            ex.signal_group(signal.SIGKILL)
        if self._procs is not None:
            self._procs.kill_all()
        # Answer first, then stop: the caller gets its reply before the channel closes.
        asyncio.get_running_loop().call_later(0.05, self._stop.set)
        return m.ShutdownResult(stopping=True)

    async def exec(self, request: m.ExecRequest, ctx: CallContext) -> m.ExecExit:
        argv = request.argv
        env = dict(os.environ) if request.env is None else {**os.environ, **request.env}
        cwd = str(resolve(request.cwd or self.workdir, self.workdir))
        if not os.path.isdir(cwd):
            raise ConfigError(f"working directory {cwd!r} does not exist")
        timeout = request.timeout
        stdout_id = request.stdout_stream
        stderr_id = request.stderr_stream
        stdin_id = request.stdin_stream
        exec_id = request.exec_id or f"x{self._next_exec()}"
        keep_background = request.keep_background

        adopted = self._adopted.get(ctx.peer)
        proc: asyncio.subprocess.Process | AdoptedProcess
        if (
            adopted is not None
            and adopted.request_id == ctx.request_id
            and (adopted.stdout_stream, adopted.stderr_stream) == (stdout_id, stderr_id)
        ):
            # Started by the first stage, which replayed this request: carry on with it.
            del self._adopted[ctx.peer]
            proc, started = AdoptedProcess(adopted), adopted.started
            out_r, err_r, in_w = adopted.out_r, adopted.err_r, -1
            ours = [out_r, err_r]
            left = None if adopted.deadline is None else adopted.deadline - time.monotonic()
            timeout = None if left is None else max(0.0, left)
        else:
            started = time.monotonic()
            # Plain pipes rather than asyncio's: asyncio's wait() also waits for the pipes to
            # close, which a background child may hold open long after the command exited.
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            in_r, in_w = os.pipe() if stdin_id is not None else (-1, -1)
            ours = [out_r, err_r] + ([in_w] if in_w >= 0 else [])
            for fd in ours:
                os.set_blocking(fd, False)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=in_r if in_r >= 0 else asyncio.subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=err_w,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                for fd in ours:
                    os.close(fd)
                code = 127 if isinstance(exc, FileNotFoundError) else 126
                reason = "command not found" if code == 127 else exc.strerror
                msg = f"{argv[0]}: {reason}\n"
                return await self._spawn_failure(code, msg, ctx.peer, stdout_id, stderr_id)
            finally:
                for fd in (out_w, err_w, in_r):
                    if fd >= 0:
                        os.close(fd)

            _raise_oom_score(proc.pid)
        ex = _Exec(proc)
        if isinstance(proc, AdoptedProcess) and adopted is not None:
            ex.timed_out, ex.last_output = adopted.timed_out, adopted.last_output
        self._execs[exec_id] = ex
        peer = ctx.peer
        pumps = [
            asyncio.ensure_future(self._pump(out_r, peer, stdout_id, ex)),
            asyncio.ensure_future(self._pump(err_r, peer, stderr_id, ex)),
        ]
        feeder = None
        if stdin_id is not None:
            feeder = asyncio.ensure_future(self._feed(peer, stdin_id, in_w))
        try:
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                ex.timed_out = True
                ex.signal_group(signal.SIGKILL)
                await proc.wait()
            await self._drain_after_exit(pumps, ex)
            if not keep_background:
                # Like a hangup: what the command left running in its group ends with it,
                # so a fork bomb's remnants cannot hold the pids limit afterwards.
                ex.signal_group(signal.SIGKILL)
        except asyncio.CancelledError:
            ex.signal_group(signal.SIGKILL)
            raise
        finally:
            self._execs.pop(exec_id, None)
            if feeder is not None:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for fd in ours:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sid in (stdout_id, stderr_id):
                if sid is not None and not peer.closed:
                    with contextlib.suppress(Exception):
                        await peer.end_stream(sid)

        rc = proc.returncode
        assert rc is not None
        sig = -rc if rc < 0 else None
        return m.ExecExit(
            exit_code=128 + sig if sig is not None else rc,
            signal=sig,
            timed_out=ex.timed_out,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            pid=proc.pid,
        )

    def _next_exec(self) -> int:
        self._exec_counter += 1
        return self._exec_counter

    async def _spawn_failure(
        self, code: int, message: str, peer: Peer, stdout_id: int | None, stderr_id: int | None
    ) -> m.ExecExit:
        """Report a command that could not start as a shell would (127/126)."""
        if stderr_id is not None:
            await peer.send_bytes(stderr_id, message.encode())
        for sid in (stdout_id, stderr_id):
            if sid is not None:
                await peer.end_stream(sid)
        return m.ExecExit(
            exit_code=code,
            signal=None,
            timed_out=False,
            duration_ms=0.0,
            pid=None,
            spawn_error=message.strip(),
        )

    async def _drain_after_exit(self, pumps: list[asyncio.Task[None]], ex: _Exec) -> None:
        pending = set(pumps)
        while pending:
            _done, pending = await asyncio.wait(pending, timeout=PIPE_IDLE_S)
            idle = time.monotonic() - ex.last_output >= PIPE_IDLE_S
            if pending and idle and ex.sending == 0:
                break

    async def _pump(self, fd: int, peer: Peer, stream_id: int | None, ex: _Exec) -> None:
        while True:
            chunk = await _read_fd(fd)
            if not chunk:
                return
            if stream_id is not None:
                ex.sending += 1
                try:
                    await peer.send_bytes(stream_id, chunk)
                finally:
                    ex.sending -= 1
            ex.last_output = time.monotonic()

    async def _feed(self, peer: Peer, stream_id: int, fd: int) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            async for chunk in peer.open_stream(stream_id):
                await _write_fd(fd, chunk)
        with contextlib.suppress(OSError):
            os.close(fd)

    async def exec_signal(
        self, request: m.ExecSignalRequest, ctx: CallContext
    ) -> m.ExecSignalResult:
        ex = self._execs.get(request.exec_id)
        if ex is None:
            return m.ExecSignalResult(signalled=False)
        ex.signal_group(request.signal)
        return m.ExecSignalResult(signalled=True)
