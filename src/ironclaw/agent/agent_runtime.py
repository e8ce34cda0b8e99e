"""The agent runtime: the ``mcp`` SDK and its dependencies, readable from inside sandboxes.

The guest runs the host's ``/usr/bin/python3`` with no site-packages of ours, and the
sandbox's host uid cannot read IronClaw's virtualenv (it may live under a 0700 home).
The namespace jail binds the host's ``/usr`` read-only, so a directory below
``/usr/local/lib/ironclaw/agent-runtime`` appears at the same path inside. This module
copies the installed distributions of ``mcp`` and its whole dependency closure (found
with :mod:`importlib.metadata`), plus IronClaw's built-in MCP servers, into such a
directory, compiles their bytecode with the guest's interpreter (a read-only tree can
never cache it later), and names the directory after a digest of its contents.

It is built once, offline (nothing is downloaded), and published with an atomic rename;
directories are 0755 and files 0644, owned by root, so no sandbox can change what
another one imports. ``IRONCLAW_AGENT_RUNTIME_DIR`` moves the root (tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import ironclaw
from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConfigError

__all__ = [
    "DEFAULT_ROOT",
    "ROOT_ENV",
    "RUNTIME_DISTRIBUTIONS",
    "dependency_closure",
    "ensure_runtime",
    "runtime_root",
]

DEFAULT_ROOT = Path("/usr/local/lib/ironclaw/agent-runtime")
ROOT_ENV = "IRONCLAW_AGENT_RUNTIME_DIR"
#: What the guest side imports beyond the standard library.
RUNTIME_DISTRIBUTIONS = ("mcp",)
GUEST_PYTHON = "/usr/bin/python3"

_PACKAGE_DIR = Path(ironclaw.__file__).resolve().parent
# IronClaw files the MCP servers import (they run without the guest zip).
_IRONCLAW_FILES = ("__init__.py", "mcp_servers")


def runtime_root() -> Path:
    root = os.environ.get(ROOT_ENV)
    return Path(root).absolute() if root else DEFAULT_ROOT


def _marker_env(extra: str) -> dict[str, str]:
    env = {k: str(v) for k, v in default_environment().items()}
    env["extra"] = extra
    return env


def dependency_closure(roots: tuple[str, ...] = RUNTIME_DISTRIBUTIONS) -> list[md.Distribution]:
    """Every installed distribution ``roots`` need on this interpreter, extras included."""
    seen: dict[str, md.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in roots]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            dist = seen.get(key) or md.distribution(name)
        except md.PackageNotFoundError:
            raise ConfigError(
                f"the agent runtime needs the Python package {name!r}, which is not installed "
                "here: reinstall IronClaw (`make deps`)"
            ) from None
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None:
                envs = [_marker_env(e) for e in (extras or {""})]
                if not any(req.marker.evaluate(env) for env in envs):
                    continue
            todo.append((req.name, frozenset(req.extras)))
    return sorted(seen.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _dist_files(dist: md.Distribution) -> list[tuple[str, Path]]:
    """``(relative path, source)`` of a distribution's files inside its site directory."""
    out: list[tuple[str, Path]] = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.startswith("..") or "__pycache__" in f.parts or rel.endswith(".pyc"):
            continue
        src = Path(str(dist.locate_file(f)))
        if src.is_file():
            out.append((rel, src))
    return out


def _ironclaw_files() -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for name in _IRONCLAW_FILES:
        path = _PACKAGE_DIR / name
        if path.is_dir():
            out += [
                (f"ironclaw/{p.relative_to(_PACKAGE_DIR).as_posix()}", p)
                for p in sorted(path.rglob("*.py"))
            ]
        else:
            out.append((f"ironclaw/{name}", path))
    return out


def _manifest() -> list[tuple[str, Path]]:
    files: dict[str, Path] = {}
    for dist in dependency_closure():
        files.update(_dist_files(dist))
    files.update(_ironclaw_files())
    return sorted(files.items())


def _digest(files: list[tuple[str, Path]], python: str) -> str:
    h = hashlib.sha256()
    st = os.stat(python)
    h.update(f"{os.path.realpath(python)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    for rel, src in files:
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()[:20]


def _check_root(root: Path) -> None:
    """Refuse a root that another user could change under us."""
    for p in [root, *root.parents]:
        if not p.exists():
            continue
        st = p.stat()
        sticky = bool(st.st_mode & 0o1000)  # like /tmp: others cannot replace our entries
        if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not sticky):
            raise ConfigError(
                f"{p} is writable by others or not ours; the agent runtime cannot live below it"
            )


def ensure_runtime(root: Path | None = None, *, python: str = GUEST_PYTHON) -> Path:
    """Build (once) and return the runtime directory for what is installed now.

    Blocking (copies files, runs the compiler): call it through ``asyncio.to_thread``.
    """
    root = root or runtime_root()
    files = _manifest()
    target = safe_join(root, _digest(files, python))
    if (target / ".complete").is_file():
        return target
    old = os.umask(0o022)
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        _check_root(root)
        tmp = safe_join(root, f".build-{os.getpid()}-{target.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        try:
            for rel, src in files:
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                shutil.copyfile(src, dst)
                os.chmod(dst, 0o644)
            # unchecked-hash: valid whatever the copies' mtimes; the tree never changes.
            proc = subprocess.run(
                [python, "-I", "-m", "compileall", "-q", "-j", "0",
                 "--invalidation-mode", "unchecked-hash", str(tmp)],
                capture_output=True,
                check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                tail = proc.stdout.decode(errors="replace")[-800:]
                raise BackendError(f"compiling the agent runtime failed: {tail}")
            for dirpath, dirnames, filenames in os.walk(tmp):
                for d in dirnames:
                    os.chmod(os.path.join(dirpath, d), 0o755)  # noqa: S103 - world-readable on purpose
                for f in filenames:
                    os.chmod(os.path.join(dirpath, f), 0o644)
            (tmp / ".complete").write_text("ok\n")
            os.chmod(tmp / ".complete", 0o644)
            os.chmod(tmp, 0o755)  # noqa: S103
            try:
                os.rename(tmp, target)
            except OSError:
                # Another builder won the race with an identical tree: use theirs.
                if not (target / ".complete").is_file():
                    raise
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    except OSError as exc:
        raise BackendError(f"building the agent runtime under {root} failed: {exc}") from exc
    finally:
        os.umask(old)
    return target
