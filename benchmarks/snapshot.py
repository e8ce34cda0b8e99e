"""Snapshot and restore time for a 100 MiB workspace, with a raw ``tar`` baseline.

Prints one JSON object:

* ``namespace``: ``snapshot_ms`` (the sandbox's /workspace streamed out by its own
  ``tar``, hashed, written and renamed into place) and ``restore_ms`` (hash and member
  check, a new sandbox, the archive unpacked in it: the time of
  ``Sandbox.create(from_snapshot=...)``), plus ``fork3_ms`` for three forks;
* ``baseline``: ``tar -c`` and ``tar -x`` of the same bytes on the host, in the same run,
  and ``create_ms`` of an empty sandbox, so the snapshot's own overhead is visible;
* ``qemu`` (whenever a built VM image is found, unless ``--no-qemu``): the same for a
  QEMU VM with the same workspace, where a snapshot is the VM's memory, devices and
  workspace disk (the VM paused meanwhile, then resumed) and a restore is a new VM
  loaded from it with a fresh identity, up to its agent answering (no boot);
  ``memory_mib`` and ``disk_mib`` are the snapshot's two files (the disk sparse).

    python benchmarks/snapshot.py --json [--mib 100] [--no-qemu] [--images DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager

FILL = (
    "head -c {mib}M /dev/urandom > big && mkdir -p src && seq 1 20000 > src/lines && ln -s big link"
)


def ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


STEP: list[str] = ["start"]  # where a failed run stopped, for its report


async def measure(manager: SandboxManager, spec: dict[str, Any], mib: int, tag: str,
                  ready: float) -> dict[str, Any]:  # fmt: skip
    STEP[0] = "create"
    t = time.perf_counter()
    rec = await manager.create(spec, ready_timeout=ready)
    create_ms = ms(t)
    r = await manager.exec(rec.id, ["sh", "-c", FILL.format(mib=mib)], timeout=300)
    if r.exit_code != 0:
        raise RuntimeError(r.stderr.decode())
    STEP[0] = "snapshot"
    t = time.perf_counter()
    snap = await manager.snapshot(rec.id, f"bench-{tag}")
    snapshot_ms = ms(t)
    STEP[0] = "restore"
    t = time.perf_counter()
    copy = await manager.restore(snap, ready_timeout=ready)
    restore_ms = ms(t)
    check = await manager.exec(copy.id, ["sh", "-c", "wc -c < big"])
    assert int(check.stdout) == mib << 20, check
    out = {
        "create_ms": create_ms,
        "snapshot_ms": snapshot_ms,
        "restore_ms": restore_ms,
        "kind": snap.kind,
        "archive_mib": round(snap.size / (1 << 20), 1),
    }
    if snap.kind == "vm":
        where = manager.snapshots().path(snap.name)
        for part, key in (("memory.state", "memory_mib"), ("workspace.ext4", "disk_mib")):
            f = where / part
            if f.exists():
                out[key] = round(f.stat().st_blocks * 512 / (1 << 20), 1)
    await manager.destroy(copy.id)
    if spec.get("backend", "namespace") == "namespace":
        t = time.perf_counter()
        forks = await manager.fork(snap, 3)
        out["fork3_ms"] = ms(t)
        for f in forks:
            await manager.destroy(f.id)
    await manager.destroy(rec.id)
    return out


def baseline(mib: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ironclaw-bench-tar-") as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        src.mkdir()
        dst.mkdir()
        subprocess.run(["sh", "-c", FILL.format(mib=mib)], cwd=src, check=True)
        archive = Path(tmp, "a.tar")
        t = time.perf_counter()
        subprocess.run(["tar", "-C", str(src), "-cf", str(archive), "."], check=True)
        tar_c = ms(t)
        t = time.perf_counter()
        subprocess.run(["tar", "-C", str(dst), "-xf", str(archive)], check=True)
        tar_x = ms(t)
    return {"tar_create_ms": tar_c, "tar_extract_ms": tar_x}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = {"benchmark": "snapshot", "workspace_mib": args.mib}
    doc["baseline"] = baseline(args.mib)
    images = Path(args.images) if args.images else Settings.from_env().state_dir / "images"
    with tempfile.TemporaryDirectory(prefix="ironclaw-bench-") as home:
        os.chmod(home, 0o700)
        settings = Settings.from_env({"IRONCLAW_HOME": home})
        settings.ensure()
        if images.is_dir():
            (settings.state_dir / "images").symlink_to(images)
            verdict = images.parent / "qemu-accel.json"  # KVM or TCG, as probed there
            if verdict.exists():
                (settings.state_dir / "qemu-accel.json").write_bytes(verdict.read_bytes())
        async with SandboxManager(settings, cgroup_root="ironclaw-bench") as manager:
            await manager.destroy((await manager.create()).id)  # warm caches
            limits = {"workspace_mib": args.mib * 2 + 64, "memory_mib": args.mib * 4 + 256}
            doc["namespace"] = await measure(manager, {"limits": limits}, args.mib, "ns", 20)
            if args.qemu and (settings.state_dir / "images").exists():
                spec = {"backend": "qemu", "limits": limits}
                try:
                    doc["qemu"] = await measure(manager, spec, args.mib, "vm", 600)
                except Exception as exc:  # reported, not hidden
                    doc["qemu"] = {"error": f"{STEP[0]}: {type(exc).__name__}: {exc}"}
            await manager.reconcile()
    return doc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--qemu", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--images", help="a state directory's images/ to boot VMs from")
    args = parser.parse_args()
    doc = asyncio.run(run(args))
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
