"""Seccomp profiles, checked with real system calls under the real filter.

A child Python loads the compiled BPF with prctl/seccomp(2) and makes each probe call in
a forked grandchild; the same probes run once without a filter as the control. A probe
the profile denies must answer the profile's errno; every other probe must behave exactly
as it does unfiltered, so over-blocking fails too. Probe arguments are chosen to fail
harmlessly when unfiltered (missing paths, bad fds, invalid flags).
"""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyseccomp as sc
import pytest

from ironclaw.errors import ConfigError
from ironclaw.policy.seccomp import (
    PROFILES,
    SeccompProfile,
    allowed_socket_families,
    bpf_memfd,
    compile_bpf,
    denied_syscalls,
    restricted_syscalls,
)

pytestmark = pytest.mark.timeout(120)

IS_X86_64 = platform.machine() == "x86_64"

# Runs in the child: load the filter (if a path is given), then run every probe in its own
# forked process so state-changing calls (unshare, personality) cannot affect the next.
PROBE_SCRIPT = r"""
import ctypes, json, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def load(path):
    data = open(path, "rb").read()
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(data, len(data))
    prog = Prog(len(data) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl")
    if libc.syscall(SECCOMP_NR, 1, 0, ctypes.byref(prog)) != 0:  # SET_MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp")

def arg(a):
    if isinstance(a, dict):
        if "s" in a:
            return ctypes.c_char_p(a["s"].encode())
        return ctypes.create_string_buffer(a["buf"])
    return ctypes.c_long(a) if a < 0 else ctypes.c_ulong(a)

def int80_getpid():
    # mov eax, 20 (i386 getpid); int 0x80; ret
    code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_int)(addr)()

def run(probe):
    pid = os.fork()
    if pid == 0:
        try:
            if probe["nr"] == "int80":
                r, err = int80_getpid(), 0
                err = -r if r < 0 else 0
            else:
                r = libc.syscall(probe["nr"], *[arg(a) for a in probe["args"]])
                err = ctypes.get_errno() if r < 0 else 0
            os._exit(err)
        finally:
            os._exit(99)  # never reached unless an exception escaped
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signal:%d" % os.WTERMSIG(status)
    return os.WEXITSTATUS(status)

def main():
    spec = json.load(sys.stdin)
    global SECCOMP_NR
    SECCOMP_NR = spec["seccomp_nr"]
    if spec["bpf"]:
        load(spec["bpf"])
    out = {}
    for name, probe in spec["probes"].items():
        out[name] = run(probe)
    json.dump(out, sys.stdout)

main()
"""

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SIGCHLD = 17
MISSING = {"s": "/nonexistent-ironclaw-probe"}
NOPID = 0x3FFFFFFF
HIGH = 1 << 32  # junk in the high half of a 64-bit register

