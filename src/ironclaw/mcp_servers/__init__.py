"""Built-in MCP servers the agent loop starts inside the sandbox (stdio transport).

``shell`` runs commands, ``files`` reads, writes, lists and patches files, ``python``
runs code; each is ``python3 -m ironclaw.mcp_servers.NAME`` over the agent runtime
(see :mod:`ironclaw.agent.agent_runtime`). They trust nothing the model sends beyond
what the sandbox itself allows: the jail, not these servers, is the security boundary;
the host's approval policy decides which calls reach them at all.
"""

from __future__ import annotations

__all__ = ["BUILTIN_SERVERS"]

#: name -> module run with ``python3 -m``.
BUILTIN_SERVERS: dict[str, str] = {
    "shell": "ironclaw.mcp_servers.shell",
    "files": "ironclaw.mcp_servers.files",
    "python": "ironclaw.mcp_servers.python",
}
