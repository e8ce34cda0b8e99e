"""Seccomp profiles for the namespace jail, compiled to the BPF that ``bwrap --seccomp`` loads.

Pure: a profile name and the network decision go in, a classic-BPF program comes out
(libseccomp's ``export_bpf`` format: an array of ``struct sock_filter``, native endian).
The filters are deny-lists (default ALLOW): namespaces, uid mapping and cgroups are the
jail; seccomp removes the kernel interfaces that would let a process inside reach around
them or attack the kernel's rarely used corners. See docs/SECCOMP.md for the rationale of
every entry.

Architecture handling: only the native ABI is in the filter, and libseccomp sends every
other ABI to the "bad arch" action, which we set to KILL_PROCESS. On x86_64 that kills a
process on its first 32-bit (``int 0x80``) or x32 system call: the i386 ABI multiplexes
sockets through ``socketcall(2)``, whose arguments BPF cannot see, and both compat ABIs are
historic sources of kernel bugs. Sandboxes run 64-bit userlands.

Argument filters compare 64-bit registers while the kernel often reads only the low 32
bits of an ``int`` argument, so every argument rule here either masks to 32 bits or errs
towards denying values with junk in the high half (never towards allowing them).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
from dataclasses import dataclass
from typing import Final, Literal, get_args

import pyseccomp as sc

from ironclaw.errors import BackendError, ConfigError

__all__ = [
    "PROFILES",
    "SeccompProfile",
    "allowed_socket_families",
    "bpf_memfd",
    "compile_bpf",
    "denied_syscalls",
    "restricted_syscalls",
]

SeccompProfile = Literal["strict", "default", "permissive"]
PROFILES: Final[tuple[SeccompProfile, ...]] = get_args(SeccompProfile)

AF_UNIX: Final = 1
AF_INET: Final = 2
AF_INET6: Final = 10
AF_NETLINK: Final = 16
NETLINK_ROUTE: Final = 0

TIOCSTI: Final = 0x5412  # push bytes into a terminal's input: escapes to the host shell
TIOCLINUX: Final = 0x541C  # console selection paste: same effect on a virtual console
PERSONALITY_QUERY: Final = 0xFFFFFFFF  # personality(0xffffffff) only reads the value

_CLONE_NEW_FLAGS: Final = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
_LOW32: Final = 0xFFFFFFFF

# Syscalls newer than the libseccomp we may run against. Numbers from 424 up are the same
# on every architecture libseccomp supports (the unified syscall table).
_FALLBACK_NUMBERS: Final = {"open_tree_attr": 467}

# Host-dangerous in every profile: loading code into the kernel, reading other processes'
# memory, kernel keyrings, and anything that changes the mount table.
_PERMISSIVE: Final = frozenset(
    {
        # kernel code and state
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "create_module",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        # keyrings are not namespaced
        "keyctl",
        "add_key",
        "request_key",
        # other processes' memory
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        # mount family
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "move_mount",
        "open_tree",
        "open_tree_attr",
        "mount_setattr",
    }
)

# Default: also no new namespaces (the jail's own are final), no host-global knobs, and
# the interfaces with a long record of privilege-escalation bugs.
_DEFAULT_EXTRA: Final = frozenset(
    {
        "unshare",
        "setns",
        "chroot",
        "acct",
        "swapon",
        "swapoff",
        "reboot",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "adjtimex",
        "iopl",
        "ioperm",
        "modify_ldt",
        "open_by_handle_at",
        "name_to_handle_at",
        "lookup_dcookie",
        "quotactl",
        "quotactl_fd",
        "nfsservctl",
        "syslog",
        "vhangup",
        "uselib",
        "kcmp",
        "pidfd_getfd",
        "process_madvise",
        "get_kernel_syms",
        "query_module",
        "_sysctl",
        "sysfs",
        "ustat",
        "fanotify_init",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    }
)

# Strict: also the rarely needed interfaces that only widen the kernel surface.
_STRICT_EXTRA: Final = frozenset(
    {
        "personality",
        "vmsplice",
        "mbind",
        "set_mempolicy",
        "set_mempolicy_home_node",
        "migrate_pages",
        "move_pages",
        "io_setup",
        "io_destroy",
        "io_submit",
        "io_cancel",
        "io_getevents",
        "io_pgetevents",
    }
)

# Answered with ENOSYS, not EPERM: glibc then falls back to clone(2), whose flags BPF can
# inspect (clone3 passes them in memory, out of the filter's reach).
_ENOSYS: Final = frozenset({"clone3"})


@dataclass(frozen=True)
class _Spec:
    eperm: frozenset[str]
    enosys: frozenset[str]
    filter_clone_ns: bool
    filter_personality: bool
    netlink: Literal["all", "route", "none"]
    inet_possible: bool


_SPECS: Final[dict[str, _Spec]] = {
    "permissive": _Spec(_PERMISSIVE, frozenset(), False, False, "all", True),
    "default": _Spec(_PERMISSIVE | _DEFAULT_EXTRA, _ENOSYS, True, True, "route", True),
    "strict": _Spec(
        _PERMISSIVE | _DEFAULT_EXTRA | _STRICT_EXTRA, _ENOSYS, True, False, "none", False
    ),
}


def _spec(profile: str) -> _Spec:
    try:
        return _SPECS[profile]
    except KeyError:
        raise ConfigError(
            f"unknown seccomp profile {profile!r}: use one of {', '.join(PROFILES)}"
        ) from None


def denied_syscalls(profile: SeccompProfile) -> frozenset[str]:
    """Syscalls the profile refuses whatever their arguments (EPERM, ENOSYS for clone3)."""
    spec = _spec(profile)
    return spec.eperm | spec.enosys


def allowed_socket_families(profile: SeccompProfile, *, allow_inet: bool) -> frozenset[int]:
    """Address families ``socket(2)`` may create; everything else fails."""
    spec = _spec(profile)
    families = {AF_UNIX}
    if allow_inet and spec.inet_possible:
        families |= {AF_INET, AF_INET6}
    if spec.netlink != "none":
        families.add(AF_NETLINK)
    return frozenset(families)


def restricted_syscalls(profile: SeccompProfile, *, allow_inet: bool) -> dict[str, str]:
    """Syscalls denied only for some arguments, with the rule in words (for docs and tests)."""
    spec = _spec(profile)
    names = {AF_UNIX: "AF_UNIX", AF_INET: "AF_INET", AF_INET6: "AF_INET6", AF_NETLINK: "AF_NETLINK"}
    allowed = allowed_socket_families(profile, allow_inet=allow_inet)
    fams = ", ".join(names[f] for f in sorted(allowed))
    rules = {
        "ioctl": "TIOCSTI and TIOCLINUX -> EPERM",
        "socket": f"only {fams}; AF_INET/AF_INET6 -> EPERM, other families -> EAFNOSUPPORT",
        "socketpair": "only AF_UNIX; other families -> EAFNOSUPPORT",
    }
    if spec.netlink == "route":
        rules["socket"] += "; AF_NETLINK only with NETLINK_ROUTE, other protocols -> EPERM"
    if spec.filter_clone_ns:
        rules["clone"] = "any CLONE_NEW* flag -> EPERM"
    if spec.filter_personality:
        rules["personality"] = "anything but PER_LINUX (0) and the 0xffffffff query -> EPERM"
    return rules


def _resolve(name: str) -> int:
    nr = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
    if nr == -1:  # __NR_SCMP_ERROR: this libseccomp has never heard of the name
        try:
            return _FALLBACK_NUMBERS[name]
        except KeyError:
            raise BackendError(f"libseccomp does not know syscall {name!r}") from None
    return nr  # negative pseudo-numbers (absent on this arch) are ignored by libseccomp


def _clone_flags_arg() -> int:
    """Index of clone(2)'s flags argument: s390 swaps the first two."""
    return 1 if sc.system_arch() in (sc.Arch.S390, sc.Arch.S390X) else 0


