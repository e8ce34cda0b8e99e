"""Detached commands in the guest: handles that outlive the call that started them.

``proc.start`` spawns a command in its own session (on a pseudo-terminal if asked) and
returns at once. Its output (stdout and stderr together, as a terminal shows them) goes
into a bounded ring per command, so a client that connects later (``proc.connect``, from
any connection) gets what the ring still holds and then follows live. A follower that
falls more than a ring behind skips ahead: the command never blocks on a slow reader.

When a command's main process ends, what it left in its process group is killed (as
for ``exec``), so a killed server's children are gone too. Ended commands are kept (their
exit status and ring) until :data:`MAX_PROCS` newer ones push them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ironclaw.errors import ConfigError, ResourceLimitExceeded
from ironclaw.proto import methods as m
from ironclaw.proto.proc_methods import MAX_PROCS
from ironclaw.rpc import CallContext

__all__ = ["ProcessTable"]

CHUNK = 64 * 1024
PIPE_IDLE_S = 0.2  # after the main process ended, stop reading once output is idle this long
#: JSON bytes of argv that one reported ProcInfo carries: a listing of MAX_PROCS of them
#: stays under the host's 2 MiB message cap, whatever the arguments hold.
SHOWN_ARGV = 4096


def shown_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` as reported: past :data:`SHOWN_ARGV` bytes of JSON it is cut, and its
    last string ends in "…" (a listing with huge arguments used to exceed the cap, and
    the host closed the channel on every ``ps``)."""
    out: list[str] = []
    used = 0
    for arg in argv:
        size = len(json.dumps(arg)) + 2  # with the ", " that joins it to the next
        if used + size <= SHOWN_ARGV:
            out.append(arg)
            used += size
            continue
        cut = arg[: max(0, SHOWN_ARGV - used)]
        while cut and used + len(json.dumps(cut + "…")) > SHOWN_ARGV:
            cut = cut[: len(cut) // 2]
        out.append(cut + "…")
        break
    return tuple(out)


def _winsize(fd: int, cols: int, rows: int) -> None:
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:  # runs in the child, after setsid: stdin is the PTY's slave
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _Proc:
    """One detached command, its output ring and the followers waiting on it."""

    def __init__(self, request: m.ProcStartRequest, proc: asyncio.subprocess.Process) -> None:
        self.request = request
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.time()
        self.ring = bytearray()
        self.base = 0  # stream offset of ring[0]
        self.cap = request.ring_bytes
        self.out_fd = -1
        self.in_fd = -1
        self.eof = False  # output finished: followers end once they caught up
        self.changed = asyncio.Event()
        self.last_output = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    @property
    def total(self) -> int:
        return self.base + len(self.ring)

    def append(self, chunk: bytes) -> None:
        self.ring += chunk
        extra = len(self.ring) - self.cap
        if extra > 0:
            del self.ring[:extra]
            self.base += extra
        self.last_output = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def info(self) -> m.ProcInfo:
        rc = self.proc.returncode
        sig = -rc if rc is not None and rc < 0 else None
        code = None if rc is None else (128 + sig if sig is not None else rc)
        return m.ProcInfo(
            pid=self.pid,
            tag=self.request.tag,
            argv=shown_argv(self.request.argv),
            pty=self.request.pty,
            running=rc is None,
            exit_code=code,
            signal=sig,
            started_at=self.started_at,
            output_bytes=self.total,
        )

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def run(self) -> None:
        """Read output into the ring until EOF (or idle after the main process ended)."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self.out_fd, readable.set)
        waiter = asyncio.ensure_future(self.proc.wait())
        try:
            while True:
                try:
                    chunk = os.read(self.out_fd, CHUNK)
                except BlockingIOError:
                    readable.clear()
                    if waiter.done():
                        idle = PIPE_IDLE_S - (time.monotonic() - self.last_output)
                        if idle <= 0:
                            break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(readable.wait(), idle)
                    else:
                        ready = asyncio.ensure_future(readable.wait())
                        await asyncio.wait({waiter, ready}, return_when=asyncio.FIRST_COMPLETED)
                        ready.cancel()
                    continue
                except OSError as exc:  # EIO: a PTY's last slave closed
                    if exc.errno != errno.EIO:
                        raise
                    chunk = b""
                if not chunk:
                    break
                self.append(chunk)
            await waiter
        finally:
            loop.remove_reader(self.out_fd)
            self.signal_group(signal.SIGKILL)  # what the command left in its group
            for fd in (self.out_fd, self.in_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.in_fd = -1
            self.eof = True
            self._wake()


class ProcessTable:
    """The guest's detached commands, shared by every connection to the agent."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self._procs: dict[int, _Proc] = {}

    def handlers(self) -> dict[str, Callable[[Any, CallContext], Awaitable[m.Record]]]:
        return {
            "proc.start": self.start,
            "proc.list": self.list,
            "proc.connect": self.connect,
            "proc.stdin": self.stdin,
            "proc.signal": self.signal,
            "proc.wait": self.wait,
            "proc.resize": self.resize,
        }

    def kill_all(self) -> None:
        for p in self._procs.values():
            p.signal_group(signal.SIGKILL)

    def _find(self, ref: m.ProcRef) -> _Proc:
        if (ref.pid is None) == (ref.tag is None):
            raise ConfigError("name a command by exactly one of pid or tag")
        if ref.pid is not None:
            found = self._procs.get(ref.pid)
            what = f"pid {ref.pid}"
        else:
            tagged = [p for p in self._procs.values() if p.request.tag == ref.tag]
            found = next((p for p in reversed(tagged) if p.info().running), None)
            found = found or (tagged[-1] if tagged else None)
            what = f"tag {ref.tag!r}"
        if found is None:
            raise ConfigError(f"no command with {what} in this sandbox: list them with `ps`")
        return found

    def _make_room(self) -> None:
        if len(self._procs) < MAX_PROCS:
            return
        for pid, p in self._procs.items():
            if p.eof:
                del self._procs[pid]
                return
        raise ResourceLimitExceeded(
            f"{MAX_PROCS} detached commands are running: kill some before starting more"
        )

    async def start(self, request: m.ProcStartRequest, ctx: CallContext) -> m.ProcInfo:
        cwd = request.cwd or self.workdir
        if not os.path.isabs(cwd):
            cwd = os.path.join(self.workdir, cwd)
        if not os.path.isdir(cwd):
            raise ConfigError(f"working directory {cwd!r} does not exist")
        if request.tag is not None and any(
            p.request.tag == request.tag and not p.eof for p in self._procs.values()
        ):
            raise ConfigError(f"a running command already has tag {request.tag!r}")
        self._make_room()
        env = {**os.environ, **(request.env or {})}
        if request.pty:
            env.setdefault("TERM", "xterm-256color")
            master, slave = os.openpty()
            _winsize(master, request.cols, request.rows)
            child_fds = (slave, slave, slave)
            ours, theirs = (master, master), [slave]
        else:
            out_r, out_w = os.pipe()
            in_r, in_w = os.pipe()
            child_fds = (in_r, out_w, out_w)
            ours, theirs = (out_r, in_w), [out_w, in_r]
        os.set_blocking(ours[0], False)
        try:
            proc = await asyncio.create_subprocess_exec(
                *request.argv, stdin=child_fds[0], stdout=child_fds[1], stderr=child_fds[2],
                cwd=cwd, env=env, start_new_session=True,
                preexec_fn=_take_terminal if request.pty else None,
            )  # fmt: skip
        except OSError as exc:
            for fd in {*ours, *theirs}:
                os.close(fd)
            raise ConfigError(f"{request.argv[0]}: {exc.strerror or exc}") from None
        finally:
            for fd in theirs:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/oom_score_adj", "w") as f:
            f.write("1000")
        p = _Proc(request, proc)
        p.out_fd = ours[0]
        p.in_fd = os.dup(ours[1]) if request.pty else ours[1]
        os.set_blocking(p.in_fd, False)
        self._procs[p.pid] = p
        p.task = asyncio.ensure_future(p.run())
        return p.info()

    async def list(self, request: m.ProcListRequest, ctx: CallContext) -> m.ProcListResult:
        return m.ProcListResult(procs=tuple(p.info() for p in self._procs.values()))

    async def connect(self, request: m.ProcConnectRequest, ctx: CallContext) -> m.ProcInfo:
        peer, sid = ctx.peer, request.stream
        try:
            p = self._find(request.ref)
        except BaseException:
            await peer.end_stream(sid)
            raise
        offset = p.base if request.replay else p.total
        try:
            while True:
                changed = p.changed
                offset = max(offset, p.base)  # fell a whole ring behind: skip ahead
                if offset < p.total:
                    start = offset - p.base
                    chunk = bytes(p.ring[start : start + CHUNK])
                    offset += len(chunk)
                    await peer.send_bytes(sid, chunk)
                elif p.eof:
                    break
                else:
                    await changed.wait()
        finally:
            if not peer.closed:
                with contextlib.suppress(Exception):
                    await peer.end_stream(sid)
        return p.info()

    async def stdin(self, request: m.ProcStdinRequest, ctx: CallContext) -> m.ProcInfo:
        from ironclaw.guest.agent import _write_fd

        p = self._find(request.ref)
        async for chunk in ctx.peer.open_stream(request.stream):
            if p.in_fd < 0:
                raise ConfigError(f"command {p.pid} has ended or its stdin is closed")
            try:
                await _write_fd(p.in_fd, chunk)
            except (BrokenPipeError, OSError) as exc:
                raise ConfigError(f"command {p.pid} does not read stdin any more: {exc}") from None
        if request.close and p.in_fd >= 0:
            if p.request.pty:
                await _write_fd(p.in_fd, b"\x04")  # a terminal's end of input is ^D
            else:
                os.close(p.in_fd)
                p.in_fd = -1
        return p.info()

    async def signal(self, request: m.ProcSignalRequest, ctx: CallContext) -> m.ProcInfo:
        p = self._find(request.ref)
        if p.proc.returncode is None:
            p.signal_group(request.signal)
        return p.info()

    async def wait(self, request: m.ProcWaitRequest, ctx: CallContext) -> m.ProcInfo:
        p = self._find(request.ref)
        if p.task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(p.task), request.timeout)
        return p.info()

    async def resize(self, request: m.ProcResizeRequest, ctx: CallContext) -> m.ProcInfo:
        p = self._find(request.ref)
        if not p.request.pty:
            raise ConfigError(f"command {p.pid} has no terminal to resize: start it with pty")
        if not p.eof:
            _winsize(p.out_fd, request.cols, request.rows)  # the kernel sends SIGWINCH
        return p.info()
