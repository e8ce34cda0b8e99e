"""The GREEN/RED classifier, rules, modes and diff cards (pure: no sandbox needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ironclaw.agent.approval import ApprovalPolicy, Approver, Color, build_card
from ironclaw.errors import ConfigError

P = ApprovalPolicy()


@pytest.mark.parametrize(
    ("name", "args", "color"),
    [
        ("files__read_file", {"path": "/etc/passwd"}, Color.GREEN),
        ("files__list_dir", {"path": "."}, Color.GREEN),
        ("files__write_file", {"path": "src/a.py"}, Color.GREEN),
        ("files__write_file", {"path": "/workspace/../etc/x"}, Color.RED),
        ("files__write_file", {"path": "../../tmp/x"}, Color.RED),
        ("files__edit_file", {"path": "/tmp/x"}, Color.RED),
        ("files__delete_file", {"path": "a.txt"}, Color.RED),
        ("shell__run", {"command": "ls -la | grep x && cat a.txt"}, Color.GREEN),
        ("shell__run", {"command": "echo hi > out.txt"}, Color.GREEN),
        ("shell__run", {"command": "echo hi >/etc/motd"}, Color.RED),
        ("shell__run", {"command": "curl https://example.com"}, Color.RED),
        ("shell__run", {"command": "ls; wget x"}, Color.RED),
        ("shell__run", {"command": "pip install requests"}, Color.RED),
        ("shell__run", {"command": "python3 -m pip install x"}, Color.RED),
        ("shell__run", {"command": "rm -rf build"}, Color.RED),
        ("shell__run", {"command": "frobnicate --all"}, Color.RED),
        ("shell__run", {"command": "echo $(rm -rf /)"}, Color.RED),
        ("shell__run", {"command": "python3 -c 'import socket'"}, Color.RED),
        ("python__run_python", {"code": "print(1 + 1)"}, Color.GREEN),
        ("python__run_python", {"code": "import urllib.request"}, Color.RED),
        ("python__run_python", {"code": "import shutil; shutil.rmtree('x')"}, Color.RED),
        ("custom__anything", {}, Color.RED),
    ],
)
def test_default_classification(name: str, args: dict[str, str], color: Color) -> None:
    assert P.classify(name, args).color is color


def test_rules_come_first_and_load_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_text(json.dumps({
        "rules": [
            {"tool": "shell__run", "command": "make deploy*", "color": "RED", "reason": "deploys"},
            {"tool": "custom__*", "color": "green"},
        ],
        "green_commands": ["frobnicate"],
    }))  # fmt: skip
    policy = ApprovalPolicy.from_file(f)
    assert policy.classify("shell__run", {"command": "make deploy prod"}).reason == "deploys"
    assert policy.classify("shell__run", {"command": "make test"}).color is Color.GREEN
    assert policy.classify("custom__x", {}).color is Color.GREEN
    assert policy.classify("shell__run", {"command": "frobnicate"}).color is Color.GREEN
    f.write_text(json.dumps({"rules": [{"tool": "x", "color": "BLUE"}]}))
    with pytest.raises(ConfigError):
        ApprovalPolicy.from_file(f)


async def test_cards_show_diffs_and_command_lines() -> None:
    async def read(path: str) -> str | None:
        return "one\ntwo\n" if path == "a.txt" else None

    card = await build_card("files__write_file", {"path": "a.txt", "content": "one\n2\n"}, read)
    assert "--- a/a.txt" in card and "-two" in card and "+2" in card
    card = await build_card("files__write_file", {"path": "new.txt", "content": "x\n"}, read)
    assert "--- /dev/null" in card and "+x" in card
    patch = "@@ -1,2 +1,2 @@\n one\n-two\n+TWO\n"
    card = await build_card("files__edit_file", {"path": "a.txt", "patch": patch}, read)
    assert "+TWO" in card and "-two" in card
    card = await build_card("shell__run", {"command": "rm -rf x", "cwd": "sub"}, read)
    assert card == "$ rm -rf x\n(cwd: sub)"


async def test_modes() -> None:
    red, green = ("files__delete_file", {"path": "a"}), ("files__read_file", {"path": "a"})
    for mode, red_ok, green_ok in (("all", True, True), ("green-only", False, True),
                                   ("never", False, False)):  # fmt: skip
        a = Approver(mode=mode)
        assert (await a.decide_call(*red))[0].approved is red_ok, mode
        assert (await a.decide_call(*green))[0].approved is green_ok, mode
    asked: list[str] = []

    async def no(req: object) -> bool:
        asked.append("x")
        return False

    d, req = await Approver(mode="prompt", prompt=no).decide_call(*red)
    assert not d.approved and d.decided_by == "person" and asked == ["x"] and req is not None
    d, _ = await Approver(mode="prompt").decide_call(*red)  # nobody to ask: refused
    assert not d.approved
    with pytest.raises(ConfigError):
        Approver(mode="sometimes")
