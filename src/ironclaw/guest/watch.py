"""``files.watch``: inotify in the guest (through ctypes: the guest has only the stdlib).

Events go to the host as JSON lines on the stream it gave, in the order the kernel
reported them: ``created``, ``modified`` (repeats for one path coalesced while queued),
``deleted``, ``moved`` (``path`` -> ``dest``; a move out of the watched tree is a
``deleted``, into it a ``created``). The queue between the kernel and the channel holds
``max_queue`` events; past that, events are dropped and one ``overflow`` event marks the
gap (so does the kernel's own IN_Q_OVERFLOW). Only paths inside the workspace can be
watched. The call lasts until the host cancels it or the watched path goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import struct
from collections import deque
from typing import Any

from ironclaw.errors import ConfigError
from ironclaw.proto import methods as m
from ironclaw.rpc import CallContext

__all__ = ["watch"]

IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x2, 0x40, 0x80, 0x100
IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
MASK = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
HEADER = struct.Struct("iIII")
BATCH = 64 * 1024

_libc: Any = None


def _inotify() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def inside_workspace(path: str, workdir: str) -> str:
    """The real path of ``path`` if it lies inside ``workdir``; ConfigError otherwise."""
    full = path if os.path.isabs(path) else os.path.join(workdir, path)
    real, root = os.path.realpath(full), os.path.realpath(workdir)
    if os.path.commonpath([real, root]) != root:
        raise ConfigError(f"{path} is outside the workspace {workdir}: watch a path inside it")
    if not os.path.exists(real):
        raise FileNotFoundError(2, "No such file or directory", path)
    return real


class _Watcher:
    def __init__(self, fd: int, max_queue: int, recursive: bool) -> None:
        self.fd, self.max_queue, self.recursive = fd, max_queue, recursive
        self.paths: dict[int, str] = {}
        self.queue: deque[dict[str, Any]] = deque()
        self.pending_overflow = False
        self.dropped = 0
        self.ready = asyncio.Event()
        self.gone = False
        # Paths a scan of a new directory announced. Between its watch being added and
        # the scan, a file can be made: the kernel then reports it too, and the second
        # "created" is dropped here. Every such event was queued before the scan ended,
        # so the set lives until the inotify queue has been drained once.
        self.announced: set[str] = set()

    def add(self, path: str, *, announce: bool = False) -> None:
        # fsencode: a name that is not UTF-8 (surrogateescape'd) is a path all the same.
        wd = _inotify().inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            return  # vanished already, or the kernel's watch limit: nothing to follow
        self.paths[wd] = path
        if self.recursive and os.path.isdir(path):
            with contextlib.suppress(OSError), os.scandir(path) as it:
                for entry in it:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if announce:  # made before its directory's watch existed
                        self.push({"type": "created", "path": entry.path, "is_dir": is_dir})
                        self.announced.add(entry.path)
                    if is_dir:
                        self.add(entry.path, announce=announce)

    def push(self, ev: dict[str, Any]) -> None:
        q = self.queue
        if self.pending_overflow and len(q) < self.max_queue:
            q.append({"type": "overflow", "path": ""})
            self.pending_overflow = False
        if ev["type"] == "modified" and q and q[-1] == ev:
            return
        if len(q) >= self.max_queue:
            self.pending_overflow = True
            self.dropped += 1
            return
        q.append(ev)
        self.ready.set()

    def on_readable(self) -> None:
        moves: dict[int, dict[str, Any]] = {}
        while True:
            try:
                buf = os.read(self.fd, BATCH)
            except BlockingIOError:
                break
            off = 0
            while off + HEADER.size <= len(buf):
                wd, mask, cookie, n = HEADER.unpack_from(buf, off)
                raw = buf[off + HEADER.size : off + HEADER.size + n]
                off += HEADER.size + n
                self._event(wd, mask, cookie, raw.rstrip(b"\0").decode(errors="surrogateescape"),
                            moves)  # fmt: skip
        for ev in moves.values():  # moved out of the tree
            self.push({"type": "deleted", "path": ev["path"], "is_dir": ev["is_dir"]})
        self.announced.clear()
        self.ready.set()

    def _event(self, wd: int, mask: int, cookie: int, name: str, moves: dict[int, Any]) -> None:
        if mask & IN_Q_OVERFLOW:
            self.push({"type": "overflow", "path": ""})
            return
        base = self.paths.get(wd)
        if base is None:
            return
        if mask & (IN_IGNORED | IN_DELETE_SELF):
            self.paths.pop(wd, None)
            self.gone = self.gone or not self.paths
            return
        path = os.path.join(base, name) if name else base
        is_dir = bool(mask & IN_ISDIR)
        if mask & (IN_CREATE | IN_MOVED_TO) and path in self.announced:
            self.announced.discard(path)  # the scan reported it (and followed a directory)
            return
        self.announced.discard(path)
        if mask & IN_CREATE:
            self.push({"type": "created", "path": path, "is_dir": is_dir})
            if is_dir and self.recursive:
                self.add(path, announce=True)
        elif mask & IN_MODIFY:
            self.push({"type": "modified", "path": path, "is_dir": is_dir})
        elif mask & IN_DELETE:
            self.push({"type": "deleted", "path": path, "is_dir": is_dir})
        elif mask & IN_MOVED_FROM:
            moves[cookie] = {"path": path, "is_dir": is_dir}
        elif mask & IN_MOVED_TO:
            src = moves.pop(cookie, None)
            if src is None:
                self.push({"type": "created", "path": path, "is_dir": is_dir})
                if is_dir and self.recursive:
                    self.add(path, announce=True)
                return
            self.push({"type": "moved", "path": src["path"], "dest": path, "is_dir": is_dir})
            if is_dir:
                old = src["path"] + "/"
                for w, p in list(self.paths.items()):
                    if p == src["path"] or p.startswith(old):
                        self.paths[w] = path + p[len(src["path"]) :]


async def watch(request: m.WatchRequest, ctx: CallContext, workdir: str) -> m.WatchResult:
    try:
        root = inside_workspace(request.path, workdir)
    except BaseException:
        await ctx.peer.end_stream(request.stream)
        raise
    libc = _inotify()
    fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    w = _Watcher(fd, request.max_queue, request.recursive)
    loop = asyncio.get_running_loop()
    peer, sid, sent = ctx.peer, request.stream, 0
    try:
        w.add(root)
        loop.add_reader(fd, w.on_readable)
        while not (w.gone and not w.queue):
            if not w.queue:
                w.ready.clear()
                await w.ready.wait()
                continue
            lines: list[str] = []
            while w.queue and len(lines) < 256:
                lines.append(json.dumps(w.queue.popleft(), separators=(",", ":")))
            if w.pending_overflow and not w.queue:  # the gap after the last kept event
                w.pending_overflow = False
                lines.append('{"type":"overflow","path":""}')
            sent += len(lines)
            await peer.send_bytes(sid, ("\n".join(lines) + "\n").encode())
    finally:
        loop.remove_reader(fd)
        os.close(fd)
        if not peer.closed:
            with contextlib.suppress(Exception):
                await peer.end_stream(sid)
    return m.WatchResult(events=sent, dropped=w.dropped)
