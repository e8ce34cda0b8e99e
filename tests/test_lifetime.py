"""The lifetime rule and its watchdog, on plain processes (the sandbox tests use real ones)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ironclaw.backends.base import Pausable
from ironclaw.resources.lifetime import (
    ACTIVITY_FILE,
    due,
    read_lifetime,
    spawn_lifetime_watchdog,
    touch_activity,
    write_lifetime,
)


def doc(tmp_path: Path, **fields: object) -> dict[str, object]:
    return {"activity": str(tmp_path / ACTIVITY_FILE), "started": time.time(), **fields}


def test_due_rule(tmp_path: Path) -> None:
    now = time.time()
    touch_activity(tmp_path)
    assert due(doc(tmp_path, deadline=now + 60), now) is None
    assert due(doc(tmp_path, deadline=now - 1), now) == "timeout: deadline reached"
    # A sandbox paused by its own on_timeout stays paused: nothing more is due.
    assert due(doc(tmp_path, deadline=now - 1, paused=True, on_timeout="pause"), now) is None
    # A paused sandbox still meets its deadline when that destroys it.
    assert due(doc(tmp_path, deadline=now - 1, paused=True), now) == "timeout: deadline reached"
    assert due(doc(tmp_path, idle_timeout=5), now + 6) == "timeout: idle for 5s"
    assert due(doc(tmp_path, idle_timeout=5), now + 1) is None
    assert due(doc(tmp_path, idle_timeout=5, paused=True), now + 60) is None  # idle stops
    assert due(doc(tmp_path, deadline=now - 1, ended="x"), now) is None


def test_watchdog_kills_at_the_deadline_the_manager_moves(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    target = subprocess.Popen(["sleep", "600"])
    try:
        write_lifetime(tmp_path, doc(tmp_path, deadline=time.time() + 600))
        touch_activity(tmp_path)
        spawn_lifetime_watchdog(tmp_path, target.pid)
        time.sleep(1.5)
        assert target.poll() is None  # far from its deadline
        moved = read_lifetime(tmp_path)
        assert moved is not None
        moved["deadline"] = time.time()  # set_timeout(0): now
        write_lifetime(tmp_path, moved)
        assert target.wait(timeout=30) == -9
        ended = read_lifetime(tmp_path)
        assert ended is not None and ended["ended"] == "timeout: deadline reached"
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()


def test_vm_backends_pause_themselves_and_the_namespace_one_uses_the_freezer() -> None:
    from ironclaw.backends.firecracker import FirecrackerBackend
    from ironclaw.backends.namespace import NamespaceBackend
    from ironclaw.backends.qemu.backend import QemuBackend

    assert isinstance(QemuBackend(), Pausable)
    assert isinstance(FirecrackerBackend(), Pausable)
    assert not isinstance(NamespaceBackend(), Pausable)


pytestmark = pytest.mark.root
