"""The QEMU process a :class:`~ironclaw.backends.qemu.vm.QemuVm` drives: spawned or attached.

A VM outlives the CLI run that started it, so a later run watches it through a pidfd
rather than as a child; both kinds answer the same small protocol here. Also the check
that QEMU really dropped root before the guest runs.
"""

from __future__ import annotations

import asyncio
import os
import select
from pathlib import Path
from typing import Protocol

from ironclaw.errors import BackendError
from ironclaw.resources.procs import wait_readable

__all__ = ["AttachedProc", "QemuProcess", "check_dropped", "wait_exit_within"]


def check_dropped(pid: int, uid: int) -> None:
    """Raise unless every thread of ``pid`` has only ``uid``/gid ``uid`` and no capabilities.

    Checked per thread: a thread that kept root would be root for the guest it runs.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
                if ":" in line
            )
            ids = fields["Uid"].split() + fields["Gid"].split()
            groups = set(fields.get("Groups", "").split()) - {str(uid)}
            if any(int(i) != uid for i in ids) or groups or int(fields["CapEff"], 16):
                raise BackendError(
                    f"QEMU thread {tid} did not drop to uid {uid}: Uid {fields['Uid'].strip()}, "
                    f"Gid {fields['Gid'].strip()}, CapEff {fields['CapEff'].strip()}"
                )
    except (OSError, KeyError, ValueError) as exc:
        raise BackendError(f"cannot verify that QEMU (pid {pid}) dropped root: {exc}") from exc


class QemuProcess(Protocol):
    """What QemuVm needs of its QEMU process, spawned (a child) or attached (not)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class AttachedProc:
    """A QEMU started by another process (an earlier CLI run), watched through a pidfd.

    Its exit status belongs to its parent; ``returncode`` becomes -1 once it is gone.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)

    def _check(self) -> bool:
        if self.returncode is None and select.select([self._fd], [], [], 0)[0]:
            self.returncode = -1
            os.close(self._fd)
        return self.returncode is not None

    async def wait(self) -> int:
        if not self._check():
            await wait_readable(self._fd)
            self._check()
        return -1


async def wait_exit_within(proc: QemuProcess, limit_s: float) -> bool:
    if proc.returncode is not None:
        return True
    try:
        async with asyncio.timeout(limit_s):
            await proc.wait()
    except TimeoutError:
        return False
    return True
