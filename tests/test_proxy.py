"""The egress proxy in-process, over loopback: SNI parsing and refusals with audit lines."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw.resources.proxy import ProxyServer, parse_sni

pytestmark = pytest.mark.timeout(30)


def client_hello(sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    if sni is None:
        ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_parse_sni_of_a_real_client_hello() -> None:
    assert parse_sni(client_hello("Allowed.Test")) == "allowed.test"
    assert parse_sni(client_hello(None)) is None
    assert parse_sni(b"GET / HTTP/1.1\r\n") is None
    assert parse_sni(client_hello("a.test")[:40]) is None  # truncated: no crash


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[int, Path, Path]]:
    config = tmp_path / "proxy.json"
    config.write_text(json.dumps({"allow_domains": ["ok.test"], "hosts": {"ok.test": "127.0.0.1"}}))
    audit = tmp_path / "audit.jsonl"
    srv = ProxyServer(str(config), str(audit), "unit")
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], audit, config
    server.close()
    await server.wait_closed()


async def ask(port: int, request: bytes) -> bytes:
    async with asyncio.timeout(10):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request)
        data = await r.read()
        w.close()
        return data


async def test_refusals_are_audited(proxy: tuple[int, Path, Path]) -> None:
    port, audit, config = proxy
    assert (await ask(port, b"CONNECT other.test:443 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
    assert (await ask(port, b"CONNECT ok.test:22 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
    # Allowed by name, but it resolves to loopback: refused, the host is not reachable.
    assert (await ask(port, b"CONNECT ok.test:443 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
    got = await ask(port, b"GET http://ok.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400")  # ambiguous: refused before any policy check
    assert (await ask(port, b"GET / HTTP/1.1\r\nHost: ok.test\r\n\r\n")).startswith(b"HTTP/1.1 403")
    # A policy change is in force for the next connection.
    config.write_text(json.dumps({"allow_domains": [], "deny_domains": ["ok.test"]}))
    got = await ask(port, b"CONNECT ok.test:443 HTTP/1.1\r\n\r\n")
    assert b"denied by ok.test" in got
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert len(lines) == 6
    assert all(x["decision"] == "deny" for x in lines)
    assert {x["host"] for x in lines if "host" in x} >= {"other.test", "ok.test"}
