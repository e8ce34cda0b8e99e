"""Typed requests and results of the sandbox's own channel methods (host -> guest).

``ping``, ``exec`` and ``exec.signal``, ``files.*`` (write, read, list, stat, remove,
mkdir), ``shutdown`` and ``identity.reset``: what every sandbox's agent answers, in
the standard library only (:mod:`ironclaw.proto.methods` holds the registry).
"""

from __future__ import annotations

from collections.abc import Mapping

from ironclaw.proto import records as f
from ironclaw.proto.records import Record, declare

__all__ = [
    "ExecExit",
    "ExecRequest",
    "ExecSignalRequest",
    "ExecSignalResult",
    "FileEntry",
    "FilesListRequest",
    "FilesListResult",
    "FilesMkdirRequest",
    "FilesMkdirResult",
    "FilesReadRequest",
    "FilesRemoveRequest",
    "FilesRemoveResult",
    "FilesStatRequest",
    "FilesTransferResult",
    "FilesWriteRequest",
    "IdentityResetRequest",
    "IdentityResetResult",
    "PingRequest",
    "PingResult",
    "ShutdownRequest",
    "ShutdownResult",
]


class FileEntry(Record):
    """One file as ``files.stat`` and ``files.list`` describe it (lstat: links not followed)."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float


declare(
    FileEntry,
    name=f.Str(max_len=f.MAX_PATH),
    path=f.PATH,
    type=f.Str(choices=("file", "dir", "symlink", "other")),
    size=f.Int(),
    mode=f.MODE,
    mtime=f.Float(),
)


class PingRequest(Record):
    pass


class PingResult(Record):
    pong: bool
    kernel: str
    uid: int
    gid: int
    pid: int
    hostname: str
    workdir: str
    python: str


class ExecRequest(Record):
    """Run ``argv``; output streams back on the given stream ids as binary frames."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    timeout: float | None = None
    stdout_stream: int | None = None
    stderr_stream: int | None = None
    stdin_stream: int | None = None
    exec_id: str | None = None
    keep_background: bool = False


class ExecExit(Record):
    """How a command ended (``exit_code`` 128+N when killed by signal N)."""

    exit_code: int
    signal: int | None
    timed_out: bool
    duration_ms: float
    pid: int | None
    spawn_error: str | None = None


class ExecSignalRequest(Record):
    exec_id: str
    signal: int = 9


class ExecSignalResult(Record):
    signalled: bool


class FilesWriteRequest(Record):
    path: str
    stream: int
    mode: int = 0o644
    mkdir: bool = True


class FilesReadRequest(Record):
    path: str
    stream: int


class FilesTransferResult(Record):
    path: str
    size: int


class FilesListRequest(Record):
    path: str


class FilesListResult(Record):
    path: str
    entries: tuple[FileEntry, ...]


class FilesStatRequest(Record):
    path: str


class FilesRemoveRequest(Record):
    path: str
    recursive: bool = False


class FilesRemoveResult(Record):
    removed: str


class FilesMkdirRequest(Record):
    path: str
    parents: bool = True


class FilesMkdirResult(Record):
    path: str


class ShutdownRequest(Record):
    pass


class ShutdownResult(Record):
    stopping: bool


class IdentityResetRequest(Record):
    """A VM restored from a shared snapshot becomes its own machine (backends/restored.py).

    Every restored VM starts with the snapshot's RNG state, hostname and address; the host
    sends fresh ``seed`` bytes (hex), names and the sandbox's address (a kernel ``ip=``
    value) right after the restore, before any command runs.
    """

    seed: str
    hostname: str
    sandbox_id: str
    machine_id: str
    ip: str | None = None
    env: Mapping[str, str] | None = None
    workspace_mib: int = 0


class IdentityResetResult(Record):
    hostname: str
    machine_id: str
    reseeded: bool


declare(PingRequest)
declare(PingResult, pong=f.Bool(), kernel=f.NAME, uid=f.Int(), gid=f.Int(), pid=f.Int(),
        hostname=f.NAME, workdir=f.PATH, python=f.NAME)  # fmt: skip
declare(
    ExecRequest,
    argv=f.Seq(f.Str(max_len=f.MAX_ARG, no_nul=True), min_items=1),
    env=f.Opt(f.StrMap()),
    cwd=f.Opt(f.Str(max_len=f.MAX_PATH, no_nul=True)),
    timeout=f.Opt(f.Float(positive=True)),
    stdout_stream=f.Opt(f.STREAM),
    stderr_stream=f.Opt(f.STREAM),
    stdin_stream=f.Opt(f.STREAM),
    exec_id=f.Opt(f.Str(min_len=1, max_len=256)),
    keep_background=f.Bool(),
)
declare(
    ExecExit,
    exit_code=f.Int(0, 255),
    signal=f.Opt(f.Int(1, 64)),
    timed_out=f.Bool(),
    duration_ms=f.Float(lo=0.0),
    pid=f.Opt(f.Int(1)),
    spawn_error=f.Opt(f.TEXT),
)
declare(ExecSignalRequest, exec_id=f.Str(min_len=1, max_len=256), signal=f.Int(1, 64))
declare(ExecSignalResult, signalled=f.Bool())
declare(FilesWriteRequest, path=f.PATH, stream=f.STREAM, mode=f.MODE, mkdir=f.Bool())
declare(FilesReadRequest, path=f.PATH, stream=f.STREAM)
declare(FilesTransferResult, path=f.PATH, size=f.Int())
declare(FilesListRequest, path=f.PATH)
declare(FilesListResult, path=f.PATH, entries=f.Seq(f.Nested(FileEntry), max_items=1 << 20))
declare(FilesStatRequest, path=f.PATH)
declare(FilesRemoveRequest, path=f.PATH, recursive=f.Bool())
declare(FilesRemoveResult, removed=f.PATH)
declare(FilesMkdirRequest, path=f.PATH, parents=f.Bool())
declare(FilesMkdirResult, path=f.PATH)
declare(ShutdownRequest)
declare(ShutdownResult, stopping=f.Bool())
declare(
    IdentityResetRequest,
    seed=f.Str(min_len=1, max_len=1024),
    hostname=f.Str(min_len=1, max_len=64),
    sandbox_id=f.Str(min_len=1, max_len=256),
    machine_id=f.Str(min_len=1, max_len=32),
    ip=f.Opt(f.Str(min_len=1, max_len=256)),
    env=f.Opt(f.StrMap()),
    workspace_mib=f.Int(0, 1 << 20),
)
declare(
    IdentityResetResult, hostname=f.Str(max_len=64), machine_id=f.Str(max_len=32), reseeded=f.Bool()
)
