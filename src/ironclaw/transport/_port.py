"""The guest's end of a virtio-serial port, held open for the agent's whole life.

The port is not closed between host connections: closing it makes the guest kernel drop
unread port data, and the host's next connection may already be sending (requests were
lost that way: a reconnect or a restore right then hung). Instead one descriptor stays
open and host sessions are told apart on it (the hello/ack of :mod:`._sessions`), using
what virtio-console reports about the host end:

* with no host connected, a read with nothing buffered returns 0 and poll reports
  POLLHUP; writes would block, and QEMU discards what reaches it then;
* the host end connecting or leaving raises SIGIO on a descriptor with ``O_ASYNC``.

A read of 0 in a session whose host was seen connected ends it at a clean boundary
(every byte of that host was read before). The reader then waits (SIGIO, or a slow poll)
until POLLHUP clears and discards bytes up to the next hello. A read of 0 before the
session's host was ever seen connected is not trusted: the hello can overtake the
guest kernel's "host connected" notice, which travels on another queue. While a
session's reading is paused (backpressure), SIGIO and POLLHUP alone end it.

A host may also leave and the next one connect before the guest reads anything in
between (both notices are handled at once): then the new hello arrives inside the old
session. Which bytes belong to which session is decided by a ``SessionTracker`` (sans-IO):
at a frame boundary the hello is seen at once. Inside a frame the old host left
unfinished it is swallowed as payload (and handed to the old session, whose reader may
then close it); but a host sends nothing after its hello until the ack, so when the
port's last bytes are a whole hello that began no session and nothing more comes for
``settle_s``, it is taken to be a new host's.

Each session is a :class:`StreamConnection` whose writes go through a descriptor of its
own (a dup of the port): ending a session aborts it, so nothing the old session queued
can reach the next host after that host's ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import signal
from typing import Any

from ._sessions import SessionTracker, ack_frame
from ._stream import DEFAULT_READ_LIMIT, StreamConnection

__all__ = ["PortSessions"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_SIGIO_POLL_S = 1.0


class _Session(asyncio.ReadTransport):
    """One host session: the read transport of its connection, fed by the port reader."""

    def __init__(self, port: PortSessions, conn: StreamConnection, number: int) -> None:
        super().__init__()
        self.port = port
        self.conn = conn
        self.number = number  # the SessionTracker's number of this session
        self.proto: asyncio.Protocol | None = None
        self.wtransport: asyncio.WriteTransport | None = None
        self.paused = False
        self.ended = False
        self.seen_connected = False  # the host end was reported connected during it

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self.port._wake.set()

    def is_reading(self) -> bool:
        return not (self.paused or self.ended)

    def is_closing(self) -> bool:
        return self.ended

    def close(self) -> None:  # the agent closed its end of this session
        self.port._end(self)

    def deliver(self, data: bytes) -> None:
        if self.proto is not None and data and not self.ended:
            self.proto.data_received(data)


class PortSessions:
    """Host sessions on an open port descriptor; :meth:`accept` returns each in turn.

    The descriptor is owned from now on and closed by :meth:`close`. ``write_fd`` (also
    owned) stands in for the port's write side where read and write are separate files
    (a test's FIFO and socket); sessions write through dups of it.
    """

    def __init__(
        self,
        fd: int,
        *,
        write_fd: int | None = None,
        read_limit: int = DEFAULT_READ_LIMIT,
        poll_s: float = 0.1,
        settle_s: float = 0.2,
    ) -> None:
        self._fd = fd
        self._wfd = fd if write_fd is None else write_fd
        self._read_limit = read_limit
        self._poll_s = poll_s
        self._settle_s = settle_s
        self._loop = asyncio.get_running_loop()
        self._pending: asyncio.Queue[StreamConnection] = asyncio.Queue()
        self._current: _Session | None = None
        self._tracker = SessionTracker()
        self._last_data = 0.0  # loop time of the last bytes read
        self._wake = asyncio.Event()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._sigio = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Sessions begun so far (tests and logs).
        self.sessions = 0

    def start(self) -> None:
        if self._task is not None:
            return
        self._arm_sigio()
        self._task = self._loop.create_task(self._run(), name="virtio-port")

    async def accept(self) -> StreamConnection:
        """The next host session. Raises what stopped the port reader (a hot-unplug)."""
        if self._task is None:
            raise RuntimeError("PortSessions not started")
        got = asyncio.ensure_future(self._pending.get())
        try:
            await asyncio.wait({got, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not got.done():
                got.cancel()
        if got.done() and not got.cancelled():
            return got.result()
        self._task.result()  # raises its error
        raise EOFError("virtio port reader ended")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._current is not None:
            self._end(self._current)
        if self._sigio:
            with contextlib.suppress(OSError):  # before the handler goes: SIGIO would kill
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_ASYNC)
            self._loop.remove_signal_handler(signal.SIGIO)
        for fd in {self._fd, self._wfd}:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the reader ---------------------------------------------------------------------
    def _arm_sigio(self) -> None:
        try:
            self._loop.add_signal_handler(signal.SIGIO, self._wake.set)
        except (RuntimeError, ValueError):  # not the main thread: poll only
            return
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETOWN, os.getpid())
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_ASYNC)
        except OSError:
            self._loop.remove_signal_handler(signal.SIGIO)
            return
        self._sigio = True

    def _host_gone(self) -> bool:
        return any(ev & select.POLLHUP for _, ev in self._poll.poll(0))

    async def _wait(self, *, readable: bool = False, timeout: float | None = None) -> None:
        """Until a wake-up: SIGIO, a resumed session, readable data, or ``timeout``."""
        if readable:
            self._loop.add_reader(self._fd, self._wake.set)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        finally:
            if readable:
                self._loop.remove_reader(self._fd)

    async def _run(self) -> None:
        empty_reads = 0
        while True:
            self._wake.clear()
            sess = self._current
            if sess is not None and sess.paused:
                if sess.seen_connected and self._host_gone():
                    self._end(sess)
                else:
                    await self._wait(timeout=None if self._sigio else self._poll_s)
                continue
            try:
                data = os.read(self._fd, _CHUNK)
            except BlockingIOError:
                if self._tracker.swallowed() is None:
                    await self._wait(readable=True)
                    continue
                # The port ends with a hello that began no session: once nothing more
                # comes for a moment, it is a new host's (which waits for its ack).
                left = self._last_data + self._settle_s - self._loop.time()
                if left > 0:
                    await self._wait(readable=True, timeout=left)
                    continue
                nonce = self._tracker.idle()
                assert nonce is not None
                await self._open(nonce)  # ends the current session first
                continue
            if data:
                empty_reads = 0
                self._last_data = self._loop.time()
                await self._feed(data)
                continue
            # Nothing buffered and no host: the session (if it had its host) is over.
            if sess is not None and sess.seen_connected:
                self._end(sess)
            empty_reads += 1
            await self._host_back(settle=empty_reads > 1)

    async def _host_back(self, *, settle: bool) -> None:
        """Return once the host end is connected again."""
        if settle:  # reads of 0 although no POLLHUP: not a real port; do not spin
            await asyncio.sleep(self._poll_s)
        # SIGIO announces the host; the poll stays as a slow safety net then (an idle,
        # pooled VM should not wake ten times a second).
        every = _SIGIO_POLL_S if self._sigio else self._poll_s
        while self._host_gone():
            self._wake.clear()
            await self._wait(timeout=every)
        if self._current is not None:
            self._current.seen_connected = True

    async def _feed(self, data: bytes) -> None:
        # The tracker's events follow the stream: a session ends at a new host's hello
        # (its end went unnoticed) or at a header no frame has, and a session begins.
        for kind, value in self._tracker.feed(data):
            sess = self._current
            if kind == "data":
                if sess is not None:
                    sess.deliver(value)
            elif kind == "end":
                if sess is not None:
                    self._end(sess, by_tracker=True)
            else:
                await self._open(value)

    async def _open(self, nonce: bytes) -> None:
        if self._current is not None:
            self._end(self._current, by_tracker=True)
        self.sessions += 1
        conn = StreamConnection(
            initiator=False, read_limit=self._read_limit, name=f"virtio-session{self.sessions}"
        )
        sess = _Session(self, conn, self.sessions)  # the tracker counts them alike
        wfile = os.fdopen(os.dup(self._wfd), "wb", buffering=0, closefd=True)
        try:
            wt, _ = await self._loop.connect_write_pipe(conn.write_protocol, wfile)
        except BaseException:
            wfile.close()
            raise
        assert isinstance(wt, asyncio.WriteTransport)
        sess.wtransport = wt
        proto = conn.read_protocol()
        proto.connection_made(sess)
        sess.proto = proto
        self._current = sess
        sess.seen_connected = not self._host_gone()
        await conn.write(ack_frame(nonce))  # first on this session's own descriptor
        self._pending.put_nowait(conn)

    def _end(self, sess: _Session, *, by_tracker: bool = False) -> None:
        """End ``sess`` now: its queued writes are dropped, its reader sees EOF.

        Unless the tracker ended it, the tracker is told (and scans for a hello next).
        """
        if sess.ended:
            return
        sess.ended = True
        if not by_tracker:
            self._tracker.end(sess.number)
        if self._current is sess:
            self._current = None
        wt = sess.wtransport
        # A transport closing with bytes left would still flush them, maybe after the
        # next session's ack; one closing with none has its connection_lost scheduled.
        if wt is not None and (not wt.is_closing() or wt.get_write_buffer_size()):
            wt.abort()
        proto = sess.proto
        if proto is not None:
            proto.eof_received()
            proto.connection_lost(None)
        self._wake.set()

    def __repr__(self) -> str:
        state: Any = "closed" if self._closed else f"{self.sessions} sessions"
        return f"<PortSessions fd={self._fd} {state}>"
