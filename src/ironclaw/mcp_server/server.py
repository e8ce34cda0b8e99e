"""``ironclaw mcp``: sandboxes as MCP tools, for Claude Desktop/Code and other MCP clients.

Tools: ``sandbox_create``, ``sandbox_exec``, ``sandbox_write_file``,
``sandbox_read_file``, ``sandbox_destroy``, ``sandbox_list`` and ``agent_run``.
Resources: ``ironclaw://sandboxes`` (all of this server's sandboxes) and
``ironclaw://sandboxes/{id}`` (one, also listed per sandbox). Failures come back as
MCP tool errors whose text says what to change; the server itself keeps running.

Transports: stdio (the client starts this process) and streamable HTTP on a loopback
address. The sandboxes made here are removed when the server stops, unless ``keep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import Resource as MCPResource
from pydantic import Field

import ironclaw
from ironclaw.agent.trace import TraceEvent
from ironclaw.errors import ConfigError, IronclawError
from ironclaw.mcp_server.backend import (
    Backend,
    Destroyed,
    ExecOutput,
    FileRead,
    FileWritten,
    SandboxView,
    TaskSummary,
)
from ironclaw.proto.jsonval import JsonObject, JsonValue
from ironclaw.transport._socket import listen_tcp

__all__ = ["IronclawMCP", "build_server", "serve_http", "serve_stdio"]

LOOPBACK = ("127.0.0.1", "::1", "localhost")
INSTRUCTIONS = (
    "IronClaw sandboxes: isolated Linux environments. Create one with sandbox_create, run "
    "commands with sandbox_exec (workspace /workspace), move files with sandbox_write_file "
    "and sandbox_read_file, and sandbox_destroy it when done. agent_run runs a whole agent "
    "task in a fresh sandbox; its risky (RED) tool calls are refused, as nobody is asked."
)


@contextlib.asynccontextmanager
async def _tool_errors() -> AsyncIterator[None]:
    """IronClaw's errors as tool errors, with their class name and advice."""
    try:
        yield
    except IronclawError as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from exc


def _event_line(event: TraceEvent) -> str:
    """A short progress message for one trace event."""
    kind = str(event.get("event", "event"))
    if kind in ("tool.call", "tool.decision", "tool.result"):
        detail = event.get("name") or event.get("reason") or ""
        if kind == "tool.decision":
            detail = ("approved" if event.get("approved") else "refused") + f": {detail}"
        return f"{kind} {detail}"[:200]
    if kind == "task.end":
        return f"task.end {event.get('status')}"
    return kind


