"""Package the guest side of IronClaw as one zip the sandbox can import from.

The agent must run inside jails whose processes have no access to the host's
filesystem (the sandbox's host uid cannot even traverse the runtime directory), so it
is not bind-mounted from wherever IronClaw is installed: bubblewrap copies this zip into
the sandbox from a file descriptor, and Python imports it with zipimport. The bundle
holds only standard-library-only modules and their bytecode, compiled by the guest's
own interpreter (so a sandbox never spends its start-up compiling); it is
content-addressed and built once.

Hashing every guest source costs each process some milliseconds (a one-shot CLI run
pays it every time), so the digest is remembered in ``guest/index.json`` with what it
was computed from: every source file's and source directory's identity (inode, size,
mtime and ctime; a directory's change when a file is added, removed or renamed in it)
and the interpreter's. A later process stats those instead of reading and hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import ironclaw
from ironclaw.config import ensure_private_dir, safe_join

__all__ = ["GUEST_MODULES", "GUEST_PYTHON", "bundle_path", "guest_sources"]

GUEST_PYTHON = "/usr/bin/python3"

# Runs under the guest's interpreter: writes sources plus unchecked-hash .pyc files
# (valid without a timestamp check, so a fixed zip date is fine) into the zip.
_BUILD = r"""
import importlib.util, json, marshal, sys, zipfile
spec = json.loads(sys.stdin.read())
with zipfile.ZipFile(spec["out"], "w", compression=zipfile.ZIP_STORED) as zf:
    for arcname, path in spec["files"]:
        src = open(path, "rb").read()
        info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        zf.writestr(info, src)
        code = compile(src, arcname, "exec", dont_inherit=True, optimize=0)
        pyc = bytearray(importlib.util.MAGIC_NUMBER)
        pyc += (0b01).to_bytes(4, "little")
        pyc += importlib.util.source_hash(src)
        pyc += marshal.dumps(code)
        cinfo = zipfile.ZipInfo(arcname + "c", date_time=(2020, 1, 1, 0, 0, 0))
        cinfo.external_attr = 0o644 << 16
        zf.writestr(cinfo, bytes(pyc))
"""

#: Modules (files or packages, relative to the ``ironclaw`` package) the guest needs, and
#: the egress proxy, which runs unprivileged on the same interpreter (all stdlib-only).
GUEST_MODULES = (
    "__init__.py",
    "errors.py",
    "ids.py",
    "proto",
    "transport",
    "rpc",
    "guest",
    "policy/__init__.py",
    "policy/addresses.py",
    "policy/domains.py",
    "resources/__init__.py",
    "resources/host_addresses.py",
    "resources/proxy.py",
    "resources/proxy_http.py",
)

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


_lock = threading.Lock()
_built: dict[tuple[Path, str], Path] = {}


def bundle_path(state_dir: Path, python: str = GUEST_PYTHON) -> Path:
    """Build (once) and return the guest zip for the installed IronClaw sources.

    Safe to call from many threads and processes at once: a per-process lock and
    cache, and a uniquely named temporary file renamed into place.
    """
    with _lock:
        key = (state_dir, python)
        cached = _built.get(key)
        if cached is not None and cached.exists():
            return cached
        _built[key] = path = _bundle_path(state_dir, python)
        return path


def _identity(path: str) -> str:
    """What changes when the file or directory at ``path`` does ("" if it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _remembered(index: Path) -> str | None:
    """The bundle name the index holds if nothing it was computed from has changed."""
    try:
        doc = json.loads(index.read_text())
        seen: dict[str, str] = doc["identities"]
        name: str = doc["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not seen or any(_identity(path) != ident for path, ident in seen.items()):
        return None
    return name


def _remember(index: Path, name: str, identities: dict[str, str]) -> None:
    tmp = index.with_name(f".{index.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps({"name": name, "identities": identities}))
    os.replace(tmp, index)


def _bundle_path(state_dir: Path, python: str) -> Path:
    directory = ensure_private_dir(safe_join(state_dir, "guest"))
    index = safe_join(directory, "index.json")
    name = _remembered(index)
    if name is not None and safe_join(directory, name).exists():
        return safe_join(directory, name)
    # Identities first, then content: a file changed while it is hashed fails the next
    # check (its identity no longer matches) rather than pinning a stale digest.
    dirs = {str(_PACKAGE_DIR / n) for n in GUEST_MODULES if (_PACKAGE_DIR / n).is_dir()}
    dirs |= {
        str(p)
        for d in list(dirs)
        for p in Path(d).rglob("*")
        if p.is_dir() and "__pycache__" not in p.parts
    }
    identities = {p: _identity(p) for p in sorted(dirs)}
    identities[python] = _identity(python)
    sources = guest_sources()
    identities.update((str(path), _identity(str(path))) for _, path in sources)
    digest = hashlib.sha256()
    st = os.stat(python)
    digest.update(f"{os.path.realpath(python)}:{st.st_size}:{st.st_mtime_ns}".encode())
    for arcname, path in sources:
        digest.update(arcname.encode() + b"\0" + path.read_bytes() + b"\0")
    name = f"guest-{digest.hexdigest()[:16]}.zip"
    target = safe_join(directory, name)
    if not target.exists():
        _build(directory, target, sources, python)
    _remember(index, name, identities)
    return target


def _build(directory: Path, target: Path, sources: list[tuple[str, Path]], python: str) -> None:
    tmp = safe_join(directory, f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    spec = {"out": str(tmp), "files": [(a, str(p)) for a, p in sources]}
    subprocess.run(
        [python, "-I", "-B", "-c", _BUILD],
        input=json.dumps(spec).encode(),
        check=True,
        stdout=sys.stderr,
    )
    os.replace(tmp, target)
