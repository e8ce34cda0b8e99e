"""The model providers the gateway calls: each translates IronClaw's neutral
conversation into a vendor's wire format and the vendor's answer back.

Models are named ``PROVIDER:NAME``:

``openai:NAME``     any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM,
                    Ollama, llama.cpp server): ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``
``anthropic:NAME``  Anthropic's Messages API: ``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``
``scripted:FILE``   replays a JSON file of model turns (tests, the offline demo)

A vendor's reply is the model's, so untrusted: :meth:`parse` reads it through bounded,
checked steps (:func:`~ironclaw.proto.jsonval.json_value`) and a shape it does not
expect is a :class:`ModelError`, never a stray ``KeyError``.

The neutral conversation (what the guest sends) is a list of messages::

    {"role": "user", "content": str}
    {"role": "assistant", "content": str | None, "tool_calls": [{id, name, arguments}]}
    {"role": "tool", "tool_call_id": str, "name": str, "content": str, "is_error": bool}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, TypeAlias

import httpx

from ironclaw.errors import ConfigError, ConnectError, InvalidParams, ModelError
from ironclaw.proto.agent_methods import TokenUsage, ToolCall
from ironclaw.proto.jsonval import JsonObject, JsonValue, json_object, json_value
from ironclaw.proto.records import to_json

__all__ = [
    "AnthropicProvider",
    "Message",
    "ModelReply",
    "OpenAIProvider",
    "Provider",
    "ScriptedProvider",
    "Tool",
    "provider_from_name",
]

DEFAULT_MAX_TOKENS = 4096
#: The largest reply read from a vendor: a turn is kilobytes, so past this it is not one.
MAX_REPLY_BYTES = 16 * 2**20
ANTHROPIC_VERSION = "2023-06-01"
#: A message of the neutral conversation, or a tool offered to the model: free-form JSON
#: the guest sends (bounded by ``model.complete``'s decode), passed on to the vendor.
Message: TypeAlias = "Mapping[str, JsonValue]"
Tool: TypeAlias = "Mapping[str, JsonValue]"


def _obj(value: JsonValue, what: str) -> JsonObject:
    if not isinstance(value, dict):
        raise TypeError(f"{what} is not an object")
    return value


def _list(value: JsonValue, what: str) -> list[JsonValue]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"{what} is not a list")
    return value


def _int(value: JsonValue) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"a token count is not a number: {value!r:.40}")
    return int(value)


def _call(call_id: str, name: JsonValue, arguments: JsonValue) -> ToolCall:
    """A tool call the model asked for; its arguments must be a bounded JSON object."""
    if not isinstance(name, str):
        raise TypeError("a tool call's name is not a string")
    return ToolCall(id=call_id, name=name, arguments=json_object(arguments or {}, "arguments"))


@dataclass(frozen=True)
class ModelReply:
    """One assistant turn in the neutral format, with what it cost."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    usage: TokenUsage
    stop_reason: str

    def calls_json(self) -> list[JsonValue]:
        return [to_json(c) for c in self.tool_calls]

    def to_json(self) -> JsonObject:
        """The JSON of ``model.complete``'s result (its decode checks it on the way out)."""
        return {
            "message": {
                "role": "assistant",
                "content": self.content,
                "tool_calls": self.calls_json(),
            },
            "usage": to_json(self.usage),
            "stop_reason": self.stop_reason,
        }


class Provider(Protocol):
    name: str
    model: str

    async def complete(
        self, system: str, messages: Sequence[Message], tools: Sequence[Tool]
    ) -> ModelReply: ...

    async def aclose(self) -> None: ...


def _model_error(provider: str, exc: BaseException | None = None, *, text: str = "") -> ModelError:
    """Say what failed without echoing request headers (they carry the key)."""
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else text
    return ModelError(f"{provider}: {detail}")


