"""Workspace snapshots: saved atomically, hashed, checked and safely restored.

A snapshot is a directory ``<state>/snapshots/<name>/`` holding ``workspace.tar`` (the
sandbox's /workspace: files, modes, symlinks as links) and ``manifest.json`` (its
SHA-256, size, and the spec it came from). A VM snapshot (``kind`` "vm", see
:mod:`ironclaw.host.vm_snapshots`) holds the VM's memory and device state and its
workspace disk instead; its manifest has the sha256 of every file (``files``) and
``sha256`` is the hash of that list. It is written under a temporary name
(``.tmp-<pid>-<name>``) and renamed into place only when complete, so a crash never
leaves a half-written snapshot listed; :func:`collect_leftovers` (run by ``gc``)
removes temporaries whose writer is gone. Restore checks the hash first (a corrupted or
tampered snapshot is refused) and then every member: no absolute paths, no ``..``, no
device files or FIFOs, no link that points outside the workspace, and a bounded total
size. The archive is unpacked inside the new sandbox by its own unprivileged ``tar``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import ConfigError, SandboxError, SandboxNotFound
from ironclaw.proto.surface import SnapshotInfo
from ironclaw.spec import SandboxSpec, parse_spec

__all__ = [
    "ARCHIVE",
    "MANIFEST",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotNotFound",
    "SnapshotStore",
    "check_archive",
    "files_digest",
    "restore_spec",
    "validate_snapshot_name",
]

ARCHIVE = "workspace.tar"
MANIFEST = "manifest.json"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TMP = re.compile(r"\.tmp-(\d+)-.*")


class SnapshotCorrupt(SandboxError):
    """The snapshot's content does not match its hash, or its archive is unsafe."""


class SnapshotNotFound(SandboxNotFound):
    """No snapshot of that name."""


def validate_snapshot_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"snapshot name {name!r}: use 1-63 of a-z 0-9 . _ -, starting alphanumeric"
        )
    return name