# name -> (syscall, args). Every one is harmless when unfiltered, even as root.
PROBES: dict[str, tuple[str, list[Any]]] = {
    "getpid": ("getpid", []),
    "ptrace": ("ptrace", [16, NOPID, 0, 0]),  # PTRACE_ATTACH
    "mount": ("mount", [{"s": "none"}, MISSING, {"s": "tmpfs"}, 0, 0]),
    "umount2": ("umount2", [MISSING, 0]),
    "pivot_root": ("pivot_root", [MISSING, MISSING]),
    "chroot": ("chroot", [MISSING]),
    "fsopen": ("fsopen", [{"s": "ironclaw-nofs"}, 0]),
    "open_tree": ("open_tree", [-1, MISSING, 0]),
    "move_mount": ("move_mount", [-1, MISSING, -1, MISSING, 0]),
    "mount_setattr": ("mount_setattr", [-1, MISSING, 0, 0, 0]),
    "unshare_user": ("unshare", [CLONE_NEWUSER]),
    "unshare_net": ("unshare", [CLONE_NEWNET]),
    "setns": ("setns", [-1, 0]),
    "clone_plain": ("clone", [SIGCHLD, 0, 0, 0, 0]),
    "clone_newuser": ("clone", [CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0]),
    "clone_newnet": ("clone", [CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0]),
    "clone_newpid": ("clone", [CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0]),
    "clone_newns": ("clone", [CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0]),
    "clone3": ("clone3", [0, 0]),
    "bpf": ("bpf", [0xFFFF, 0, 0]),
    "perf_event_open": ("perf_event_open", [0, 0, -1, -1, 0]),
    "keyctl": ("keyctl", [9999, 0, 0, 0, 0]),
    "add_key": ("add_key", [0, 0, 0, 0, 0]),
    "request_key": ("request_key", [0, 0, 0, 0]),
    "userfaultfd": ("userfaultfd", [0x80000]),
    "kexec_load": ("kexec_load", [0, 0, 0, 0xDEAD0000]),
    "kexec_file_load": ("kexec_file_load", [-1, -1, 0, 0, 0xDEAD0000]),
    "init_module": ("init_module", [0, 0, {"s": ""}]),
    "finit_module": ("finit_module", [-1, {"s": ""}, 0]),
    "delete_module": ("delete_module", [{"s": "ironclaw_no_such_module"}, 0x800]),
    "process_vm_readv": ("process_vm_readv", [NOPID, 0, 0, 0, 0, 0]),
    "process_vm_writev": ("process_vm_writev", [NOPID, 0, 0, 0, 0, 0]),
    "ioctl_tiocsti": ("ioctl", [-1, 0x5412, 0]),
    "ioctl_tiocsti_high": ("ioctl", [-1, HIGH | 0x5412, 0]),
    "ioctl_tioclinux": ("ioctl", [-1, 0x541C, 0]),
    "ioctl_fionread": ("ioctl", [-1, 0x541B, 0]),
    "personality_query": ("personality", [0xFFFFFFFF]),
    "personality_linux": ("personality", [0]),
    "personality_norandom": ("personality", [0x0040000]),
    "acct": ("acct", [MISSING]),
    "swapon": ("swapon", [MISSING, 0]),
    "swapoff": ("swapoff", [MISSING]),
    "reboot": ("reboot", [0, 0, 0, 0]),  # wrong magic: EINVAL
    "settimeofday": ("settimeofday", [0, 0]),
    "clock_settime": ("clock_settime", [1, {"buf": 16}]),  # CLOCK_MONOTONIC: EINVAL
    "adjtimex": ("adjtimex", [{"buf": 512}]),  # modes 0: read only
    "clock_adjtime": ("clock_adjtime", [1, {"buf": 512}]),
    "iopl": ("iopl", [0]),
    "ioperm": ("ioperm", [0, 0, 0]),
    "modify_ldt": ("modify_ldt", [0, {"buf": 64}, 64]),
    "open_by_handle_at": ("open_by_handle_at", [-1, 0, 0]),
    "name_to_handle_at": ("name_to_handle_at", [-1, MISSING, 0, 0, 0]),
    "lookup_dcookie": ("lookup_dcookie", [0, 0, 0]),
    "quotactl": ("quotactl", [0, 0, 0, 0]),
    "nfsservctl": ("nfsservctl", [0, 0, 0]),
    "syslog": ("syslog", [10, 0, 0]),  # SYSLOG_ACTION_SIZE_BUFFER
    "vhangup": ("vhangup", []),  # no controlling tty (new session): no effect
    "uselib": ("uselib", [MISSING]),
    "kcmp": ("kcmp", [NOPID, NOPID, 0, 0, 0]),
    "pidfd_getfd": ("pidfd_getfd", [-1, 0, 0]),
    "io_uring_setup": ("io_uring_setup", [0, 0]),
    "io_uring_enter": ("io_uring_enter", [-1, 0, 0, 0, 0, 0]),
    "io_uring_register": ("io_uring_register", [-1, 0, 0, 0]),
    "vmsplice": ("vmsplice", [-1, 0, 0, 0]),
    "mbind": ("mbind", [0, 0, 0, 0, 0, 0]),
    "set_mempolicy": ("set_mempolicy", [0, 0, 0]),
    "io_setup": ("io_setup", [0, 0]),
    "sock_unix": ("socket", [1, 1, 0]),
    "sock_inet": ("socket", [2, 1, 0]),
    "sock_inet6": ("socket", [10, 1, 0]),
    "sock_inet_high": ("socket", [HIGH | 2, 1, 0]),
    "sock_unix_high": ("socket", [HIGH | 1, 1, 0]),
    "sock_netlink_route": ("socket", [16, 3, 0]),
    "sock_netlink_audit": ("socket", [16, 3, 9]),
    "sock_netlink_route_high": ("socket", [16, 3, HIGH]),
    "sock_packet": ("socket", [17, 3, 0]),
    "sock_key": ("socket", [15, 3, 2]),
    "sock_alg": ("socket", [38, 5, 0]),
    "sock_vsock": ("socket", [40, 1, 0]),
    "sock_af0": ("socket", [0, 1, 0]),
    "socketpair_unix": ("socketpair", [1, 1, 0, {"buf": 8}]),
    "socketpair_inet": ("socketpair", [2, 1, 0, {"buf": 8}]),
}
if IS_X86_64:
    PROBES["x32_getpid"] = ("x32:getpid", [])


