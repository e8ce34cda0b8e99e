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

from ironclaw.proto.frames import MAX_STREAM_ID
from ironclaw.proto.records import (
    MAX_ARG,
    MAX_PATH,
    Bool,
    Float,
    Int,
    Nested,
    Opt,
    Record,
    Seq,
    Str,
    StrMap,
    declare,
)

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

STREAM = Int(1, MAX_STREAM_ID)
PATH = Str(min_len=1, max_len=MAX_PATH, no_nul=True)
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
declare(ProcRef, pid=Opt(PID), tag=Opt(TAG))
declare(ProcStartRequest, argv=Seq(Str(max_len=MAX_ARG, no_nul=True), min_items=1),
        env=Opt(StrMap()), cwd=Opt(PATH), tag=Opt(TAG), ring_bytes=Int(4096, MAX_RING),
        pty=Bool(), cols=DIM, rows=DIM)  # fmt: skip
declare(ProcInfo, pid=PID, tag=Opt(TAG), argv=Seq(Str(max_len=MAX_ARG, no_nul=True)),
        pty=Bool(), running=Bool(), exit_code=Opt(Int(0, 255)), signal=Opt(SIGNAL),
        started_at=Float(lo=0.0), output_bytes=Int())  # fmt: skip
declare(ProcListRequest)
declare(ProcListResult, procs=Seq(Nested(ProcInfo), max_items=MAX_PROCS))
declare(ProcConnectRequest, ref=Nested(ProcRef), stream=STREAM, replay=Bool())
declare(ProcStdinRequest, ref=Nested(ProcRef), stream=STREAM, close=Bool())
declare(ProcSignalRequest, ref=Nested(ProcRef), signal=SIGNAL)
declare(ProcWaitRequest, ref=Nested(ProcRef), timeout=Opt(Float(lo=0.0)))
declare(ProcResizeRequest, ref=Nested(ProcRef), cols=DIM, rows=DIM)
declare(WatchRequest, path=PATH, stream=STREAM, recursive=Bool(),
        max_queue=Int(1, MAX_WATCH_QUEUE))  # fmt: skip
declare(WatchEvent, type=Str(choices=_TYPES), path=Str(max_len=MAX_PATH, no_nul=True),
        dest=Opt(Str(max_len=MAX_PATH, no_nul=True)), is_dir=Bool())  # fmt: skip
declare(WatchResult, events=Int(), dropped=Int())
