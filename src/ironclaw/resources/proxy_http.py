"""What the egress proxy reads from the wire: strict HTTP/1.x and the TLS SNI. Stdlib only.

The proxy checks every request of a connection, so it must see message boundaries
exactly as the upstream server will: anything two parsers could read differently
(bare LF, obs-fold, duplicate Host, Content-Length next to Transfer-Encoding, two
Content-Lengths) is refused with 400 instead of guessed at. Bodies are copied by their
framing, never by "whatever comes next", so a request hidden in a body is read as the
next request and checked like the first.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CHUNKED",
    "EOF",
    "BadMessage",
    "Framing",
    "Message",
    "parse_sni",
    "read_message",
    "relay_body",
    "request_framing",
    "response_framing",
    "split_absolute",
]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([!-~]+) (HTTP/1\.[01])")
_STATUS_LINE = re.compile(r"(HTTP/1\.[01]) ([1-9][0-9]{2})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_COPY = 65536

CHUNKED: Literal["chunked"] = "chunked"
EOF: Literal["eof"] = "eof"
#: Body length in bytes, chunked, or delimited by the connection closing.
Framing = int | Literal["chunked", "eof"]


class BadMessage(Exception):
    """A message two parsers could read differently, or not HTTP/1.x: answered 400."""


@dataclass
class Message:
    """One request or response head; ``start`` is its first line split in three."""

    start: tuple[str, str, str]
    headers: list[tuple[str, str]]

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for k, v in self.headers if k.lower() == key]

    def tokens(self, name: str) -> list[str]:
        """Comma-separated tokens of every ``name`` header, lower-cased."""
        return [t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()]


async def _line(reader: asyncio.StreamReader, budget: int) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadMessage("header line too long") from None
    if len(line) > budget:
        raise BadMessage("message head too long")
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        raise BadMessage("line not ended by CRLF (bare LF or CR)")
    return line[:-2]


async def read_message(
    reader: asyncio.StreamReader, *, request: bool, limit: int = 16384
) -> Message | None:
    """Read and strictly parse one head; None on a clean end of stream before it."""
    budget = limit
    try:
        first = await _line(reader, budget)
        if not first and request:  # one empty line between requests is tolerated
            first = await _line(reader, budget)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise BadMessage("stream ended inside a message head") from None
    budget -= len(first) + 2
    text = first.decode("latin-1")
    match = (_REQUEST_LINE if request else _STATUS_LINE).fullmatch(text)
    if match is None:
        raise BadMessage(f"malformed {'request' if request else 'status'} line {text[:80]!r}")
    if request:
        start = (match[1], match[2], match[3])
    else:
        start = (match[1], match[2], text[len(match[1]) + 5 :])
    headers: list[tuple[str, str]] = []
    while True:
        try:
            raw = await _line(reader, budget)
        except asyncio.IncompleteReadError:
            raise BadMessage("stream ended inside a message head") from None
        budget -= len(raw) + 2
        if not raw:
            return Message(start, headers)
        line = raw.decode("latin-1")
        if line[0] in " \t":
            raise BadMessage("obsolete line folding (obs-fold) in the header block")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadMessage(f"malformed header line {line[:80]!r}")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise BadMessage(f"control character in header {name}")
        headers.append((name, value))


def _framing(msg: Message, version: str) -> Framing | None:
    """Transfer-Encoding chunked, a single Content-Length, or None (neither present)."""
    te = msg.get_all("transfer-encoding")
    cl = msg.get_all("content-length")
    if te:
        if cl:
            raise BadMessage("both Transfer-Encoding and Content-Length")
        if version == "HTTP/1.0":
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 message")
        if msg.tokens("transfer-encoding") != [CHUNKED]:
            raise BadMessage(f"unsupported Transfer-Encoding {', '.join(te)!r}")
        return CHUNKED
    if len(cl) > 1:
        raise BadMessage("more than one Content-Length")
    if cl:
        if not cl[0].isdigit() or not cl[0].isascii() or len(cl[0]) > 15:
            raise BadMessage(f"bad Content-Length {cl[0]!r}")
        return int(cl[0])
    return None


def request_framing(msg: Message) -> Framing:
    """How the request's body is delimited: no framing headers means no body.

    A Connection header naming Host or a framing header is refused: a proxy drops the
    headers it names, and the server would then read the body as further requests.
    """
    named = {"host", "content-length", "transfer-encoding"} & set(msg.tokens("connection"))
    if named:
        raise BadMessage(f"Connection header names {', '.join(sorted(named))}")
    framing = _framing(msg, msg.start[2])
    return 0 if framing is None else framing


def response_framing(msg: Message, method: str) -> Framing:
    """How the response's body is delimited (RFC 9112 section 6.3)."""
    status = int(msg.start[1])
    if method == "HEAD" or status < 200 or status in (204, 304):
        return 0
    framing = _framing(msg, msg.start[0])
    return EOF if framing is None else framing


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, _COPY))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        writer.write(data)
        await writer.drain()
        n -= len(data)


