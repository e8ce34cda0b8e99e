"""A stand-in for Firecracker (and its jailer) that behaves as Firecracker's docs describe.

Run as a program (``python test_firecracker_fake.py firecracker|jailer ...``) it serves
Firecracker's API on a Unix socket - HTTP/1.1, 204 on success, 400 with
``fault_message`` on refusal - and checks every body against Firecracker's own Swagger
spec, answering 400 on unknown fields as Firecracker does. On ``InstanceStart`` it runs
the real guest agent (``python -m ironclaw.guest``) as "the guest" and serves hybrid vsock
on the configured ``uds_path``: ``CONNECT <port>\\n`` gets ``OK <hostport>\\n`` and a
spliced stream once the guest listens, and a closed connection before that (the boot
race). Pause stops the splice like stopped vCPUs; snapshots write and read real files.
The jailer mode checks its arguments, enters ``--netns`` for real and serves the API from
``<base>/firecracker/<id>/root/run/firecracker.socket`` with chroot-relative paths.

Only what a real boot needs is missing: a kernel. The tests in this file check the fake
itself against the spec, so the backend tests that lean on it stand on tested ground.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

SPEC_PATH = Path(__file__).resolve().parents[1].parent / "shared/data/firecracker/firecracker.yaml"
GUEST_PORT = 1024
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found"}


class FakeFirecracker:
    """The API server, the vsock muxer and the guest process of one fake microVM."""

    def __init__(
        self,
        api_sock: str,
        *,
        root: Path | None = None,
        uid: int | None = None,
        record: Path | None = None,
        refuse_first: int = 2,
        vm_id: str = "anonymous-instance",
    ) -> None:
        from ironclaw.backends.firecracker.schema import ApiSpec

        self.spec = ApiSpec.load(SPEC_PATH)
        self.api_sock = api_sock
        self.root = root
        self.uid = uid
        self.record = record
        self.refuse_first = refuse_first
        self.vm_id = vm_id
        self.state = "Not started"
        self.config: dict[str, Any] = {"drives": {}, "network-interfaces": {}}
        self.running = asyncio.Event()
        self.done = asyncio.Event()
        self.connects = 0
        self.refused = 0
        self.guest: asyncio.subprocess.Process | None = None
        self.guest_dir = Path(tempfile.mkdtemp(prefix="fcguest"))
        self.vsock_server: asyncio.Server | None = None
        self._host_ports = itertools.count(1 << 30)

    # -- paths as the jailed Firecracker sees them -------------------------------------
    def host(self, path: str) -> Path:
        if self.root is None:
            return Path(path)
        if not path.startswith("/"):
            raise ValueError(f"relative path {path!r} inside the jail")
        # Relative to the jail root, which is the cwd: short socket paths, as in a chroot.
        return Path(path.lstrip("/"))

    def log(self, **event: Any) -> None:
        if self.record is not None:
            with open(self.record, "a") as f:
                f.write(json.dumps(event) + "\n")

    # -- HTTP --------------------------------------------------------------------------
    async def serve(self) -> None:
        server = await asyncio.start_unix_server(self._http, self.api_sock)
        try:
            await self.done.wait()
        finally:
            server.close()
            await self._stop_guest()
            shutil.rmtree(self.guest_dir, ignore_errors=True)

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload = await self.dispatch(method, target, raw)
                data = b"" if payload is None else json.dumps(payload).encode()
                head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                if data:
                    head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                else:
                    head += "Content-Length: 0\r\n"
                writer.write(head.encode() + b"\r\n" + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def dispatch(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            return 400, {"fault_message": f"invalid JSON: {exc}"}
        self.log(kind="api", method=method, path=path, body=body)
        if method != "GET":
            errors = self.spec.validate_request(method, path, body)
            if errors:
                return 400, {"fault_message": "; ".join(errors)}
        try:
            return await self._route(method, path, body)
        except _Refused as exc:
            return 400, {"fault_message": str(exc)}

    async def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (method, path) == ("GET", "/"):
            info = {"app_name": "Firecracker", "id": self.vm_id, "state": self.state}
            return 200, {**info, "vmm_version": "1.17.0-fake"}
        if (method, path) == ("GET", "/vm/config"):
            return 200, self.config
        if method == "PUT" and path == "/actions":
            return await self._action(body["action_type"])
        if method == "PATCH" and path == "/vm":
            if self.state == "Not started":
                raise _Refused("The microVM is not started")
            self.state = "Paused" if body["state"] == "Paused" else "Running"
            (self.running.clear if self.state == "Paused" else self.running.set)()
            return 204, None
        if method == "PUT" and path == "/snapshot/create":
            return self._snapshot_create(body)
        if method == "PUT" and path == "/snapshot/load":
            return await self._snapshot_load(body)
        if method == "PUT" and self.state != "Not started":
            raise _Refused("The requested operation is not supported after starting the microVM.")
        if method == "PUT" and path in ("/boot-source", "/machine-config", "/vsock"):
            for key in ("kernel_image_path", "initrd_path"):
                if key in body:
                    self._readable(body[key])
            self.config[path.lstrip("/")] = body
            return 204, None
        if method == "PUT" and path.startswith("/drives/"):
            if body["is_read_only"]:
                self._readable(body["path_on_host"])
            else:
                self._writable(body["path_on_host"])
            self.config["drives"][body["drive_id"]] = body
            return 204, None
        if method == "PUT" and path.startswith("/network-interfaces/"):
            tap = body["host_dev_name"]
            try:
                socket.if_nametoindex(tap)  # in this process's network namespace
            except OSError:
                raise _Refused(f"Open tap device failed: no device {tap} here") from None
            self.config["network-interfaces"][body["iface_id"]] = body
            return 204, None
        return 404, {"fault_message": f"no fake route for {method} {path}"}

    def _readable(self, path: str) -> None:
        st = self._stat(path)
        if self.uid is not None and st.st_uid != self.uid and not st.st_mode & 0o004:
            raise _Refused(f"cannot open {path}: Permission denied (uid {self.uid})")

    def _writable(self, path: str) -> None:
        st = self._stat(path)
        if self.uid is not None and st.st_uid != self.uid and not st.st_mode & 0o002:
            raise _Refused(f"cannot open {path} read-write: Permission denied (uid {self.uid})")

    def _stat(self, path: str) -> os.stat_result:
        try:
            return os.stat(self.host(path))
        except (OSError, ValueError) as exc:
            raise _Refused(f"cannot open {path}: {exc}") from None

    async def _action(self, action: str) -> tuple[int, Any]:
        if action == "InstanceStart":
            if self.state != "Not started":
                raise _Refused("The microVM is already running")
            if "boot-source" not in self.config:
                raise _Refused("Cannot start microvm without kernel configuration.")
            await self._boot()
            return 204, None
        if action == "SendCtrlAltDel":
            if self.state == "Not started":
                raise _Refused("The microVM is not started")
            # The guest reboots; Firecracker exits (reboot=k).
            asyncio.get_running_loop().call_later(0.05, self.done.set)
            return 204, None
        return 204, None

    async def _boot(self) -> None:
        vsock = self.config.get("vsock")
        if vsock is not None:
            uds = self.host(vsock["uds_path"])
            with contextlib.suppress(FileNotFoundError):
                uds.unlink()
            self.vsock_server = await asyncio.start_unix_server(self._vsock, str(uds))
        workdir = self.guest_dir / "ws"
        workdir.mkdir(exist_ok=True)
        self.guest = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ironclaw.guest",
            "--unix",
            str(self.guest_dir / "agent.sock"),
            "--workdir",
            str(workdir),
            stdin=asyncio.subprocess.DEVNULL,
        )
        self.state = "Running"
        self.running.set()
        self.log(kind="boot", guest_pid=self.guest.pid)

    async def _stop_guest(self) -> None:
        if self.vsock_server is not None:
            self.vsock_server.close()
        if self.guest is not None and self.guest.returncode is None:
            self.guest.kill()
            await self.guest.wait()

    # -- hybrid vsock ----------------------------------------------------------------
    async def _vsock(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from ironclaw.proto import HandshakeServer, ok_line

        self.connects += 1
        try:
            hs = HandshakeServer()
            while (port := hs.receive_data(await reader.read(64))) is None:
                pass
            guest = None
            if port == GUEST_PORT and self.connects > self.refuse_first:
                with contextlib.suppress(OSError):
                    guest = await asyncio.open_unix_connection(str(self.guest_dir / "agent.sock"))
            if guest is None:
                self.refused += 1
                self.log(kind="vsock", port=port, ok=False)
                writer.close()  # nobody listens on that guest port (yet)
                return
            self.log(kind="vsock", port=port, ok=True)
            writer.write(ok_line(next(self._host_ports)))
            g_reader, g_writer = guest
            if hs.leftover:
                g_writer.write(hs.leftover)
            await asyncio.gather(
                self._pump(reader, g_writer), self._pump(g_reader, writer), return_exceptions=True
            )
        except (ValueError, ConnectionError):
            writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.running.wait()  # paused vCPUs move no bytes
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    # -- snapshots -------------------------------------------------------------------
    def _snapshot_create(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.state != "Paused":
            raise _Refused("Create snapshot error: the microVM must be paused")
        kind = body.get("snapshot_type", "Full")
        if kind == "Diff" and not self.config["machine-config"].get("track_dirty_pages"):
            raise _Refused("Diff snapshots need dirty page tracking")
        state = {"config": self.config, "type": kind}
        self.host(body["snapshot_path"]).write_text(json.dumps(state))
        self.host(body["mem_file_path"]).write_bytes(b"\0" * 4096)
        return 204, None

    async def _snapshot_load(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.state != "Not started" or any(
            k for k, v in self.config.items() if v and k not in ("drives", "network-interfaces")
        ):
            raise _Refused(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )
        try:
            saved = json.loads(self.host(body["snapshot_path"]).read_text())
        except (OSError, ValueError) as exc:
            raise _Refused(f"Load snapshot error: {exc}") from None
        self._stat(body["mem_backend"]["backend_path"])
        config = saved["config"]
        for drive in config["drives"].values():
            self._stat(drive["path_on_host"])
        for over in body.get("network_overrides", []):
            config["network-interfaces"][over["iface_id"]]["host_dev_name"] = over["host_dev_name"]
        if "vsock_override" in body:
            config["vsock"]["uds_path"] = body["vsock_override"]["uds_path"]
        self.config = config
        await self._boot()
        if not body.get("resume_vm"):
            self.state = "Paused"
            self.running.clear()
        return 204, None


class _Refused(Exception):
    """A request Firecracker would answer with 400."""


# -- programs ------------------------------------------------------------------------------
def _firecracker_main(argv: list[str], *, root: Path | None = None, uid: int | None = None) -> int:
    p = argparse.ArgumentParser(prog="firecracker")
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    p.add_argument("--record")
    p.add_argument("--refuse-first", type=int, default=2)
    a = p.parse_args(argv)
    api = a.api_sock
    if root is not None:
        os.chdir(root)  # stands in for the chroot
        api = a.api_sock.lstrip("/")

    async def run() -> None:
        fc = FakeFirecracker(
            api,
            root=root,
            uid=uid,
            record=Path(a.record) if a.record else None,
            refuse_first=a.refuse_first,
            vm_id=a.id,
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, fc.done.set)
        fc.log(kind="start", argv=argv, pid=os.getpid(), root=str(root) if root else None)
        await fc.serve()

    asyncio.run(run())
    return 0


def _jailer_main(argv: list[str], record: str | None) -> int:
    if "--" in argv:
        i = argv.index("--")
        argv, fc_args = argv[:i], argv[i + 1 :]
    else:
        fc_args = []
    p = argparse.ArgumentParser(prog="jailer")
    p.add_argument("--id", required=True)
    p.add_argument("--exec-file", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--chroot-base-dir", default="/srv/jailer")
    p.add_argument("--netns")
    p.add_argument("--cgroup-version", type=int, choices=(1, 2), default=1)
    p.add_argument("--cgroup", action="append", default=[])
    a = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", a.id):
        sys.exit(f"jailer: invalid instance id {a.id!r}")
    exec_file = Path(a.exec_file)
    if "firecracker" not in exec_file.name or not exec_file.is_file():
        sys.exit(f"jailer: bad exec file {exec_file}")
    root = Path(a.chroot_base_dir) / exec_file.name / a.id / "root"
    root.mkdir(parents=True, exist_ok=True)
    if a.netns:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(a.netns, os.O_RDONLY)
        if libc.setns(fd, 0x40000000) != 0:
            sys.exit(f"jailer: setns {a.netns} failed")
        os.close(fd)
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"kind": "jailer", "argv": argv, "fc_args": fc_args}) + "\n")
    extra = ["--id", a.id, *(["--record", record] if record else [])]
    return _firecracker_main([*fc_args, *extra], root=root, uid=a.uid)


def main(argv: list[str]) -> int:
    """``firecracker|jailer [--record FILE] [--refuse-first N] ARGS...``"""
    mode, rest = argv[0], argv[1:]
    if mode == "jailer":
        record = None
        if rest[:1] == ["--record"]:
            record, rest = rest[1], rest[2:]
        return _jailer_main(rest, record)
    return _firecracker_main(rest)


def write_wrappers(directory: Path, record: Path, *, refuse_first: int = 2) -> tuple[Path, Path]:
    """Executables named ``firecracker`` and ``jailer`` that run this fake."""
    me, py = Path(__file__).resolve(), sys.executable
    fc, jl = directory / "firecracker", directory / "jailer"
    fc.write_text(
        f'#!/bin/sh\nexec {py} {me} firecracker "$@" --record {record} '
        f"--refuse-first {refuse_first}\n"
    )
    jl.write_text(f'#!/bin/sh\nexec {py} {me} jailer --record {record} "$@"\n')
    for f in (fc, jl):
        f.chmod(0o755)
    return fc, jl


def read_record(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- tests of the fake itself ----------------------------------------------------------------
pytestmark = pytest.mark.skipif(not SPEC_PATH.is_file(), reason=f"{SPEC_PATH} is absent")


@pytest.fixture
async def fake(tmp_path: Path) -> Any:
    fc = FakeFirecracker(str(tmp_path / "api.sock"), record=tmp_path / "rec.jsonl")
    task = asyncio.ensure_future(fc.serve())
    for _ in range(200):
        if (tmp_path / "api.sock").exists():
            break
        await asyncio.sleep(0.005)
    yield fc
    fc.done.set()
    async with asyncio.timeout(5):
        await task


async def test_fake_answers_like_firecracker(fake: FakeFirecracker, tmp_path: Path) -> None:
    status, _ = await fake.dispatch("PUT", "/machine-config", b'{"vcpu_count": 1}')
    assert status == 400  # mem_size_mib is required
    status, body = await fake.dispatch(
        "PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 128, "ht_enabled": true}'
    )
    assert status == 400
    assert "ht_enabled" in body["fault_message"]
    status, _ = await fake.dispatch(
        "PUT", "/machine-config", b'{"vcpu_count": 1, "mem_size_mib": 128}'
    )
    assert status == 204
    status, body = await fake.dispatch("PUT", "/actions", b'{"action_type": "InstanceStart"}')
    assert status == 400
    assert "kernel" in body["fault_message"]
    status, body = await fake.dispatch("PATCH", "/vm", b'{"state": "Paused"}')
    assert (status, "not started" in body["fault_message"]) == (400, True)
