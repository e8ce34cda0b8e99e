"""The remote SDK's detached commands, terminals, ports and file watches.

The same surface as the in-process SDK's ``sb.commands``, ``sb.pty``, ``sb.ports`` and
``sb.files.watch``, over the routes of ``ironclaw serve`` (REST for start, list, kill,
stdin and ports; a WebSocket for attach and PTYs; Server-Sent Events for a watch).
Results are the channel's own records (:class:`~ironclaw.proto.proc_methods.ProcInfo`,
:class:`~ironclaw.proto.proc_methods.WatchEvent`), as in-process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal as _signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Unpack
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from ironclaw.client._errors import from_problem
from ironclaw.client._http import frame_doc, problem_of, send_opening, sse_events
from ironclaw.client._http import seg as _seg
from ironclaw.errors import ApiError, ConnectError, IronclawError
from ironclaw.proto import methods as m
from ironclaw.proto.proc_methods import ProcView
from ironclaw.proto.surface import PortInfo, PtyOptions, StartOptions

if TYPE_CHECKING:
    from ironclaw.client.api import ApiClient

__all__ = [
    "RemoteCommands",
    "RemotePorts",
    "RemoteProcessHandle",
    "RemotePty",
    "RemoteTerminal",
    "RemoteWatch",
]

MAX_WAIT = 300.0  # the server's longest single wait


def _info(doc: Any) -> m.ProcInfo:
    fields = {k: doc[k] for k in m.ProcInfo._fields if k in doc}
    return m.decode(m.ProcInfo, fields, "process")


def _base(api: ApiClient, sandbox_id: str) -> str:
    return f"/v1/sandboxes/{_seg(sandbox_id)}"


def _ws(api: ApiClient, path: str) -> Any:
    headers = {"Authorization": f"Bearer {api.token}"} if api.token else None
    if api.uds is not None:
        return unix_connect(api.uds, f"ws://ironclaw{path}", additional_headers=headers)
    return connect(f"{api.base.replace('http', 'ws', 1)}{path}", additional_headers=headers)


async def _until_exit(proc: ProcView, ws: ClientConnection, what: str) -> AsyncIterator[bytes]:
    """A command's output frames until its exit frame, whose info ``proc`` then holds."""
    async for msg in ws:
        if isinstance(msg, bytes):
            yield msg
            continue
        doc = frame_doc(msg)
        if doc.get("type") == "exit":
            proc.info = _info(doc)
            return
    raise ApiError(f"the server closed the {what} without an exit status")


