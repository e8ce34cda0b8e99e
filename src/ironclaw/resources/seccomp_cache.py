"""Compiled seccomp programs kept in the state directory, so a new process need not
load libseccomp to start a sandbox.

Loading the bindings costs a one-shot ``ironclaw exec`` tens of milliseconds (they look
for the library by running ``ldconfig -p``, twice), although there are only six distinct
programs. Each is compiled once by :func:`ironclaw.policy.seccomp.compile_bpf` and stored
under a key that changes with anything that could change it: the profile and network
decision, the machine, the policy module's source and the libseccomp bindings installed.
The directory is private to the orchestrator (0700, checked), like the guest bundle.
"""

from __future__ import annotations

import _thread
import hashlib
import importlib.util
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from ironclaw.config import ensure_private_dir, safe_join

if TYPE_CHECKING:
    from ironclaw.policy.seccomp import SeccompProfile

__all__ = ["seccomp_program"]

_lock = _thread.allocate_lock()  # threading's Lock, without loading threading
_memo: dict[tuple[Path, SeccompProfile, bool], bytes] = {}


def _key(profile: str, allow_inet: bool) -> str:
    digest = hashlib.sha256(f"{profile}:{allow_inet}:{os.uname().machine}".encode())
    for module in ("ironclaw.policy.seccomp", "pyseccomp"):
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        if origin is None or not os.path.exists(origin):
            digest.update(f"{module}:absent".encode())
            continue
        st = os.stat(origin)
        digest.update(f"{module}:{origin}:{st.st_size}:{st.st_mtime_ns}".encode())
        if module.startswith("ironclaw."):
            digest.update(Path(origin).read_bytes())
    return digest.hexdigest()[:24]


def seccomp_program(state_dir: Path, profile: SeccompProfile, *, allow_inet: bool) -> bytes:
    """The BPF program of ``compile_bpf(profile, allow_inet=...)``, from the cache if built."""
    memo_key = (state_dir, profile, allow_inet)
    with _lock:
        cached = _memo.get(memo_key)
        if cached is not None:
            return cached
        directory = ensure_private_dir(safe_join(state_dir, "seccomp"))
        path = safe_join(directory, f"{_key(profile, allow_inet)}.bpf")
        try:
            program = path.read_bytes()
        except FileNotFoundError:
            program = b""
        if not program or len(program) % 8:
            from ironclaw.policy.seccomp import compile_bpf

            program = compile_bpf(profile, allow_inet=allow_inet)
            tmp = safe_join(directory, f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(program)
            os.replace(tmp, path)
        _memo[memo_key] = program
        return program