class IronclawMCP(MCPServer[Any]):
    """An MCP server that also lists one resource per sandbox."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(
            "ironclaw", instructions=INSTRUCTIONS, version=ironclaw.__version__, log_level="WARNING"
        )
        self.backend = backend

    async def list_resources(self) -> list[MCPResource]:
        listed = await super().list_resources()
        with contextlib.suppress(IronclawError):
            for sb in await self.backend.sandboxes():
                listed.append(
                    MCPResource(
                        uri=f"ironclaw://sandboxes/{sb['id']}",
                        name=f"sandbox {sb['id']}",
                        description=f"{sb['backend']} sandbox, {sb['state']}",
                        mime_type="application/json",
                    )
                )
        return listed


def _member(doc: JsonObject, key: str) -> JsonObject:
    """``doc[key]`` as an object, made if missing."""
    value = doc.setdefault(key, {})
    if not isinstance(value, dict):
        raise ToolError(f"spec.{key} must be an object")
    return value


def build_server(backend: Backend) -> IronclawMCP:
    """The MCP server with its tools and resources bound to ``backend``."""
    mcp = IronclawMCP(backend)

    @mcp.tool()
    async def sandbox_create(
        image: Annotated[str, Field(description="Image name ('host' by default).")] = "host",
        memory_mib: Annotated[int | None, Field(ge=16, description="Memory limit, MiB.")] = None,
        allow: Annotated[
            list[str] | None, Field(description="Egress allowed: CIDR[:PORT[/tcp|udp]] rules.")
        ] = None,
        spec: Annotated[
            JsonObject | None,
            Field(description="A full sandbox spec (limits, env, network, backend, ...)."),
        ] = None,
    ) -> SandboxView:
        """Create and start a sandbox; returns its id. No network unless allowed."""
        doc: JsonObject = dict(spec or {})
        if doc.get("mounts"):
            raise ToolError("host mounts are not offered over MCP: copy files in instead")
        doc.setdefault("image", image)
        if memory_mib is not None:
            _member(doc, "limits")["memory_mib"] = memory_mib
        if allow:
            _member(doc, "network")["allow"] = list[JsonValue](allow)
        async with _tool_errors():
            return await backend.create(doc)

    @mcp.tool()
    async def sandbox_exec(
        sandbox_id: str,
        command: Annotated[
            str | list[str],
            Field(description="A shell line (run by /bin/sh -c) or an argv list."),
        ],
        cwd: Annotated[str | None, Field(description="Directory (default /workspace).")] = None,
        env: dict[str, str] | None = None,
        stdin: Annotated[str | None, Field(description="Text fed to standard input.")] = None,
        timeout: Annotated[float, Field(gt=0, le=3600, description="Seconds.")] = 60.0,
        max_output: Annotated[
            int, Field(ge=1, le=1024 * 1024, description="Bytes kept per stream.")
        ] = 64 * 1024,
    ) -> ExecOutput:
        """Run a command in a sandbox: exit code, stdout, stderr. Output past
        max_output bytes is cut and 'truncated' is true."""
        async with _tool_errors():
            return await backend.exec(
                sandbox_id,
                command,
                cwd=cwd,
                env=env,
                stdin=stdin,
                timeout=timeout,
                max_output=max_output,
            )

    @mcp.tool()
    async def sandbox_write_file(
        sandbox_id: str,
        path: Annotated[str, Field(description="Relative to /workspace, or absolute.")],
        content: str,
        encoding: Literal["text", "base64"] = "text",
    ) -> FileWritten:
        """Write a file in a sandbox (text as UTF-8, or bytes given as base64)."""
        async with _tool_errors():
            return await backend.write_file(sandbox_id, path, content, encoding=encoding)

    @mcp.tool()
    async def sandbox_read_file(
        sandbox_id: str,
        path: str,
        encoding: Literal["text", "base64"] = "text",
        max_bytes: Annotated[int, Field(ge=1, le=1024 * 1024)] = 256 * 1024,
    ) -> FileRead:
        """Read a file from a sandbox; binary files need encoding='base64'."""
        async with _tool_errors():
            return await backend.read_file(sandbox_id, path, encoding=encoding, max_bytes=max_bytes)

    @mcp.tool()
    async def sandbox_destroy(sandbox_id: str) -> Destroyed:
        """Stop a sandbox and remove everything it had."""
        async with _tool_errors():
            return await backend.destroy(sandbox_id)

    @mcp.tool()
    async def sandbox_list() -> list[SandboxView]:
        """The sandboxes this server created and still has."""
        async with _tool_errors():
            return await backend.sandboxes()

    @mcp.tool()
    async def agent_run(
        task: Annotated[str, Field(min_length=1, description="What the agent should do.")],
        model: Annotated[
            str, Field(description="openai:NAME or anthropic:NAME (keys stay on the host).")
        ] = "openai:gpt-4o-mini",
        script: Annotated[
            list[JsonObject] | None,
            Field(description="Scripted model turns instead of a real model (for tests)."),
        ] = None,
        approve: Annotated[
            Literal["green-only", "never"],
            Field(description="RED calls: refused (green-only) or nothing runs (never)."),
        ] = "green-only",
        sandbox: JsonObject | None = None,
        max_steps: Annotated[int, Field(ge=1, le=200)] = 20,
        wall_time_s: Annotated[float, Field(gt=0, le=3600)] = 600.0,
        keep: Annotated[bool, Field(description="Keep the sandbox afterwards.")] = False,
        ctx: Context | None = None,
    ) -> TaskSummary:
        """Run an AI agent on TASK in a fresh sandbox and return its answer and trace
        summary. Nobody is asked about RED calls here: they are refused."""
        if (sandbox or {}).get("mounts"):
            raise ToolError("host mounts are not offered over MCP: copy files in instead")

        async def progress(n: int, event: TraceEvent) -> None:
            if ctx is not None:
                await ctx.report_progress(n, None, _event_line(event))

        async with _tool_errors():
            return await backend.run_task(
                task,
                model=model,
                script=script,
                approve=approve,
                sandbox=dict(sandbox or {}),
                budget={"max_steps": max_steps, "wall_time_s": wall_time_s},
                keep=keep,
                progress=progress,
            )

    @mcp.resource(
        "ironclaw://sandboxes", name="sandboxes", mime_type="application/json",
        description="The sandboxes this server created.",
    )  # fmt: skip
    async def sandboxes_resource() -> str:
        return json.dumps(await backend.sandboxes())

    @mcp.resource("ironclaw://sandboxes/{sandbox_id}", name="sandbox", mime_type="application/json")
    async def sandbox_resource(sandbox_id: str) -> str:
        return json.dumps(await backend.get(sandbox_id))

    return mcp


async def serve_stdio(backend: Backend) -> None:
    """Serve over stdin/stdout until the client closes them (or sends SIGTERM, as MCP
    clients do when stdin alone did not stop a server); the cleanup runs either way."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    if me is not None:
        loop.add_signal_handler(signal.SIGTERM, me.cancel)
    try:
        await backend.open()
        await build_server(backend).run_stdio_async()
    except asyncio.CancelledError:
        pass
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await backend.aclose()


class _Server(uvicorn.Server):
    """Stops on SIGINT or SIGTERM and returns (uvicorn would re-raise the signal after
    its shutdown, killing the process before the sandboxes are cleaned up)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def serve_http(backend: Backend, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve streamable HTTP at ``/mcp`` until interrupted; prints ``listening on URL``.

    Loopback only: the transport has no authentication of its own (the SDK also checks
    Host and Origin against DNS rebinding)."""
    if host not in LOOPBACK:
        raise ConfigError(
            f"--host {host}: the MCP HTTP transport has no authentication, so it listens on "
            "loopback only (127.0.0.1, ::1 or localhost); put an authenticating proxy in front "
            "to reach it from elsewhere"
        )
    sock = listen_tcp(host, port, backlog=128)
    try:
        await backend.open()
        app = build_server(backend).streamable_http_app(host=host)
        server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"listening on http://{shown}:{bound}/mcp", file=sys.stderr, flush=True)
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await backend.aclose()
