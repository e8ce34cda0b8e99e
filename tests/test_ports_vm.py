"""Exposed ports on a real QEMU VM (TCG): one port reachable from the host, nothing else.

One VM serves the whole module (a TCG boot costs 30-60 s on a loaded host): two HTTP
servers in the guest, 8000 exposed and 8001 not. The tests run in file order; the last
one destroys the VM and checks that its forwards went with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from conftest import CGROUP_ROOT, UID_BASE, image_cache_settings
from ironclaw.config import Settings
from ironclaw.errors import ConfigError
from ironclaw.host import ports
from ironclaw.host.manager import SandboxManager
from ironclaw.images import ImageArtifacts
from ironclaw.sdk import Sandbox
from nethelpers import PROBE
from test_qemu_backend import vm_snapshots  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.vm,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

# Sockets in a namespace sandbox need a network policy; TEST-NET-1 leads nowhere.
NOWHERE = ["192.0.2.0/24"]


@dataclass
class Vm:
    manager: SandboxManager
    sb: Sandbox
    guest_ip: str
    host_ifname: str
    uid: int


def _connects(host: str, port: int) -> bool:
    """Whether a TCP connection from the host (as root) is answered."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


async def _serve(sb: Sandbox, port: int) -> None:
    h = await sb.commands.start(["python3", "-m", "http.server", str(port)], tag=f"http{port}")
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
    for _ in range(300):
        if (await sb.exec(["python3", "-c", probe], timeout=30)).exit_code == 0:
            return
        if not (await h.wait(0)).running:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"the guest's server on {port} did not start: {await h.wait(0)}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(
    tmp_path_factory: pytest.TempPathFactory,
    image: ImageArtifacts,
    vm_snapshots: None,  # noqa: F811  (the fixture imported above)
) -> AsyncIterator[Vm]:
    home = tmp_path_factory.mktemp("ichome-ports-vm")
    os.chmod(home, 0o700)
    state = home / "state"
    state.mkdir(mode=0o700)
    cache = image_cache_settings().state_dir
    # Only this session's image, under a name of this home's own (see vm_image).
    images = state / "images"
    (images / "names").mkdir(mode=0o700, parents=True)
    (images / image.digest).symlink_to(cache / "images" / image.digest)
    (images / "names" / "default").write_text(image.digest + "\n")
    if (cache / "qemu-accel.json").exists():
        shutil.copyfile(cache / "qemu-accel.json", state / "qemu-accel.json")
    settings = Settings.from_env({"IRONCLAW_HOME": str(home)})
    mgr = SandboxManager(settings, cgroup_root=CGROUP_ROOT, uid_base=UID_BASE)
    await mgr.open()
    try:
        spec = {
            "backend": "qemu",
            "limits": {"memory_mib": 384, "workspace_mib": 64},
            "network": {"allow": NOWHERE},
        }
        record = await mgr.create(spec, ready_timeout=120)  # TCG on a busy host
        sb = Sandbox(mgr, record, owns=False)
        await sb.files.write("index.html", "hello from the guest")
        await _serve(sb, 8000)
        await _serve(sb, 8001)
        net = record.info["network"]
        yield Vm(mgr, sb, net["guest_ip"], net["host_ifname"], int(record.info["host_uid"]))
    finally:
        for rec in await mgr.store.all():
            with contextlib.suppress(Exception):
                await mgr.destroy(rec.id)
        await mgr.reconcile()
        await mgr.aclose()
        shutil.rmtree(home, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def _admitted(vm: Vm) -> list[tuple[str, int, int]]:
    return [a for a in await vm.manager.net.firewall.admitted_ports() if a[0] == vm.host_ifname]


async def test_exposed_port_is_reachable_and_nothing_else(vm: Vm) -> None:
    sb = vm.sb
    # Positive control: both servers answer on the guest's own address, inside the guest.
    inside = json.dumps([[vm.guest_ip, 8000], [vm.guest_ip, 8001]])
    got = json.loads((await sb.exec(["python3", "-c", PROBE, inside, "5"], timeout=60)).stdout)
    assert all(v.startswith("ok:") for v in got.values()), got
    # The host's own connections into the sandbox are closed, exposed or not.
    assert not _connects(vm.guest_ip, 8000)
    assert not _connects(vm.guest_ip, 8001)

    started = time.monotonic()
    url = await sb.ports.expose(8000)
    expose_ms = (time.monotonic() - started) * 1000
    assert url.startswith("http://127.0.0.1:")
    assert await _admitted(vm) == [(vm.host_ifname, 8000, vm.uid)]
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(url + "/index.html")
        assert r.status_code == 200 and r.text == "hello from the guest"
        times = []
        for _ in range(20):
            t0 = time.monotonic()
            assert (await http.get(url + "/index.html")).status_code == 200
            times.append((time.monotonic() - t0) * 1000)
    times.sort()
    print(f"\nexpose on a VM: {expose_ms:.0f} ms; GET through the forwarder p50 "
          f"{times[len(times) // 2]:.1f} ms, max {times[-1]:.1f} ms")  # fmt: skip

    (listed,) = await sb.ports.list()
    assert (listed.port, listed.url) == (8000, url)
    # Only the forwarder's uid is admitted: root on the host still cannot dial the guest,
    # and 8001, listening on the same address, stays closed; so does the next host port.
    assert not _connects(vm.guest_ip, 8000)
    assert not _connects(vm.guest_ip, 8001)
    assert not _connects("127.0.0.1", listed.host_port + 1) or listed.host_port == 65535

    await sb.ports.unexpose(8000)
    assert await sb.ports.list() == []
    assert await _admitted(vm) == []
    for _ in range(100):  # the forwarder is gone: its host port is closed
        if not _connects("127.0.0.1", listed.host_port):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the host port still answers after unexpose")


async def test_another_sandbox_reaches_neither_port(vm: Vm) -> None:
    """Even a sandbox whose own policy allows the guest's address: the VM's veth admits
    replies only, whatever is exposed."""
    url = await vm.sb.ports.expose(8000)
    try:
        spec = {"network": {"allow": [f"{vm.guest_ip}/32"]}}
        async with Sandbox.create(spec, manager=vm.manager) as other:
            targets = json.dumps([[vm.guest_ip, 8000], [vm.guest_ip, 8001]])
            res = await other.exec(["python3", "-c", PROBE, targets, "3"], timeout=60)
            got = json.loads(res.stdout)
            assert all(v.startswith("err:") for v in got.values()), got
        async with httpx.AsyncClient(timeout=30) as http:  # while the forward works
            assert (await http.get(url)).status_code == 200
    finally:
        await vm.sb.ports.unexpose(8000)


async def test_bad_input_is_refused_and_changes_nothing(vm: Vm) -> None:
    sb = vm.sb
    url = await sb.ports.expose(8000)
    before = (await sb.ports.list(), await _admitted(vm))
    for bad in (0, 65536, -1):
        with pytest.raises(ConfigError, match="out of range"):
            await sb.ports.expose(bad)
    with pytest.raises(ConfigError, match="already exposed"):
        await sb.ports.expose(8000)
    with pytest.raises(ConfigError, match="not exposed"):
        await sb.ports.unexpose(8001)
    with pytest.raises(ConfigError, match="not an IP address"):
        await sb.ports.expose(8001, host="localhost")
    assert (await sb.ports.list(), await _admitted(vm)) == before
    assert [p.url for p in before[0]] == [url]
    await sb.ports.unexpose(8000)


async def test_gc_clears_a_forward_its_exposing_process_left(vm: Vm) -> None:
    """What a killed orchestrator leaves: the port admitted and a forwarder started, but
    no record written (made here by the same steps expose takes), and a forwarder that
    died under a written record."""
    mgr, record = vm.manager, await vm.manager.get(vm.sb.id)
    died = await vm.sb.ports.expose(8000)
    os.kill((await vm.sb.ports.list())[0].pid, 9)
    plan = ports.forward_plan(record.id, record.backend, record.info)
    folder = mgr.settings.sandbox_runtime_dir(record.rid) / "ports"
    half = folder / "8001.json"
    half.touch(mode=0o600)
    fwd = await ports._start_forwarder(  # the state a crash leaves
        mgr, plan, half, int(record.info["pid"]), 8001, ipaddress.ip_address("127.0.0.1"), 0
    )
    async with httpx.AsyncClient(timeout=30) as http:  # it works, unrecorded
        assert (await http.get(f"http://127.0.0.1:{fwd.host_port}/")).status_code == 200
    assert {a[1] for a in await _admitted(vm)} == {8000, 8001}

    report = await mgr.reconcile()
    assert any("exposed port 8001" in o for o in report.orphans), report
    assert any("exposed port 8000" in o for o in report.orphans), report
    assert await _admitted(vm) == []
    assert not half.exists() and not (folder / "8000.json").exists()
    for _ in range(100):
        if not _connects("127.0.0.1", fwd.host_port):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the unrecorded forwarder still runs after gc")
    assert died.startswith("http://")
    # The sandbox itself is untouched, and can expose again.
    again = await vm.sb.ports.expose(8000)
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(again)).status_code == 200


async def test_destroy_takes_forwarders_and_admissions_along(vm: Vm) -> None:
    listed = await vm.sb.ports.list()
    assert [p.port for p in listed] == [8000]
    pid = listed[0].pid
    await vm.manager.destroy(vm.sb.id)
    assert await _admitted(vm) == []
    for _ in range(200):  # the forwarder ends with its VM (a zombie until reaped)
        if not _alive(pid):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the forwarder outlived its VM")
    assert not _connects("127.0.0.1", listed[0].host_port)
