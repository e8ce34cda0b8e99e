"""The guest's recursive watch on a real inotify descriptor: a file made inside a new
directory in the window between that directory's watch being added and its scan is
reported once, not twice (the scan and the kernel both see it).

The window is forced, not waited for: the scan of the new directory first makes the
file, as a racing writer would, then reads the directory.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw.guest import watch as gw

IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000


@pytest.fixture
def inotify_fd() -> Iterator[int]:
    fd = ctypes.CDLL(None, use_errno=True).inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    assert fd >= 0
    yield fd
    os.close(fd)


def _events(w: Any) -> list[tuple[str, str]]:
    return [(e["type"], e["path"]) for e in w.queue]


def test_a_file_made_between_a_new_directorys_watch_and_its_scan_is_created_once(
    tmp_path: Path, inotify_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_scandir = os.scandir
    sub = tmp_path / "sub"

    def racing_scandir(path: Any) -> Any:
        if os.fspath(path) == str(sub) and not (sub / "a.txt").exists():
            (sub / "a.txt").write_text("1")  # after the watch on sub, before the scan
        return real_scandir(path)

    w = gw._Watcher(inotify_fd, max_queue=100, recursive=True)
    w.add(str(tmp_path))
    monkeypatch.setattr(gw.os, "scandir", racing_scandir)
    sub.mkdir()
    w.on_readable()  # IN_CREATE sub: watch it, scan it (a.txt appears meanwhile)
    w.on_readable()  # the kernel's own IN_CREATE/IN_MODIFY of a.txt, if not read yet
    events = _events(w)
    assert events.count(("created", str(sub / "a.txt"))) == 1, events
    assert events[0] == ("created", str(sub))


def test_a_file_deleted_and_made_again_after_the_scan_is_reported_again(
    tmp_path: Path, inotify_fd: int
) -> None:
    w = gw._Watcher(inotify_fd, max_queue=100, recursive=True)
    w.add(str(tmp_path))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a.txt").write_text("1")
    w.on_readable()  # the scan announces a.txt
    (sub / "a.txt").unlink()
    (sub / "a.txt").write_text("2")
    w.on_readable()
    a = str(sub / "a.txt")
    assert [e for e in _events(w) if e[1] == a][:3] == [
        ("created", a),
        ("deleted", a),
        ("created", a),
    ], _events(w)
