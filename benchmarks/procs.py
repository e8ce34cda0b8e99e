"""Detached commands and exposed ports: what a user waits for.

Measures, on one real namespace sandbox: ``commands.start`` of ``echo`` until its output
stream ends (spawn, ring, replay, exit), ``ports.expose`` (bind, netns, forwarder spawn),
an HTTP GET through the forwarder (p50), and a 50 MB download through it (MB/s).
``--json`` prints one JSON line.

Run as root: ``.venv/bin/python benchmarks/procs.py --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from ironclaw.sdk import Sandbox

SERVE = (
    "import http.server as h; "
    "h.HTTPServer(('127.0.0.1', 8000), h.SimpleHTTPRequestHandler).serve_forever()"
)


async def _ms(coro: object) -> float:
    started = time.perf_counter()
    await coro  # type: ignore[misc]
    return (time.perf_counter() - started) * 1000


async def main(rounds: int) -> dict[str, float]:
    async with Sandbox.create({"network": {"allow": ["192.0.2.0/24"]}}) as sb:

        async def echo() -> None:
            h = await sb.commands.start(["echo", "hi"])
            async for _ in h.output():
                pass

        start = [await _ms(echo()) for _ in range(rounds)]
        await sb.commands.start(["python3", "-c", SERVE])
        probe = "import socket; socket.create_connection(('127.0.0.1', 8000), 1)"
        while (await sb.exec(["python3", "-c", probe])).exit_code != 0:
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        url = await sb.ports.expose(8000)
        expose_ms = (time.perf_counter() - t0) * 1000
        await sb.files.write("index.html", b"ok")
        await sb.files.write("big", b"x" * 50_000_000)
        async with httpx.AsyncClient(timeout=60) as http:
            gets = [await _ms(http.get(url + "/index.html")) for _ in range(rounds)]
            t0 = time.perf_counter()
            body = (await http.get(url + "/big")).content
            mbps = len(body) / (time.perf_counter() - t0) / 1e6
    return {
        "start_echo_until_end_p50_ms": round(statistics.median(start), 2),
        "expose_ms": round(expose_ms, 2),
        "http_get_via_forwarder_p50_ms": round(statistics.median(gets), 2),
        "download_via_forwarder_mb_s": round(mbps, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main(args.rounds))
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
