"""The blocking remote SDK (``SyncSandbox``) has the async one's whole surface: detached
commands, PTYs, ports, watches, lifetimes, pause/resume, live egress and snapshots, each
driven here through a real ``ironclaw serve`` and real namespace sandboxes; and every
public async method has a blocking twin with the same parameters."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator

import httpx
import pytest

from apiserver import Server, serve
from ironclaw.client import Sandbox, SyncSandbox
from ironclaw.client import sync as blocking
from ironclaw.client.controls import RemoteNetwork, RemoteSnapshot, RemoteSnapshots
from ironclaw.client.procs import (
    RemoteCommands,
    RemotePorts,
    RemoteProcessHandle,
    RemotePty,
    RemoteTerminal,
    RemoteWatch,
)
from ironclaw.client.sandbox import RemoteFiles
from ironclaw.config import Settings
from ironclaw.errors import Conflict, NotFound
from test_api_procs import NET, SERVE, SERVER

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

TWINS: dict[type, type] = {
    Sandbox: blocking.SyncSandbox,
    RemoteFiles: blocking.SyncFiles,
    RemoteCommands: blocking.SyncCommands,
    RemoteProcessHandle: blocking.SyncProcessHandle,
    RemotePty: blocking.SyncPty,
    RemoteTerminal: blocking.SyncTerminal,
    RemotePorts: blocking.SyncPorts,
    RemoteNetwork: blocking.SyncNetwork,
    RemoteSnapshots: blocking.SyncSnapshots,
    RemoteWatch: blocking.SyncWatch,
}
#: Names that change with the colour of the function.
RENAMED = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__",
           "__aiter__": "__iter__", "__anext__": "__next__"}  # fmt: skip


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


def _public(cls: type) -> dict[str, object]:
    """The class's public methods and properties, inherited ones too (not ``object``'s)."""
    out = {}
    for name, value in inspect.getmembers(cls):
        if name.startswith("_") and name not in {*RENAMED, *RENAMED.values()}:
            continue
        if hasattr(object, name) and getattr(object, name) is value:
            continue
        if callable(value) or isinstance(value, property):
            out[name] = value
    return out


def test_every_public_async_method_has_a_blocking_twin_with_its_parameters() -> None:
    checked = 0
    for async_cls, sync_cls in TWINS.items():
        mine = _public(sync_cls)
        for name, value in _public(async_cls).items():
            twin = RENAMED.get(name, name)
            assert twin in mine, f"{sync_cls.__name__} lacks {twin} ({async_cls.__name__}.{name})"
            if isinstance(value, property):
                assert isinstance(mine[twin], property), (sync_cls, twin)
                continue
            if name in RENAMED or (async_cls is Sandbox and name == "create"):
                continue  # (create: the sync one has no ``client=``, its loop is private)
            want = list(inspect.signature(value).parameters)  # type: ignore[arg-type]
            got = list(inspect.signature(mine[twin]).parameters)  # type: ignore[arg-type]
            assert got == want, f"{sync_cls.__name__}.{twin}{got} vs {want}"
            assert not inspect.iscoroutinefunction(mine[twin]), twin
            assert not inspect.isasyncgenfunction(mine[twin]), twin
            checked += 1
    assert checked >= 40  # the surface is all there, not an empty mapping
    params = list(inspect.signature(blocking.SyncSandbox.create).parameters)
    assert params == [p for p in inspect.signature(Sandbox.create).parameters if p != "client"]


def _until(chunks: Iterable[bytes], marker: bytes) -> bytes:
    seen = b""
    for chunk in chunks:
        seen += chunk
        if marker in seen:
            return seen
    raise AssertionError(f"{marker!r} never came: {seen!r}")


def _alive(sb: SyncSandbox, pid: int) -> bool:
    check = f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status"
    return sb.exec(["sh", "-c", check]).exit_code == 0


def test_processes_attach_with_replay_stdin_and_kill(server: Server) -> None:
    token = server.token("read", "write")
    with SyncSandbox.create(sandbox_id="sync-procs", api_url=server.url, token=token) as sb:
        h = sb.commands.start(["sh", "-c", SERVER], tag="web")
        assert isinstance(h, blocking.SyncProcessHandle) and h.tag == "web"
        with h.output() as out:
            seen = _until(out, b"ready")
        child = int(seen.split(b"child=")[1].split()[0])
        assert [(p.pid, p.tag, p.running) for p in sb.commands.list()] == [(h.pid, "web", True)]
        # Another client, its own loop and connection: the output so far is replayed.
        other = SyncSandbox.connect("sync-procs", api_url=server.url, token=token)
        try:
            again = other.commands.connect("web")
            assert again.pid == h.pid
            stream = again.output(replay=True)
            assert _until(stream, b"ready") == f"child={child}\nready\n".encode()
            assert _alive(sb, child)
            assert h.kill().pid == h.pid
            assert list(stream) == []  # then it ends, with the exit status
            assert (again.info.running, again.info.exit_code) == (False, 137)
            assert h.wait(30).signal == 9
            assert not _alive(sb, child)  # its children went with it
        finally:
            other.close()
        cat = sb.commands.start(["sh", "-c", "read a; read b; echo got $a $b; exit 4"])
        cat.send_stdin("one\n")
        cat.send("two\n")
        cat.close_stdin()
        assert cat.wait(30).exit_code == 4
        assert b"".join(cat.output()) == b"got one two\n"
        with pytest.raises(NotFound):
            sb.commands.connect("nobody")


def test_pty_sees_its_size_and_a_resize(server: Server) -> None:
    token = server.token("read", "write")
    with (
        SyncSandbox.create(api_url=server.url, token=token) as sb,
        sb.pty.create(100, 30, argv=["/bin/sh"], tag="shell") as term,
    ):
        assert isinstance(term, blocking.SyncTerminal) and term.tag == "shell"
        term.send(b"stty size\n")
        _until(term.output(), b"30 100")
        term.resize(120, 40)
        term.send_stdin("stty size\n")
        _until(term.output(), b"40 120")
        term.send(b"exit 5\n")
        info = term.wait()
        assert info.exit_code == 5 and info.pty and term.info.running is False


def test_ports_expose_list_unexpose(server: Server) -> None:
    token = server.token("read", "write")
    with SyncSandbox.create(NET, api_url=server.url, token=token) as sb:
        sb.files.write("index.html", "hello from inside")
        sb.commands.start(["python3", "-c", SERVE, "8000"], tag="http")
        probe = "import socket; socket.create_connection(('127.0.0.1', 8000), 1)"
        for _ in range(200):
            if sb.exec(["python3", "-c", probe]).exit_code == 0:
                break
            time.sleep(0.05)
        url = sb.ports.expose(8000)
        r = httpx.get(url + "/index.html", timeout=10)
        assert r.status_code == 200 and r.text == "hello from inside"
        assert [(p.port, p.url) for p in sb.ports.list()] == [(8000, url)]
        with pytest.raises(Conflict, match="already exposed"):
            sb.ports.expose(8000)
        sb.ports.unexpose(8000)
        assert sb.ports.list() == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=5)


def test_watch_is_a_blocking_iterator_of_events_in_order(server: Server) -> None:
    token = server.token("read", "write")
    with SyncSandbox.create(api_url=server.url, token=token) as sb:
        sb.files.mkdir("w")
        with sb.files.watch("w", recursive=True) as watch:
            assert isinstance(watch, blocking.SyncWatch)
            watch.start()  # returns once the guest's watch is in place
            script = "mkdir -p w/d && echo 1 > w/d/a && mv w/d/a w/d/b && rm w/d/b"
            assert sb.exec(["sh", "-c", script]).exit_code == 0
            seen = []
            for ev in watch:
                if ev.type != "modified":
                    seen.append((ev.type, ev.path.removeprefix("/workspace/")))
                if ev.type == "deleted":
                    break
        assert seen == [("created", "w/d"), ("created", "w/d/a"), ("moved", "w/d/a"),
                        ("deleted", "w/d/b")]  # fmt: skip


def test_controls_timeout_pause_network_and_snapshots(server: Server) -> None:
    token = server.token("read", "write")
    with SyncSandbox.create(NET, api_url=server.url, token=token) as sb:
        deadline = sb.set_timeout(600)
        assert deadline is not None and 590 < deadline - time.time() <= 600
        assert sb.set_timeout(None) is None
        sb.pause()
        assert sb.remote.record["state"] == "paused"
        with pytest.raises(Conflict, match="already paused"):
            sb.pause()
        sb.resume(timeout=300)
        assert sb.remote.record["state"] == "running"
        assert sb.exec(["echo", "back"]).stdout == b"back\n"

        policy = sb.network.update(allow=["192.0.2.7:8081"])
        assert [(str(r.network), r.port) for r in policy.allow] == [("192.0.2.7/32", 8081)]
        assert sb.exec(["true"]).exit_code == 0  # still answering after the change

        sb.files.write("state.txt", "saved")
        snap = sb.snapshot("sync-base")
        assert isinstance(snap, RemoteSnapshot) and snap.source == sb.id
        assert [s.name for s in sb.snapshots.list()] == ["sync-base"]
        assert sb.snapshots.get("sync-base").sha256 == snap.sha256
        forks = sb.snapshots.fork("sync-base", 2)
        assert len(forks) == 2
        for doc in forks:
            with SyncSandbox.connect(doc["id"], api_url=server.url, token=token) as twin:
                assert twin.files.read("state.txt") == b"saved"
        opts = {"api_url": server.url, "token": token, "from_snapshot": snap}
        with SyncSandbox.create({"labels": {"copy": "yes"}}, **opts) as restored:  # type: ignore[arg-type]
            assert restored.files.read("state.txt") == b"saved"
            assert restored.remote.record["spec"]["labels"] == {"copy": "yes"}
        sb.snapshots.remove("sync-base")
        assert sb.snapshots.list() == []
        with pytest.raises(NotFound):
            sb.snapshots.get("sync-base")
