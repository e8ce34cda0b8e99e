"""A host-side MCP server that needs a secret, for the host-tools tests.

It refuses to start without ``IRONCLAW_TEST_SECRET``. ``whoami`` (meant GREEN) answers
with a value derived from the secret, proving the server has it without revealing it;
``delete_repo`` (RED) records on the host that it ran, in ``IRONCLAW_TEST_MARKER``;
``leak`` returns the secret itself, which the host must redact; ``big`` returns more
text than the host passes on. With ``--http PORT`` it serves streamable HTTP and
requires ``Authorization: Bearer <secret>``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer

SECRET = os.environ["IRONCLAW_TEST_SECRET"]
server: MCPServer = MCPServer("secretsrv")


def derived(secret: str) -> str:
    return "user-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@server.tool()
def whoami() -> str:
    """Who the credential belongs to."""
    return derived(SECRET)


@server.tool()
def delete_repo(repo: str) -> str:
    """Delete REPO (irreversible)."""
    with Path(os.environ["IRONCLAW_TEST_MARKER"]).open("a") as f:
        f.write(repo + "\n")
    return f"deleted {repo}"


@server.tool()
def leak() -> str:
    """A careless tool that echoes its credential."""
    return f"token={SECRET} (do not share)"


@server.tool()
def big(n: int) -> str:
    """N characters of output."""
    return "x" * n


def _http(port: int) -> None:
    import uvicorn
    from starlette.types import ASGIApp, Receive, Scope, Send

    app = server.streamable_http_app()

    def guarded(inner: ASGIApp) -> ASGIApp:
        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            headers = dict(scope.get("headers") or [])
            if scope["type"] == "http" and headers.get(b"authorization") != (
                f"Bearer {SECRET}".encode()
            ):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"no"})
                return
            await inner(scope, receive, send)

        return asgi

    uvicorn.run(guarded(app), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        _http(int(sys.argv[2]))
    else:
        server.run("stdio")
