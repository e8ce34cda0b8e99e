"""QEMU's own seccomp filter (``-sandbox``), on for every QEMU IronClaw launches.

A guest that escapes into QEMU is the next attacker on the host. QEMU can install a
mode-2 filter on itself before the guest runs; IronClaw asks for every denial it offers:
obsolete syscalls, fork/exec (QEMU dies of SIGSYS if it tries), scheduler, priority,
affinity and rlimit changes, and set*id calls, except where ``-runas`` needs those (see
:func:`sandbox_value`). A QEMU built without libseccomp is refused unless
:data:`SANDBOX_ENV` is ``off``.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from ironclaw.errors import ConfigError

__all__ = ["SANDBOX_ENV", "sandbox_args", "sandbox_problem", "sandbox_value"]

#: ``off`` runs QEMU without its seccomp filter (for a QEMU built without libseccomp).
SANDBOX_ENV = "IRONCLAW_QEMU_SANDBOX"
_PACKAGE = "qemu-system-x86"


def sandbox_value(*, runas: bool) -> str:
    """The ``-sandbox`` value: ``elevateprivileges`` is denied unless QEMU drops root.

    QEMU 7.2 installs the filter before ``-runas`` calls setgid/setuid, so with ``deny``
    it kills itself (SIGSYS) at start. After that drop QEMU holds no root id and no
    capability (``process.check_dropped``) and runs with no_new_privs, so a set*id call can
    only trade the sandbox uid for itself.
    """
    elevate = "allow" if runas else "deny"
    return f"on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"


@functools.cache
def _probe(qemu: str, mtime_ns: int) -> str | None:
    argv = [qemu, "-sandbox", sandbox_value(runas=False), "-M", "none", "-nodefaults"]
    argv += ["-display", "none", "-qmp", "stdio"]
    try:
        out = subprocess.run(
            argv,
            input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if out.returncode == 0:
        return None
    return out.stderr.decode(errors="replace").strip()[-300:] or f"exit {out.returncode}"


def sandbox_problem(qemu: str) -> str | None:
    """Why the QEMU binary ``qemu`` cannot install its filter, or None if it can.

    A real run with every option (blocking, ~50 ms), once per binary and process.
    """
    try:
        mtime_ns = Path(qemu).stat().st_mtime_ns
    except OSError as exc:
        return str(exc)
    return _probe(qemu, mtime_ns)


def sandbox_args(qemu: str, *, runas: bool) -> list[str]:
    """The ``-sandbox`` option for a launch of ``qemu``; ConfigError if it cannot honour it."""
    if os.environ.get(SANDBOX_ENV, "on") == "off":
        return []
    why = sandbox_problem(qemu)
    if why is not None:
        raise ConfigError(
            f"{qemu} cannot confine itself with seccomp (-sandbox): {why}. Install a QEMU "
            f"built with libseccomp (apt-get install {_PACKAGE}), or set {SANDBOX_ENV}=off "
            "to run VMs without QEMU's own syscall filter"
        )
    return ["-sandbox", sandbox_value(runas=runas)]
