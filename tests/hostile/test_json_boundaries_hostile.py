"""The typed JSON boundaries against a hostile other side (invariant 8).

A model vendor's reply and a remote API server's answers are read by the host: each must
come back as the one error its boundary promises (:class:`ModelError`, :class:`ApiError`)
whatever is sent, within the channel's JSON bounds, and a body is never read past its
bound. Real HTTP servers on loopback speaking raw bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from ironclaw.agent.gateway import AnthropicProvider, Gateway, OpenAIProvider
from ironclaw.client import ApiClient
from ironclaw.client import _http as client_http
from ironclaw.client import api as client_api
from ironclaw.client.controls import RemoteNetwork, restore_doc
from ironclaw.client.procs import RemoteWatch
from ironclaw.errors import ApiError, ConnectError, ModelError
from ironclaw.proto.records import MAX_JSON_DEPTH, MAX_STR
from test_gateway_http import FakeModelServer

pytestmark = pytest.mark.timeout(60)

#: Nested past what json.loads can follow (RecursionError), yet only 100 kB of text.
DEEP_TEXT = "[" * 50_000 + "]" * 50_000


def _nested(depth: int) -> Any:
    doc: Any = {}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


@asynccontextmanager
async def raw_server(
    status: int, body: bytes, *, repeat: int = 1, sent: list[int] | None = None
) -> AsyncIterator[str]:
    """Answers every request with ``body`` sent ``repeat`` times, chunked (no length said
    up front, as an endless stream begins); yields its URL. ``sent`` gets the size of each
    chunk the client's socket took."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode().split("\r\n"):
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            await reader.readexactly(length)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            for _ in range(repeat):
                writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
                await writer.drain()
                if sent is not None:
                    sent.append(len(body))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_tool_call_arguments_nested_past_the_parser_are_a_model_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "x", "arguments": DEEP_TEXT}}
    reply = {"choices": [{"message": {"content": None, "tool_calls": [call]}}]}
    async with FakeModelServer([reply]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        gw = Gateway(OpenAIProvider("gpt-4o-mini"))
        with pytest.raises(ModelError, match="unexpected response shape: RecursionError"):
            await gw.complete({"messages": [{"role": "user", "content": "hi"}]})
        await gw.aclose()


async def test_a_token_count_that_is_no_number_is_a_model_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reply = {"content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": "many"}}
    async with FakeModelServer([reply]) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        gw = Gateway(AnthropicProvider("claude", api_key="k"))
        with pytest.raises(ModelError, match="unexpected response shape: ValueError"):
            await gw.complete({"messages": [{"role": "user", "content": "hi"}]})
        await gw.aclose()


async def test_api_answers_nested_past_the_channels_depth_are_refused() -> None:
    deep = _nested(MAX_JSON_DEPTH + 2)
    sandbox = {"id": "s", "backend": "namespace", "state": "running", "reason": None,
               "created_at": 1.0, "owner": None, "spec": deep}  # fmt: skip
    async with FakeModelServer([deep, sandbox, [sandbox]]) as server, ApiClient(server.url) as api:
        with pytest.raises(ApiError, match="deeper"):
            await api.request_object("POST", "/v1/sandboxes/s/pause")
        with pytest.raises(ApiError, match=r"GET /v1/sandboxes/s: .*deeper"):
            await api.get("s")
        with pytest.raises(ApiError, match="deeper"):
            await api.list_sandboxes()


async def test_an_exec_answer_of_the_wrong_shape_is_an_api_error() -> None:
    answers: list[Any] = [{}, {"stdout_b64": "!!", "stderr_b64": "", "exit_code": 0}, [1]]
    async with FakeModelServer(answers) as server, ApiClient(server.url) as api:
        for _ in answers:
            with pytest.raises(ApiError, match="does not fit"):
                await api.exec("s", ["true"])


async def test_an_answer_past_the_bound_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 2 * 2**20
    monkeypatch.setattr(client_api, "MAX_ANSWER_BYTES", limit)
    chunk = b" " * 2**20
    for status in (200, 500):  # an answer, and an error's body
        async with raw_server(status, chunk, repeat=8) as url, ApiClient(url) as api:
            with pytest.raises(ApiError, match=rf"over {limit} bytes: not read"):
                await api.request_object("GET", "/v1/anything")


async def test_an_error_body_nested_past_the_parser_is_an_api_error() -> None:
    async with raw_server(500, DEEP_TEXT.encode()) as url, ApiClient(url) as api:
        with pytest.raises(ApiError, match="HTTP 500"):
            await api.request_object("GET", "/v1/anything")


EXIT = {"type": "exit", "exit_code": 0, "timed_out": False}


def _exec_ws_server(frames: list[bytes], exit_doc: Any = EXIT) -> Any:
    """A WebSocket server that answers an exec's opening message with ``frames`` (binary
    output frames) and then an exit frame."""

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        for frame in frames:
            await ws.send(frame)
        await ws.send(json.dumps(exit_doc))
        await ws.wait_closed()

    return serve(handler, "127.0.0.1", 0, max_size=None)


