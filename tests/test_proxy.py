"""The egress proxy in-process, over loopback: SNI and HTTP parsing, refusals with audit lines."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw.resources.proxy import ProxyServer, parse_sni
from ironclaw.resources.proxy_http import (
    BadMessage,
    Message,
    read_message,
    request_framing,
    split_absolute,
)

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


async def parse(raw: bytes) -> Message | None:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_message(reader, request=True)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"GET http://a.test/ HTTP/1.1\nHost: a.test\r\n\r\n", "bare LF"),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n  x\r\n\r\n", "obs-fold"),
        (b"GET http://a.test/ HTTP/1.1\r\nHost : a.test\r\n\r\n", "malformed header"),
        (b"GET  http://a.test/ HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"GET http://a.test/ HTTP/2\r\n\r\n", "malformed request line"),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test", "stream ended"),
        (b"GET http://a.test/ HTTP/1.1\r\nX: \x01\r\n\r\n", "control character"),
    ],
)
async def test_strict_heads(raw: bytes, error: str) -> None:
    with pytest.raises(BadMessage, match=error):
        await parse(raw)


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        (b"", 0),
        (b"Content-Length: 12\r\n", 12),
        (b"Transfer-Encoding: Chunked\r\n", "chunked"),
        (b"Content-Length: 1\r\nContent-Length: 1\r\n", "more than one Content-Length"),
        (b"Content-Length: +1\r\n", "bad Content-Length"),
        (b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n", "both"),
        (b"Transfer-Encoding: chunked, chunked\r\n", "unsupported"),
        (b"Connection: Content-Length\r\n", "Connection header names content-length"),
    ],
)
async def test_request_framing(headers: bytes, framing: int | str) -> None:
    msg = await parse(b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\n" + headers + b"\r\n")
    assert msg is not None
    if isinstance(framing, int) or framing == "chunked":
        assert request_framing(msg) == framing
    else:
        with pytest.raises(BadMessage, match=framing):
            request_framing(msg)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("http://A.test/x?y", ("a.test", 80, "/x?y")),
        ("http://a.test", ("a.test", 80, "/")),
        ("http://a.test?q", ("a.test", 80, "/?q")),
        ("HTTP://a.test:8080/", ("a.test", 8080, "/")),
        ("http://[::1]:80/", ("::1", 80, "/")),
        ("http://a.test@b.test/", None),
        ("http://a.test/#f", None),
        ("http://:80/", None),
        ("http://a.test:8o/", None),
        ("https://a.test/", None),
    ],
)
def test_split_absolute(target: str, expected: tuple[str, int, str] | None) -> None:
    if expected is None:
        with pytest.raises(BadMessage):
            split_absolute(target)
    else:
        assert split_absolute(target) == expected
