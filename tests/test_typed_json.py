"""The typed JSON boundaries: free-form JSON is checked and bounded where it enters, and
data with a shape (a model's reply, the API's answers, trace lines, MCP tool output) is
decoded against that shape, junk failing with a typed error that says where."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from ironclaw.agent.gateway import AnthropicProvider, Gateway, OpenAIProvider, ScriptedProvider
from ironclaw.agent.providers import MAX_REPLY_BYTES
from ironclaw.agent.trace import TraceWriter, read_trace
from ironclaw.client import ApiClient
from ironclaw.config import Settings
from ironclaw.errors import ApiError, ConfigError, InvalidParams, ModelError, ProtocolError
from ironclaw.mcp_server import LocalBackend, build_server
from ironclaw.proto.host_tools_methods import HostToolsCallRequest, HostToolsListResult
from ironclaw.proto.jsonval import JsonObject, json_object, json_value
from ironclaw.proto.records import MAX_JSON_DEPTH
from test_gateway_http import FakeModelServer
from test_rpc import modules_outside_the_stdlib

pytestmark = pytest.mark.timeout(60)


def _nested(depth: int) -> Any:
    doc: Any = {}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


def test_json_object_accepts_json_and_rejects_what_is_not() -> None:
    doc = {"a": [1, 2.5, True, None, {"b": "c"}]}
    assert json_object(doc, "x") == doc
    assert json_value([1, "two"], "x") == [1, "two"]
    for junk, match in (
        ([1], "must be an object"),
        ({"a": {1: 2}}, "keys must be strings"),
        ({"a": float("nan")}, "finite"),
        ({"a": object()}, "must be JSON"),
        (_nested(MAX_JSON_DEPTH + 2), "deeper"),
    ):
        with pytest.raises(InvalidParams, match=match):
            json_object(junk, "spec")


def test_pydantic_reads_the_json_alias_as_a_recursive_schema() -> None:
    schema = TypeAdapter(JsonObject).json_schema()
    assert schema["additionalProperties"] == {"$ref": "#/$defs/JsonValue"}
    assert TypeAdapter(JsonObject).validate_python({"a": [1, {"b": None}]}) == {
        "a": [1, {"b": None}]
    }
    with pytest.raises(ValueError):
        TypeAdapter(JsonObject).validate_python({"a": object()})


@pytest.mark.parametrize(
    ("provider", "junk"),
    [
        (OpenAIProvider, {"choices": "none"}),
        (
            OpenAIProvider,
            {
                "choices": [
                    {
                        "message": {
                            "tool_calls": [{"function": {"name": "x", "arguments": "[1, 2]"}}]
                        }
                    }
                ]
            },
        ),
        (OpenAIProvider, {"choices": [{"message": {}}], "usage": {"prompt_tokens": [1]}}),
        (AnthropicProvider, {"content": "not a list"}),
        (AnthropicProvider, {"content": [{"type": "tool_use", "id": "t", "name": 7}]}),
        (
            AnthropicProvider,
            {
                "content": [
                    {
                        "type": "tool_use",
                        "id": "t",
                        "name": "x",
                        "input": _nested(MAX_JSON_DEPTH + 2),
                    }
                ]
            },
        ),
    ],
)
def test_a_model_reply_of_the_wrong_shape_is_a_model_error(provider: Any, junk: Any) -> None:
    with pytest.raises(ModelError, match="unexpected response shape"):
        provider.parse(junk)


async def test_junk_from_a_model_server_is_a_model_error_over_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with FakeModelServer([{"choices": [{"message": "hi"}]}]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        gw = Gateway(OpenAIProvider("gpt-4o-mini"))
        with pytest.raises(ModelError, match="unexpected response shape"):
            await gw.complete({"messages": [{"role": "user", "content": "hi"}]})
        await gw.aclose()


async def test_a_model_reply_past_the_bound_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = {"choices": [{"message": {"content": "x" * (MAX_REPLY_BYTES + 1)}}]}
    async with FakeModelServer([huge]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        gw = Gateway(OpenAIProvider("gpt-4o-mini"))
        with pytest.raises(ModelError, match=r"over \d+ bytes: not read"):
            await gw.complete({"messages": [{"role": "user", "content": "hi"}]})
        await gw.aclose()


async def test_a_scripted_turn_of_the_wrong_shape_is_a_model_error() -> None:
    provider = ScriptedProvider([{"tool_calls": [{"name": "x", "arguments": "ls"}]}])
    with pytest.raises(ModelError, match="scripted"):
        await provider.complete("", [], [])


async def test_the_api_clients_answers_are_decoded_against_their_types() -> None:
    good_task = {
        "id": "t1",
        "sandbox_id": "s1",
        "status": "running",
        "answer": None,
        "reason": None,
        "steps": 0,
        "tool_calls": 0,
        "events": 1,
        "later": "kept",
    }
    answers = [good_task, {"id": "t1", "status": 3}, [{"id": 1}]]
    async with FakeModelServer(answers) as server, ApiClient(server.url) as api:
        task = await api.task("t1")
        assert task["status"] == "running"
        assert dict(task)["later"] == "kept"  # a newer server's field is kept
        with pytest.raises(ApiError, match=r"GET /v1/tasks/t1: .*does not fit"):
            await api.task("t1")
        with pytest.raises(ApiError, match="GET /v1/sandboxes"):
            await api.list_sandboxes()


def test_read_trace_keeps_only_lines_with_the_hosts_stamps(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    trace = TraceWriter([path])
    trace.emit("task.start", task="t")
    with path.open("a") as f:
        f.write(json.dumps({"event": "tool.decision", "approved": True}) + "\n")  # no stamps
        f.write(json.dumps({"seq": "1", "ts": 1.0, "source": "host", "event": "x"}) + "\n")
        f.write('{"seq": 9, "ts": 1')  # torn
    events = read_trace(path)
    assert [e["event"] for e in events] == ["task.start"]
    assert events[0]["source"] == "host" and isinstance(events[0]["seq"], int)


def test_host_tool_arguments_are_bounded_json_objects() -> None:
    ok = {"call_id": "c", "name": "n", "arguments": {"a": [1]}, "timeout_s": 5}
    assert HostToolsCallRequest.from_json(ok).arguments == {"a": [1]}
    deep = {**ok, "arguments": _nested(MAX_JSON_DEPTH + 2)}
    with pytest.raises(ConfigError, match="arguments"):
        HostToolsCallRequest.from_json(deep)
    listing = {"tools": [{"name": "t", "description": "", "input_schema": {"x": float("inf")}}]}
    with pytest.raises(ProtocolError, match="input_schema"):
        HostToolsListResult.from_json(listing)


async def test_mcp_tools_publish_their_output_types(settings: Settings) -> None:
    tools = {t.name: t for t in await build_server(LocalBackend(settings)).list_tools()}
    exec_out = tools["sandbox_exec"].output_schema
    assert exec_out is not None
    assert {"exit_code", "stdout", "truncated"} <= set(exec_out["required"])
    run = tools["agent_run"].output_schema
    assert run is not None and {"id", "status", "answer", "kept", "decisions"} <= set(
        run["required"]
    )
    assert "trace" in run["properties"] and "trace" not in run["required"]  # only when local
    listed = tools["sandbox_list"].output_schema
    assert listed is not None and "SandboxView" in json.dumps(listed)


def test_the_json_types_load_in_the_guests_bare_python() -> None:
    """The guest imports them with no site-packages: the alias falls back, the checks work."""
    loaded = modules_outside_the_stdlib(
        "from ironclaw.proto.jsonval import json_object; "
        "import ironclaw.proto.host_tools_methods; "
        "assert json_object({'a': [1]}, 'x') == {'a': [1]}"
    )
    assert loaded == ""
