"""``make demo``: untrusted code in a real sandbox, and what it cannot do.

Until the agent lands, the main job is this: a sandbox runs a probe script that tries
what hostile code would try, and a table shows each attempt's outcome as the kernel
reported it. Nothing here is simulated; every row is a real syscall in a real jail.
"""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from ironclaw.host.manager import SandboxManager
from ironclaw.resources.procs import descendants, host_uid

__all__ = ["PROBE", "run_demo"]

# Runs inside the sandbox. Prints one JSON object: probe name -> outcome.
PROBE = r"""
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = "ALLOWED" + (f" ({r})" if r not in (None, 0) else "")
    except OSError as e:
        code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else str(e)
        out[name] = "blocked: " + code
def sysret(r):
    if r == -1:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    return r
attempt("read /etc/shadow", lambda: open("/etc/shadow").read(1))
attempt("list /root", lambda: os.listdir("/root"))
attempt("list /home", lambda: os.listdir("/home"))
attempt("write /usr/bin/evil", lambda: open("/usr/bin/evil", "w").write("x"))
attempt("write /etc/passwd", lambda: open("/etc/passwd", "a").write("x"))
attempt("ptrace(PTRACE_TRACEME)", lambda: sysret(libc.ptrace(0, 0, 0, 0)))
attempt("mount tmpfs", lambda: sysret(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
attempt("unshare(CLONE_NEWUSER)", lambda: sysret(libc.unshare(0x10000000)))
attempt("bpf()", lambda: sysret(libc.syscall(321, 0, 0, 0)))
attempt("keyctl()", lambda: sysret(libc.syscall(250, 0, 0, 0, 0, 0)))
attempt("socket(AF_INET)", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("write /workspace/ok.txt", lambda: open("/workspace/ok.txt", "w").write("fine"))
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
out["capabilities held"] = "none (CapEff=0)" if int(caps, 16) == 0 else "ALLOWED: " + caps
out["uid inside"] = str(os.getuid())
print(json.dumps(out))
"""

FORK_BOMB = "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived"
MEMORY_HOG = "import time; b = []\nwhile True: b.append(bytearray(16 << 20)); time.sleep(0.01)"


async def run_demo() -> int:
    console = Console()
    console.rule("[bold]IronClaw demo: untrusted code in a namespace sandbox")
    spec = {"limits": {"memory_mib": 128, "pids": 64, "wall_time_s": 120}}
    async with SandboxManager() as manager:
        t0 = time.monotonic()
        with console.status("creating sandbox…"):
            record = await manager.create(spec)
        console.print(
            f"sandbox [cyan]{record.id}[/] ready in {(time.monotonic() - t0) * 1000:.0f} ms "
            f"(backend {record.backend}, 128 MiB, 64 pids, no network)"
        )
        try:
            probe = await manager.exec(record.id, ["python3", "-c", PROBE], timeout=30)
            results = json.loads(probe.stdout or b"{}")
            table = Table("attempt", "outcome", title="What the untrusted code tried")
            for name, outcome in results.items():
                style = "red" if outcome.startswith("ALLOWED") and "workspace" not in name else ""
                table.add_row(name, f"[{style}]{outcome}[/]" if style else outcome)
            sup = int(record.info.get("pid", 0))
            host_uids = sorted({host_uid(p) for p in descendants(sup)} - {-1})
            table.add_row("uid as the host kernel sees it", ", ".join(map(str, host_uids)))
            bomb = await manager.exec(record.id, ["sh", "-c", FORK_BOMB], timeout=10)
            table.add_row("fork bomb", f"stopped: {bomb.status} (exit {bomb.exit_code})")
            hog = await manager.exec(record.id, ["python3", "-c", MEMORY_HOG], timeout=30)
            table.add_row("allocate memory without end", f"stopped: {hog.status}")
            sleeper = await manager.exec(record.id, ["sleep", "60"], timeout=1)
            table.add_row("sleep 60 with a 1 s limit", f"stopped: {sleeper.status}")
            console.print(table)
        finally:
            await manager.destroy(record.id)
        console.print(f"sandbox [cyan]{record.id}[/] destroyed; nothing of it remains.")
    return 0
