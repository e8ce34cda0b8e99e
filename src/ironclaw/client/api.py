"""A thin async client of every API route: :class:`ApiClient`.

``api_url`` is ``http(s)://host:port`` or ``unix:/path/to.sock``; without arguments
the client reads ``IRONCLAW_API_URL`` and ``IRONCLAW_API_TOKEN``. Failures raise the
exception the server raised (the class travels in the problem details).

Answers are the server's, so checked: each JSON body is decoded against its
``TypedDict`` (:func:`_decode`, with pydantic) and one that does not fit is an
:class:`~ironclaw.errors.ApiError` naming the route, never a ``KeyError`` later.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import httpx
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from ironclaw.client._http import frame_doc, problem_of, read_body, send_opening, sse_events
from ironclaw.client._http import problem as _problem
from ironclaw.client._http import seg as _seg
from ironclaw.errors import ApiError, ConfigError, ConnectError, InvalidParams, IronclawError
from ironclaw.proto import records
from ironclaw.proto.jsonval import JsonObject, JsonValue, json_value
from ironclaw.proto.lifecycle import AsyncResource
from ironclaw.proto.limits import DEFAULT_MAX_FRAME
from ironclaw.proto.sandbox_methods import FileEntry
from ironclaw.proto.surface import ExecOptions, ExecResult, OutputSink, feed

if TYPE_CHECKING:
    from ironclaw.client.controls import RemoteSnapshots

__all__ = [
    "API_TOKEN_ENV",
    "API_URL_ENV",
    "ApiClient",
    "ApprovalDoc",
    "ExecResult",
    "SandboxDoc",
    "TaskFields",
    "TaskInfo",
]

API_URL_ENV = "IRONCLAW_API_URL"
API_TOKEN_ENV = "IRONCLAW_API_TOKEN"  # noqa: S105 - a variable name, not a secret
CHUNK = 256 * 1024
#: The largest answer read whole: far above any the server gives (an exec's output at
#: its 16 MiB capture limit per stream, base64, is under 45 MiB). A server sending more
#: is not an IronClaw server, and the client must not hold all it sends.
MAX_ANSWER_BYTES = 128 * 2**20
#: The largest WebSocket message taken: an output chunk is at most a channel frame.
WS_MAX_MESSAGE = DEFAULT_MAX_FRAME + 1024
#: What :meth:`ApiClient.exec_stream` keeps of each stream (every byte is counted), as the
#: agent path and the server's one-request exec keep.
CAPTURE_LIMIT = 16 * 2**20


T = TypeVar("T")
# Fields a newer server adds are kept (extra="allow"): the client checks what it reads.
_OPEN = ConfigDict(extra="allow")


@with_config(_OPEN)
class SandboxDoc(TypedDict):
    """A sandbox as the API describes it (``GET /v1/sandboxes/{id}``); ``spec`` is the
    spec as given, free-form JSON."""

    id: str
    backend: str
    state: str
    reason: str | None
    created_at: float
    owner: str | None
    spec: JsonObject


@with_config(_OPEN)
class TaskInfo(TypedDict):
    """An agent task (``GET /v1/tasks/{id}``); the task routes answer with this type."""

    id: str
    sandbox_id: str
    status: str
    answer: str | None
    reason: str | None
    steps: int
    tool_calls: int
    events: int


@with_config(_OPEN)
class ApprovalDoc(TypedDict):
    """A RED call waiting for a decision (``GET /v1/approvals``, which answers with this
    type); ``arguments`` are the tool call's, free-form JSON."""

    id: str
    task_id: str
    sandbox_id: str
    name: str
    arguments: JsonObject
    color: str
    reason: str
    card: str


class TaskFields(TypedDict, total=False):
    """What ``POST /v1/tasks`` takes besides the task: ``script`` (scripted model turns)
    and ``sandbox`` (a spec) are free-form JSON, ``budget`` a Budget's fields."""

    model: str
    script: list[JsonObject]
    script_loop: bool
    sandbox: JsonObject
    budget: JsonObject
    approve: str
    keep: bool


_SANDBOX = TypeAdapter(SandboxDoc)
_SANDBOXES = TypeAdapter(list[SandboxDoc])
_TASK = TypeAdapter(TaskInfo)
_APPROVALS = TypeAdapter(list[ApprovalDoc])
_OBJECT = TypeAdapter(JsonObject)