class _HttpProvider:
    """What the HTTP providers share: where the URL and key come from, and one client."""

    name = "http"
    _url_env: ClassVar[str]
    _default_url: ClassVar[str]
    _key_env: ClassVar[str]
    _key_required: ClassVar[bool] = False

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 120.0,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(self._key_env, "")
        if self._key_required and not key:
            raise ConfigError(f"{self.name} models need {self._key_env} in the host's environment")
        self.model = model
        url = base_url or os.environ.get(self._url_env) or self._default_url
        self.base_url = url.rstrip("/")
        self._key = key
        self.max_tokens = max_tokens
        self._client = httpx.AsyncClient(timeout=timeout)

    async def _post(self, url: str, headers: dict[str, str], body: JsonObject) -> JsonValue:
        """The vendor's answer, read up to :data:`MAX_REPLY_BYTES` and checked to be
        bounded JSON (its shape is :meth:`parse`'s)."""
        try:
            async with self._client.stream("POST", url, headers=headers, json=body) as resp:
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_REPLY_BYTES:
                        raise _model_error(
                            self.name, text=f"a reply over {MAX_REPLY_BYTES} bytes: not read"
                        )
            if resp.status_code >= 400:
                shown = data[:300].decode(errors="replace").replace("\n", " ")
                raise _model_error(
                    self.name, text=f"HTTP {resp.status_code} from {resp.request.url}: {shown}"
                )
            return json_value(json.loads(data), "the response")
        except InvalidParams as exc:
            raise _model_error(self.name, text=f"unexpected response: {exc}") from None
        except httpx.ConnectError as exc:
            raise ConnectError(f"{self.name}: cannot reach {url}: {exc}") from None
        except (httpx.HTTPError, ValueError, RecursionError) as exc:
            raise _model_error(self.name, exc) from None

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- what a provider's wire format supplies ------------------------------------------

    _path: ClassVar[str]

    def _body(self, system: str, messages: Sequence[Message]) -> JsonObject:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    _schema_key: ClassVar[str]  # where a tool's JSON schema goes

    def wire_tool(self, tool: Tool) -> JsonObject:
        return {
            "name": tool["name"],
            "description": tool.get("description", ""),
            self._schema_key: tool.get("input_schema") or {"type": "object"},
        }

    @staticmethod
    def parse(doc: JsonValue) -> ModelReply:
        raise NotImplementedError

    async def complete(
        self, system: str, messages: Sequence[Message], tools: Sequence[Tool]
    ) -> ModelReply:
        """One model turn: the provider's body, the tools in its wire form, one POST."""
        body = self._body(system, messages)
        if tools:
            body["tools"] = [self.wire_tool(t) for t in tools]
        return self.parse(await self._post(f"{self.base_url}{self._path}", self._headers(), body))


