"""Facts about host processes read from /proc (no subprocess, no blocking waits), and
waiting on a pidfd without blocking the event loop."""

from __future__ import annotations

import os

__all__ = [
    "descendants",
    "host_uid",
    "is_zombie",
    "process_start_time",
    "processes_with_uid_in",
    "wait_readable",
]


async def wait_readable(fd: int) -> None:
    """Return once ``fd`` is readable (a pidfd: once its process has exited). The loop
    wakes on the event itself, no polling; cancelling stops the wait cleanly."""
    import asyncio  # here: the one-shot CLI reads /proc facts without an event loop

    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat).

    Stored beside a pid so that a recycled pid is never mistaken for our process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _parent_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), as host pids."""
    children = _parent_map()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def host_uid(pid: int) -> int:
    """The real uid of ``pid`` in the host's user namespace, or -1 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def is_zombie(pid: int) -> bool:
    """True for a process that has exited and waits to be reaped by its parent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] in (b"Z", b"X")


def processes_with_uid_in(low: int, high: int) -> list[tuple[int, int]]:
    """``(pid, uid)`` of every live process whose host uid is in ``[low, high)``.

    Zombies are left out: they hold nothing but a pid, and only their parent (often the
    host's init, once the orchestrator that started them is gone) can reap them.
    """
    out: list[tuple[int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        uid = host_uid(pid)
        if low <= uid < high and not is_zombie(pid):
            out.append((pid, uid))
    return out
