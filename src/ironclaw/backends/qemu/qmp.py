"""A minimal asyncio client for QEMU's machine protocol (QMP) over a UNIX socket.

QMP is line-delimited JSON: a greeting, then commands answered in order, with
asynchronous events (SHUTDOWN, STOP, ...) interleaved. One reader task routes answers
to their callers by ``id`` and keeps events for :meth:`QmpClient.wait_event`, so a
caller never mistakes an event for the answer it waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ironclaw.errors import BackendError

__all__ = ["QmpClient", "QmpError"]

_MAX_LINE = 16 * 2**20


class QmpError(BackendError):
    """QEMU answered a QMP command with an error, or the QMP socket failed."""


class QmpClient:
    """One QMP session; build with :meth:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._event_cond = asyncio.Condition()
        self._closed: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: Path, limit_s: float = 5.0) -> QmpClient:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        try:
            async with asyncio.timeout(limit_s):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=_MAX_LINE)
                greeting = json.loads(await reader.readline() or b"null")
        except (OSError, TimeoutError, ValueError) as exc:
            raise QmpError(f"cannot open QMP socket {path}: {exc!r}") from exc
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            writer.close()
            raise QmpError(f"unexpected QMP greeting from {path}: {greeting!r}")
        client = cls(reader, writer)
        client._task = asyncio.get_running_loop().create_task(client._read_loop())
        await client.execute("qmp_capabilities", limit_s=limit_s)
        return client

    async def _read_loop(self) -> None:
        error: BaseException = QmpError("QMP connection closed")
        try:
            while line := await self._reader.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "event" in msg:
                    async with self._event_cond:
                        self._events.append(msg)
                        self._event_cond.notify_all()
                    continue
                fut = self._pending.pop(msg.get("id", -1), None)
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    err = msg["error"]
                    fut.set_exception(QmpError(f"{err.get('class')}: {err.get('desc')}"))
                else:
                    fut.set_result(msg.get("return"))
        except (OSError, ValueError) as exc:
            error = QmpError(f"QMP connection failed: {exc!r}")
        finally:
            self._closed = error
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self._pending.clear()
            async with self._event_cond:
                self._event_cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        limit_s: float = 10.0,
        fds: Sequence[int] = (),
    ) -> Any:
        """Run one command and return its ``return`` value; raise :class:`QmpError`.

        ``fds`` ride along with the command as SCM_RIGHTS (for ``getfd``/``add-fd``).
        """
        if self._closed is not None:
            raise QmpError(f"QMP {command}: connection closed")
        ident = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        try:
            data = json.dumps(msg).encode() + b"\n"
            if fds:
                await self._writer.drain()  # nothing of an earlier command may follow
                self._send_with_fds(data, fds)
            else:
                self._writer.write(data)
            await self._writer.drain()
            async with asyncio.timeout(limit_s):
                return await fut
        except OSError as exc:
            raise QmpError(f"QMP {command}: {exc!r}") from exc
        except TimeoutError as exc:
            raise QmpError(f"QMP {command}: no answer within {limit_s}s") from exc
        finally:
            self._pending.pop(ident, None)

    def _send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send ``data`` with ``fds`` attached, straight on the socket (asyncio's writer
        cannot carry ancillary data); the rest, if the send was short, goes the usual way."""
        transport_sock = self._writer.get_extra_info("socket")
        if transport_sock is None:
            raise OSError("QMP transport has no socket to pass descriptors on")
        with socket.socket(fileno=os.dup(transport_sock.fileno())) as sock:
            sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            self._writer.write(data[sent:])

    async def wait_event(self, name: str, limit_s: float) -> dict[str, Any]:
        """Wait for (and consume) the first event called ``name``, past or future."""
        async with asyncio.timeout(limit_s), self._event_cond:
            while True:
                for i, ev in enumerate(self._events):
                    if ev.get("event") == name:
                        return self._events.pop(i)
                if self._closed is not None:
                    raise QmpError(f"QMP closed before event {name}")
                await self._event_cond.wait()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
