"""``ironclaw doctor``: what this host supports, each missing piece with its fix.

Every check runs the real thing where that is cheap (a user namespace is created, the
seccomp library is loaded), because a file that exists is not a feature that works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def _run(*argv: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return 127, str(exc)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, "timed out"
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def _tool(name: str, version_args: list[str], package: str, required: bool) -> Check:
    """``package`` is a Debian package name, or a sentence when Debian has none."""
    path = shutil.which(name)
    if path is None:
        fix = package if " " in package else f"apt-get install {package}"
        return Check(name, False, "not installed", fix, required)
    rc, out = await _run(path, *version_args)
    first = out.splitlines()[0] if out else ""
    return Check(
        name, rc == 0, first or f"exit {rc}", None if rc == 0 else f"reinstall {package}", required
    )


async def _userns() -> Check:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Check("user namespaces", False, "bwrap missing", "apt-get install bubblewrap", True)
    rc, out = await _run(
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--",
        "/usr/bin/true",
    )
    if rc == 0:
        return Check("user namespaces", True, "an unprivileged uid can create a jail", None, True)
    return Check(
        "user namespaces",
        False,
        out or f"exit {rc}",
        "enable unprivileged user namespaces: sysctl -w user.max_user_namespaces=15000 "
        "(and kernel.unprivileged_userns_clone=1 or apparmor_restrict_unprivileged_userns=0)",
        True,
    )


def _seccomp() -> Check:
    try:
        from ironclaw.policy.seccomp import compile_bpf

        size = len(compile_bpf("default", allow_inet=False))
    except Exception as exc:
        return Check("seccomp", False, str(exc), "apt-get install libseccomp2", True)
    return Check("seccomp", True, f"default profile compiles to {size} bytes of BPF", None, True)


def _qemu_sandbox() -> Check:
    """QEMU must install its own seccomp filter (``-sandbox``): probed with a real run."""
    from ironclaw.backends.qemu.seccomp import SANDBOX_ENV, sandbox_problem
    from ironclaw.backends.qemu.vm import qemu_binary

    why = sandbox_problem(qemu_binary())
    if why is None:
        return Check("qemu sandbox", True, "QEMU confines itself with seccomp (-sandbox on)")
    off = os.environ.get(SANDBOX_ENV) == "off"
    return Check(
        "qemu sandbox",
        False,
        f"QEMU lacks seccomp support: {why}"
        + (f" ({SANDBOX_ENV}=off: VMs run without it)" if off else ""),
        f"apt-get install qemu-system-x86 (a QEMU built with libseccomp), or set {SANDBOX_ENV}=off",
    )


def _cgroups() -> Check:
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists():
        ctrls = v2.read_text().split()
        missing = [c for c in ("memory", "pids", "cpu") if c not in ctrls]
        ok = not missing
        return Check(
            "cgroups",
            ok,
            f"v2 controllers: {' '.join(ctrls)}",
            None if ok else f"delegate {', '.join(missing)} to IronClaw's cgroup",
            True,
        )
    found = [c for c in ("memory", "pids", "cpu") if Path(f"/sys/fs/cgroup/{c}/tasks").exists()]
    ok = len(found) == 3
    return Check(
        "cgroups",
        ok,
        f"v1 controllers: {' '.join(found) or 'none'}",
        None if ok else "mount the memory, pids and cpu cgroup controllers",
        True,
    )


def _kvm() -> Check:
    if not os.path.exists("/dev/kvm"):
        return Check(
            "kvm", False, "/dev/kvm missing", "enable virtualisation (VMs fall back to TCG)"
        )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Check("kvm", False, "/dev/kvm not accessible", "add the user to group kvm")
    verdict = _cached_accel_verdict()
    if verdict == "tcg":
        return Check(
            "kvm",
            False,
            "/dev/kvm present but a guest kernel did not boot under it (probed); VMs use TCG",
            "use a host with working nested or bare-metal KVM for fast VMs",
        )
    if verdict == "kvm":
        return Check("kvm", True, "/dev/kvm boots guests (probed)")
    return Check("kvm", True, "/dev/kvm present (bootability is probed on first VM start)")


def _cached_accel_verdict() -> str | None:
    """The QEMU backend's cached KVM probe for this installation, if it ran."""
    import json

    from ironclaw.config import Settings, safe_join

    try:
        path = safe_join(Settings.from_env().state_dir, "qemu-accel.json")
        return str(json.loads(path.read_text())["accel"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _nftables() -> Check:
    """A private table created and deleted in one batch, and which deletions the kernel has."""
    from ironclaw.errors import NetworkError
    from ironclaw.resources.firewall import NO_DESTROY_ENV, check_nftables

    try:
        destroy, forced = check_nftables()
    except NetworkError as exc:
        fix = "run as root (needs CAP_NET_ADMIN) and load nf_tables: modprobe nf_tables"
        return Check("nftables", False, str(exc), fix, True)
    if destroy and not forced:
        path = "deletions use DESTROY messages (Linux 6.3+)"
    else:
        why = f"{NO_DESTROY_ENV}=1" if forced else "this kernel has no DESTROY messages"
        path = f"deletions use the DEL fallback ({why}): each sandbox's record lists them"
    return Check("nftables", True, f"tables can be created and deleted; {path}", None, True)


async def run_checks() -> list[Check]:
    """All checks, required ones (the namespace backend) first."""
    tools = await asyncio.gather(
        _tool("bwrap", ["--version"], "bubblewrap", True),
        _tool("nft", ["--version"], "nftables", True),
        # The guest agent runs on the distribution's interpreter, not on IronClaw's own.
        _tool("/usr/bin/python3", ["--version"], "python3", True),
        _tool("qemu-system-x86_64", ["--version"], "qemu-system-x86", False),
        _tool("firecracker", ["--version"], "install the firecracker release binary", False),
        _tool("jailer", ["--version"], "install the jailer from the firecracker release", False),
        _tool("debootstrap", ["--version"], "debootstrap", False),
    )
    userns = await _userns()
    checks = [tools[0], userns, _seccomp(), _cgroups(), tools[1], tools[2], _kvm(), *tools[3:]]
    if tools[3].ok:
        checks.insert(checks.index(tools[3]) + 1, await asyncio.to_thread(_qemu_sandbox))
    checks.insert(checks.index(tools[1]) + 1, _nftables())
    from ironclaw.backends.firecracker import probe_firecracker

    fc_ok, fc_detail = probe_firecracker()
    checks.append(
        Check(
            "firecracker backend",
            fc_ok,
            fc_detail,
            None
            if fc_ok
            else "install firecracker and jailer from their release page, "
            "on a host whose KVM can boot guests",
        )
    )
    return checks
