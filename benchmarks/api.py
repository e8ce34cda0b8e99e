"""The API's overhead and its behaviour under concurrent clients.

Starts ``ironclaw serve`` (a child process, 127.0.0.1, a free port) over a private home and
cgroup root, then prints one JSON line:

* ``api_p50_ms`` / ``sdk_p50_ms`` / ``ratio``: create -> exec ``true`` -> destroy through
  the API (remote SDK, one connection) versus the in-process SDK, alternated in the same
  run (goal: ratio <= 1.5);
* ``concurrent``: ``--clients`` clients (50) each doing ``--rounds`` (20) lifecycles at
  once: ``errors``, ``leaks`` (registry rows, runtime directories and cgroups left after
  all are done), ``p50_ms``, ``p99_ms``, ``max_ms``, ``wall_s`` and the server's RSS.

    python benchmarks/api.py --json [--clients 50 --rounds 20 --serial 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ironclaw.api.auth import create_token
from ironclaw.client import ApiClient
from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.store import Store
from ironclaw.sdk import Sandbox

CGROUP_ROOT = "ironclaw-bench-api"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def api_lifecycle(api: ApiClient) -> float:
    t0 = time.perf_counter()
    sid = (await api.create())["id"]
    try:
        result = await api.exec(sid, ["true"])
        assert result.exit_code == 0
    finally:
        await api.delete(sid)
    return (time.perf_counter() - t0) * 1000


async def sdk_lifecycle(manager: SandboxManager) -> float:
    t0 = time.perf_counter()
    async with Sandbox.create(manager=manager) as sb:
        result = await sb.exec(["true"])
        assert result.exit_code == 0
    return (time.perf_counter() - t0) * 1000


def leftovers(settings: Settings) -> dict[str, int]:
    import sqlite3

    db = sqlite3.connect(settings.registry_path)
    rows = db.execute("SELECT COUNT(*) FROM sandboxes").fetchone()[0]
    db.close()
    run = settings.runtime_dir / "sandboxes"
    dirs = len(list(run.iterdir())) if run.is_dir() else 0
    cgroups = sum(
        1
        for ctrl in Path("/sys/fs/cgroup").iterdir()
        if (ctrl / CGROUP_ROOT).is_dir()
        for d in (ctrl / CGROUP_ROOT).iterdir()
        if d.is_dir()
    )
    return {"registry_rows": rows, "runtime_dirs": dirs, "cgroups": cgroups}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ironclaw-bench-") as home:
        os.chmod(home, 0o700)
        env = {**os.environ, "IRONCLAW_HOME": home, "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
        os.environ.update(env)
        settings = Settings.from_env(env)
        settings.ensure()
        async with Store(settings.registry_path) as store:
            token, _ = await create_token(store, ["read", "write"])
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ironclaw.cli", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            if not line.startswith("listening on "):
                raise SystemExit(f"ironclaw serve did not start: {line!r}")
            url = line.split()[2]
            out = await measure(args, url, token, settings, proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        out["after_server_exit"] = leftovers(settings)
        async with SandboxManager(settings, cgroup_root=CGROUP_ROOT) as manager:
            for record in await manager.sandboxes():
                await manager.destroy(record.id)
        return out


async def measure(
    args: argparse.Namespace, url: str, token: str, settings: Settings, pid: int
) -> dict[str, Any]:
    api_ms: list[float] = []
    sdk_ms: list[float] = []
    async with (
        ApiClient(url, token) as api,
        SandboxManager(settings, cgroup_root=CGROUP_ROOT) as manager,
    ):
        for _ in range(3):  # warm both paths (imports, the server's first channel)
            await api_lifecycle(api)
            await sdk_lifecycle(manager)
        for _ in range(args.serial):
            api_ms.append(await api_lifecycle(api))
            sdk_ms.append(await sdk_lifecycle(manager))
    rss_before = rss_mib(pid)
    errors: list[str] = []
    lat: list[float] = []

    async def client() -> None:
        async with ApiClient(url, token, timeout=300) as api:
            for _ in range(args.rounds):
                try:
                    lat.append(await api_lifecycle(api))
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    async with ApiClient(url, token) as api:
        listed = len(await api.list_sandboxes())
    leaks = leftovers(settings)
    return {
        "api_p50_ms": round(statistics.median(api_ms), 1),
        "sdk_p50_ms": round(statistics.median(sdk_ms), 1),
        "ratio": round(statistics.median(api_ms) / statistics.median(sdk_ms), 3),
        "serial_runs": args.serial,
        "concurrent": {
            "clients": args.clients,
            "rounds": args.rounds,
            "lifecycles": len(lat),
            "errors": len(errors),
            "error_samples": errors[:3],
            "leaks": {"listed_by_api": listed, **leaks},
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "p99_ms": round(pct(lat, 99), 1) if lat else None,
            "max_ms": round(max(lat), 1) if lat else None,
            "wall_s": round(wall, 1),
            "server_rss_mib": {"before": round(rss_before, 1), "after": round(rss_mib(pid), 1)},
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--serial", type=int, default=30)
    ns = parser.parse_args()
    result = asyncio.run(main(ns))
    print(json.dumps(result) if ns.json else json.dumps(result, indent=2))