class RemoteProcessHandle(ProcView):
    """One detached command in a remote sandbox: output, stdin, signals, exit status."""

    def __init__(self, api: ApiClient, sandbox_id: str, info: m.ProcInfo) -> None:
        self.api, self.sandbox_id, self.info = api, sandbox_id, info

    def _path(self, tail: str = "") -> str:
        return f"{_base(self.api, self.sandbox_id)}/processes/{self.info.pid}{tail}"

    async def output(self, *, replay: bool = True) -> AsyncIterator[bytes]:
        """The output the guest still holds (``replay``), then live output until the end."""
        query = urlencode({"replay": str(replay).lower()})
        try:
            async with _ws(self.api, self._path(f"/attach?{query}")) as ws:
                async for chunk in _until_exit(self, ws, "attach stream"):
                    yield chunk
        except (OSError, ConnectionClosed) as exc:
            raise ConnectError(f"attach to {self.api.base} failed: {exc}") from None

    async def send_stdin(self, data: bytes | str, *, close: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else data
        body = {"data_b64": base64.b64encode(raw).decode(), "close": close}
        self.info = _info(await self.api.request("POST", self._path("/stdin"), json=body))

    async def send(self, data: bytes | str) -> None:
        await self.send_stdin(data)

    async def close_stdin(self) -> None:
        await self.send_stdin(b"", close=True)

    async def kill(self, signum: int = _signal.SIGKILL) -> m.ProcInfo:
        """Signal the command's process group (its children too)."""
        body = {"signal": int(signum), "wait": 0}
        self.info = _info(await self.api.request("POST", self._path("/kill"), json=body))
        return self.info

    async def wait(self, timeout: float | None = None) -> m.ProcInfo:
        """The command's info once it ended, or as it is when ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            left = MAX_WAIT if end is None else max(0.0, min(MAX_WAIT, end - loop.time()))
            doc = await self.api.request("GET", self._path(), params={"wait": left})
            self.info = _info(doc)
            if not self.info.running or (end is not None and loop.time() >= end):
                return self.info


class RemoteCommands:
    """Detached commands of a remote sandbox: start, list, and re-attach from anywhere."""

    def __init__(self, api: ApiClient, sandbox_id: str) -> None:
        self.api, self.sandbox_id = api, sandbox_id

    async def start(self, argv: list[str], **opts: Unpack[StartOptions]) -> RemoteProcessHandle:
        """Start ``argv`` and return at once (the server fills in options not given)."""
        body = {"argv": argv, **opts}
        path = f"{_base(self.api, self.sandbox_id)}/processes"
        doc = await self.api.request("POST", path, json=body)
        return RemoteProcessHandle(self.api, self.sandbox_id, _info(doc))

    async def list(self) -> list[m.ProcInfo]:
        doc = await self.api.request("GET", f"{_base(self.api, self.sandbox_id)}/processes")
        return [_info(d) for d in doc["processes"]]

    async def connect(self, target: int | str) -> RemoteProcessHandle:
        """The command with pid (int) or tag (str) ``target``."""
        path = f"{_base(self.api, self.sandbox_id)}/processes/{_seg(str(target))}"
        doc = await self.api.request("GET", path)
        return RemoteProcessHandle(self.api, self.sandbox_id, _info(doc))


class RemoteTerminal(ProcView):
    """A PTY session over one WebSocket: ``send``, ``resize``, ``output()``, ``kill``.

    Closing it (or leaving ``async with``) hangs the terminal up: the shell is killed.
    """

    def __init__(self, ws: ClientConnection, info: m.ProcInfo) -> None:
        self.ws, self.info = ws, info

    async def output(self) -> AsyncIterator[bytes]:
        """The terminal's bytes until the command ends (then ``info`` has its status)."""
        try:
            async for chunk in _until_exit(self, self.ws, "terminal"):
                yield chunk
        except ConnectionClosed as exc:
            raise ConnectError(f"terminal stream closed: {exc}") from None

    async def send(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        for i in range(0, len(raw), 32 * 1024):
            await self.ws.send(raw[i : i + 32 * 1024])

    async def send_stdin(self, data: bytes | str) -> None:
        await self.send(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self.ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def kill(self, signum: int = _signal.SIGKILL) -> None:
        await self.ws.send(json.dumps({"type": "signal", "signal": int(signum)}))

    async def wait(self) -> m.ProcInfo:
        """Drain the output until the command ends; its final info."""
        async for _ in self.output():
            pass
        return self.info

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> RemoteTerminal:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RemotePtyOptions(PtyOptions, total=False):
    """``pty.create``'s options, and ``keep``: the terminal outlives this connection."""

    keep: bool


class RemotePty:
    """Interactive terminals: ``t = await sb.pty.create(80, 24)``."""

    def __init__(self, api: ApiClient, sandbox_id: str) -> None:
        self.api, self.sandbox_id = api, sandbox_id

    async def create(
        self, cols: int = 80, rows: int = 24, **opts: Unpack[RemotePtyOptions]
    ) -> RemoteTerminal:
        """Start ``argv`` (a shell) on a terminal; ``keep``: it survives the session."""
        first = {"cols": cols, "rows": rows, **opts}
        try:
            ws = await _ws(self.api, f"{_base(self.api, self.sandbox_id)}/pty")
        except (OSError, ConnectionClosed) as exc:
            raise ConnectError(f"terminal to {self.api.base} failed: {exc}") from None
        try:
            await send_opening(ws, json.dumps(first))
            msg = await ws.recv()
            if isinstance(msg, bytes):
                raise ApiError("the server sent output before the terminal started")
            return RemoteTerminal(ws, _info(frame_doc(msg)))
        except ConnectionClosed as exc:
            await ws.close()
            raise ConnectError(f"terminal to {self.api.base} failed: {exc}") from None
        except BaseException:
            await ws.close()
            raise


class RemotePorts:
    """Servers inside reachable on the server's host: ``url = await sb.ports.expose(8000)``."""

    def __init__(self, api: ApiClient, sandbox_id: str) -> None:
        self.api, self.path = api, f"{_base(api, sandbox_id)}/ports"

    async def expose(self, port: int, *, host: str = "127.0.0.1", host_port: int = 0) -> str:
        body = {"port": port, "bind": host, "host_port": host_port}
        doc = await self.api.request("POST", self.path, json=body)
        return str(doc["url"])

    async def list(self) -> list[PortInfo]:
        doc = await self.api.request("GET", self.path)
        return [PortInfo(**p) for p in doc["ports"]]

    async def unexpose(self, port: int) -> None:
        await self.api.request("DELETE", f"{self.path}/{int(port)}")


class RemoteWatch:
    """File events of a remote sandbox, in order: ``async for ev in sb.files.watch(p)``.

    ``await w.start()`` returns once the watch is in place in the guest (a change made
    after that is reported); iterating starts it if that was not done.
    """

    def __init__(
        self, api: ApiClient, sandbox_id: str, path: str, recursive: bool, max_queue: int
    ) -> None:
        self.api, self.url = api, f"{_base(api, sandbox_id)}/watch"
        self.params: dict[str, str | int] = {
            "path": path,
            "recursive": str(recursive).lower(),
            "max_queue": max_queue,
        }
        self._stack = contextlib.AsyncExitStack()
        self._resp: httpx.Response | None = None
        self._events: AsyncIterator[m.WatchEvent] | None = None

    async def start(self) -> None:
        if self._resp is not None:
            return
        try:
            resp = await self._stack.enter_async_context(
                self.api.http.stream("GET", self.url, params=self.params)
            )
        except httpx.HTTPError as exc:
            raise ConnectError(f"watch at {self.api.base} failed: {exc}") from None
        if resp.status_code >= 400:
            refusal = await problem_of(resp)
            await self._stack.aclose()
            raise refusal
        self._resp = resp
        self._events = self._parse(resp)

    async def _parse(self, resp: httpx.Response) -> AsyncIterator[m.WatchEvent]:
        async for name, doc in sse_events(resp):
            if name == "error":
                status = doc.get("status", 500) if isinstance(doc, dict) else 500
                raise from_problem(status if type(status) is int else 500, doc)
            yield m.decode(m.WatchEvent, doc, "watch event")

    def __aiter__(self) -> RemoteWatch:
        return self

    async def __anext__(self) -> m.WatchEvent:
        await self.start()
        assert self._events is not None
        try:
            return await anext(self._events)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except httpx.HTTPError as exc:
            await self.aclose()
            raise ConnectError(f"watch at {self.api.base} broke: {exc}") from None
        except IronclawError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop watching (the server ends the guest's watch)."""
        await self._stack.aclose()
