"""schemathesis against the served OpenAPI document: bounded examples, no 5xx anywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from apiserver import start_server
from ironclaw.config import Settings

pytestmark = pytest.mark.root


def test_openapi_document_and_schemathesis_finds_no_server_error(
    settings: Settings, tmp_path: Path
) -> None:
    # Model calls of fuzzed tasks go to a closed local port, never out to a provider.
    closed = {
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
    }
    server = start_server(settings, env=closed)
    try:
        doc = httpx.get(f"{server.url}/openapi.json").json()
        assert doc["openapi"].startswith("3.")
        for path in (
            "/v1/sandboxes",
            "/v1/sandboxes/{sandbox_id}/exec",
            "/v1/sandboxes/{sandbox_id}/files/content",
            "/v1/tasks",
            "/v1/tasks/{task_id}/events",
            "/v1/approvals",
            "/v1/snapshots",
            "/v1/snapshots/{name}/fork",
            "/v1/sandboxes/{sandbox_id}/network",
            "/v1/sandboxes/{sandbox_id}/pause",
            "/healthz",
            "/metrics",
        ):
            assert path in doc["paths"], path
        # Every scope, but a quota: fuzzed creates make at most two real sandboxes.
        token = server.token("read", "write", "approve", max_sandboxes=2, max_memory_mib=1024)
        bin_dir = Path(sys.executable).parent
        proc = subprocess.run(
            [
                str(bin_dir / "schemathesis"),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "5",
                "--workers",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-time",
                "120",
                "--seed",
                "7",
                "--request-timeout",
                "60",
                "--generation-database",
                "none",
                "--no-color",
                "-H",
                f"Authorization: Bearer {token}",
                "--report",
                "junit",
                "--report-dir",
                str(tmp_path),
            ],
            capture_output=True,
            timeout=400,
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        out = proc.stdout.decode(errors="replace")
        print(out[-3000:])
        assert proc.returncode == 0, out[-6000:] + proc.stderr.decode(errors="replace")[-2000:]
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        assert m is not None and m[1] == m[2] and int(m[1]) >= 100, out[-2000:]
        assert "Fuzzing" in out and "Coverage" in out
    finally:
        assert server.stop() == 0