@dataclass(frozen=True)
class Snapshot(SnapshotInfo):
    """One saved sandbox; pass it to ``Sandbox.create(from_snapshot=...)``.

    ``kind`` is "workspace" (an archive of /workspace) or "vm" (memory, devices and
    disks: ``files`` maps each file to its sha256, ``vm`` says what it must be restored
    on: image digest, QEMU version, VM size).
    """

    files: dict[str, str] = field(default_factory=dict)
    vm: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: dict[str, str]) -> str:
    """One hash over every file's name and sha256: a VM snapshot's content hash."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


#: What a restore may not change: a snapshot comes back on its own backend and image.
FIXED_FIELDS = ("backend", "image")
#: Overridden field by field; every other field given replaces the snapshot's whole.
MERGED_FIELDS = ("limits", "lifetime")


def restore_spec(
    recorded: dict[str, Any], given: SandboxSpec | dict[str, Any] | None
) -> SandboxSpec:
    """The spec a restore uses: the one the snapshot recorded, with what was given on top.

    ``given`` holds only what the caller set explicitly (a dict, or a spec whose unset
    fields are ignored): e.g. labels, lifetime, network, env, limits (a VM snapshot needs
    its own memory and cpus). Backend and image cannot change.
    """
    base = dict(recorded)
    if isinstance(given, SandboxSpec):
        given = given.model_dump(mode="json", exclude_unset=True)
    defaults = SandboxSpec().model_dump(mode="json")
    for key, value in (given or {}).items():
        if key in FIXED_FIELDS:
            if value != base.get(key, defaults.get(key)):
                raise ConfigError(
                    f"a snapshot is restored with its own {key} ({base.get(key, defaults.get(key))}"
                    f"), not {value!r}: leave {key} out"
                )
        elif key in MERGED_FIELDS and isinstance(value, dict):
            base[key] = {**(base.get(key) or {}), **value}
        else:
            base[key] = value
    return parse_spec(base)


def check_archive(path: Path, *, max_bytes: int) -> int:
    """Refuse an archive that could write outside the workspace; return its total size."""
    total = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = member.name
                norm = posixpath.normpath(name)
                if name.startswith("/") or norm == ".." or norm.startswith("../"):
                    raise SnapshotCorrupt(f"snapshot member {name!r} lies outside the workspace")
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise SnapshotCorrupt(f"snapshot member {name!r} is a device file or FIFO")
                if member.issym() or member.islnk():
                    target = member.linkname
                    base = posixpath.dirname(norm) if member.issym() else ""
                    resolved = posixpath.normpath(posixpath.join(base, target))
                    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                        raise SnapshotCorrupt(
                            f"snapshot link {name!r} -> {target!r} points outside the workspace"
                        )
                total += member.size
                if total > max_bytes:
                    raise SnapshotCorrupt(
                        f"snapshot unpacks to more than {max_bytes} bytes (the workspace limit)"
                    )
    except tarfile.TarError as exc:
        raise SnapshotCorrupt(f"snapshot archive is unreadable: {exc}") from None
    return total


class SnapshotStore:
    """The snapshots directory: list, write (atomically), load (checked), remove."""

    def __init__(self, settings: Settings) -> None:
        self.root = safe_join(settings.state_dir, "snapshots")

    def path(self, name: str) -> Path:
        return safe_join(self.root, validate_snapshot_name(name))

    def new_temp(self, name: str) -> Path:
        """A fresh private directory to write ``name`` into before :meth:`commit`."""
        validate_snapshot_name(name)
        ensure_private_dir(self.root)
        if self.path(name).exists():
            raise ConfigError(f"a snapshot named {name!r} exists; remove it or pick another name")
        tmp = safe_join(self.root, f".tmp-{os.getpid()}-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        return tmp

    def commit(self, tmp: Path, snap: Snapshot) -> Snapshot:
        """Hash-stamp the archive in ``tmp`` and rename the directory into place."""
        manifest = tmp / MANIFEST
        with open(manifest, "w") as f:
            json.dump(snap.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        for part in snap.files or (ARCHIVE,):
            with open(safe_join(tmp, part), "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, self.path(snap.name))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"snapshot {snap.name!r} could not be stored: {exc}") from None
        return snap

    def stamp(self, tmp: Path, **fields: Any) -> Snapshot:
        archive = tmp / ARCHIVE
        return Snapshot(
            sha256=_hash_file(archive), size=archive.stat().st_size, created_at=time.time(),
            **fields,
        )  # fmt: skip

    def stamp_files(self, tmp: Path, files: dict[str, str], **fields: Any) -> Snapshot:
        """A VM snapshot's manifest; ``files`` maps each file in ``tmp`` to its sha256
        (hashed by the writer as it wrote them, so nothing is read twice)."""
        size = sum(safe_join(tmp, n).stat().st_blocks * 512 for n in files)
        return Snapshot(
            sha256=files_digest(files), size=size, created_at=time.time(), kind="vm",
            files=files, **fields,
        )  # fmt: skip

    def verified_file(self, snap: Snapshot, part: str, digest: str) -> None:
        """Refuse ``part`` of ``snap`` unless its content hash is ``digest`` (the recorded one)."""
        if snap.files.get(part) != digest or files_digest(snap.files) != snap.sha256:
            raise SnapshotCorrupt(
                f"snapshot {snap.name!r} is corrupted: {part} does not match its recorded "
                "sha256; remove it (`ironclaw snapshot rm`)"
            )

    def all(self) -> list[Snapshot]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(SnapshotNotFound, SnapshotCorrupt, ConfigError):
                found.append(self.get(entry.name))
        return found

    def get(self, name: str) -> Snapshot:
        path = self.path(name)
        try:
            doc = json.loads((path / MANIFEST).read_text())
            return Snapshot(**doc)
        except FileNotFoundError:
            raise SnapshotNotFound(
                f"no snapshot named {name!r}; `ironclaw snapshot ls` lists them"
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise SnapshotCorrupt(f"snapshot {name!r} has an unreadable manifest: {exc}") from None

    def verified_archive(self, snap: Snapshot, *, max_bytes: int) -> Path:
        """The archive, after its hash and every member are checked."""
        archive = self.path(snap.name) / ARCHIVE
        try:
            digest = _hash_file(archive)
        except OSError as exc:
            raise SnapshotCorrupt(f"snapshot {snap.name!r} has no archive: {exc}") from None
        if digest != snap.sha256:
            raise SnapshotCorrupt(
                f"snapshot {snap.name!r} is corrupted: its content hash is {digest[:16]}…, "
                f"not the recorded {snap.sha256[:16]}…; remove it (`ironclaw snapshot rm`)"
            )
        check_archive(archive, max_bytes=max_bytes)
        return archive

    def remove(self, name: str) -> None:
        path = self.path(name)
        if not path.exists():
            raise SnapshotNotFound(f"no snapshot named {name!r}")
        doomed = safe_join(self.root, f".tmp-{os.getpid()}-rm-{name}")
        os.rename(path, doomed)  # gone from listings at once, even if rmtree is cut short
        shutil.rmtree(doomed, ignore_errors=True)

    def collect_leftovers(self, *, dry_run: bool = False) -> list[str]:
        """Temporaries whose writing process is gone (a crash mid-snapshot): removed."""
        if not self.root.is_dir():
            return []
        removed = []
        for entry in self.root.iterdir():
            m = _TMP.fullmatch(entry.name)
            if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                continue  # not a temporary, or its writer still runs
            removed.append(f"snapshot temporary {entry.name}")
            if not dry_run:
                resumed = _resume_source(entry)
                if resumed:
                    removed.append(resumed)
                shutil.rmtree(entry, ignore_errors=True)
        return removed


def _resume_source(tmp: Path) -> str | None:
    """A VM snapshot cut off mid-way leaves its source paused: let it run again."""
    if not (tmp / "source.json").exists():
        return None
    from ironclaw.backends.qemu.usersnap import recover_source

    return recover_source(tmp)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
