"""Channel benchmark: ironclaw.rpc over a Unix socket against raw asyncio in the same run.

    python benchmarks/rpc.py --json

Round trip: sequential echo calls through :class:`ironclaw.rpc.Peer` versus a plain
asyncio stream echo of one newline-delimited JSON object (client encodes and decodes the
JSON, the server echoes the line); p50/p99 over all calls. Throughput: 256 MiB
server->client as binary stream frames versus a raw socket copy
(``sock_sendall``/``sock_recv_into``), best of ``--rounds`` each (the per-round median
ratio is reported too). Rounds interleave both sides so drift hits them alike. Servers
run in a child process so client and server each have a core, as host and guest would.
The client is the host's end and runs with ``HOST_LIMITS``, so their checks are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ironclaw.rpc import HOST_LIMITS, CallContext, Peer
from ironclaw.transport import SocketConnection, unix

BULK_BLOCK = 16 * 2**20
ECHO_PARAMS = {"cmd": ["echo", "hello"], "cwd": "/workspace", "env": {"LANG": "C.UTF-8"}}


# -- servers (child process) -------------------------------------------------------------
async def _serve_rpc(path: str) -> None:
    block = os.urandom(BULK_BLOCK)

    async def echo(params: Any, ctx: CallContext) -> Any:
        return params

    async def bulk(params: Any, ctx: CallContext) -> int:
        sid, total = params["stream"], params["bytes"]
        sent = 0
        while sent < total:
            n = min(BULK_BLOCK, total - sent)
            await ctx.peer.send_bytes(sid, memoryview(block)[:n])
            sent += n
        await ctx.peer.end_stream(sid)
        return sent

    async def on_connect(conn: SocketConnection) -> None:
        async with Peer(conn, handlers={"echo": echo, "bulk": bulk}, name="bench-server") as p:
            await p.wait_closed()

    await _run_server(path, on_connect)


async def _serve_raw(path: str) -> None:
    block = os.urandom(BULK_BLOCK)
    loop = asyncio.get_running_loop()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readline()
        if first.startswith(b"BULK "):
            total = int(first.split()[1])
            sock = writer.get_extra_info("socket")
            raw = socket.socket(fileno=os.dup(sock.fileno()))
            raw.setblocking(False)
            sent = 0
            while sent < total:
                n = min(BULK_BLOCK, total - sent)
                await loop.sock_sendall(raw, memoryview(block)[:n])
                sent += n
            raw.close()
            writer.close()
            return
        line = first
        while line:
            writer.write(line)
            await writer.drain()
            line = await reader.readline()
        writer.close()

    srv = await asyncio.start_unix_server(on_connect, path)
    async with srv:
        await srv.serve_forever()


async def _run_server(path: str, on_connect: Any) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    server = await unix.serve(sock, on_connect)
    async with server:
        await server.serve_forever()


# -- clients ------------------------------------------------------------------------------
def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _rtt_rpc(path: str, n: int) -> list[float]:
    conn = await unix.connect(path)
    async with Peer(conn, name="bench-client", limits=HOST_LIMITS) as peer:
        for _ in range(200):
            await peer.call("echo", ECHO_PARAMS)
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await peer.call("echo", ECHO_PARAMS)
            out.append((time.perf_counter_ns() - t0) / 1000)
    return out


async def _rtt_raw(path: str, n: int) -> list[float]:
    reader, writer = await asyncio.open_unix_connection(path)
    out = []
    for i in range(n + 200):
        t0 = time.perf_counter_ns()
        writer.write(
            json.dumps({"jsonrpc": "2.0", "id": i, "params": ECHO_PARAMS}).encode() + b"\n"
        )
        await writer.drain()
        json.loads(await reader.readline())
        if i >= 200:
            out.append((time.perf_counter_ns() - t0) / 1000)
    writer.close()
    await writer.wait_closed()
    return out


async def _bulk_rpc(path: str, total: int) -> float:
    conn = await unix.connect(path)
    async with Peer(conn, name="bench-client", limits=HOST_LIMITS) as peer:
        sid = peer.new_stream_id()
        stream = peer.open_stream(sid)
        t0 = time.perf_counter()
        call = asyncio.ensure_future(peer.call("bulk", {"stream": sid, "bytes": total}))
        got = 0
        async for chunk in stream:
            got += len(chunk)
        sent = await call
        dt = time.perf_counter() - t0
    if got != total or sent != total:
        raise RuntimeError(f"bulk transfer lost bytes: got {got}, sent {sent}, want {total}")
    return total / dt


async def _bulk_raw(path: str, total: int) -> float:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    buf = bytearray(256 * 1024)
    t0 = time.perf_counter()
    await loop.sock_sendall(sock, b"BULK %d\n" % total)
    got = 0
    while True:
        n = await loop.sock_recv_into(sock, buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    sock.close()
    if got != total:
        raise RuntimeError(f"raw transfer lost bytes: got {got}, want {total}")
    return total / dt


def _spawn(mode: str, path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, mode, path])
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"{mode} server did not start")
        time.sleep(0.01)
    return proc


async def _bench(n: int, total: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ic-bench-") as tmp:
        rpc_path, raw_path = os.path.join(tmp, "rpc.sock"), os.path.join(tmp, "raw.sock")
        procs = [_spawn("--serve-rpc", rpc_path), _spawn("--serve-raw", raw_path)]
        try:
            rpc_rtt: list[float] = []
            raw_rtt: list[float] = []
            rpc_tp: list[float] = []
            raw_tp: list[float] = []
            for _ in range(rounds):  # interleaved so drift hits both sides alike
                raw_rtt += await _rtt_raw(raw_path, n // rounds)
                rpc_rtt += await _rtt_rpc(rpc_path, n // rounds)
                raw_tp.append(await _bulk_raw(raw_path, total))
                rpc_tp.append(await _bulk_rpc(rpc_path, total))
        finally:
            for p in procs:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
    rpc_p50, raw_p50 = statistics.median(rpc_rtt), statistics.median(raw_rtt)
    # Best of N for throughput (as timeit does): other load only ever slows a round down.
    rpc_mibs = max(rpc_tp) / 2**20
    raw_mibs = max(raw_tp) / 2**20
    median_ratio = statistics.median(r / w for r, w in zip(rpc_tp, raw_tp, strict=True))
    return {
        "rtt_p50_us": round(rpc_p50, 1),
        "rtt_p99_us": round(_pct(rpc_rtt, 0.99), 1),
        "raw_rtt_p50_us": round(raw_p50, 1),
        "raw_rtt_p99_us": round(_pct(raw_rtt, 0.99), 1),
        "ratio_rtt": round(rpc_p50 / raw_p50, 3),
        "bulk_bytes": total,
        "throughput_mib_s": round(rpc_mibs, 1),
        "raw_throughput_mib_s": round(raw_mibs, 1),
        "ratio_throughput": round(rpc_mibs / raw_mibs, 3),
        "ratio_throughput_median": round(median_ratio, 3),
        "calls": len(rpc_rtt),
        "rounds": rounds,
        "python": sys.version.split()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--calls", type=int, default=6000)
    ap.add_argument("--bytes", type=int, default=256 * 2**20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--serve-rpc", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--serve-raw", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_rpc:
        asyncio.run(_serve_rpc(args.serve_rpc))
        return
    if args.serve_raw:
        asyncio.run(_serve_raw(args.serve_raw))
        return
    result = asyncio.run(_bench(args.calls, args.bytes, args.rounds))
    result["meets_targets"] = result["ratio_rtt"] <= 2.0 and result["ratio_throughput"] >= 0.5
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for k, v in result.items():
            print(f"{k:24} {v}")


if __name__ == "__main__":
    main()
