"""The in-process SDK and the remote SDK satisfy one protocol: checked by mypy (a program
that uses both as ``SandboxAPI`` type-checks, and one that is missing a method does not),
and at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ironclaw.client import ApiClient, ExecResultLike, FilesAPI, SandboxAPI
from ironclaw.client import ExecResult as RemoteResult
from ironclaw.client import Sandbox as RemoteSandbox
from ironclaw.config import Settings
from ironclaw.host.manager import ExecResult as LocalResult
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.store import SandboxRecord
from ironclaw.sdk import Sandbox as LocalSandbox

ROOT = Path(__file__).resolve().parents[1]

CONFORMS = """
from ironclaw.client import Sandbox as Remote, SandboxAPI
from ironclaw.sdk import Sandbox as Local

async def use(sb: SandboxAPI) -> bytes:
    async with sb:
        await sb.files.write("a", b"x")
        await sb.pause()
        await sb.resume(timeout=5.0)
        deadline: float | None = await sb.set_timeout(None)
        digest: str = (await sb.snapshot("s")).sha256
        policy = await sb.network.update(allow=["10.0.0.1:80"], deny_domains=None)
        assert deadline is None and digest and policy.allow
        return (await sb.exec(["true"], timeout=1.0)).stdout

def both(local: Local, remote: Remote) -> list[SandboxAPI]:
    return [local, remote]
"""

BROKEN = """
from ironclaw.client import SandboxAPI

class NoExec:
    id = "x"

def one(x: NoExec) -> SandboxAPI:
    return x
"""


def _mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "check.py"
    f.write_text(code)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--python-version",
            "3.11",
            str(f),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"MYPYPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )


def test_mypy_accepts_both_sdks_as_the_protocol_and_rejects_a_non_conforming_class(
    tmp_path: Path,
) -> None:
    ok = _mypy(tmp_path, CONFORMS)
    assert ok.returncode == 0, ok.stdout
    bad = _mypy(tmp_path, BROKEN)
    assert bad.returncode == 1 and 'Incompatible return value type (got "NoExec"' in bad.stdout


def test_both_sandboxes_satisfy_the_protocol_at_run_time(tmp_path: Path) -> None:
    record = SandboxRecord(id="sb-x", slot=0, backend="namespace", state="running", spec={})
    local = LocalSandbox(
        SandboxManager(Settings(runtime_dir=tmp_path / "r", state_dir=tmp_path / "s")),
        record,
        owns=False,
    )
    remote = RemoteSandbox(
        ApiClient("http://127.0.0.1:9", "t"), {"id": "sb-x", "backend": "qemu"}, owns=True
    )
    for sb in (local, remote):
        assert isinstance(sb, SandboxAPI) and isinstance(sb.files, FilesAPI)
    assert remote.id == local.id == "sb-x" and remote.backend == "qemu"
    for cls in (LocalResult, RemoteResult):
        result = cls(
            sandbox_id="s", exit_code=0, signal=None, stdout=b"", stderr=b"", duration_ms=1.0
        )
        assert isinstance(result, ExecResultLike)
    assert not isinstance(object(), SandboxAPI)