def _deny_unless_in(
    flt: sc.SyscallFilter, syscall: int, arg: int, allowed: frozenset[int], errnos: dict[int, int]
) -> None:
    """Deny ``syscall`` unless argument ``arg`` (an int) is one of ``allowed``.

    Values up to the largest interesting one are matched exactly on the low 32 bits;
    everything above, including junk in the high half, is denied by one ``>=`` rule.
    """
    top = max([*allowed, *errnos])
    for value in range(top + 1):
        if value not in allowed:
            action = sc.ERRNO(errnos.get(value, errno.EAFNOSUPPORT))
            flt.add_rule(action, syscall, sc.Arg(arg, sc.MASKED_EQ, _LOW32, value))
    flt.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), syscall, sc.Arg(arg, sc.GE, top + 1))


def _build(profile: SeccompProfile, allow_inet: bool) -> sc.SyscallFilter:
    spec = _spec(profile)
    flt = sc.SyscallFilter(sc.ALLOW)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    eperm = sc.ERRNO(errno.EPERM)

    for name in sorted(spec.eperm):
        flt.add_rule(eperm, _resolve(name))
    for name in sorted(spec.enosys):
        flt.add_rule(sc.ERRNO(errno.ENOSYS), _resolve(name))

    ioctl = _resolve("ioctl")
    for cmd in (TIOCSTI, TIOCLINUX):
        flt.add_rule(eperm, ioctl, sc.Arg(1, sc.MASKED_EQ, _LOW32, cmd))

    if spec.filter_clone_ns:
        clone, arg = _resolve("clone"), _clone_flags_arg()
        for bit in _CLONE_NEW_FLAGS.values():
            flt.add_rule(eperm, clone, sc.Arg(arg, sc.MASKED_EQ, bit, bit))

    if spec.filter_personality:
        # A 32-bit value is neither 0 nor all ones iff, read cyclically, some set bit is
        # followed by a clear one: 32 single-comparison rules, exact on the low 32 bits.
        personality = _resolve("personality")
        for bit in range(32):
            nxt = (bit + 1) % 32
            mask = (1 << bit) | (1 << nxt)
            flt.add_rule(eperm, personality, sc.Arg(0, sc.MASKED_EQ, mask, 1 << bit))

    families = allowed_socket_families(profile, allow_inet=allow_inet)
    inet_errnos = {AF_INET: errno.EPERM, AF_INET6: errno.EPERM}
    _deny_unless_in(flt, _resolve("socket"), 0, families, inet_errnos)
    _deny_unless_in(flt, _resolve("socketpair"), 0, frozenset({AF_UNIX}), {})
    if spec.netlink == "route":
        # Protocol junk in the high half is denied too (GT compares all 64 bits).
        flt.add_rule(
            eperm,
            _resolve("socket"),
            sc.Arg(0, sc.MASKED_EQ, _LOW32, AF_NETLINK),
            sc.Arg(2, sc.GT, NETLINK_ROUTE),
        )
    return flt