def _probe_specs() -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    for name, (call, args) in PROBES.items():
        if call.startswith("x32:"):
            nr = 0x40000000 | sc.resolve_syscall(sc.Arch.NATIVE, call[4:])
        else:
            nr = sc.resolve_syscall(sc.Arch.NATIVE, call)
            if nr < 0:
                continue  # not on this architecture
        specs[name] = {"nr": nr, "args": args}
    if IS_X86_64:
        specs["int80_getpid"] = {"nr": "int80", "args": []}
    return specs


def run_probes(
    tmp_path: Path, bpf: bytes | None, probes: dict[str, dict[str, Any]] | None = None
) -> dict[str, int | str]:
    path = ""
    if bpf is not None:
        path = str(tmp_path / "filter.bpf")
        Path(path).write_bytes(bpf)
    spec = {
        "seccomp_nr": sc.resolve_syscall(sc.Arch.NATIVE, "seccomp"),
        "bpf": path,
        "probes": _probe_specs() if probes is None else probes,
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_SCRIPT],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling tty: vhangup is a no-op
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, int | str] = json.loads(proc.stdout)
    return result


def expected_denials(profile: SeccompProfile, allow_inet: bool) -> dict[str, int | str]:
    """Probe -> what the filter must answer; probes not listed must match the control."""
    denied = denied_syscalls(profile)
    out: dict[str, int | str] = {}
    for name, (call, _) in PROBES.items():
        if call in denied:
            out[name] = errno.ENOSYS if call == "clone3" else errno.EPERM
    # Argument rules, in every profile.
    out.update(
        ioctl_tiocsti=errno.EPERM,
        ioctl_tiocsti_high=errno.EPERM,
        ioctl_tioclinux=errno.EPERM,
        sock_packet=errno.EAFNOSUPPORT,
        sock_key=errno.EAFNOSUPPORT,
        sock_alg=errno.EAFNOSUPPORT,
        sock_vsock=errno.EAFNOSUPPORT,
        sock_af0=errno.EAFNOSUPPORT,
        sock_unix_high=errno.EAFNOSUPPORT,
        socketpair_inet=errno.EAFNOSUPPORT,
    )
    if not (allow_inet and profile != "strict"):
        out.update(sock_inet=errno.EPERM, sock_inet6=errno.EPERM)
    # Junk in the high half is refused; which of the two overlapping rules answers is
    # libseccomp's choice.
    out["sock_inet_high"] = "denied"
    if profile == "strict":
        out.update(
            sock_netlink_route=errno.EAFNOSUPPORT,
            sock_netlink_audit=errno.EAFNOSUPPORT,
            sock_netlink_route_high=errno.EAFNOSUPPORT,
        )
    if profile == "default":
        out.update(sock_netlink_audit=errno.EPERM, sock_netlink_route_high=errno.EPERM)
    if profile in ("default", "strict"):
        for flag in ("newuser", "newnet", "newpid", "newns"):
            out[f"clone_{flag}"] = errno.EPERM
    if profile == "default":
        out["personality_norandom"] = errno.EPERM
    # Foreign ABIs are killed, whatever the profile.
    sigsys = f"signal:{int(signal.SIGSYS)}"
    out.update(x32_getpid=sigsys, int80_getpid=sigsys)
    return out


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int | str]:
    results = run_probes(tmp_path_factory.mktemp("control"), None)
    # The probes must be meaningful: unfiltered, none of them answers what the filter would.
    for name in ("ptrace", "mount", "unshare_user", "clone_newuser", "bpf", "keyctl"):
        assert results[name] not in (errno.EPERM, errno.ENOSYS), (name, results[name])
    assert results["clone3"] == errno.EINVAL
    assert results["sock_inet"] == 0
    assert results["sock_packet"] == 0  # we are root: only the filter can refuse it
    return results