async def test_an_exec_streams_capture_is_bounded_and_every_byte_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit = 2**20
    monkeypatch.setattr(client_api, "CAPTURE_LIMIT", limit)
    chunk = b"\x01" + b"o" * (limit // 2)
    async with _exec_ws_server([chunk] * 5) as server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with ApiClient(url) as api:
            seen: list[int] = []
            result = await api.exec_stream("s", ["yes"], on_stdout=lambda b: seen.append(len(b)))
    assert len(result.stdout) == limit
    assert result.stdout_bytes == sum(seen) == 5 * (limit // 2)
    assert result.truncated


async def test_an_exec_stream_message_past_the_bound_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_api, "WS_MAX_MESSAGE", 2**20)
    async with _exec_ws_server([b"\x01" + b"o" * 2**21]) as server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with ApiClient(url) as api:
            with pytest.raises(ConnectError, match="exec stream"):
                await api.exec_stream("s", ["yes"])


async def test_task_events_past_the_bound_or_not_json_are_api_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit = 2**20
    monkeypatch.setattr(client_http, "MAX_EVENT_BYTES", limit)
    endless_line = b"data: " + b"x" * limit
    not_json = b"event: x\ndata: " + DEEP_TEXT.encode() + b"\n\n"
    for body, repeat, match in (
        (endless_line, 8, rf"over {limit} bytes: not read"),
        (not_json, 1, "event 'x' from the server is not JSON"),
    ):
        async with raw_server(200, body, repeat=repeat) as url, ApiClient(url) as api:
            with pytest.raises(ApiError, match=match):
                async for _ in api.events("t1"):
                    pass


async def test_a_streamed_error_body_is_read_only_in_part() -> None:
    """Of 256 MiB of error body only the head is read: the client hangs up long before
    the server could send it all (socket buffers hold a few MiB)."""
    sent: list[int] = []
    chunk = b"y" * 2**20
    async with raw_server(500, chunk, repeat=256, sent=sent) as url, ApiClient(url) as api:
        with pytest.raises(ApiError, match=r"HTTP 500: y{300}$"):
            async for _ in api.events("t1"):
                pass
    assert sum(sent) < 64 * len(chunk)


async def test_an_object_key_past_the_string_bound_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key is a string like any other: the bound on strings holds for it too."""
    call = {"type": "tool_use", "id": "t", "name": "x", "input": {"k" * (MAX_STR + 1): 1}}
    async with FakeModelServer([{"content": [call]}]) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        gw = Gateway(AnthropicProvider("claude", api_key="k"))
        with pytest.raises(ModelError, match=f"strings must be at most {MAX_STR} characters"):
            await gw.complete({"messages": [{"role": "user", "content": "hi"}]})
        await gw.aclose()


async def test_snapshot_and_network_answers_of_the_wrong_shape_are_api_errors() -> None:
    snapshot = {"name": "n", "kind": "k", "sha256": "s", "size": 1, "created": 1.0,
                "source": "s", "backend": "namespace"}  # fmt: skip
    answers: list[Any] = [
        {},  # get
        [{**snapshot, "size": "big"}],  # list
        {"list": "instead"},  # list
        [{"id": 3}],  # fork
        {"id": "s"},  # restore
        {"allow": 5},  # network update
    ]
    async with FakeModelServer(answers) as server, ApiClient(server.url) as api:
        with pytest.raises(ApiError, match=r"GET /v1/snapshots/n: .*no snapshot"):
            await api.snapshots.get("n")
        for _ in range(2):
            with pytest.raises(ApiError, match="GET /v1/snapshots"):
                await api.snapshots.list()
        with pytest.raises(ApiError, match=r"POST /v1/snapshots/n/fork: .*does not fit"):
            await api.snapshots.fork("n", 1)
        with pytest.raises(ApiError, match=r"POST /v1/snapshots/n/restore: .*does not fit"):
            await restore_doc(api, "n", None, None)
        with pytest.raises(ApiError, match="no network policy"):
            await RemoteNetwork(api, "s").update(allow=["10.0.0.1"])


@pytest.mark.parametrize(
    "exit_doc",
    [{"type": "exit"}, {**EXIT, "exit_code": "zero"}, {**EXIT, "signal": [9]}],
)
async def test_an_exec_streams_exit_frame_of_the_wrong_shape_is_an_api_error(
    exit_doc: Any,
) -> None:
    async with _exec_ws_server([], exit_doc) as server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with ApiClient(url) as api:
            with pytest.raises(ApiError, match="exit frame does not fit"):
                await api.exec_stream("s", ["true"])


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ("[" * 50_000 + "]" * 50_000, "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"type": "error", "status": "teapot", "detail": "no"}', "HTTP 500: no"),
    ],
)
def test_a_websocket_text_frame_of_the_wrong_shape_is_an_api_error(frame: str, match: str) -> None:
    with pytest.raises(ApiError, match=match):
        client_http.frame_doc(frame)


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"[1]", r"HTTP 500: \[1\]"), (b'{"status": "x", "detail": "gone"}', "HTTP 500: gone")],
)
async def test_a_watch_error_event_of_the_wrong_shape_is_an_api_error(
    data: bytes, match: str
) -> None:
    body = b"event: error\ndata: " + data + b"\n\n"
    async with raw_server(200, body) as url, ApiClient(url) as api:
        watch = RemoteWatch(api, "s", "/workspace", False, 16)
        with pytest.raises(ApiError, match=match):
            async for _ in watch:
                pass
        await watch.aclose()