def compile_bpf(profile: SeccompProfile, *, allow_inet: bool) -> bytes:
    """The profile as a BPF program for the native architecture, ready for ``--seccomp FD``.

    ``allow_inet`` follows the sandbox's network policy; ``strict`` never allows IP
    sockets. Raises :class:`ConfigError` for an unknown profile. Results are cached: there
    are only six distinct programs.
    """
    _spec(profile)
    return _compile_cached(profile, allow_inet)


@functools.lru_cache(maxsize=8)
def _compile_cached(profile: SeccompProfile, allow_inet: bool) -> bytes:
    try:
        flt = _build(profile, allow_inet)
        fd = os.memfd_create("ironclaw-seccomp", os.MFD_CLOEXEC)
        with os.fdopen(fd, "w+b") as buf:
            flt.export_bpf(buf)
            buf.seek(0)
            program = buf.read()
    except OSError as exc:
        raise BackendError(f"libseccomp could not build the {profile!r} filter: {exc}") from exc
    if not program or len(program) % 8:
        raise BackendError(f"libseccomp returned a malformed program ({len(program)} bytes)")
    return program


def bpf_memfd(program: bytes) -> int:
    """A sealed, close-on-exec memfd holding ``program``, positioned at 0.

    Hand it to the child with ``pass_fds`` and ``--seccomp <fd>``; sealing means nothing
    can change the filter between here and bwrap reading it. The caller closes it.
    """
    fd = os.memfd_create("ironclaw-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(program)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd
