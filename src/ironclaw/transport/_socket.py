"""Connection on a non-blocking stream socket, driven straight by the event loop.

asyncio's socket transport allocates a fresh ``bytes`` for every read and copies every
write that does not fit the kernel buffer into a growing bytearray. For bulk traffic
those copies (and the page faults of the large allocations) cost more than the kernel
copy itself, so this connection instead:

* reads with ``recv_into`` into a buffer the caller owns (``read_into``; the rpc decoder
  hands over its own buffer), or returns plain ``bytes`` from ``read``;
* writes with ``sendmsg`` from a queue of read-only views, so header and payload go out
  in one syscall and nothing is copied in user space. Mutable inputs are copied once,
  because the caller may reuse them after ``write`` returns.

A write is all-or-nothing with respect to cancellation: the bytes are queued before the
first await, so a cancelled writer never leaves half a frame on the wire. Bytes pushed
back with ``unread`` (a handshake's leftovers) are returned before the socket is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

from ironclaw.errors import ChannelClosed, ConfigError, ConnectError, ReadError, WriteError

__all__ = ["HIGH_WATER", "Receiver", "SocketConnection", "connect_socket", "listen_tcp"]

HIGH_WATER: Final = 2**20  # queued bytes above which write() waits
_MAX_IOV: Final = 64
_CLOSE_GRACE: Final = 2.0
_RESET_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN})

Buffer = bytes | bytearray | memoryview
_T = TypeVar("_T")
_PUSH_READ: Final = 128 * 1024


class Receiver(Protocol):
    """What ``attach_receiver`` feeds (the shape of asyncio's BufferedProtocol)."""

    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def eof_received(self, exc: BaseException | None) -> None: ...


class SocketConnection:
    """A :class:`~ironclaw.transport.Connection` on one connected stream socket."""

    def __init__(self, sock: socket.socket, *, initiator: bool | None, name: str = "") -> None:
        sock.setblocking(False)
        self.initiator = initiator
        self.name = name
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._pushback: deque[bytes] = deque()
        self._reading = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._reader_armed = False
        self._receiver: Receiver | None = None
        self._paused = False
        self._wqueue: deque[memoryview] = deque()
        self._wbytes = 0
        self._writer_armed = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._write_error: BaseException | None = None
        self._eof = False
        self._closing = False
        self._fd_closed = False

    # -- state --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closing or self._eof or self._write_error is not None

    def fileno(self) -> int:
        return self._fd

    # -- reading --------------------------------------------------------------------------
    def attach_receiver(self, receiver: Receiver) -> None:
        """Push mode: from now on bytes go straight into ``receiver`` from the loop callback.

        ``read``/``read_into`` must not be used afterwards. Bytes pushed back with
        ``unread`` are delivered first.
        """
        if self._receiver is not None or self._reading:
            raise RuntimeError("connection already has a reader")
        # A pull-mode read (a handshake) may have left the fd registered with the pull
        # callback; drop it, or push mode would never be armed.
        self._disarm_reader()
        self._receiver = receiver
        if self._pushback:
            self._loop.call_soon(self._deliver_pushback)
        else:
            self.resume_reading()

    def _deliver_pushback(self) -> None:
        receiver = self._receiver
        assert receiver is not None
        while self._pushback and not self._closing:
            data = self._pushback.popleft()
            with receiver.get_buffer(len(data)) as buf:
                buf[: len(data)] = data
            receiver.buffer_updated(len(data))
        if not self._paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        self._paused = True
        self._disarm_reader()

    def resume_reading(self) -> None:
        self._paused = False
        if self._receiver is not None and not self._reader_armed:
            if self._closing or self._eof or self._fd_closed:
                return
            self._reader_armed = True
            self._loop.add_reader(self._fd, self._push_ready)

    def _push_ready(self) -> None:
        receiver = self._receiver
        assert receiver is not None
        try:
            with receiver.get_buffer(_PUSH_READ) as buf:
                n = self._sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disarm_reader()
            self._eof = True
            if exc.errno in _RESET_ERRNOS:
                receiver.eof_received(None)
            else:
                receiver.eof_received(ReadError(f"read failed: {exc.strerror or exc}"))
            return
        except Exception as exc:  # the receiver's buffer is unusable (a failed decoder)
            self._disarm_reader()
            receiver.eof_received(exc)
            return
        if not n:
            self._disarm_reader()
            self._eof = True
            receiver.eof_received(None)
            return
        receiver.buffer_updated(n)

    def unread(self, data: bytes) -> None:
        if data:
            self._pushback.appendleft(data)

    async def read(self, max_bytes: int = 262144) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if self._pushback:
            data = self._pushback.popleft()
            if len(data) > max_bytes:
                self._pushback.appendleft(data[max_bytes:])
                data = data[:max_bytes]
            return data
        return await self._io(lambda: self._sock.recv(max_bytes))

    async def read_into(self, buf: memoryview) -> int:
        """Fill ``buf`` with up to ``len(buf)`` bytes; 0 means EOF."""
        if self._pushback:
            data = self._pushback.popleft()
            n = min(len(data), len(buf))
            buf[:n] = data[:n]
            if n < len(data):
                self._pushback.appendleft(data[n:])
            return n
        return await self._io(lambda: self._sock.recv_into(buf))

    async def _io(self, op: Callable[[], _T]) -> _T:
        if self._reading:
            raise RuntimeError("read() is already being awaited by another task")
        self._reading = True
        try:
            while True:
                if self._closing:
                    raise ChannelClosed("connection closed locally")
                try:
                    result = op()
                except (BlockingIOError, InterruptedError):
                    await self._wait_readable()
                    continue
                except OSError as exc:
                    if exc.errno in _RESET_ERRNOS:
                        self._eof = True
                    raise ReadError(f"read failed: {exc.strerror or exc}") from exc
                if not result:
                    self._eof = True
                return result
        finally:
            self._reading = False

    async def _wait_readable(self) -> None:
        # The fd stays registered between reads (no epoll_ctl per message); it is dropped
        # only when readiness fires while nobody reads, i.e. when the reader applies
        # backpressure, so level-triggered epoll cannot spin.
        fut = self._loop.create_future()
        self._read_waiter = fut
        if not self._reader_armed:
            self._reader_armed = True
            self._loop.add_reader(self._fd, self._on_readable)
        try:
            await fut
        finally:
            self._read_waiter = None

    def _on_readable(self) -> None:
        fut = self._read_waiter
        if fut is None:
            self._disarm_reader()
        elif not fut.done():
            fut.set_result(None)

    def _disarm_reader(self) -> None:
        if self._reader_armed:
            self._reader_armed = False
            if not self._fd_closed:
                self._loop.remove_reader(self._fd)

    # -- writing --------------------------------------------------------------------------
    async def write(self, data: Buffer) -> None:
        """Queue ``data`` (sent at once if the socket takes it); wait above the high-water mark."""
        self._queue(data)
        if self._wbytes > HIGH_WATER:
            await self._drained()

    async def writev(self, parts: Sequence[Buffer]) -> None:
        """Like ``write`` for several buffers, sent back to back (one ``sendmsg`` if possible)."""
        if not self._wqueue and not self._closing and self._write_error is None:
            views = [_flat(p) for p in parts]
            n = self._send(self._sock.sendmsg, views)
            for view in views:
                if n >= view.nbytes:
                    n -= view.nbytes
                    continue
                self._queue(view[n:] if n else view)
                n = 0
        else:
            for part in parts:
                self._queue(part)
        if self._wbytes > HIGH_WATER:
            await self._drained()

    def _send(self, send: Callable[[_T], int], data: _T) -> int:
        """What the socket takes now (0 when it is full); a lost connection fails this write
        and every later one."""
        try:
            return send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._fail_write(exc)
            raise ChannelClosed(f"connection lost: {exc.strerror or exc}") from exc

    def _queue(self, data: Buffer) -> None:
        if self._closing:
            raise ChannelClosed("connection closed locally")
        if self._write_error is not None:
            raise ChannelClosed(f"connection lost: {self._write_error}") from self._write_error
        view = _flat(data)
        if not view.nbytes:
            return
        if not self._wqueue:
            n = self._send(self._sock.send, view)
            if n == view.nbytes:
                return
            view = view[n:]
        if not view.readonly:
            view = memoryview(view.tobytes())
        self._wqueue.append(view)
        self._wbytes += view.nbytes
        if not self._writer_armed:
            self._writer_armed = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _write_ready(self) -> None:
        q = self._wqueue
        while q:
            try:
                n = self._sock.sendmsg(_take(q, _MAX_IOV))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail_write(exc)
                return
            self._wbytes -= n
            while n:
                head = q[0]
                if n >= head.nbytes:
                    n -= head.nbytes
                    q.popleft()
                else:
                    q[0] = head[n:]
                    n = 0
            if self._wbytes > HIGH_WATER:
                return
            self._wake_drain()
        self._disarm_writer()
        self._wake_drain()

    def _disarm_writer(self) -> None:
        if self._writer_armed:
            self._writer_armed = False
            if not self._fd_closed:
                self._loop.remove_writer(self._fd)

    def _wake_drain(self) -> None:
        if self._wbytes <= HIGH_WATER // 2 or not self._wqueue:
            waiters, self._drain_waiters = self._drain_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _fail_write(self, exc: BaseException) -> None:
        self._write_error = exc
        self._wqueue.clear()
        self._wbytes = 0
        self._disarm_writer()
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(ChannelClosed(f"connection lost while writing: {exc}"))
        # A reader blocked on a dead socket learns it from its own recv (EOF / reset).

    async def _drained(self) -> None:
        fut = self._loop.create_future()
        self._drain_waiters.append(fut)
        try:
            await fut
        except ChannelClosed:
            raise
        except OSError as exc:  # pragma: no cover - defensive
            raise WriteError(str(exc)) from exc

    # -- closing --------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Flush queued bytes (at most a short grace period), then close. Idempotent."""
        if self._fd_closed:
            return
        self._closing = True
        self._disarm_reader()
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)
        if self._wqueue and self._write_error is None:
            with contextlib.suppress(TimeoutError, ChannelClosed):
                async with asyncio.timeout(_CLOSE_GRACE):
                    while self._wqueue and self._write_error is None:
                        await self._drained()
        self.abort()

    def abort(self) -> None:
        """Close now, dropping queued bytes (what a crash looks like from the other side)."""
        self._closing = True
        if self._fd_closed:
            return
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)
        self._disarm_writer()
        self._wqueue.clear()
        self._wbytes = 0
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(ChannelClosed("connection closed locally"))
        self._disarm_reader()
        self._fd_closed = True
        self._sock.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SocketConnection {self.name or self._fd} {state} queued={self._wbytes}>"


async def connect_socket(
    sock: socket.socket,
    address: Any,
    *,
    what: str,
    name: str,
    timeout: float,
    wrap: Callable[[socket.socket], SocketConnection] | None = None,
) -> SocketConnection:
    """Connect ``sock`` and wrap it (``wrap``, or a plain :class:`SocketConnection`); on
    any failure it is closed, and ``what`` says where to."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
    except TimeoutError as exc:
        sock.close()
        raise ConnectError(f"{what}: timed out after {timeout}s") from exc
    except OSError as exc:
        sock.close()
        raise ConnectError(f"{what}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    if wrap is not None:
        return wrap(sock)
    return SocketConnection(sock, initiator=True, name=name)


def listen_tcp(host: str, port: int, *, backlog: int, nodelay: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket (IPv6 when ``host`` has a colon) for a server
    loop; ``nodelay`` is inherited by accepted connections. A port in use or an address
    not on this machine is a :class:`~ironclaw.errors.ConfigError` naming them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _flat(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _take(q: deque[memoryview], n: int) -> list[memoryview]:
    if len(q) <= n:
        return list(q)
    return [q[i] for i in range(n)]