class OpenAIProvider(_HttpProvider):
    """Chat completions, as OpenAI, vLLM, Ollama and llama.cpp's server speak it."""

    name = "openai"
    _path = "/chat/completions"
    _schema_key = "parameters"
    _url_env = "OPENAI_BASE_URL"
    _default_url = "https://api.openai.com/v1"
    # Local servers (Ollama, llama.cpp) need no key; OpenAI itself answers 401.
    _key_env = "OPENAI_API_KEY"

    @staticmethod
    def wire_messages(system: str, messages: Sequence[Message]) -> list[JsonValue]:
        out: list[JsonValue] = [{"role": "system", "content": system}] if system else []
        for m in messages:
            role = m.get("role")
            if role == "assistant":
                msg: JsonObject = {"role": "assistant", "content": m.get("content")}
                calls = [_obj(c, "a tool call") for c in _list(m.get("tool_calls"), "tool_calls")]
                if calls:
                    msg["tool_calls"] = [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {
                                "name": c["name"],
                                "arguments": json.dumps(c.get("arguments") or {}),
                            },
                        }
                        for c in calls
                    ]
                out.append(msg)
            elif role == "tool":
                content = str(m.get("content", ""))
                if m.get("is_error"):
                    content = f"ERROR: {content}"
                out.append(
                    {"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": content}
                )
            else:
                out.append({"role": "user", "content": str(m.get("content", ""))})
        return out

    def wire_tool(self, tool: Tool) -> JsonObject:
        return {"type": "function", "function": super().wire_tool(tool)}

    @staticmethod
    def parse(doc: JsonValue) -> ModelReply:
        try:
            top = _obj(doc, "the response")
            choice = _obj(_list(top["choices"], "choices")[0], "a choice")
            msg = _obj(choice["message"], "the message")
            calls = []
            for raw_call in _list(msg.get("tool_calls"), "tool_calls"):
                c = _obj(raw_call, "a tool call")
                fn = _obj(c["function"], "a function call")
                raw = fn.get("arguments") or "{}"
                args = json.loads(raw) if isinstance(raw, str) else raw
                calls.append(_call(str(c.get("id") or ""), fn["name"], args))
            usage = _obj(top.get("usage") or {}, "usage")
            content = msg.get("content")
            return ModelReply(
                content=None if content is None else str(content),
                tool_calls=tuple(calls),
                usage=TokenUsage(
                    _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
                ),
                stop_reason=str(choice.get("finish_reason") or ""),
            )
        except (KeyError, IndexError, TypeError, ValueError, RecursionError, InvalidParams) as exc:
            # RecursionError: arguments nested past what json.loads can follow.
            raise _model_error("openai", text=f"unexpected response shape: {exc!r}") from None

    def _body(self, system: str, messages: Sequence[Message]) -> JsonObject:
        return {
            "model": self.model,
            "messages": self.wire_messages(system, messages),
            "max_tokens": self.max_tokens,
        }

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}


class AnthropicProvider(_HttpProvider):
    """Anthropic's Messages API (``POST /v1/messages``)."""

    name = "anthropic"
    _path = "/v1/messages"
    _schema_key = "input_schema"
    _url_env = "ANTHROPIC_BASE_URL"
    _default_url = "https://api.anthropic.com"
    _key_env = "ANTHROPIC_API_KEY"
    _key_required = True

    @staticmethod
    def wire_messages(messages: Sequence[Message]) -> list[JsonObject]:
        """Tool results become ``tool_result`` blocks of one user turn, as the API wants."""
        out: list[JsonObject] = []
        for m in messages:
            role = m.get("role")
            if role == "assistant":
                blocks: list[JsonValue] = []
                if m.get("content"):
                    blocks.append({"type": "text", "text": m["content"]})
                for raw in _list(m.get("tool_calls"), "tool_calls"):
                    c = _obj(raw, "a tool call")
                    blocks.append({"type": "tool_use", "id": c["id"], "name": c["name"],
                                   "input": c.get("arguments") or {}})  # fmt: skip
                out.append({"role": "assistant", "content": blocks})
            elif role == "tool":
                block: JsonObject = {
                    "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id"),
                    "content": str(m.get("content", "")),
                    "is_error": bool(m.get("is_error")),
                }
                last = out[-1] if out else None
                if last and last["role"] == "user" and isinstance(last["content"], list):
                    last["content"].append(block)
                else:
                    out.append({"role": "user", "content": [block]})
            else:
                out.append({"role": "user", "content": str(m.get("content", ""))})
        return out

    @staticmethod
    def parse(doc: JsonValue) -> ModelReply:
        try:
            top = _obj(doc, "the response")
            texts: list[str] = []
            calls: list[ToolCall] = []
            for raw in _list(top["content"], "content"):
                block = _obj(raw, "a content block")
                if block.get("type") == "text":
                    texts.append(str(block.get("text", "")))
                elif block.get("type") == "tool_use":
                    calls.append(_call(str(block["id"]), block["name"], block.get("input")))
            usage = _obj(top.get("usage") or {}, "usage")
            return ModelReply(
                content="\n".join(texts) if texts else None,
                tool_calls=tuple(calls),
                usage=TokenUsage(_int(usage.get("input_tokens")), _int(usage.get("output_tokens"))),
                stop_reason=str(top.get("stop_reason") or ""),
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidParams) as exc:
            # ValueError: a token count that is a string but no number.
            raise _model_error("anthropic", text=f"unexpected response shape: {exc!r}") from None

    def _body(self, system: str, messages: Sequence[Message]) -> JsonObject:
        wired: list[JsonValue] = list(self.wire_messages(messages))
        body: JsonObject = {"model": self.model, "max_tokens": self.max_tokens, "messages": wired}
        if system:
            body["system"] = system
        return body

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self._key, "anthropic-version": ANTHROPIC_VERSION}


