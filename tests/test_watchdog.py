"""The VM watchdog with real processes: wall-time kill, owner-death kill, quiet exit,
and a uid of its own that the watched process cannot signal."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ironclaw.resources.procs import host_uid, is_zombie
from ironclaw.resources.watchdog import spawn_watchdog, watchdog_uid

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


def _ids(pid: int) -> dict[str, list[int]]:
    """Real, effective, saved (and fs) uids and gids, and the effective capabilities."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "uid": [int(x) for x in fields["Uid"].split()],
        "gid": [int(x) for x in fields["Gid"].split()],
        "groups": [int(x) for x in fields["Groups"].split()],
        "cap": [int(fields["CapEff"], 16)],
    }


def _assert_own_uid(wd: int, target_uid: int) -> None:
    """Real and saved uid are the watchdog's; only the effective uid is the target's."""
    own = watchdog_uid()
    assert own not in (0, target_uid)
    ids = _ids(wd)
    assert ids["uid"][:3] == [own, target_uid, own]
    assert ids["gid"][:3] == [own, own, own]
    assert ids["groups"] == [] and ids["cap"] == [0]
    assert host_uid(wd) == own != UID


def test_wall_time_limit_kills_the_target_and_the_watchdog_is_unprivileged() -> None:
    target = _sleeper()
    try:
        wd = spawn_watchdog(target.pid, uid=UID, wall_time_s=0.5, owner_pid=None)
        assert wd is not None
        _assert_own_uid(wd, UID)
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


def test_the_watched_uid_cannot_kill_its_watchdog_which_still_kills_on_time() -> None:
    """A process of the target's uid (a guest escaped into QEMU) gets EPERM signalling
    the watchdog, which then still ends the target at its wall time."""
    target = _sleeper()
    try:
        wd = spawn_watchdog(target.pid, uid=UID, wall_time_s=3, owner_pid=None)
        assert wd is not None
        _assert_own_uid(wd, UID)
        as_target = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
        kill = subprocess.run(
            [*as_target, "kill", "-9", str(wd)], capture_output=True, text=True, check=False
        )
        assert kill.returncode != 0
        assert "Operation not permitted" in kill.stderr
        # Nor through a pidfd: the permission is checked when the signal is sent.
        via_pidfd = subprocess.run(
            [*as_target, "/usr/bin/python3", "-c",
             "import os, signal, sys\n"
             "fd = os.pidfd_open(int(sys.argv[1]))\n"
             "try:\n    signal.pidfd_send_signal(fd, signal.SIGKILL)\n"
             "except PermissionError:\n    print('EPERM')\n", str(wd)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert via_pidfd.stdout.strip() == "EPERM", via_pidfd.stderr
        # Nor inspect it: reading its memory map needs ptrace access (PTRACE_MODE_READ).
        peek = subprocess.run(
            [*as_target, "cat", f"/proc/{wd}/maps"], capture_output=True, text=True, check=False
        )
        assert peek.returncode != 0 and "Permission denied" in peek.stderr
        # Non-dumpable: its /proc files belong to root, so that uid cannot, say, raise its
        # oom_score_adj to make it the OOM killer's first choice.
        assert os.stat(f"/proc/{wd}/oom_score_adj").st_uid == 0
        raise_oom = subprocess.run(
            [*as_target, "sh", "-c", f"echo 1000 > /proc/{wd}/oom_score_adj"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert raise_oom.returncode != 0
        assert Path(f"/proc/{wd}/oom_score_adj").read_text().strip() == "0"
        # The same uid can still signal the target, so the check above is not vacuous.
        same = subprocess.run([*as_target, "kill", "-0", str(target.pid)], check=False)
        assert same.returncode == 0
        assert host_uid(wd) != -1 and not is_zombie(wd)
        assert _gone(target, 30)
        assert target.returncode == -9
    finally:
        target.kill()


def test_the_watchdog_refuses_the_targets_uid_or_root() -> None:
    from ironclaw.errors import ConfigError

    with pytest.raises(ConfigError, match="must differ"):
        spawn_watchdog(os.getpid(), uid=UID, wall_time_s=1, owner_pid=None, own_uid=UID)
    with pytest.raises(ConfigError, match="must differ"):
        spawn_watchdog(os.getpid(), uid=UID, wall_time_s=1, owner_pid=None, own_uid=0)
