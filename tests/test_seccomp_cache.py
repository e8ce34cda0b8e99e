"""The seccomp program cache: the same bytes as compiling, without libseccomp once built."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ironclaw.policy.seccomp import compile_bpf
from ironclaw.resources import seccomp_cache
from ironclaw.resources.seccomp_cache import seccomp_program


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    seccomp_cache._memo.clear()


@pytest.mark.parametrize(
    ("profile", "inet"), [("default", False), ("strict", False), ("permissive", True)]
)
def test_cached_program_is_the_compiled_one(tmp_path: Path, profile: str, inet: bool) -> None:
    state = tmp_path / "state"
    program = seccomp_program(state, profile, allow_inet=inet)  # type: ignore[arg-type]
    assert program == compile_bpf(profile, allow_inet=inet)  # type: ignore[arg-type]
    (file,) = (state / "seccomp").glob("*.bpf")
    assert file.read_bytes() == program
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "seccomp").stat().st_mode) == 0o700


def test_profiles_and_network_get_their_own_entries(tmp_path: Path) -> None:
    a = seccomp_program(tmp_path, "default", allow_inet=False)
    b = seccomp_program(tmp_path, "default", allow_inet=True)
    assert a != b and len(list((tmp_path / "seccomp").glob("*.bpf"))) == 2


def test_a_damaged_entry_is_rebuilt(tmp_path: Path) -> None:
    good = seccomp_program(tmp_path, "default", allow_inet=False)
    (file,) = (tmp_path / "seccomp").glob("*.bpf")
    file.write_bytes(good[:-3])
    seccomp_cache._memo.clear()
    assert seccomp_program(tmp_path, "default", allow_inet=False) == good
    assert file.read_bytes() == good


def test_a_built_entry_needs_no_libseccomp(tmp_path: Path) -> None:
    good = seccomp_program(tmp_path, "default", allow_inet=False)
    code = (
        "import sys; from pathlib import Path; "
        "from ironclaw.resources.seccomp_cache import seccomp_program; "
        f"p = seccomp_program(Path({str(tmp_path)!r}), 'default', allow_inet=False); "
        "sys.stdout.buffer.write(p); assert 'pyseccomp' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout == good
