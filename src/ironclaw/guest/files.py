"""The ``files.*`` methods of the guest agent: write and read (streamed in chunks),
list, stat, remove, mkdir, all relative to the sandbox's working directory.

A write goes to a hidden ``.<name>.ironclaw-part`` file renamed into place at the end,
so a reader never sees half a file; a read refuses anything but a regular file before
it reads a byte (see :func:`_open_regular`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from ironclaw.errors import ConfigError
from ironclaw.proto import methods as m
from ironclaw.rpc import CallContext

__all__ = ["READ_CHUNK", "FileMethods", "resolve"]

READ_CHUNK = 256 * 1024


def resolve(path: str, workdir: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(workdir) / p


def _open_regular(path: Path) -> int:
    """Open a regular file for reading, refusing anything else before reading a byte.

    A link to ``/dev/zero`` or a FIFO would otherwise stream forever (or block the
    agent): the last component is not followed (O_NOFOLLOW), the open does not wait
    (O_NONBLOCK), and fstat on the opened file decides.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{path} is a symbolic link: files.read reads regular files only, "
                "read the link's target instead"
            ) from None
        raise
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
    raise ConfigError(f"{path} is {kind}: files.read reads regular files only")


def _entry(path: Path, st: os.stat_result) -> m.FileEntry:
    if stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    return m.FileEntry(
        name=path.name,
        path=str(path),
        type=kind,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        mtime=st.st_mtime,
    )


class FileMethods:
    """The handlers, bound to one working directory."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    async def write(self, request: m.FilesWriteRequest, ctx: CallContext) -> m.FilesTransferResult:
        path = resolve(request.path, self.workdir)
        stream_id = request.stream
        mode = request.mode
        if request.mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.ironclaw-part")
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            async for chunk in ctx.peer.open_stream(stream_id):
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(chunk)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        return m.FilesTransferResult(path=str(path), size=size)

    async def read(self, request: m.FilesReadRequest, ctx: CallContext) -> m.FilesTransferResult:
        path = resolve(request.path, self.workdir)
        stream_id = request.stream
        size = 0
        try:
            fd = _open_regular(path)
            try:
                while chunk := os.read(fd, READ_CHUNK):
                    size += len(chunk)
                    await ctx.peer.send_bytes(stream_id, chunk)
            finally:
                os.close(fd)
        finally:
            if not ctx.peer.closed:
                with contextlib.suppress(Exception):
                    await ctx.peer.end_stream(stream_id)
        return m.FilesTransferResult(path=str(path), size=size)

    async def list(self, request: m.FilesListRequest, ctx: CallContext) -> m.FilesListResult:
        path = resolve(request.path, self.workdir)
        entries = []
        with os.scandir(path) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                entries.append(_entry(Path(entry.path), st))
        entries.sort(key=lambda e: e.name)
        return m.FilesListResult(path=str(path), entries=tuple(entries))

    async def stat(self, request: m.FilesStatRequest, ctx: CallContext) -> m.FileEntry:
        path = resolve(request.path, self.workdir)
        return _entry(path, path.lstat())

    async def remove(self, request: m.FilesRemoveRequest, ctx: CallContext) -> m.FilesRemoveResult:
        path = resolve(request.path, self.workdir)
        if path.is_dir() and not path.is_symlink():
            if request.recursive:
                import shutil

                shutil.rmtree(path)
            else:
                path.rmdir()
        else:
            path.unlink()
        return m.FilesRemoveResult(removed=str(path))

    async def mkdir(self, request: m.FilesMkdirRequest, ctx: CallContext) -> m.FilesMkdirResult:
        path = resolve(request.path, self.workdir)
        path.mkdir(parents=request.parents, exist_ok=True)
        return m.FilesMkdirResult(path=str(path))