class ScriptedProvider:
    """Replays model turns from a file (or a list): deterministic, offline, no key.

    The file is JSON: ``{"turns": [turn, ...], "loop": false}`` where a turn is
    ``{"content": str | null, "tool_calls": [{"name", "arguments", "id"?}],
    "usage": {"input_tokens", "output_tokens"}?}``. With ``loop`` the turns repeat
    forever (a model that never stops, for budget tests); otherwise running out of turns
    is an error.
    """

    name = "scripted"

    def __init__(self, turns: Sequence[Message], *, loop: bool = False,
                 model: str = "scripted") -> None:  # fmt: skip
        if not turns:
            raise ConfigError("a scripted model needs at least one turn")
        self.model = model
        self.turns: list[JsonObject] = [dict(t) for t in turns]
        self.loop = loop
        self.position = 0
        self.requests: list[JsonObject] = []

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedProvider:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read scripted turns from {p}: {exc}") from None
        if isinstance(doc, list):
            doc = {"turns": doc}
        if not isinstance(doc, dict) or not isinstance(doc.get("turns"), list):
            raise ConfigError(f"{p}: expected {{'turns': [...]}}")
        return cls(doc["turns"], loop=bool(doc.get("loop")), model=p.name)

    async def complete(
        self, system: str, messages: Sequence[Message], tools: Sequence[Tool]
    ) -> ModelReply:
        self.requests.append({"system": system, "messages": [dict(m) for m in messages],
                              "tools": [dict(t) for t in tools]})  # fmt: skip
        if self.position >= len(self.turns):
            if not self.loop:
                raise _model_error("scripted", text=f"script ended after {len(self.turns)} turns")
            self.position = 0
        turn = self.turns[self.position]
        self.position += 1
        try:
            calls = []
            for i, raw in enumerate(_list(turn.get("tool_calls"), "tool_calls")):
                c = _obj(raw, "a tool call")
                call_id = str(c.get("id") or f"call_{len(self.requests)}_{i}")
                calls.append(_call(call_id, c["name"], c.get("arguments")))
            usage = _obj(turn.get("usage") or {}, "usage")
            # Without counts in the script, estimate (4 characters a token) so budgets work.
            in_tokens = usage.get("input_tokens", len(json.dumps(list(messages))) // 4)
            out_tokens = usage.get("output_tokens", len(json.dumps(turn)) // 4)
            content = turn.get("content")
            return ModelReply(
                content=None if content is None else str(content),
                tool_calls=tuple(calls),
                usage=TokenUsage(_int(in_tokens), _int(out_tokens)),
                stop_reason="tool_use" if calls else "end_turn",
            )
        except (KeyError, TypeError, ValueError, InvalidParams) as exc:
            raise _model_error("scripted", text=f"turn {self.position}: {exc!r}") from None

    async def aclose(self) -> None:
        return None


def provider_from_name(name: str) -> Provider:
    """``openai:NAME``, ``anthropic:NAME`` or ``scripted:FILE``."""
    kind, sep, rest = name.partition(":")
    if not sep or not rest:
        raise ConfigError(f"model {name!r}: use openai:NAME, anthropic:NAME or scripted:FILE")
    if kind == "openai":
        return OpenAIProvider(rest)
    if kind == "anthropic":
        return AnthropicProvider(rest)
    if kind == "scripted":
        return ScriptedProvider.from_file(rest)
    raise ConfigError(f"unknown model provider {kind!r}: use openai, anthropic or scripted")