def _decode(adapter: TypeAdapter[T], doc: JsonValue, route: str) -> T:
    """``doc`` as the type ``route`` answers with, or :class:`ApiError` saying what differs.

    First within the channel's JSON bounds (depth, values, string length; each item of a
    listing on its own), which pydantic's schema of the free-form fields does not impose.
    """
    try:
        for item in doc if isinstance(doc, list) else (doc,):
            json_value(item, route)
    except InvalidParams as exc:
        raise ApiError(f"{route}: the server's answer does not fit ({exc})") from None
    try:
        return adapter.validate_python(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise ApiError(
            f"{route}: the server's answer does not fit ({where}: {first['msg']}); "
            "is the server a matching IronClaw version?"
        ) from None


def _entry(doc: JsonValue, route: str) -> JsonObject:
    """A file entry, checked as the channel's :class:`FileEntry` record (the one
    definition of that shape) and given back as its JSON."""
    try:
        return records.to_json(records.decode(FileEntry, doc, route))
    except InvalidParams as exc:
        raise ApiError(f"{route}: the server's answer does not fit ({exc})") from None


class ApiClient(AsyncResource):
    """One connection pool to one server. Use as ``async with ApiClient() as api``."""

    def __init__(
        self, api_url: str | None = None, token: str | None = None, *, timeout: float = 60.0
    ) -> None:
        url = api_url or os.environ.get(API_URL_ENV)
        if not url:
            raise ConfigError(f"no API URL: pass api_url= or set {API_URL_ENV}")
        self.token = token if token is not None else os.environ.get(API_TOKEN_ENV)
        self.uds: str | None = None
        if url.startswith("unix:"):
            self.uds = url.removeprefix("unix:")
            base, transport = "http://ironclaw", httpx.AsyncHTTPTransport(uds=self.uds)
        elif url.startswith(("http://", "https://")):
            # No Nagle: a request's body is written after its headers, and would otherwise
            # wait for the server's delayed ACK (~40 ms per request with a body).
            nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            base = url.rstrip("/")
            transport = httpx.AsyncHTTPTransport(socket_options=nodelay)
        else:
            raise ConfigError(f"API URL {url!r}: use http://HOST:PORT or unix:/PATH")
        self.base = base
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.AsyncClient(
            base_url=base,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, read=None),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    @property
    def snapshots(self) -> RemoteSnapshots:
        """The caller's snapshots: ``list``, ``get``, ``remove`` (and ``create``, ``fork``)."""
        from ironclaw.client.controls import RemoteSnapshots

        return RemoteSnapshots(self)

    # -- plumbing ----------------------------------------------------------------------

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self.http.stream(method, path, **kwargs) as resp:
                content = await read_body(resp, MAX_ANSWER_BYTES, f"{method} {path}")
        except httpx.HTTPError as exc:
            raise ConnectError(f"cannot reach the IronClaw API at {self.base}: {exc}") from None
        if resp.status_code >= 400:
            raise _problem(resp.status_code, content)
        if resp.status_code == 204 or not content:
            return None
        try:
            return json.loads(content)
        except (ValueError, RecursionError):
            raise ApiError(f"{method} {path}: the server's answer is not JSON") from None

    async def _typed(self, adapter: TypeAdapter[T], method: str, path: str, **kwargs: Any) -> T:
        return _decode(adapter, await self.request(method, path, **kwargs), f"{method} {path}")

    async def request_object(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        """A route whose answer is a JSON object the caller reads itself (else ApiError)."""
        return await self._typed(_OBJECT, method, path, **kwargs)

    async def request_sandbox(self, method: str, path: str, **kwargs: Any) -> SandboxDoc:
        """A route whose answer is a sandbox (a snapshot's restore), else ApiError."""
        return await self._typed(_SANDBOX, method, path, **kwargs)

    async def request_sandboxes(self, method: str, path: str, **kwargs: Any) -> list[SandboxDoc]:
        """A route whose answer is a list of sandboxes (a snapshot's fork), else ApiError."""
        return await self._typed(_SANDBOXES, method, path, **kwargs)

    # -- sandboxes ---------------------------------------------------------------------

    async def create(
        self, spec: JsonObject | None = None, *, sandbox_id: str | None = None
    ) -> SandboxDoc:
        body: JsonObject = {"spec": spec or {}}
        if sandbox_id is not None:
            body["id"] = sandbox_id
        return await self._typed(_SANDBOX, "POST", "/v1/sandboxes", json=body)

    async def list_sandboxes(
        self, state: str | None = None, labels: dict[str, str] | None = None
    ) -> list[SandboxDoc]:
        """The caller's sandboxes in ``state`` carrying every one of ``labels``."""
        params: list[tuple[str, str]] = [("state", state)] if state else []
        params += [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        return await self._typed(_SANDBOXES, "GET", "/v1/sandboxes", params=params or None)

    async def get(self, sandbox_id: str) -> SandboxDoc:
        return await self._typed(_SANDBOX, "GET", f"/v1/sandboxes/{_seg(sandbox_id)}")

    async def delete(self, sandbox_id: str) -> None:
        await self.request("DELETE", f"/v1/sandboxes/{_seg(sandbox_id)}")

    async def ping(self, sandbox_id: str) -> JsonObject:
        """The guest's ping answer, as the server passes it on (free-form)."""
        return await self._typed(_OBJECT, "POST", f"/v1/sandboxes/{_seg(sandbox_id)}/ping")

    # -- exec --------------------------------------------------------------------------

    async def exec(
        self, sandbox_id: str, argv: list[str], **opts: Unpack[ExecOptions]
    ) -> ExecResult:
        """Run a command. Without sinks its output comes back whole, in one request;
        with sinks (or ``capture=False``) it streams (see :meth:`exec_stream`)."""
        on_stdout, on_stderr = opts.get("on_stdout"), opts.get("on_stderr")
        if on_stdout is not None or on_stderr is not None or not opts.get("capture", True):
            return await self.exec_stream(sandbox_id, argv, **opts)
        stdin = opts.get("stdin")
        body: JsonObject = {
            "argv": list[JsonValue](argv),
            "env": dict[str, JsonValue](env) if (env := opts.get("env")) is not None else None,
            "cwd": opts.get("cwd"),
            "timeout": opts.get("timeout"),
            "keep_background": opts.get("keep_background", False),
        }
        if stdin is not None:
            body["stdin_b64"] = base64.b64encode(stdin).decode()
        route = f"/v1/sandboxes/{_seg(sandbox_id)}/exec"
        doc = await self.request("POST", route, json=body)
        try:
            out, err = base64.b64decode(doc["stdout_b64"]), base64.b64decode(doc["stderr_b64"])
            sig = doc.get("signal")
            return ExecResult(
                sandbox_id=sandbox_id,
                exit_code=int(doc["exit_code"]),
                signal=None if sig is None else int(sig),
                stdout=out,
                stderr=err,
                duration_ms=float(doc["duration_ms"]),
                status=str(doc["status"]),
                timed_out=bool(doc["timed_out"]),
                stdout_bytes=len(out),
                stderr_bytes=len(err),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            why = f"{exc!r:.200}"
            raise ApiError(f"POST {route}: the server's answer does not fit ({why})") from None

    def _ws(self, sandbox_id: str) -> Any:
        path = f"/v1/sandboxes/{_seg(sandbox_id)}/exec/ws"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        if self.uds is not None:
            return unix_connect(
                self.uds,
                f"ws://ironclaw{path}",
                additional_headers=headers,
                max_size=WS_MAX_MESSAGE,
            )
        ws_base = self.base.replace("http", "ws", 1)
        return connect(f"{ws_base}{path}", additional_headers=headers, max_size=WS_MAX_MESSAGE)

    async def exec_stream(
        self,
        sandbox_id: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | AsyncIterator[bytes] | None = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        capture: bool = True,
        keep_background: bool = False,
    ) -> ExecResult:
        """Run a command over the WebSocket: output reaches the sinks as it is printed,
        and ``stdin`` (bytes or an async iterator) is sent while the command runs."""
        bufs = (bytearray(), bytearray())
        counts = [0, 0]
        try:
            async with self._ws(sandbox_id) as ws:
                await send_opening(
                    ws,
                    json.dumps(
                        {
                            "argv": argv,
                            "env": env,
                            "cwd": cwd,
                            "timeout": timeout,
                            "stdin": stdin is not None,
                            "keep_background": keep_background,
                        }
                    ),
                )
                feeder = asyncio.ensure_future(_feed(ws, stdin)) if stdin is not None else None
                try:
                    async for msg in ws:
                        if isinstance(msg, bytes):
                            i = 0 if msg[:1] == b"\x01" else 1
                            chunk = msg[1:]
                            counts[i] += len(chunk)
                            if capture and len(bufs[i]) < CAPTURE_LIMIT:
                                bufs[i].extend(chunk[: CAPTURE_LIMIT - len(bufs[i])])
                            await feed(on_stdout if i == 0 else on_stderr, chunk)
                            continue
                        doc = frame_doc(msg)
                        if doc.get("type") == "exit":
                            break
                    else:
                        raise ApiError("the server closed the exec stream without a result")
                finally:
                    if feeder is not None:
                        feeder.cancel()
                        await asyncio.gather(feeder, return_exceptions=True)
        except (OSError, ConnectionClosed) as exc:
            raise ConnectError(f"exec stream to {self.base} failed: {exc}") from None
        except IronclawError:
            raise
        except Exception as exc:  # websockets' handshake errors (a 4xx on upgrade)
            raise ApiError(f"exec stream to {self.base} failed: {exc}") from None
        try:
            exit_code, sig = int(doc["exit_code"]), doc.get("signal")
            duration_ms = float(doc.get("duration_ms") or 0.0)
            sig = None if sig is None else int(sig)
        except (KeyError, TypeError, ValueError) as exc:
            why = f"{exc!r:.200}"
            raise ApiError(f"exec stream: the server's exit frame does not fit ({why})") from None
        return ExecResult(
            sandbox_id=sandbox_id,
            exit_code=exit_code,
            signal=sig,
            stdout=bytes(bufs[0]),
            stderr=bytes(bufs[1]),
            duration_ms=duration_ms,
            status="timeout" if doc.get("timed_out") else "exited",
            timed_out=bool(doc.get("timed_out")),
            stdout_bytes=counts[0],
            stderr_bytes=counts[1],
            truncated=capture and (len(bufs[0]) < counts[0] or len(bufs[1]) < counts[1]),
        )

    # -- files -------------------------------------------------------------------------

    def _files(self, sandbox_id: str, tail: str = "") -> str:
        return f"/v1/sandboxes/{_seg(sandbox_id)}/files{tail}"

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        data: bytes | str | AsyncIterator[bytes],
        *,
        mode: int = 0o644,
    ) -> int:
        """Upload, streamed: an async iterator is sent chunk by chunk as it yields (a str
        as UTF-8)."""
        doc = await self.request(
            "PUT",
            self._files(sandbox_id, "/content"),
            params={"path": path, "mode": mode},
            content=data.encode() if isinstance(data, str) else data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return int(doc["size"])

    async def read_file(self, sandbox_id: str, path: str, sink: OutputSink | None = None) -> bytes:
        """Download, streamed into ``sink`` (then nothing is kept) or returned whole."""
        buf = bytearray()
        try:
            async with self.http.stream(
                "GET", self._files(sandbox_id, "/content"), params={"path": path}
            ) as resp:
                if resp.status_code >= 400:
                    raise await problem_of(resp)
                async for chunk in resp.aiter_bytes(CHUNK):
                    if sink is None:
                        buf.extend(chunk)
                    else:
                        await feed(sink, chunk)
        except httpx.HTTPError as exc:
            raise ConnectError(f"download from {self.base} failed: {exc}") from None
        return bytes(buf)

    async def list_files(self, sandbox_id: str, path: str = ".") -> list[JsonObject]:
        """The directory's entries (``FileEntry`` fields: name, path, type, size, ...)."""
        route = self._files(sandbox_id)
        doc = await self.request("GET", route, params={"path": path})
        if not isinstance(doc, list):
            raise ApiError(f"GET {route}: the server's answer is not a list")
        return [_entry(item, f"GET {route}") for item in doc]

    async def stat(self, sandbox_id: str, path: str) -> JsonObject:
        route = self._files(sandbox_id, "/stat")
        return _entry(await self.request("GET", route, params={"path": path}), f"GET {route}")

    async def remove(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        params: dict[str, str | bool] = {"path": path, "recursive": recursive}
        await self.request("DELETE", self._files(sandbox_id), params=params)

    async def mkdir(self, sandbox_id: str, path: str) -> None:
        await self.request("POST", self._files(sandbox_id, "/mkdir"), params={"path": path})

    # -- agent tasks and approvals -----------------------------------------------------

    async def start_task(self, task: str, **fields: Unpack[TaskFields]) -> TaskInfo:
        """Start an agent task (fields: model, script, sandbox, budget, approve, keep)."""
        return await self._typed(_TASK, "POST", "/v1/tasks", json={"task": task, **fields})

    async def task(self, task_id: str) -> TaskInfo:
        return await self._typed(_TASK, "GET", f"/v1/tasks/{_seg(task_id)}")

    async def cancel_task(self, task_id: str) -> TaskInfo:
        return await self._typed(_TASK, "POST", f"/v1/tasks/{_seg(task_id)}/cancel")

    async def events(self, task_id: str) -> AsyncIterator[JsonObject]:
        """The task's trace events (Server-Sent Events), from the first until the end."""
        async with self.http.stream("GET", f"/v1/tasks/{_seg(task_id)}/events") as resp:
            if resp.status_code >= 400:
                raise await problem_of(resp)
            async for name, doc in sse_events(resp):
                if not isinstance(doc, dict):
                    raise ApiError(f"task {task_id}: event {name!r} is not a JSON object")
                yield doc

    async def approvals(self) -> list[ApprovalDoc]:
        return await self._typed(_APPROVALS, "GET", "/v1/approvals")

    async def decide(self, approval_id: str, approve: bool) -> None:
        await self.request("POST", f"/v1/approvals/{_seg(approval_id)}", json={"approve": approve})


async def _feed(ws: ClientConnection, stdin: bytes | AsyncIterator[bytes]) -> None:
    if isinstance(stdin, bytes | bytearray):
        for i in range(0, len(stdin), CHUNK):
            await ws.send(bytes(stdin[i : i + CHUNK]))
    else:
        async for chunk in stdin:
            await ws.send(chunk)
    await ws.send(json.dumps({"type": "eof"}))
