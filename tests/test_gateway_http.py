"""The gateway over real HTTP: canned OpenAI and Anthropic servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ironclaw.agent.gateway import Gateway, ScriptedProvider, provider_from_name
from ironclaw.errors import ConfigError, RpcError

pytestmark = pytest.mark.timeout(30)


class FakeModelServer:
    """Serves ``responses`` in order on 127.0.0.1 and records every request."""

    def __init__(self, responses: list[dict[str, Any]], status: int = 200) -> None:
        self.responses = list(responses)
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeModelServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(
                    {"method": method, "path": path, "headers": headers,
                     "body": json.loads(body or b"{}")}
                )  # fmt: skip
                doc = self.responses.pop(0) if self.responses else {"error": "no more"}
                payload = json.dumps(doc).encode()
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


OPENAI_TOOL_TURN = {
    "choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "checking",
        "tool_calls": [{"id": "call_9", "type": "function", "function": {
            "name": "shell__run", "arguments": "{\"command\": \"ls\"}"}}]}}],
    "usage": {"prompt_tokens": 1000, "completion_tokens": 100},
}  # fmt: skip
ANTHROPIC_TOOL_TURN = {
    "content": [{"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "toolu_1", "name": "shell__run",
                 "input": {"command": "ls"}}],
    "stop_reason": "tool_use",
    "usage": {"input_tokens": 1000, "output_tokens": 100},
}  # fmt: skip
CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "list files"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c0", "name": "files__list_dir", "arguments": {"path": "."}},
                    {"id": "c1", "name": "shell__run", "arguments": {"command": "pwd"}}]},
    {"role": "tool", "tool_call_id": "c0", "name": "files__list_dir", "content": "a.txt",
     "is_error": False},
    {"role": "tool", "tool_call_id": "c1", "name": "shell__run", "content": "refused",
     "is_error": True},
]  # fmt: skip
TOOLS = [{"name": "shell__run", "description": "run", "input_schema": {"type": "object"}}]


async def test_openai_wire_format_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeModelServer([OPENAI_TOOL_TURN]) as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        gw = Gateway(provider_from_name("openai:gpt-4o-mini"))
        reply = await gw.complete({"system": "be brief", "messages": CONVERSATION,
                                   "tools": TOOLS})  # fmt: skip
        await gw.aclose()
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "gpt-4o-mini" and body["messages"][0] == {
        "role": "system", "content": "be brief"}  # fmt: skip
    call = body["messages"][2]["tool_calls"][1]
    assert call["function"] == {"name": "shell__run", "arguments": '{"command": "pwd"}'}
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "c0", "content": "a.txt"}
    assert body["messages"][4]["content"].startswith("ERROR: ")
    assert body["tools"][0]["function"]["parameters"] == {"type": "object"}
    assert reply["message"]["tool_calls"] == [
        {"id": "call_9", "name": "shell__run", "arguments": {"command": "ls"}}]  # fmt: skip
    assert reply["usage"] == {"input_tokens": 1000, "output_tokens": 100}
    assert gw.usage.to_json()["cost_usd"] == pytest.approx((1000 * 0.15 + 100 * 0.6) / 1e6)


async def test_anthropic_wire_format_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeModelServer([ANTHROPIC_TOOL_TURN]) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "ak-test")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        gw = Gateway(provider_from_name("anthropic:claude-3-5-haiku-latest"))
        reply = await gw.complete({"system": "be brief", "messages": CONVERSATION,
                                   "tools": TOOLS})  # fmt: skip
        await gw.aclose()
    req = server.requests[0]
    assert req["path"] == "/v1/messages"
    assert req["headers"]["x-api-key"] == "ak-test"
    assert req["headers"]["anthropic-version"] == "2023-06-01"
    body = req["body"]
    assert body["system"] == "be brief" and body["tools"][0]["input_schema"] == {"type": "object"}
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"][1] == {"type": "tool_use", "id": "c1", "name": "shell__run",
                                     "input": {"command": "pwd"}}  # fmt: skip
    results = msgs[2]["content"]  # both tool results in one user turn
    assert [r["tool_use_id"] for r in results] == ["c0", "c1"]
    assert [r["is_error"] for r in results] == [False, True]
    assert reply["message"] == {"role": "assistant", "content": "checking", "tool_calls": [
        {"id": "toolu_1", "name": "shell__run", "arguments": {"command": "ls"}}]}  # fmt: skip
    assert gw.usage.to_json()["total_tokens"] == 1100


async def test_http_errors_do_not_leak_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeModelServer([{"error": {"message": "bad key"}}], status=401) as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-xyz")
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        provider = provider_from_name("openai:m")
        with pytest.raises(RpcError) as info:
            await provider.complete("", CONVERSATION[:1], [])
        await provider.aclose()
    assert "401" in str(info.value) and "sk-secret-xyz" not in str(info.value)


def test_model_names_and_missing_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError):
        provider_from_name("anthropic:claude")
    with pytest.raises(ConfigError):
        provider_from_name("gpt-4o")
    with pytest.raises(ConfigError):
        provider_from_name("scripted:" + str(tmp_path / "missing.json"))
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"turns": [{"content": "hi"}]}))
    assert isinstance(provider_from_name(f"scripted:{f}"), ScriptedProvider)


async def test_scripted_provider_ends_or_loops() -> None:
    once = ScriptedProvider([{"content": "a"}])
    assert (await once.complete("", [], [])).content == "a"
    with pytest.raises(RpcError):
        await once.complete("", [], [])
    looping = ScriptedProvider([{"content": "a"}], loop=True)
    for _ in range(3):
        assert (await looping.complete("", [], [])).content == "a"
