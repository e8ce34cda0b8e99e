"""The jail's command lines, built in one place: bubblewrap's, and the exec chain that
turns root into the sandbox's unprivileged launcher before it (see :mod:`.backend`).

Pure functions of the spec (apart from looking at which of ``/bin``, ``/lib``... are
symlinks on this host), so they are golden-testable without starting anything.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path
from typing import TYPE_CHECKING, dataclass_transform

if TYPE_CHECKING:  # annotations only: the launch path loads without pydantic
    from ironclaw.spec import SandboxSpec

__all__ = [
    "GUEST_GID",
    "GUEST_UID",
    "GUEST_ZIP",
    "LAUNCH_SCRIPT",
    "WORKSPACE",
    "JailFds",
    "PlainRecord",
    "bwrap_argv",
    "etc_files",
    "launch_chain",
]

GUEST_UID = 1000
GUEST_GID = 1000
GUEST_ZIP = "/opt/ironclaw/ironclaw.zip"
WORKSPACE = "/workspace"
MiB = 1024 * 1024

_AGENT_BOOT = (
    "import sys; sys.path.insert(0, {zip!r}); "
    "from ironclaw.guest.__main__ import main; sys.exit(main(sys.argv[1:]))"
)

# Host files the "host" image shares read-only; everything else in /etc is synthetic.
_HOST_ETC_BINDS = ("ld.so.cache", "alternatives", "ssl", "ca-certificates", "localtime")
_USR_LINKS = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")


def etc_files(hostname: str) -> dict[str, bytes]:
    """The synthetic /etc of the "host" image: no host accounts, no secrets."""
    return {
        "passwd": (
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
            f"sandbox:x:{GUEST_UID}:{GUEST_GID}:sandbox:{WORKSPACE}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "group": f"root:x:0:\nsandbox:x:{GUEST_GID}:\nnogroup:x:65534:\n".encode(),
        "hostname": f"{hostname}\n".encode(),
        "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost\n".encode(),
        "nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files dns\n",
        "resolv.conf": b"# no resolver: names are resolved by the egress proxy, if any\n",
    }


@dataclass_transform(kw_only_default=True)
class PlainRecord:
    """A keyword-only record: its fields are its class's annotations, a default is a
    class attribute. The launch path's records (here and in :mod:`.launch`) are these,
    not dataclasses: each dataclass costs the one-shot CLI's start-up about a
    millisecond (its methods are generated with exec), and :mod:`ironclaw.proto.records`
    loads the channel's frame module with it (tens of ms). Type checkers read the fields
    as a dataclass's; at run time the constructor only stores what it is given.
    """

    __slots__ = ()

    def __init__(self, **fields: object) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


class JailFds(PlainRecord):
    """Descriptors handed to bubblewrap; closed in the parent once it started.

    ``guest_zip`` and ``listen`` are the agent's: a jail that runs the user's command
    directly (the one-shot ``ironclaw exec``) has neither.
    """

    seccomp: int
    etc: dict[str, int]
    status: int
    guest_zip: int | None = None
    listen: int | None = None

    def all(self) -> list[int]:
        extra = [fd for fd in (self.guest_zip, self.listen) if fd is not None]
        return [self.seccomp, *extra, self.status, *self.etc.values()]

    def close(self) -> None:
        # ``listen`` belongs to its socket object, which closes it exactly once: closing
        # the number here too could close another sandbox's descriptor that reused it.
        for fd in self.all():
            if fd != self.listen:
                with contextlib.suppress(OSError):
                    os.close(fd)


def bwrap_argv(
    spec: SandboxSpec,
    *,
    hostname: str,
    fds: JailFds,
    share_net: bool,
    extra_env: dict[str, str] | None = None,
    bwrap: str = "bwrap",
    payload: list[str] | None = None,
) -> list[str]:
    """The full bubblewrap command line for ``spec`` (pure: golden-testable).

    It runs the guest agent (on ``fds.listen``, its code from ``fds.guest_zip``), or with
    ``payload`` that command instead: the same jail, the user's command as its process.
    """
    lim = spec.limits
    a: list[str] = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        str(GUEST_UID),
        "--gid",
        str(GUEST_GID),
        "--hostname",
        hostname,
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    if share_net:
        a.append("--share-net")
    for name in _USR_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            a += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            a += ["--ro-bind", str(host), f"/{name}"]
    a += ["--proc", "/proc", "--dev", "/dev", "--dir", "/etc"]
    for name in _HOST_ETC_BINDS:
        if (Path("/etc") / name).exists():
            a += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for name, fd in sorted(fds.etc.items()):
        a += ["--perms", "0444", "--file", str(fd), f"/etc/{name}"]
    if fds.guest_zip is not None:
        a += ["--perms", "0555", "--dir", "/opt/ironclaw"]
        a += ["--perms", "0444", "--file", str(fds.guest_zip), GUEST_ZIP]
    a += ["--perms", "1777", "--size", str(lim.tmp_mib * MiB), "--tmpfs", "/tmp"]
    a += ["--perms", "0755", "--size", str(lim.workspace_mib * MiB), "--tmpfs", WORKSPACE]
    a += ["--symlink", "/tmp", "/var/tmp"]
    for m in spec.mounts:
        a += ["--bind" if m.writable else "--ro-bind", m.source, m.target]
    a += ["--remount-ro", "/"]
    a += ["--seccomp", str(fds.seccomp), "--json-status-fd", str(fds.status)]
    a += ["--chdir", WORKSPACE, "--clearenv"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": WORKSPACE,
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        **(extra_env or {}),
        **spec.env,
    }
    for k, v in env.items():
        a += ["--setenv", k, v]
    if payload is not None:
        return [*a, "--", *payload]
    if fds.listen is None or fds.guest_zip is None:
        raise ValueError("the guest agent needs its listening socket and its code")
    a += [
        "--",
        "/usr/bin/python3",
        "-I",
        "-S",
        "-B",
        "-c",
        _AGENT_BOOT.format(zip=GUEST_ZIP),
        "--listen-fd",
        str(fds.listen),
        "--workdir",
        WORKSPACE,
    ]
    return a


# The launcher's last steps as root, as an exec chain rather than a Python preexec hook:
# without a hook, Python starts the child with vfork, which does not copy the
# orchestrator's page tables. (A plain fork of a large process holds its memory-map lock
# for milliseconds, stalling the event loop's thread even when done on another thread.)
#   sh      waits until the parent has put it in the sandbox's cgroups (a "go" line on
#           its stdin, a pipe), then sets the rlimits: all after inherit both;
#   nsenter enters the sandbox's network namespace (when it has one);
#   setpriv drops to the sandbox's host uid, no supplementary groups, and for a one-shot
#           sandbox asks for SIGKILL when the orchestrator goes away.
LAUNCH_SCRIPT = (
    'read -r go && [ "$go" = go ] || exit 97; exec </dev/null; '
    'ulimit -c "$1" && ulimit -n "$2" && ulimit -f "$3" || exit 98; shift 3; exec "$@"'
)


def launch_chain(
    *,
    uid: int,
    limits: list[tuple[int, int, int]],
    netns_path: str | None,
    die_with_parent: bool,
    sh: str = "/bin/sh",
    nsenter: str = "nsenter",
    setpriv: str = "setpriv",
) -> list[str]:
    """The argv prefix that turns root into the sandbox's unprivileged launcher (pure)."""
    values = {res: _clamp(res, soft) for res, soft, _hard in limits}
    core = values.get(resource.RLIMIT_CORE, 0)
    nofile = values.get(resource.RLIMIT_NOFILE, 1024)
    fsize = values.get(resource.RLIMIT_FSIZE, resource.RLIM_INFINITY)
    blocks = "unlimited" if fsize == resource.RLIM_INFINITY else str(max(1, fsize // 512))
    argv = [sh, "-c", LAUNCH_SCRIPT, "ironclaw-launch", str(core), str(nofile), blocks]
    if netns_path is not None:
        argv += [nsenter, f"--net={netns_path}", "--"]
    argv += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if die_with_parent:
        argv += ["--pdeathsig=KILL"]
    argv += ["--"]
    return argv


def _clamp(res: int, value: int) -> int:
    """Never above the current hard limit: raising it needs CAP_SYS_RESOURCE, which hosts
    and containers often withhold even from root."""
    hard = resource.getrlimit(res)[1]
    if hard == resource.RLIM_INFINITY:
        return value
    return hard if value == resource.RLIM_INFINITY else min(value, hard)