@pytest.mark.root
@pytest.mark.parametrize("allow_inet", [False, True])
@pytest.mark.parametrize("profile", PROFILES)
def test_profile_under_real_syscalls(
    tmp_path: Path, control: dict[str, int | str], profile: SeccompProfile, allow_inet: bool
) -> None:
    filtered = run_probes(tmp_path, compile_bpf(profile, allow_inet=allow_inet))
    expected = expected_denials(profile, allow_inet)
    mismatches = {}
    for name, got in filtered.items():
        want = expected.get(name, control[name])
        if want == "denied" and got in (errno.EPERM, errno.EAFNOSUPPORT):
            continue
        if got != want:
            mismatches[name] = {"got": got, "want": want, "unfiltered": control[name]}
    assert not mismatches


@pytest.mark.root
@pytest.mark.parametrize("profile", PROFILES)
def test_every_listed_syscall_is_denied(tmp_path: Path, profile: SeccompProfile) -> None:
    """Sweep: each name in the profile, called with all arguments -1, gets the profile's errno.

    Only runs under the filter; -1 everywhere is an invalid fd, pointer and flag set, so
    even a broken filter could not make these calls do anything.
    """
    probes = {}
    for name in denied_syscalls(profile):
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if name == "open_tree_attr" and nr == -1:
            nr = 467
        if nr >= 0:
            probes[name] = {"nr": nr, "args": [-1] * 6}
    assert len(probes) >= len(denied_syscalls(profile)) - 12  # a few are not on every arch
    got = run_probes(tmp_path, compile_bpf(profile, allow_inet=True), probes)
    want = {n: errno.ENOSYS if n == "clone3" else errno.EPERM for n in probes}
    assert got == want


def test_int80_probe_is_meaningful(control: dict[str, int | str]) -> None:
    if not IS_X86_64:
        pytest.skip("x86_64 only")
    # With IA-32 emulation the unfiltered call succeeds, so SIGSYS under the filter is ours.
    assert control["int80_getpid"] in (0, f"signal:{int(signal.SIGSEGV)}")
    assert control["x32_getpid"] == errno.ENOSYS


LOADER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
data = open(sys.argv[1], "rb").read()
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buf = ctypes.create_string_buffer(data, len(data))
prog = Prog(len(data) // 8, ctypes.cast(buf, ctypes.c_void_p))
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP
os.execvp(sys.argv[2], sys.argv[2:])
"""

NORMAL_PYTHON = r"""
import socket, subprocess, threading, tempfile, os
out = []
t = threading.Thread(target=lambda: out.append(sum(range(1000))))
t.start(); t.join()
a, b = socket.socketpair()
a.sendall(b"ping"); assert b.recv(4) == b"ping"
r = subprocess.run(["sh", "-c", "echo sub"], capture_output=True, text=True, check=True)
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "f"), "w").write("x")
print(out[0], r.stdout.strip())
"""


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["python3", "-c", NORMAL_PYTHON], "499500 sub"),
        (["sh", "-c", "echo hi | cat; ls / >/dev/null && echo listed"], "hi\nlisted"),
    ],
    ids=["python-threads-subprocess", "sh-pipe-ls"],
)
def test_normal_programs_still_work(
    tmp_path: Path, profile: SeccompProfile, argv: list[str], want: str
) -> None:
    bpf = tmp_path / "f.bpf"
    bpf.write_bytes(compile_bpf(profile, allow_inet=False))
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(bpf), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == want


BWRAP_CHECK = r"""
import ctypes, errno, socket
libc = ctypes.CDLL(None, use_errno=True)
res = {}
for fam in ("AF_UNIX", "AF_INET"):
    try:
        socket.socket(getattr(socket, fam)).close(); res[fam] = 0
    except OSError as e:
        res[fam] = e.errno
