"""The guest bundle's digest is remembered by the sources' identities, not re-hashed.

A copy of the real package stands in for the installed one, so editing, adding and
removing guest sources can be tried without touching the tree under test.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

import ironclaw
from ironclaw.resources import guest_bundle


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    src = Path(ironclaw.__file__).resolve().parent
    copy = tmp_path / "pkg" / "ironclaw"
    for name in guest_bundle.GUEST_MODULES:
        if (src / name).is_dir():
            shutil.copytree(src / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, copy / name)
    monkeypatch.setattr(guest_bundle, "_PACKAGE_DIR", copy)
    return copy


def fresh(state: Path) -> Path:
    """``bundle_path`` as a new process calls it (no per-process cache)."""
    guest_bundle._built.clear()
    return guest_bundle.bundle_path(state)


class NoHashing:
    def sha256(self) -> None:
        raise AssertionError("the sources were hashed although none changed")


def test_an_unchanged_tree_is_not_hashed_again(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    first = fresh(state)
    index = json.loads((state / "guest" / "index.json").read_text())
    assert index["name"] == first.name
    assert str(package / "guest" / "__main__.py") in index["identities"]
    with monkeypatch.context() as m:
        m.setattr(guest_bundle, "hashlib", NoHashing())
        assert fresh(state) == first


@pytest.mark.parametrize("change", ["edit", "add", "remove"])
def test_a_changed_source_gives_a_new_bundle(package: Path, tmp_path: Path, change: str) -> None:
    state = tmp_path / "state"
    first = fresh(state)
    target = package / "guest" / "added_module.py"
    if change == "edit":
        target = package / "ids.py"
        target.write_text(target.read_text() + "\nMARK = 1\n")
    elif change == "add":
        target.write_text("MARK = 2\n")
    else:
        target = package / "proto" / "lifecycle.py"
        target.unlink()
    second = fresh(state)
    assert second != first and second.exists()
    arcname = f"ironclaw/{target.relative_to(package).as_posix()}"
    with zipfile.ZipFile(second) as zf:
        names = zf.namelist()
        if change == "remove":
            assert arcname not in names
        else:
            assert b"MARK" in zf.read(arcname)


def test_a_lost_or_corrupt_index_is_rebuilt_to_the_same_bundle(
    package: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = fresh(state)
    index = state / "guest" / "index.json"
    index.write_text("{not json")
    assert fresh(state) == first
    assert json.loads(index.read_text())["name"] == first.name
    index.unlink()
    assert fresh(state) == first
    assert index.exists()
