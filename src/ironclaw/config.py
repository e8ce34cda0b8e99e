"""Where IronClaw keeps its files, and the one helper that builds every path.

Runtime files (sockets, pids) live under one root-owned 0700 directory (default
``/run/ironclaw``), state (the registry) under ``/var/lib/ironclaw``. ``IRONCLAW_HOME``
moves both below one directory (tests use it). Every path is built with
:func:`safe_join`, which refuses anything that would leave its base. Standard library only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

from ironclaw.errors import ConfigError
from ironclaw.ids import validate_sandbox_id

__all__ = ["DEFAULT_UID_BASE", "Settings", "ensure_private_dir", "safe_join"]

#: Host uids of sandboxes are ``base + slot`` (below 2^31: user-namespace maps refuse
#: more); ``base - 1`` is the egress proxies' uid, ``base - 2`` the VM watchdogs'.
#: ``IRONCLAW_UID_BASE`` moves the range.
DEFAULT_UID_BASE = 2_000_000_000


def safe_join(base: Path, *parts: str) -> Path:
    """Join ``parts`` below ``base`` and prove the result stays inside it.

    Each part must be a single plain name (no separators, no ``..``), and the joined
    path, resolved lexically, must still be below ``base``.
    """
    result = base
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\0" in part:
            raise ConfigError(f"refusing path component {part!r} below {base}")
        result = result / part
    base_abs = os.path.abspath(base)
    res_abs = os.path.abspath(result)
    if os.path.commonpath([base_abs, res_abs]) != base_abs:
        raise ConfigError(f"path {res_abs} escapes {base_abs}")
    return result


def ensure_private_dir(path: Path, mode: int = 0o700) -> Path:
    """Create ``path`` (and parents) owned by us with ``mode``; refuse a foreign or loose one."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by us; remove it")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    return path


class Settings(NamedTuple):
    """Directory layout. Build with :meth:`from_env`."""

    runtime_dir: Path
    state_dir: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = env.get("IRONCLAW_HOME")
        if home:
            base = Path(home).absolute()
            return cls(runtime_dir=base / "run", state_dir=base / "state")
        return cls(
            runtime_dir=Path(env.get("IRONCLAW_RUNTIME_DIR", "/run/ironclaw")),
            state_dir=Path(env.get("IRONCLAW_STATE_DIR", "/var/lib/ironclaw")),
        )

    def ensure(self) -> None:
        """Create both roots, root-owned, mode 0700."""
        ensure_private_dir(self.runtime_dir)
        ensure_private_dir(self.state_dir)

    @property
    def registry_path(self) -> Path:
        return safe_join(self.state_dir, "registry.sqlite3")

    def sandbox_runtime_dir(self, sandbox_id: str) -> Path:
        """Per-sandbox runtime directory: ``<runtime>/sandboxes/<id>``."""
        return safe_join(self.runtime_dir, "sandboxes", validate_sandbox_id(sandbox_id))

    def sandbox_state_dir(self, sandbox_id: str) -> Path:
        return safe_join(self.state_dir, "sandboxes", validate_sandbox_id(sandbox_id))
