"""The namespace launch's records: keyword-only, defaults from the class, no dataclasses.

They are built on :class:`ironclaw.backends.namespace.cmdline.PlainRecord` so the one-shot
CLI's start-up generates no methods (the import test in test_oneshot_direct.py guards
that); these checks hold what a dataclass would have given for free.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ironclaw.backends.namespace.cmdline import JailFds
from ironclaw.backends.namespace.launch import Jail, Payload, Tools
from ironclaw.spec_light import DEFAULT_SPEC


def test_a_record_keeps_what_it_is_given_and_defaults_the_rest(tmp_path: Path) -> None:
    jail = Jail(
        spec=DEFAULT_SPEC,
        sandbox_id="rec-1",
        host_uid=70000,
        run_dir=tmp_path,
        state_dir=tmp_path,
        one_shot=True,
    )
    assert (jail.sandbox_id, jail.host_uid, jail.one_shot) == ("rec-1", 70000, True)
    assert (jail.cgroup, jail.netns_path, jail.extra_env) == (None, None, None)
    assert jail.hostname == "rec-1" and jail.status_path == tmp_path / "status.json"
    fds = JailFds(seccomp=5, etc={"hosts": 7}, status=6)
    assert fds.all() == [5, 6, 7]
    fds = JailFds(seccomp=5, etc={}, status=6, guest_zip=8, listen=9)
    assert fds.all() == [5, 8, 9, 6]


def test_records_are_keyword_only_and_do_not_share_values() -> None:
    with pytest.raises(TypeError):
        Payload(1, 2, 0)  # type: ignore[call-arg]
    a = Payload(stdout=1, stderr=2, oom_score_adj=0, argv=["true"])
    b = Payload(stdout=3, stderr=3, oom_score_adj=1000)
    assert (a.stdout, a.stderr, a.argv, a.listen) == (1, 2, ["true"], None)
    assert (b.stdout, b.argv, b.guest_zip) == (3, None, None)
    assert not any(dataclasses.is_dataclass(c) for c in (Jail, Payload, Tools, JailFds))


def test_tools_find_names_every_program() -> None:
    tools = Tools.find(bwrap="/nowhere/bwrap")
    assert tools.bwrap == "/nowhere/bwrap"
    assert all(isinstance(getattr(tools, n), str) for n in ("timeout", "nsenter", "setpriv"))
