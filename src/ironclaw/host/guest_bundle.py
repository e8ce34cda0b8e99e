"""Package the guest side of IronClaw as one zip the sandbox can import from.

The agent must run inside jails whose processes have no access to the host's
filesystem (the sandbox's host uid cannot even traverse the runtime directory), so it
is not bind-mounted from wherever IronClaw is installed: bubblewrap copies this zip into
the sandbox from a file descriptor, and Python imports it with zipimport. The bundle
holds only standard-library-only modules; it is content-addressed and built once.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import ironclaw
from ironclaw.config import ensure_private_dir, safe_join

__all__ = ["GUEST_MODULES", "bundle_path", "guest_sources"]

#: Modules (files or packages, relative to the ``ironclaw`` package) the guest needs.
GUEST_MODULES = ("__init__.py", "errors.py", "ids.py", "proto", "transport", "rpc", "guest")

_PACKAGE_DIR = Path(ironclaw.__file__).resolve().parent


def guest_sources() -> list[tuple[str, Path]]:
    """``(archive name, source path)`` for every file of the guest, sorted."""
    out: list[tuple[str, Path]] = []
    for name in GUEST_MODULES:
        path = _PACKAGE_DIR / name
        if path.is_dir():
            for file in sorted(path.rglob("*.py")):
                rel = file.relative_to(_PACKAGE_DIR).as_posix()
                out.append((f"ironclaw/{rel}", file))
        elif path.exists():
            out.append((f"ironclaw/{name}", path))
    out.sort()
    return out


def bundle_path(state_dir: Path) -> Path:
    """Build (once) and return the guest zip for the installed IronClaw sources."""
    sources = guest_sources()
    digest = hashlib.sha256()
    for arcname, path in sources:
        digest.update(arcname.encode() + b"\0" + path.read_bytes() + b"\0")
    name = f"guest-{digest.hexdigest()[:16]}.zip"
    directory = ensure_private_dir(safe_join(state_dir, "guest"))
    target = safe_join(directory, name)
    if target.exists():
        return target
    tmp = safe_join(directory, f".{name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for arcname, path in sources:
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    os.replace(tmp, target)
    return target