async def relay_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: Framing
) -> None:
    """Copy exactly one body, validating chunked framing as it passes."""
    if framing == EOF:
        while data := await reader.read(_COPY):
            writer.write(data)
            await writer.drain()
        return
    if isinstance(framing, int):
        await _copy(reader, writer, framing)
        return
    while True:
        line = await _line(reader, 4096)
        size_text = line.split(b";", 1)[0]
        if not _HEX.fullmatch(size_text):
            raise BadMessage(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        # Re-encoded, not copied: chunk extensions and trailers are where parsers differ,
        # so neither is passed on (both are optional to act on).
        writer.write(b"%x\r\n" % size)
        if size == 0:
            while trailer := await _line(reader, 4096):
                if trailer[0:1] in (b" ", b"\t") or b":" not in trailer:
                    raise BadMessage("malformed trailer line")
            writer.write(b"\r\n")
            await writer.drain()
            return
        await _copy(reader, writer, size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadMessage("chunk data not followed by CRLF")
        writer.write(b"\r\n")


def split_absolute(target: str) -> tuple[str, int, str]:
    """``http://host[:port]/path`` as (host, port, origin-form path)."""
    if not target[:7].lower() == "http://":
        raise BadMessage("only absolute http:// targets are proxied")
    rest = target[7:]
    if "#" in rest:
        raise BadMessage("fragment in request target")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    if "@" in authority or "\\" in authority:
        raise BadMessage("user information in request target")
    if authority.startswith("["):
        host, close, port_text = authority[1:].partition("]")
        if not close or (port_text and not port_text.startswith(":")):
            raise BadMessage(f"bad authority {authority!r}")
        port_text = port_text[1:]
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        raise BadMessage("empty host in request target")
    if port_text and not (port_text.isdigit() and port_text.isascii() and len(port_text) <= 5):
        raise BadMessage(f"bad port {port_text!r}")
    return host.lower(), int(port_text) if port_text else 80, path


def parse_sni(hello: bytes) -> str | None:
    """The server name of a TLS ClientHello record, or None if absent or malformed."""
    try:
        if len(hello) < 5 or hello[0] != 0x16:
            return None
        body = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
        if body[0] != 0x01:  # handshake type client_hello
            return None
        pos = 4 + 2 + 32  # handshake header, legacy version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            etype = int.from_bytes(body[pos : pos + 2], "big")
            elen = int.from_bytes(body[pos + 2 : pos + 4], "big")
            ext = body[pos + 4 : pos + 4 + elen]
            pos += 4 + elen
            if etype != 0:  # server_name
                continue
            p = 2
            while p + 3 <= len(ext):
                ntype, nlen = ext[p], int.from_bytes(ext[p + 1 : p + 3], "big")
                if ntype == 0:
                    return ext[p + 3 : p + 3 + nlen].decode("ascii").lower()
                p += 3 + nlen
        return None
    except (IndexError, UnicodeDecodeError):
        return None