res["unshare"] = 0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno()
print(res)
"""


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.root
@pytest.mark.parametrize("allow_inet", [False, True])
def test_bwrap_accepts_filter_as_unprivileged_user(allow_inet: bool) -> None:
    """The exact hand-over the backend uses: sealed memfd -> ``bwrap --seccomp FD``."""
    fd = bpf_memfd(compile_bpf("default", allow_inet=allow_inet))
    try:
        proc = subprocess.run(
            [
                *("bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"),
                *("--unshare-all", "--die-with-parent", "--seccomp", str(fd)),
                *("python3", "-c", BWRAP_CHECK),
            ],
            pass_fds=(fd,),
            preexec_fn=_as_nobody,  # single-threaded test process
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    inet = 0 if allow_inet else errno.EPERM
    assert proc.stdout.strip() == str({"AF_UNIX": 0, "AF_INET": inet, "unshare": errno.EPERM})


def test_bpf_memfd_is_sealed() -> None:
    program = compile_bpf("default", allow_inet=False)
    fd = bpf_memfd(program)
    try:
        assert os.read(fd, len(program) + 1) == program
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


def test_program_shape() -> None:
    for profile in PROFILES:
        for allow_inet in (False, True):
            prog = compile_bpf(profile, allow_inet=allow_inet)
            assert len(prog) % 8 == 0
            assert 0 < len(prog) // 8 <= 4096  # BPF_MAXINSNS
    assert compile_bpf("default", allow_inet=True) != compile_bpf("default", allow_inet=False)
    assert compile_bpf("strict", allow_inet=True) == compile_bpf("strict", allow_inet=False)


def test_unknown_profile_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown seccomp profile"):
        compile_bpf("lenient", allow_inet=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        denied_syscalls("")  # type: ignore[arg-type]


def test_families_and_rules() -> None:
    assert allowed_socket_families("default", allow_inet=False) == {1, 16}
    assert allowed_socket_families("default", allow_inet=True) == {1, 2, 10, 16}
    assert allowed_socket_families("strict", allow_inet=True) == {1}
    assert allowed_socket_families("permissive", allow_inet=False) == {1, 16}
    assert "clone" in restricted_syscalls("default", allow_inet=False)
    assert "clone" not in restricted_syscalls("permissive", allow_inet=False)


GOLDEN_PERMISSIVE = {
    "add_key",
    "bpf",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "request_key",
    "umount2",
    "userfaultfd",
}
GOLDEN_DEFAULT = GOLDEN_PERMISSIVE | {
    "_sysctl",
    "acct",
    "adjtimex",
    "chroot",
    "clock_adjtime",
    "clock_settime",
    "clone3",
    "fanotify_init",
    "get_kernel_syms",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "lookup_dcookie",
    "modify_ldt",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "pidfd_getfd",
    "process_madvise",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "syslog",
    "unshare",
    "uselib",
    "ustat",
    "vhangup",
}
GOLDEN_STRICT = GOLDEN_DEFAULT | {
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_setup",
    "io_submit",
    "mbind",
    "migrate_pages",
    "move_pages",
    "personality",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "vmsplice",
}


def test_golden_denied_sets() -> None:
    """Changing a profile is a deliberate act: update docs/SECCOMP.md and this list."""
    assert denied_syscalls("permissive") == GOLDEN_PERMISSIVE
    assert denied_syscalls("default") == GOLDEN_DEFAULT
    assert denied_syscalls("strict") == GOLDEN_STRICT


def test_every_denied_name_resolves() -> None:
    """A typo would silently deny nothing; every name must be a syscall libseccomp knows."""
    every = GOLDEN_STRICT - {"open_tree_attr"}  # newer than some libseccomp releases
    for name in every:
        assert sc.resolve_syscall(sc.Arch.X86_64, name) != -1 or (
            sc.resolve_syscall(sc.Arch.AARCH64, name) != -1
        ), name
