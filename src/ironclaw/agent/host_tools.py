"""Credentialed tools run on the host: host-side MCP servers behind the approval cliff.

A GitHub or Postgres MCP server needs a token; a token inside the sandbox is a token the
agent (hostile by assumption) can read and send anywhere. So such servers run here, on
the host, started with the official ``mcp`` client over stdio (secrets taken by name
from the host's environment) or over streamable HTTP (headers with ``${VAR}``). The
guest sees only their tools, named ``host__<server>__<tool>`` (vendors' tool-name rules
forbid dots), through two channel methods (:mod:`ironclaw.proto.host_tools_methods`).

The cliff is enforced where the effect happens: every ``hosttools.call`` is classified
by the task's :class:`Approver` (host tools are RED unless the config or a policy rule
marks them GREEN) and a RED call waits for its decision here; a refused call never
reaches the server. What goes back to the guest is the tool list and the call results,
bounded in size, with every configured secret value replaced by ``[redacted]`` in case
a server echoes one. Environments and headers never cross the channel.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironclaw.agent.approval import Approver, Color, Rule
from ironclaw.errors import ConfigError, IronclawError
from ironclaw.proto.host_tools_methods import (
    HostTool,
    HostToolsCallRequest,
    HostToolsCallResult,
    HostToolsListRequest,
    HostToolsListResult,
)
from ironclaw.proto.lifecycle import AsyncResource
from ironclaw.rpc import CallContext

if TYPE_CHECKING:
    from mcp import ClientSession

__all__ = [
    "HOST_PREFIX",
    "MAX_HOST_RESULT_CHARS",
    "HostServerSpec",
    "HostTools",
    "load_host_tools",
    "parse_host_mcp",
]

#: Model-visible names of host tools: ``host__<server>__<tool>``.
HOST_PREFIX = "host__"
MAX_HOST_RESULT_CHARS = 32_000
REDACTED = "[redacted]"
#: Secret values shorter than this are not redacted (they would match everywhere).
_MIN_SECRET = 6
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SPEC_KEYS = frozenset({"name", "command", "args", "env", "cwd", "url", "headers", "green"})

Emit = Callable[..., Awaitable[None]]


def _strings(doc: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what}: {key!r} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class HostServerSpec:
    """One host MCP server: stdio ``command``/``args`` or a streamable HTTP ``url``.

    ``env`` names host environment variables handed to a stdio server (on top of the
    SDK's minimal default environment: PATH, HOME, ...); ``headers`` values may use
    ``${VAR}`` from the host environment. ``green`` lists tool names (globs) that run
    without approval; every other tool of the server is RED.
    """

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    green: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: Any) -> HostServerSpec:
        if not isinstance(doc, dict):
            raise ConfigError("a host MCP server must be an object {name, command|url, ...}")
        name = doc.get("name")
        what = f"host MCP server {name!r}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
            raise ConfigError(f"{what}: 'name' must match [A-Za-z0-9][A-Za-z0-9_-]* without '__'")
        unknown = set(doc) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
        command, url, cwd = doc.get("command"), doc.get("url"), doc.get("cwd")
        if (command is None) == (url is None):
            raise ConfigError(f"{what}: give exactly one of 'command' (stdio) or 'url' (HTTP)")
        for key, value in (("command", command), ("url", url), ("cwd", cwd)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{what}: {key!r} must be a non-empty string")
        if url is not None and not str(url).startswith(("http://", "https://")):
            raise ConfigError(f"{what}: 'url' must be http:// or https://")
        env = _strings(doc, "env", what)
        bad = [e for e in env if not _ENV_NAME.fullmatch(e)]
        if bad:
            raise ConfigError(f"{what}: 'env' lists variable names, not {bad[0]!r}")
        headers = doc.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(f"{what}: 'headers' must map strings to strings")
        if url is None and headers:
            raise ConfigError(f"{what}: 'headers' apply to an HTTP server ('url') only")
        if url is not None and (env or doc.get("args") or cwd):
            raise ConfigError(f"{what}: 'env', 'args' and 'cwd' apply to a stdio server only")
        return cls(name, command, _strings(doc, "args", what), env, cwd, url, dict(headers),
                   _strings(doc, "green", what))  # fmt: skip

    def resolve(self, environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """(env, headers) with the host's values; a missing variable is a ConfigError."""

        def get(var: str) -> str:
            value = environ.get(var)
            if value is None:
                raise ConfigError(
                    f"host MCP server {self.name!r} needs ${var}: set it in the environment "
                    "of the command that starts the task"
                )
            return value

        env = {var: get(var) for var in self.env}
        headers = {k: _VAR.sub(lambda m: get(m.group(1)), v) for k, v in self.headers.items()}
        return env, headers

    def secret_values(self, environ: Mapping[str, str]) -> set[str]:
        """Values to keep out of results: the env it gets and the variables its headers use."""
        names = set(self.env) | {m for v in self.headers.values() for m in _VAR.findall(v)}
        return {environ[n] for n in names if len(environ.get(n, "")) >= _MIN_SECRET}


def load_host_tools(path: str | Path) -> list[HostServerSpec]:
    """``--host-tools FILE``: JSON or YAML ``{"servers": [{name, command, args, env, ...}]}``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the host tools file {path}: {exc}") from None
    try:
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError
        raise ConfigError(f"{path}: {exc}") from None
    if (
        not isinstance(doc, dict)
        or set(doc) - {"servers"}
        or not isinstance(doc.get("servers"), list)
    ):
        raise ConfigError(f"{path}: expected {{'servers': [...]}} and nothing else")
    specs = [HostServerSpec.from_json(s) for s in doc["servers"]]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError(f"{path}: two host MCP servers share a name")
    return specs


def parse_host_mcp(text: str) -> HostServerSpec:
    """``--host-mcp 'NAME=cmd args'``: a stdio server on the host, no secrets, all RED."""
    name, sep, rest = text.partition("=")
    try:
        argv = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"--host-mcp {text!r}: {exc}") from None
    if not sep or not argv:
        raise ConfigError(f"--host-mcp {text!r}: write NAME=COMMAND ARGS")
    return HostServerSpec.from_json({"name": name, "command": argv[0], "args": argv[1:]})


def _text(blocks: list[Any]) -> str:
    parts: list[str] = []
    for block in blocks:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]")
    return "\n".join(parts)


class HostTools(AsyncResource):
    """The host MCP servers of one task and the two channel handlers over them.

    :meth:`start` and :meth:`aclose` must run in the same asyncio task (the SDK's
    transports hold task groups). While started, the servers' GREEN marks are rules
    at the end of the approver's policy, so the user's own rules still come first.
    """

    def __init__(
        self,
        specs: list[HostServerSpec],
        approver: Approver,
        *,
        emit: Emit | None = None,
        environ: Mapping[str, str] | None = None,
        max_call_s: float = 120.0,
        max_result_chars: int = MAX_HOST_RESULT_CHARS,
    ) -> None:
        self.specs = list(specs)
        if len({s.name for s in self.specs}) != len(self.specs):
            raise ConfigError("two host MCP servers share a name")
        self.approver = approver
        self.environ = dict(os.environ if environ is None else environ)
        self.max_call_s = max_call_s
        self.max_result_chars = max_result_chars
        self.emit = emit
        for spec in self.specs:
            spec.resolve(self.environ)  # every variable it needs is set: fail before starting
        self._stack = contextlib.AsyncExitStack()
        self._sessions: dict[str, ClientSession] = {}
        self._tools: dict[str, tuple[str, str]] = {}  # exposed -> (server, tool)
        self._rules: list[Rule] = []
        self._secrets: list[str] = []
        self.tools: list[HostTool] = []

    async def open(self) -> None:
        """What ``async with`` runs: :meth:`start`."""
        await self.start()

    async def start(self) -> None:
        """Start every server, list its tools; a server that fails stops the task."""
        secrets: set[str] = set()
        for spec in self.specs:
            secrets |= spec.secret_values(self.environ)
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted(secrets, key=len, reverse=True)
        try:
            for spec in self.specs:
                await self._start_one(spec)
        except BaseException:
            await self.aclose()
            raise
        self.approver.policy.rules.extend(self._rules)
        if self.specs:
            await self._event("host_tools.ready", servers=[s.name for s in self.specs],
                             tools=[t.name for t in self.tools])  # fmt: skip

    async def _start_one(self, spec: HostServerSpec) -> None:
        from mcp import ClientSession

        env, headers = spec.resolve(self.environ)
        try:
            if spec.url is not None:
                import httpx2
                from mcp.client.streamable_http import streamable_http_client

                client = await self._stack.enter_async_context(
                    httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))
                )
                read, write = await self._stack.enter_async_context(
                    streamable_http_client(spec.url, http_client=client)
                )
            else:
                from mcp import StdioServerParameters, stdio_client

                assert spec.command is not None
                params = StdioServerParameters(
                    command=spec.command, args=list(spec.args), env=env, cwd=spec.cwd
                )
                read, write = await self._stack.enter_async_context(stdio_client(params))
            session = await self._stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            listing = await session.list_tools()
        except IronclawError:
            raise
        except Exception as exc:  # OSError, ExceptionGroup, MCPError, httpx errors...
            raise ConfigError(
                f"host MCP server {spec.name!r} did not start: {self._redact(str(exc))}; "
                "check its command/url and the variables it needs"
            ) from None
        self._sessions[spec.name] = session
        for tool in listing.tools:
            exposed = f"{HOST_PREFIX}{spec.name}__{tool.name}"
            self._tools[exposed] = (spec.name, tool.name)
            schema = json.loads(self._redact(json.dumps(dict(tool.input_schema))))
            self.tools.append(HostTool(exposed, self._redact(tool.description or ""), schema))
            if any(fnmatch.fnmatchcase(tool.name, g) for g in spec.green):
                self._rules.append(
                    Rule(exposed, Color.GREEN, reason=f"marked GREEN in host server {spec.name}")
                )

    async def aclose(self) -> None:
        """Stop the servers and take their GREEN rules out of the approver's policy."""
        rules = self.approver.policy.rules
        rules[:] = [r for r in rules if not any(r is mine for mine in self._rules)]
        self._sessions.clear()
        await self._stack.aclose()

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    async def _event(self, kind: str, **fields: Any) -> None:
        if self.emit is not None:
            await self.emit(kind, **fields)

    # -- channel handlers -------------------------------------------------------------------
    async def handle_list(self, params: Any, ctx: CallContext) -> dict[str, Any]:
        HostToolsListRequest.from_json(params)
        return HostToolsListResult(tuple(self.tools)).to_json()

    async def handle_call(self, params: Any, ctx: CallContext) -> dict[str, Any]:
        req = HostToolsCallRequest.from_json(params)
        return (await self.call(req)).to_json()

    async def call(self, req: HostToolsCallRequest) -> HostToolsCallResult:
        """Classify, decide, and only if approved run the call on its server."""
        target = self._tools.get(req.name)
        if target is None:
            return HostToolsCallResult(f"unknown host tool {req.name!r}", True, False, "", "")
        await self._event("tool.call", call_id=req.call_id, name=req.name,
                          arguments=req.arguments, host=True)  # fmt: skip
        cls = self.approver.policy.classify(req.name, req.arguments)
        await self._event("tool.classified", call_id=req.call_id, color=cls.color.value,
                          reason=cls.reason)  # fmt: skip
        decision, request = await self.approver.decide_call(req.name, req.arguments)
        await self._event("tool.decision", call_id=req.call_id,
                          card=request.card if request else None, **decision.to_json())  # fmt: skip
        color = decision.color.value
        if not decision.approved:
            return HostToolsCallResult(
                f"refused by the approval policy: {decision.reason}", True, False, color,
                decision.reason,
            )  # fmt: skip
        server, tool = target
        timeout = min(req.timeout_s, self.max_call_s)
        started = time.monotonic()
        try:
            result = await self._sessions[server].call_tool(
                tool, req.arguments, read_timeout_seconds=timeout
            )
            text = _text(list(getattr(result, "content", None) or []))
            is_error = bool(getattr(result, "is_error", False))
        except Exception as exc:  # the server failed, went away or timed out: the model is told
            if isinstance(exc, TimeoutError) or "timed out" in str(exc).lower():
                text = f"host tool {req.name} timed out after {timeout:g}s"
            else:
                text = f"host tool {req.name} failed: {type(exc).__name__}: {exc}"
            is_error = True
        text = self._redact(text)
        if len(text) > self.max_result_chars:
            cut = len(text) - self.max_result_chars
            text = text[: self.max_result_chars] + f"\n[... {cut} chars cut]"
        await self._event("host_tools.result", call_id=req.call_id, name=req.name,
                          is_error=is_error, chars=len(text),
                          duration_ms=round((time.monotonic() - started) * 1000, 3))  # fmt: skip
        return HostToolsCallResult(text, is_error, True, color, decision.reason)
