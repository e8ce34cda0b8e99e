"""Whether KVM really works here: one probe boot per host kernel, QEMU and guest kernel.

Some hosts expose ``/dev/kvm`` but cannot run a stock kernel with it, so the answer
comes from a real (bounded) boot, and is cached in the state directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

from ironclaw.backends.qemu.cmdline import (
    Accel,
    boot_argv,
    kernel_cmdline,
    machine_args,
    qemu_binary,
)
from ironclaw.backends.qemu.seccomp import sandbox_args
from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.images import ImageArtifacts

__all__ = ["probe_accel"]

log = logging.getLogger(__name__)

_PROBE_MARK = "IRONCLAW-PROBE-OK"


def _probe_cache(settings: Settings) -> Path:
    return safe_join(settings.state_dir, "qemu-accel.json")


def _probe_key(artifacts: ImageArtifacts) -> str:
    qemu = Path(qemu_binary())
    st = qemu.stat()
    raw = f"{platform.release()}|{qemu}|{st.st_mtime_ns}|{artifacts.kernel_release}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def probe_accel(
    artifacts: ImageArtifacts, settings: Settings | None = None, *, timeout: float = 15.0
) -> Accel:
    """``"kvm"`` if the image's kernel reaches its initramfs under KVM, else ``"tcg"``.

    The verdict is cached in the state directory per host kernel, QEMU binary and guest
    kernel. The probe boot is bounded by ``timeout``: a KVM that hangs counts as broken.
    """
    settings = settings or Settings.from_env()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = _probe_cache(settings)
    key = _probe_key(artifacts)
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(cache.read_text())
        if data["key"] == key and data["accel"] in ("kvm", "tcg"):
            return "kvm" if data["accel"] == "kvm" else "tcg"
    verdict: Accel = "tcg"
    qemu = qemu_binary()
    argv = [
        *boot_argv(
            qemu,
            sandbox_args(qemu, runas=False),
            machine_args("kvm", 1, 256),
            artifacts,
            kernel_cmdline("kvm", extra=("ironclaw.probe=1",)),
        ),
        "-serial",
        "stdio",
    ]
    started = time.monotonic()
    try:
        out = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if _PROBE_MARK.encode() in out.stdout:
            verdict = "kvm"
    except subprocess.TimeoutExpired:
        pass
    log.info("KVM probe: %s after %.1fs", verdict, time.monotonic() - started)
    ensure_private_dir(settings.state_dir)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "accel": verdict}))
    os.replace(tmp, cache)
    return verdict
