"""Typed backend info: what the registry stores round-trips, and rows written before the
info was typed (plain dicts, beside the manager's own keys) still load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ironclaw.backends.base import Backend, BackendInfo
from ironclaw.backends.firecracker import FirecrackerBackend
from ironclaw.backends.firecracker.backend import FirecrackerInfo
from ironclaw.backends.namespace import NamespaceBackend, NamespaceInfo
from ironclaw.backends.qemu.backend import QemuBackend, QemuInfo
from ironclaw.errors import BackendError
from ironclaw.resources.store import Store

# What the manager itself writes into a row's info, beside the backend's keys.
MANAGER_KEYS: dict[str, Any] = {
    "owner_start": 123456,
    "rid": "sb-old",
    "host_uid": 200007,
    "network": {"netns_path": "/run/netns/x", "guest_ip": "10.250.0.2", "proxy_pid": 77},
}

# Rows exactly as the backends wrote them when info was a dict.
OLD_ROWS: dict[str, dict[str, Any]] = {
    "namespace": {
        "pid": 4242,
        "pid_start": 998877,
        "socket": "/r/sandboxes/sb-old/agent.sock",
        "status_file": "/r/sandboxes/sb-old/status.json",
        "log": "/r/sandboxes/sb-old/sandbox.log",
        "host_uid": 200007,
        "started_at": 1700000000.5,
        "wall_time_s": None,
    },
    "qemu": {
        "watchdog_pid": 4243,
        "wall_time_s": 30.0,
        "pid": 4242,
        "pid_start": 998877,
        "socket": "/r/sandboxes/sb-old/agent.sock",
        "qmp": "/r/sandboxes/sb-old/qmp.sock",
        "console_log": "/r/sandboxes/sb-old/console.log",
        "stderr_log": "/r/sandboxes/sb-old/qemu.stderr",
        "run_dir": "/r/sandboxes/sb-old",
        "image": "ab" * 16,
        "kernel_release": "6.1.0-test",
        "accel": "tcg",
        "vcpus": 1,
        "guest_mib": 288,
        "tap": None,
        "host_uid": 200007,
        "started_at": 1700000000.5,
    },
    "firecracker": {
        "pid": 4242,
        "pid_start": 998877,
        "api_socket": "/r/sandboxes/sb-old/api.sock",
        "vsock_uds": "/r/sandboxes/sb-old/vsock.sock",
        "vsock_port": 1024,
        "run_dir": "/r/sandboxes/sb-old",
        "console_log": "/r/sandboxes/sb-old/console.log",
        "chroot_base": "/s/jailer",
        "jail_id": "sb-old",
        "uid": 200007,
        "gid": 200007,
        "jailed": True,
        "tap": "tap0",
        "vcpus": 2,
        "mem_mib": 480,
        "track_dirty_pages": False,
        "started_at": 1700000000.5,
    },
}

BACKENDS: dict[str, tuple[Backend[Any], type[BackendInfo]]] = {
    "namespace": (NamespaceBackend(), NamespaceInfo),
    "qemu": (QemuBackend(), QemuInfo),
    "firecracker": (FirecrackerBackend(), FirecrackerInfo),
}


@pytest.mark.parametrize("name", sorted(OLD_ROWS))
async def test_an_old_registry_row_loads_and_writes_back_the_same(
    name: str, tmp_path: Path
) -> None:
    backend, cls = BACKENDS[name]
    async with Store(tmp_path / "r.sqlite3") as store:
        await store.reserve("sb-old", backend=name, spec={}, owner_pid=1, one_shot=False)
        await store.update("sb-old", state="running", info={**OLD_ROWS[name], **MANAGER_KEYS})
        record = await store.get("sb-old")
    info = backend.load_info(record.info)
    assert type(info) is cls
    assert (info.pid, info.pid_start, info.started_at) == (4242, 998877, 1700000000.5)
    # Every key the old row had is a field under the same name, with the same value.
    assert info.to_json() == OLD_ROWS[name]


@pytest.mark.parametrize("name", sorted(OLD_ROWS))
async def test_typed_info_round_trips_through_the_registry(name: str, tmp_path: Path) -> None:
    backend, cls = BACKENDS[name]
    info = cls.from_json({**OLD_ROWS[name], "pid": 99, "started_at": 2.0})
    async with Store(tmp_path / "r.sqlite3") as store:
        await store.reserve("sb-new", backend=name, spec={}, owner_pid=1, one_shot=False)
        await store.update("sb-new", info={**info.to_json(), **MANAGER_KEYS})
        record = await store.get("sb-new")
    back = backend.load_info(record.info)
    assert back == info
    assert json.loads(json.dumps(back.to_json())) == info.to_json()
    assert cls.of(record.info) == info and cls.of(info) is info


def test_a_row_without_a_launch_is_refused_with_advice() -> None:
    """A row whose launch never returned has no pid: loading it says what to do."""
    backend, _ = BACKENDS["qemu"]
    with pytest.raises(BackendError, match="ironclaw gc"):
        backend.load_info(MANAGER_KEYS)


def test_one_backends_info_is_not_taken_for_anothers() -> None:
    ns = NamespaceInfo.from_json(OLD_ROWS["namespace"])
    with pytest.raises(BackendError, match="NamespaceInfo given where QemuInfo"):
        QemuInfo.of(ns)


def test_every_backend_satisfies_the_protocol() -> None:
    for backend, _ in BACKENDS.values():
        assert isinstance(backend, Backend)
