"""A real ``ironclaw serve`` in a child process on a free loopback port, for API tests.

A child process (not a thread of the test) so that its memory is its own to measure,
and so that the test's client and the server never share an event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ironclaw.api.auth import create_token
from ironclaw.config import Settings
from ironclaw.resources.store import Store

SRC = str(Path(__file__).resolve().parents[1] / "src")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    settings: Settings
    extra_urls: list[str] = field(default_factory=list)

    def token(self, *scopes: str, **quota: int) -> str:
        # In a thread of its own: callers may be inside a running event loop.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _token(self.settings, list(scopes), **quota)).result()

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the server process, in KiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields["VmRSS"], fields["VmHWM"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


async def _token(settings: Settings, scopes: list[str], **quota: int) -> str:
    async with Store(settings.registry_path) as store:
        token, _ = await create_token(store, scopes, **quota)
    return token


def start_server(settings: Settings, *extra: str, env: dict[str, str] | None = None) -> Server:
    settings.ensure()
    env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ironclaw.cli", "serve", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    urls = []
    want = 1 + sum(1 for a in extra if a == "--socket") - (1 if "--no-tcp" in extra else 0)
    while len(urls) < want:
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"ironclaw serve exited with {proc.wait()}")
        if line.startswith("listening on "):
            urls.append(line.split(" ", 2)[2].strip())
    return Server(urls[0], proc, settings, urls[1:])


def serve(settings: Settings, *extra: str) -> Iterator[Server]:
    server = start_server(settings, *extra)
    try:
        yield server
    finally:
        server.stop()
