"""A hostile guest: speaks the channel's frames, then breaks every rule it can.

Standard library only: the real tests run it *inside* a sandbox (``python3
hostile_guest.py SOCKET``), where it listens on a Unix socket in a mounted directory
and the host's real ``Peer`` (with ``HOST_LIMITS``) connects to it, exactly as the
manager connects to a sandbox's agent. The unit tests import its payload builders.

Per connection it reads the host's first request; ``params["mode"]`` picks the attack,
``params["stdout_stream"]`` is the stream the host opened for it (as for ``exec``).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any

HEADER = struct.Struct(">IBI")
MESSAGE, DATA, END = 1, 2, 3
CHUNK = 128 * 1024 - 64
MiB = 2**20


def frame(ftype: int, sid: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), ftype, sid) + payload


def message(obj: Any) -> bytes:
    return frame(MESSAGE, 0, json.dumps(obj, separators=(",", ":")).encode())


def nested(levels: int, rid: int = 1) -> bytes:
    """A response whose result nests ``levels`` arrays: ``[[[...]]]``."""
    body = b'{"jsonrpc":"2.0","id":%d,"result":' % rid + b"[" * levels + b"]" * levels + b"}"
    return frame(MESSAGE, 0, body)


def wide(size: int) -> bytes:
    """A notification whose params are ``size`` bytes of empty arrays: ``[[],[],...]``."""
    n = size // 3
    body = b'{"jsonrpc":"2.0","method":"agent.event","params":[' + b"[]," * n + b"[]]}"
    return frame(MESSAGE, 0, body)


def huge_nested_chunks(total: int = 16 * MiB) -> Iterator[bytes]:
    """One MESSAGE frame of ``total`` bytes of nesting, produced lazily in 1 MiB pieces."""
    yield HEADER.pack(total, MESSAGE, 0)
    half = total // 2
    for ch, n in ((b"[", half), (b"]", total - half)):
        while n:
            k = min(n, MiB)
            yield ch * k
            n -= k


def invented_ids(rng: random.Random, streams: int = 200, per_stream: int = 64) -> Iterator[bytes]:
    """The attack found in review: DATA on ids nobody opened, 64 full frames each."""
    chunk = b"\0" * CHUNK
    for _ in range(streams):
        sid = rng.randrange(2, 2**32, 2)  # the guest's own (even) id space
        for _ in range(per_stream):
            yield frame(DATA, sid, chunk)


SEEDS = [
    message({"jsonrpc": "2.0", "id": 7, "result": {"exit_code": 0}}),
    message({"jsonrpc": "2.0", "method": "agent.event", "params": {"n": 1}}),
    message({"jsonrpc": "2.0", "id": 8, "method": "model.complete", "params": {"m": [1]}}),
    message({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "x"}}),
    frame(DATA, 1, b"stdout bytes"),
    frame(END, 1, b""),
]


def mutated(rng: random.Random) -> bytes:
    """One seeded mutation of a valid frame sequence: flips, cuts, bad lengths and ids."""
    parts = [rng.choice(SEEDS) for _ in range(rng.randint(1, 8))]
    wire = bytearray(b"".join(parts))
    for _ in range(rng.randint(0, 6)):
        op = rng.randrange(7)
        pos = rng.randrange(len(wire)) if wire else 0
        if op == 0 and wire:
            wire[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            wire[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif op == 2:
            del wire[pos : pos + rng.randint(1, 16)]
        elif op == 3:  # a header claiming anything at all
            wire[pos:pos] = HEADER.pack(rng.getrandbits(32), rng.randint(0, 5), rng.getrandbits(32))
        elif op == 4:  # a stream id from either space, or one the host did open
            wire += frame(DATA, rng.choice([1, 2, 3, rng.getrandbits(32)]), rng.randbytes(64))
        elif op == 5:
            wire += nested(rng.randint(1, 200), rng.randint(1, 9))
        else:
            wire += message({"jsonrpc": "2.0", "id": rng.randint(1, 9), "method": "x" * 3})
    return bytes(wire)


def read_request(sock: socket.socket) -> dict[str, Any]:
    head = _read_exactly(sock, HEADER.size)
    length, _, _ = HEADER.unpack(head)
    req: dict[str, Any] = json.loads(_read_exactly(sock, length))
    return req


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return bytes(buf)


def attack(mode: str, params: dict[str, Any], rid: Any) -> Iterator[bytes]:
    """What the guest sends after the host's request, by mode."""
    rng = random.Random(params.get("seed", 0))
    sid = int(params.get("stdout_stream") or 1)
    if mode == "polite":
        yield frame(DATA, sid, b"hello from a polite guest\n")
        yield frame(END, sid, b"")
        yield message({"jsonrpc": "2.0", "id": rid, "result": {"exit_code": 0}})
    elif mode == "invented_ids":
        yield frame(DATA, sid, b"looks legitimate at first\n")
        yield from invented_ids(rng)
    elif mode == "huge_nested":
        yield from huge_nested_chunks()
    elif mode == "deep_json":
        yield nested(40_000)
    elif mode == "wide_json":
        yield wide(2 * MiB - 200)
    elif mode == "big_data":
        yield HEADER.pack(16 * MiB, DATA, sid)
        yield b"\0" * (16 * MiB)
    elif mode == "many_calls":
        for i in range(5000):
            yield message({"jsonrpc": "2.0", "id": 1000 + i, "method": "agent.event"})
    elif mode == "notify_flood":
        note = message({"jsonrpc": "2.0", "method": "exec.output", "params": {"d": "x" * 64}})
        for _ in range(200_000):
            yield note
    elif mode == "stream_flood":
        # Legitimate streams, written as fast as the host lets us; then one invented id.
        chunks = [frame(DATA, int(s), b"y" * CHUNK) for s in params.get("streams") or [sid]]
        for i in range(int(params.get("count", 2**62))):
            yield chunks[i % len(chunks)]
        yield frame(DATA, 2, b"and now a stream the host never opened")
    elif mode == "fuzz":
        for _ in range(int(params.get("count", 1))):
            yield mutated(rng)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def handle(conn: socket.socket) -> None:
    with conn:
        try:
            req = read_request(conn)
            params = req.get("params") or {}
            for piece in attack(str(params.get("mode")), params, req.get("id")):
                conn.sendall(piece)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        except (OSError, EOFError, ValueError):
            pass  # the host hung up on us: that is the point


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    serve(sys.argv[1])
