"""A whole one-shot CLI run against bare bubblewrap running the same command.

Times ``ironclaw exec -- python3 -c pass`` as a user runs it (a new process: interpreter
start, the CLI's imports, create, exec, destroy, exit) and the bare
``bwrap --unshare-all ... python3 -c pass`` (the same raw floor as start.py, with Python
instead of ``true``), interleaved so both see the same load, and prints one JSON line:
the p50 of each and their ``ratio``. IronClaw runs from compiled bytecode, as an
installed package does (pip compiles it at install): the package is compiled before the
timed runs, also where the environment sets PYTHONDONTWRITEBYTECODE.

    python benchmarks/oneshot.py --json [--runs 30]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from start import RAW_BWRAP, drop, pct

COMMAND = ["python3", "-c", "pass"]


def timed(argv: list[str], env: dict[str, str] | None = None, preexec: object = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, preexec_fn=preexec, stdout=subprocess.DEVNULL)  # type: ignore[arg-type]
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    import ironclaw  # the package the CLI below runs (PYTHONPATH applies to both)

    compileall.compile_dir(Path(ironclaw.__file__).parent, quiet=1)
    bare = [*RAW_BWRAP[:-1], "/usr/bin/python3", "-c", "pass"]
    cli: list[float] = []
    raw: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ironclaw-bench-") as home:
        os.chmod(home, 0o700)
        env = {**os.environ, "IRONCLAW_HOME": home}
        ironclaw = [sys.executable, "-m", "ironclaw.cli", "exec", "--", *COMMAND]
        for _ in range(2):  # warm caches: the guest bundle is built on the first run
            timed(ironclaw, env)
        for _ in range(args.runs):
            cli.append(timed(ironclaw, env))
            raw.append(timed(bare, preexec=drop))
    doc = {
        "benchmark": "oneshot",
        "runs": args.runs,
        "command": " ".join(COMMAND),
        "ironclaw_exec_p50_ms": round(statistics.median(cli), 2),
        "ironclaw_exec_p99_ms": round(pct(cli, 0.99), 2),
        "bare_bwrap_p50_ms": round(statistics.median(raw), 2),
        "ratio": round(statistics.median(cli) / statistics.median(raw), 2),
        "target_ratio": 8.0,
        "target_p50_ms": 100.0,
    }
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
