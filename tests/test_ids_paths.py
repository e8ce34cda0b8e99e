"""Invariant 1 and 2 at the unit level: ids validated, paths kept inside, names distinct."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import ConfigError, InvalidSandboxId
from ironclaw.ids import ID_PATTERN, derived_name, new_sandbox_id, validate_sandbox_id

BAD_IDS = [
    "../../etc/passwd",
    "a/b",
    "A",
    "-x",
    "a" * 64,
    "",
    "café",
    "a b",
    "a\0b",
    ".",
    "..",
    "x_y",
    "a\n",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused_with_a_clear_message(bad: str) -> None:
    with pytest.raises(InvalidSandboxId, match="invalid sandbox id"):
        validate_sandbox_id(bad)


def test_non_string_id_is_refused() -> None:
    with pytest.raises(InvalidSandboxId):
        validate_sandbox_id(42)


def test_good_ids_pass() -> None:
    for good in ["a", "0", "task-1", "a" * 63, "x-" * 31 + "z"]:
        assert validate_sandbox_id(good) == good


def test_generated_ids_are_valid_and_distinct() -> None:
    ids = {new_sandbox_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(ID_PATTERN.fullmatch(i) for i in ids)


valid_ids = st.from_regex(ID_PATTERN, fullmatch=True)


@given(valid_ids, valid_ids)
def test_distinct_ids_never_share_a_derived_name(a: str, b: str) -> None:
    if a != b:
        for kind, cap in (("ns", 64), ("v", 15), ("ch", 64)):
            assert derived_name(kind, a, max_len=cap) != derived_name(kind, b, max_len=cap)


def test_ids_the_old_sanitisation_merged_get_distinct_names() -> None:
    # The old scheme replaced non-alphanumerics with '_' and truncated: these collided.
    pairs = [("task-1", "task1"), ("a-b1", "ab-1"), ("x" * 62 + "a", "x" * 62 + "b")]
    for a, b in pairs:
        assert derived_name("ch", a) != derived_name("ch", b)
        assert derived_name("v", a, max_len=15) != derived_name("v", b, max_len=15)


def test_derived_names_fit_interface_names() -> None:
    name = derived_name("v", "a" * 63, max_len=15)
    assert len(name) == 15 and name.startswith("icv")


@pytest.mark.parametrize("part", ["..", ".", "a/b", "", "/etc", "x\0y"])
def test_safe_join_refuses_escapes(tmp_path: Path, part: str) -> None:
    with pytest.raises(ConfigError):
        safe_join(tmp_path, part)


def test_settings_paths_stay_inside_and_refuse_bad_ids(tmp_path: Path) -> None:
    s = Settings(runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    assert s.sandbox_runtime_dir("ok-1").parent.parent == tmp_path / "run"
    for bad in BAD_IDS:
        with pytest.raises(InvalidSandboxId):
            s.sandbox_runtime_dir(bad)


def test_runtime_roots_are_private(tmp_path: Path) -> None:
    s = Settings(runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    s.ensure()
    for d in (s.runtime_dir, s.state_dir):
        st_ = d.stat()
        assert stat.S_IMODE(st_.st_mode) == 0o700
        assert st_.st_uid == os.geteuid()


def test_default_roots_are_not_world_writable_tmp() -> None:
    s = Settings.from_env({})
    assert s.runtime_dir == Path("/run/ironclaw")
    assert s.state_dir == Path("/var/lib/ironclaw")
    assert not str(s.runtime_dir).startswith("/tmp")


def test_ensure_private_dir_tightens_loose_mode(tmp_path: Path) -> None:
    d = tmp_path / "loose"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_ensure_private_dir_refuses_foreign_owner(tmp_path: Path) -> None:
    d = tmp_path / "foreign"
    d.mkdir()
    os.chown(d, 12345, 12345)
    with pytest.raises(ConfigError, match="owned by uid 12345"):
        ensure_private_dir(d)
