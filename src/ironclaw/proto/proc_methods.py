"""Typed requests and results of the process, PTY and file-watch channel methods.

``proc.start``    start a detached command (optionally on a PTY); output kept in a ring
``proc.list``     the guest's detached commands, running and recently ended
``proc.connect``  replay a command's ring buffer on a stream, then follow it live
``proc.stdin``    feed a stream's bytes to a command's stdin (optionally closing it)
``proc.signal``   signal a command's process group
``proc.wait``     wait (bounded) for a command to end
``proc.resize``   set a PTY command's window size (the guest sends SIGWINCH)
``files.watch``   inotify events under a workspace path as JSON lines on a stream

:mod:`ironclaw.proto.methods` registers them. Standard library only: the guest imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

from ironclaw.proto import records as f
from ironclaw.proto.records import MAX_PATH, Int, Record, Str, declare

__all__ = [
    "MAX_PROCS",
    "MAX_RING",
    "MAX_WATCH_LINE",
    "ProcConnectRequest",
    "ProcInfo",
    "ProcListRequest",
    "ProcListResult",
    "ProcRef",
    "ProcResizeRequest",
    "ProcSignalRequest",
    "ProcStartRequest",
    "ProcStdinRequest",
    "ProcView",
    "ProcWaitRequest",
    "WatchEvent",
    "WatchRequest",
    "WatchResult",
]

#: Largest output ring a command may ask for (the default is 1 MiB).
MAX_RING = 64 * 2**20
#: Detached commands the guest keeps (ended ones are forgotten oldest first).
MAX_PROCS = 256
#: Longest JSON line of one watch event (a path is at most 4096 characters).
MAX_WATCH_LINE = 3 * MAX_PATH + 256
MAX_WATCH_QUEUE = 65_536

TAG = Str(min_len=1, max_len=128, no_nul=True)
PID = Int(1, 2**22)
SIGNAL = Int(1, 64)
DIM = Int(1, 1000)


class ProcRef(Record):
    """Which command: by pid or by tag (exactly one)."""

    pid: int | None = None
    tag: str | None = None


class ProcStartRequest(Record):
    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    tag: str | None = None
    ring_bytes: int = 2**20
    pty: bool = False
    cols: int = 80
    rows: int = 24


class ProcInfo(Record):
    """One detached command; ``exit_code`` is None while it runs (128+N if killed by N)."""

    pid: int
    tag: str | None
    argv: tuple[str, ...]
    pty: bool
    running: bool
    exit_code: int | None
    signal: int | None
    started_at: float
    output_bytes: int


class ProcView:
    """What every handle on one command shows from its latest :class:`ProcInfo` (the
    in-process and the remote handle, and the remote terminal)."""

    info: ProcInfo

    @property
    def pid(self) -> int:
        return self.info.pid

    @property
    def tag(self) -> str | None:
        return self.info.tag


class ProcListRequest(Record):
    pass


class ProcListResult(Record):
    procs: tuple[ProcInfo, ...]


class ProcConnectRequest(Record):
    """Send the ring's bytes (``replay``) then live output on ``stream`` until the end."""

    ref: ProcRef
    stream: int
    replay: bool = True


class ProcStdinRequest(Record):
    """Write what arrives on ``stream`` to stdin until its END; then close stdin if asked."""

    ref: ProcRef
    stream: int
    close: bool = False


class ProcSignalRequest(Record):
    ref: ProcRef
    signal: int = 15


class ProcWaitRequest(Record):
    ref: ProcRef
    timeout: float | None = None


class ProcResizeRequest(Record):
    ref: ProcRef
    cols: int
    rows: int


class WatchRequest(Record):
    """Watch ``path`` (inside the workspace); events go on ``stream`` as JSON lines."""

    path: str
    stream: int
    recursive: bool = True
    max_queue: int = 4096


class WatchEvent(Record):
    """One change. ``overflow``: events were lost (the queue or the kernel's was full)."""

    type: str
    path: str
    dest: str | None = None
    is_dir: bool = False


class WatchResult(Record):
    events: int
    dropped: int


_TYPES = ("created", "modified", "deleted", "moved", "overflow")
declare(ProcRef, pid=f.Opt(PID), tag=f.Opt(TAG))
declare(
    ProcStartRequest,
    argv=f.Seq(f.Str(max_len=f.MAX_ARG, no_nul=True), min_items=1),
    env=f.Opt(f.StrMap()),
    cwd=f.Opt(f.PATH),
    tag=f.Opt(TAG),
    ring_bytes=f.Int(4096, MAX_RING),
    pty=f.Bool(),
    cols=DIM,
    rows=DIM,
)
declare(
    ProcInfo,
    pid=PID,
    tag=f.Opt(TAG),
    argv=f.Seq(f.Str(max_len=f.MAX_ARG, no_nul=True)),
    pty=f.Bool(),
    running=f.Bool(),
    exit_code=f.Opt(f.Int(0, 255)),
    signal=f.Opt(SIGNAL),
    started_at=f.Float(lo=0.0),
    output_bytes=f.Int(),
)
declare(ProcListRequest)
declare(ProcListResult, procs=f.Seq(f.Nested(ProcInfo), max_items=MAX_PROCS))
declare(ProcConnectRequest, ref=f.Nested(ProcRef), stream=f.STREAM, replay=f.Bool())
declare(ProcStdinRequest, ref=f.Nested(ProcRef), stream=f.STREAM, close=f.Bool())
declare(ProcSignalRequest, ref=f.Nested(ProcRef), signal=SIGNAL)
declare(ProcWaitRequest, ref=f.Nested(ProcRef), timeout=f.Opt(f.Float(lo=0.0)))
declare(ProcResizeRequest, ref=f.Nested(ProcRef), cols=DIM, rows=DIM)
declare(
    WatchRequest,
    path=f.PATH,
    stream=f.STREAM,
    recursive=f.Bool(),
    max_queue=f.Int(1, MAX_WATCH_QUEUE),
)
declare(
    WatchEvent,
    type=f.Str(choices=_TYPES),
    path=f.Str(max_len=f.MAX_PATH, no_nul=True),
    dest=f.Opt(f.Str(max_len=f.MAX_PATH, no_nul=True)),
    is_dir=f.Bool(),
)
declare(WatchResult, events=f.Int(), dropped=f.Int())
