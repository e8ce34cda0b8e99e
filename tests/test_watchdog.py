"""The VM watchdog with real processes: wall-time kill, owner-death kill, quiet exit."""

from __future__ import annotations

import subprocess
import time

import pytest

from ironclaw.resources.procs import host_uid, is_zombie
from ironclaw.resources.watchdog import spawn_watchdog

pytestmark = pytest.mark.root
UID = 65534


def _gone(proc: subprocess.Popen[bytes], within: float) -> bool:
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return False
    return True


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], user=UID, group=UID, extra_groups=[])


def test_wall_time_limit_kills_the_target_and_the_watchdog_is_unprivileged() -> None:
    target = _sleeper()
    try:
        wd = spawn_watchdog(target.pid, uid=UID, wall_time_s=0.5, owner_pid=None)
        assert wd is not None and host_uid(wd) == UID
        assert not _gone(target, 0.2)  # not before its time
        assert _gone(target, 10)
        assert target.returncode == -9
    finally:
        target.kill()


def test_a_one_shot_target_dies_with_its_owner() -> None:
    owner = subprocess.Popen(["sleep", "60"])
    target = _sleeper()
    try:
        spawn_watchdog(target.pid, uid=UID, wall_time_s=None, owner_pid=owner.pid)
        assert not _gone(target, 0.5)
        owner.kill()
        owner.wait()
        assert _gone(target, 10)
    finally:
        owner.kill()
        target.kill()


def test_the_watchdog_leaves_with_its_target_and_is_not_started_without_a_reason() -> None:
    target = _sleeper()
    wd = spawn_watchdog(target.pid, uid=UID, wall_time_s=300, owner_pid=None)
    assert wd is not None

    def alive() -> bool:
        return host_uid(wd) != -1 and not is_zombie(wd)

    assert alive()
    target.kill()
    target.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive():
        time.sleep(0.05)
    assert not alive()
    assert spawn_watchdog(1, uid=UID, wall_time_s=None, owner_pid=None) is None
