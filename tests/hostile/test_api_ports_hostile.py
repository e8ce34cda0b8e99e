"""The ports routes facing API clients that reach beyond their token.

Exposing a port makes the server (root) listen on its host for the client. A token
without ``write``, a token of another owner, and a ``write`` token asking for what only
root may have on that host (a non-loopback address, a privileged port below 1024) are
refused; an ``admin`` token may. A real ``ironclaw serve`` and real sandboxes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from apiserver import Server, serve
from ironclaw.client import Sandbox
from ironclaw.config import Settings

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _free_privileged_port() -> int:
    for port in range(900, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


async def test_tokens_reach_only_what_their_scope_and_owner_allow(server: Server) -> None:
    owner = server.token("read", "write")
    async with Sandbox.create(sandbox_id="ports-hostile", api_url=server.url, token=owner) as sb:
        base = f"/v1/sandboxes/{sb.id}/ports"
        url = await sb.ports.expose(8000)
        reader = server.token("read")
        stranger = server.token("read", "write")
        admin = server.token("read", "write", "admin")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            # read only: may list, not expose or unexpose.
            r = await http.post(base, json={"port": 8001}, headers=_auth(reader))
            assert r.status_code == 403, r.text
            r = await http.delete(f"{base}/8000", headers=_auth(reader))
            assert r.status_code == 403, r.text
            # Another owner's write token: the sandbox does not exist for it.
            for method, path, body in (
                ("POST", base, {"port": 8001}),
                ("GET", base, None),
                ("DELETE", f"{base}/8000", None),
            ):
                r = await http.request(method, path, json=body, headers=_auth(stranger))
                assert r.status_code == 404, (method, r.text)
            # The owner's write token: beyond loopback, or a port only root may bind.
            priv = _free_privileged_port()
            for body in (
                {"port": 8001, "bind": "0.0.0.0"},
                {"port": 8001, "bind": "::"},
                {"port": 8001, "host_port": priv},
            ):
                r = await http.post(base, json=body, headers=_auth(owner))
                assert r.status_code == 403, (body, r.text)
                assert "admin" in r.json()["detail"], r.text
            r = await http.post(base, json={"port": 8001, "host_port": priv}, headers=_auth(admin))
            assert r.status_code == 201, r.text
            assert r.json()["host_port"] == priv
        ports = {p.port: p.url for p in await sb.ports.list()}
        assert ports == {8000: url, 8001: f"http://127.0.0.1:{priv}"}
