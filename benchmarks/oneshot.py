"""A whole one-shot CLI run against bare bubblewrap running the same command.

Times ``ironclaw exec -- python3 -c pass`` as a user runs it (a new process: interpreter
start, the CLI's imports, create, exec, destroy, exit) and the bare
``bwrap --unshare-all ... python3 -c pass`` (the same raw floor as start.py, with Python
instead of ``true``), interleaved so both see the same load, and prints one JSON line:
the p50 of each and their ``ratio``. IronClaw runs from compiled bytecode, as an
installed package does (pip compiles it at install): the package is compiled before the
timed runs, also where the environment sets PYTHONDONTWRITEBYTECODE. The CLI starts the
way the installed ``ironclaw`` command does: a console script (as pip writes it, for the
entry point pyproject.toml names) run by this interpreter, not ``python -m``.

The CLI takes its direct path (the command as the jail's process, no agent: see
``ironclaw.cli.oneshot``); ``--agent`` times the path through the manager and the guest
agent instead (``IRONCLAW_ONESHOT=agent``), for comparison.

Also in the same run: ``python_pass_p50_ms`` (this interpreter's bare start, with its
site-packages), ``breakdown_p50_ms`` (the CLI's own wall-clock steps, from
``IRONCLAW_TIMING``: imports, registry open, create (register, cgroups, launch), exec
(the command, to its end), destroy, close (the registry, and printing ``--json``), exit;
the interpreter's start before them is the rest of the total) and the load average, at
the start and at the end.

    python benchmarks/oneshot.py --json [--runs 30] [--agent]
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
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from start import RAW_BWRAP, drop, pct

COMMAND = ["python3", "-c", "pass"]
ROOT = Path(__file__).resolve().parent.parent
#: What pip writes for a console script (``bin/ironclaw``), for entry point "mod:func".
CONSOLE_SCRIPT = """#!{python}
import sys
from {module} import {func}
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit({func}())
"""


def console_script(directory: Path) -> Path:
    """The ``ironclaw`` command as an install makes it, from pyproject.toml's entry point."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        entry = tomllib.load(f)["project"]["scripts"]["ironclaw"]
    module, func = entry.split(":")
    path = directory / "ironclaw"
    path.write_text(CONSOLE_SCRIPT.format(python=sys.executable, module=module, func=func))
    path.chmod(0o755)
    return path


def timed(
    argv: list[str],
    env: dict[str, str] | None = None,
    preexec: object = None,
    marks: list[dict[str, float]] | None = None,
) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(
        argv,
        check=True,
        env=env,
        preexec_fn=preexec,  # type: ignore[arg-type]
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if marks is not None else None,
    )
    took = (time.perf_counter() - t0) * 1000
    if marks is not None:
        for line in p.stderr.decode().splitlines():
            if line.startswith("ironclaw-timing: "):
                marks.append(json.loads(line.removeprefix("ironclaw-timing: ")))
    return took


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--agent", action="store_true", help="through the guest agent")
    args = parser.parse_args()

    import ironclaw  # the package the CLI below runs (PYTHONPATH applies to both)

    compileall.compile_dir(Path(ironclaw.__file__).parent, quiet=1)
    bare = [*RAW_BWRAP[:-1], "/usr/bin/python3", "-c", "pass"]
    cli: list[float] = []
    raw: list[float] = []
    interp: list[float] = []
    marks: list[dict[str, float]] = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ironclaw-bench-") as home:
        os.chmod(home, 0o700)
        env = {**os.environ, "IRONCLAW_HOME": home, "IRONCLAW_TIMING": "1"}
        env.pop("IRONCLAW_ONESHOT", None)
        if args.agent:
            env["IRONCLAW_ONESHOT"] = "agent"
        ironclaw = [str(console_script(Path(home))), "exec", "--", *COMMAND]
        for _ in range(2):  # warm caches: the guest bundle is built on the first run
            timed(ironclaw, env, marks=[])
        for _ in range(args.runs):
            cli.append(timed(ironclaw, env, marks=marks))
            raw.append(timed(bare, preexec=drop))
            interp.append(timed([sys.executable, "-c", "pass"]))
    steps = list(marks[0]) if marks else []
    doc = {
        "benchmark": "oneshot",
        "runs": args.runs,
        "path": "agent" if args.agent else "direct",
        "command": " ".join(COMMAND),
        "ironclaw_exec_p50_ms": round(statistics.median(cli), 2),
        "ironclaw_exec_p99_ms": round(pct(cli, 0.99), 2),
        "bare_bwrap_p50_ms": round(statistics.median(raw), 2),
        "ratio": round(statistics.median(cli) / statistics.median(raw), 2),
        "python_pass_p50_ms": round(statistics.median(interp), 2),
        "breakdown_p50_ms": {k: round(statistics.median(m[k] for m in marks), 2) for k in steps},
        "loadavg": [round(x, 2) for x in (*load, *os.getloadavg())],
        "target_ratio": 8.0,
        "target_p50_ms": 100.0,
    }
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
