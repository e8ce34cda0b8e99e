"""The namespace jail, with real bubblewrap and real syscalls: what code inside cannot do."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from ironclaw.host.manager import SandboxManager
from ironclaw.resources.procs import descendants, host_uid

pytestmark = pytest.mark.root

PROBE = r"""
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
res = {}
def sc(name, fn):
    ctypes.set_errno(0)
    r = fn()
    res[name] = errno.errorcode.get(ctypes.get_errno(), "OK") if r == -1 else "OK"
sc("ptrace", lambda: libc.ptrace(0, 0, 0, 0))
sc("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
sc("unshare_user", lambda: libc.unshare(0x10000000))
sc("unshare_net", lambda: libc.unshare(0x40000000))
sc("bpf", lambda: libc.syscall(321, 0, 0, 0))
sc("keyctl", lambda: libc.syscall(250, 0, 0, 0, 0, 0))
sc("setns", lambda: libc.setns(0, 0))
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM); res["af_inet"] = "OK"
except OSError as e:
    res["af_inet"] = errno.errorcode[e.errno]
status = {l.split(":")[0]: l.split(":", 1)[1].strip() for l in open("/proc/self/status")}
res["caps"] = {k: status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
res["uid"] = os.getuid()
print(json.dumps(res))
"""


@pytest.fixture
async def sandbox(manager: SandboxManager) -> tuple[SandboxManager, str]:
    record = await manager.create({"limits": {"memory_mib": 256, "pids": 128}})
    return manager, record.id


async def run(mgr: SandboxManager, sid: str, script: str, **kw: Any) -> Any:
    return await mgr.exec(sid, ["sh", "-c", script], **kw)


async def test_host_secrets_are_invisible(sandbox: tuple[SandboxManager, str]) -> None:
    mgr, sid = sandbox
    for path in ["/root", "/home", "/etc/shadow", "/var/lib/ironclaw", "/run/ironclaw", "/run"]:
        r = await run(mgr, sid, f"test -e {path} && echo PRESENT || echo absent")
        assert r.stdout.strip() == b"absent", path
    # IronClaw's own state (this test's IRONCLAW_HOME) is invisible as well.
    home = os.environ["IRONCLAW_HOME"]
    r = await run(mgr, sid, f"ls {home} 2>&1; echo rc=$?")
    assert b"rc=0" not in r.stdout
    # The synthetic /etc has no host accounts.
    r = await run(mgr, sid, "cat /etc/passwd")
    assert b"sandbox:x:1000" in r.stdout and b"/root" not in r.stdout


async def test_writes_outside_the_workspace_fail(sandbox: tuple[SandboxManager, str]) -> None:
    mgr, sid = sandbox
    for path in ["/usr/bin/x", "/etc/passwd", "/opt/ironclaw/x", "/x", "/proc/sys/kernel/hostname"]:
        r = await run(mgr, sid, f"echo pwn >> {path} && echo WROTE || echo refused")
        assert r.stdout.strip().endswith(b"refused"), (path, r.stdout, r.stderr)
    r = await run(mgr, sid, "echo ok > /workspace/f && cat /workspace/f && pwd")
    assert r.stdout == b"ok\n/workspace\n"


async def test_dangerous_syscalls_fail_with_eperm_and_caps_are_empty(
    sandbox: tuple[SandboxManager, str],
) -> None:
    mgr, sid = sandbox
    r = await mgr.exec(sid, ["python3", "-c", PROBE])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    for name in ("ptrace", "mount", "unshare_user", "unshare_net", "bpf", "keyctl", "setns"):
        assert res[name] == "EPERM", (name, res)
    assert res["af_inet"] in ("EPERM", "EAFNOSUPPORT", "EACCES")
    assert all(int(v, 16) == 0 for v in res["caps"].values()), res["caps"]
    assert res["uid"] == 1000


async def test_processes_are_unprivileged_on_the_host(sandbox: tuple[SandboxManager, str]) -> None:
    """Invariant 7: the host kernel never sees uid 0 for anything the sandbox runs."""
    mgr, sid = sandbox
    record = await mgr.get(sid)
    pid = int(record.info["pid"])
    r = await mgr.exec(sid, ["sh", "-c", "sleep 5 & echo $!"], timeout=10)
    assert r.exit_code == 0
    below = descendants(pid)
    uids = {host_uid(p) for p in [pid, *below]} - {-1}
    assert len(below) >= 3  # bwrap monitor, bwrap init, agent (and the sleeper)
    assert 0 not in uids, uids
    assert uids == {record.info["host_uid"]}


async def test_two_sandboxes_share_nothing(manager: SandboxManager) -> None:
    a = await manager.create(sandbox_id="ab-1")
    b = await manager.create(sandbox_id="a-b1")  # merged by the old '_' sanitisation
    assert a.info["socket"] != b.info["socket"]
    assert a.info["host_uid"] != b.info["host_uid"]
    dirs = {manager.settings.sandbox_runtime_dir(x.id) for x in (a, b)}
    assert len(dirs) == 2 and all(d.is_dir() for d in dirs)
    cga, cgb = manager.cgroups.open(a.id), manager.cgroups.open(b.id)
    assert set(cga.pids()).isdisjoint(cgb.pids()) and cga.pids() and cgb.pids()
    # A file written in one is not visible in the other.
    await manager.exec(a.id, ["sh", "-c", "echo secret > /workspace/s"])
    r = await manager.exec(b.id, ["sh", "-c", "cat /workspace/s 2>&1; echo rc=$?"])
    assert b"secret" not in r.stdout
    # Neither can see the other's processes.
    r = await manager.exec(b.id, ["sh", "-c", "ls /proc | grep -c '^[0-9]'"])
    assert int(r.stdout) <= 6


async def test_exec_streams_stdin_env_cwd_and_exit_codes(
    sandbox: tuple[SandboxManager, str],
) -> None:
    mgr, sid = sandbox
    r = await mgr.exec(sid, ["cat"], stdin=b"hello\x00world")
    assert r.stdout == b"hello\x00world"
    r = await mgr.exec(sid, ["sh", "-c", "echo $FOO; pwd; exit 7"], env={"FOO": "bar"}, cwd="/tmp")
    assert r.stdout == b"bar\n/tmp\n" and r.exit_code == 7
    r = await mgr.exec(sid, ["no-such-command"])
    assert r.exit_code == 127 and b"not found" in r.stderr
    r = await mgr.exec(sid, ["sh", "-c", "kill -9 $$"])
    assert r.exit_code == 137 and r.signal == 9


async def test_files_round_trip_large(sandbox: tuple[SandboxManager, str]) -> None:
    mgr, sid = sandbox
    data = os.urandom(5 * 1024 * 1024 + 7)
    assert await mgr.write_file(sid, "dir/blob.bin", data) == len(data)
    assert await mgr.read_file(sid, "dir/blob.bin") == data
    r = await mgr.exec(sid, ["sha256sum", "dir/blob.bin"])
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    guest = await mgr.guest(sid)
    assert [e.name for e in await guest.list("dir")] == ["blob.bin"]
    await guest.remove("dir", recursive=True)
    from ironclaw.errors import RpcError

    with pytest.raises(RpcError) as info:
        await mgr.read_file(sid, "dir/blob.bin")
    assert info.value.data["type"] == "FileNotFoundError"
