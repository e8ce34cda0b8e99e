"""IronClaw as an MCP server (``ironclaw mcp``): sandboxes and agent tasks as tools.

Not to be confused with :mod:`ironclaw.mcp_servers`, the tool servers that run inside
a sandbox for the agent loop.
"""

from ironclaw.mcp_server.backend import Backend, LocalBackend
from ironclaw.mcp_server.remote import RemoteBackend
from ironclaw.mcp_server.server import IronclawMCP, build_server, serve_http, serve_stdio

__all__ = [
    "Backend",
    "IronclawMCP",
    "LocalBackend",
    "RemoteBackend",
    "build_server",
    "serve_http",
    "serve_stdio",
]
