"""ironclaw.rpc.Peer over real socket pairs (push mode) and the in-memory pair (pull mode)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw.errors import (
    ChannelClosed,
    ConfigError,
    FrameTooLarge,
    MalformedFrame,
    RpcError,
    SandboxNotFound,
)
from ironclaw.proto import (
    HEADER,
    Decoder,
    ErrorResponse,
    FrameType,
    HandshakeServer,
    Notification,
    Request,
    Response,
    encode_frame,
    encode_message_frame,
    ok_line,
)
from ironclaw.rpc import CallContext, Peer
from ironclaw.transport import SocketConnection, hybrid_vsock, memory, unix

pytestmark = pytest.mark.timeout(60)


def connections(kind: str) -> tuple[Any, Any]:
    if kind == "memory":
        return memory.pair()
    a, b = socket.socketpair()
    return unix.from_socket(a, initiator=True), unix.from_socket(b, initiator=False)


@pytest.fixture(params=["socket", "memory"])
async def peers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Peer, Peer]]:
    ca, cb = connections(request.param)
    host, guest = Peer(ca, name="host"), Peer(cb, name="guest")
    await host.start()
    await guest.start()
    try:
        yield host, guest
    finally:
        await host.aclose()
        await guest.aclose()


async def echo(params: Any, ctx: CallContext) -> Any:
    return params


# -- calls -------------------------------------------------------------------------------------
async def test_call_notify_and_handlers(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    guest.register("echo", echo)
    seen: list[Any] = []

    async def who(params: Any, ctx: CallContext) -> Any:
        seen.append((ctx.method, ctx.request_id, ctx.peer is guest))
        return {"you": params["me"]}

    guest.register("who", who)
    async with asyncio.timeout(5):
        assert await host.call("echo", {"a": [1, "ü", None]}) == {"a": [1, "ü", None]}
        assert await host.call("echo", [1, 2]) == [1, 2]
        assert await host.call("echo") is None
        assert await host.call("who", {"me": "host"}) == {"you": "host"}
        # Both directions work on one channel.
        host.register("echo", echo)
        assert await guest.call("echo", ["back"]) == ["back"]
    assert seen == [("who", 4, True)]
    with pytest.raises(TypeError, match="params"):
        await host.call("echo", "scalar")


async def test_errors_cross_the_wire_as_their_own_types(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers

    async def fail(params: Any, ctx: CallContext) -> Any:
        kind = params["kind"]
        if kind == "fnf":
            raise FileNotFoundError(2, "No such file", "/etc/nope")
        if kind == "ic":
            raise SandboxNotFound("sandbox sb-1 is gone")
        if kind == "rpc":
            raise RpcError(-31999, "custom", {"hint": 1})
        if kind == "bad-result":
            return {"x": object()}
        raise RuntimeError("boom")

    guest.register("fail", fail)
    async with asyncio.timeout(5):
        with pytest.raises(RpcError) as fnf:
            await host.call("fail", {"kind": "fnf"})
        assert fnf.value.code == -32050
        assert fnf.value.data == {"type": "FileNotFoundError"}
        with pytest.raises(SandboxNotFound, match="sb-1 is gone"):
            await host.call("fail", {"kind": "ic"})
        with pytest.raises(RpcError) as custom:
            await host.call("fail", {"kind": "rpc"})
        assert (custom.value.code, custom.value.data) == (-31999, {"hint": 1})
        with pytest.raises(RpcError) as internal:
            await host.call("fail", {"kind": "other"})
        assert internal.value.code == -32603
        assert "RuntimeError: boom" in internal.value.message
        with pytest.raises(RpcError) as unencodable:
            await host.call("fail", {"kind": "bad-result"})
        assert unencodable.value.code == -32603
        assert "cannot be sent" in unencodable.value.message
        with pytest.raises(RpcError) as missing:
            await host.call("no/such/method")
        assert missing.value.code == -32601
        # The channel is still fine after all of that.
        guest.register("echo", echo)
        assert await host.call("echo", [1]) == [1]


async def test_1000_concurrent_calls_with_random_latency(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    rng = random.Random(1234)
    finished: list[int] = []

    async def slow_echo(params: Any, ctx: CallContext) -> Any:
        await asyncio.sleep(rng.random() * 0.05)
        finished.append(params["i"])
        return {"i": params["i"], "id": ctx.request_id}

    guest.register("slow", slow_echo)
    async with asyncio.timeout(30):
        results = await asyncio.gather(*(host.call("slow", {"i": i}) for i in range(1000)))
    assert [r["i"] for r in results] == list(range(1000))
    assert len({r["id"] for r in results}) == 1000
    assert finished != sorted(finished), "responses were not out of order; test proves nothing"
    assert host.stats()["pending_calls"] == 0
    assert guest.stats()["handler_tasks"] == 0


async def test_notifications_reach_every_subscriber_in_order(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    first, second = host.subscribe("exec/out"), host.subscribe("exec/out")
    other = host.subscribe("other")
    for i in range(300):
        await guest.notify("exec/out", {"seq": i})
    await guest.notify("other", ["x"])

    async def take(sub: Any, n: int) -> list[Any]:
        out = []
        async for params in sub:
            out.append(params["seq"])
            if len(out) == n:
                break
        return out

    async with asyncio.timeout(10):
        assert await take(first, 300) == list(range(300))
        assert await take(second, 300) == list(range(300))
        assert await anext(other) == ["x"]
    second.close()
    await guest.notify("exec/out", {"seq": 300})
    async with asyncio.timeout(5):
        assert await anext(first) == {"seq": 300}
    await guest.aclose()
    async with asyncio.timeout(5):
        assert [p async for p in first] == []  # ends when the peer closes


# -- cancellation and timeouts ---------------------------------------------------------------
async def test_cancelling_a_call_cancels_the_remote_handler(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(params: Any, ctx: CallContext) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    guest.register("forever", forever)
    call = asyncio.create_task(host.call("forever"))
    async with asyncio.timeout(5):
        await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with asyncio.timeout(5):
        await cancelled.wait()
    # Timeouts do the same and raise the builtin TimeoutError.
    started.clear()
    cancelled.clear()
    with pytest.raises(TimeoutError):
        await host.call("forever", timeout=0.2)
    async with asyncio.timeout(5):
        await cancelled.wait()
    assert host.stats()["pending_calls"] == 0


# -- connection loss ---------------------------------------------------------------------------
DYING_PEER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
need, got = int(sys.argv[2]), b""
while got.count(b'"method"') < need:  # wait until every request has arrived
    got += s.recv(65536)
s.sendall(struct.pack(">IBI", 100, 1, 0) + b'{"jsonrpc": "2.0", ')  # half a frame, then die
import os; os._exit(1)
"""


async def test_a_peer_dying_mid_frame_fails_all_pending_calls(tmp_path: Path) -> None:
    path = str(tmp_path / "die.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    before = asyncio.all_tasks()
    accepted: asyncio.Queue[SocketConnection] = asyncio.Queue()
    server = await unix.serve(listener, lambda c: _park(c, accepted))
    child = subprocess.Popen([sys.executable, "-I", "-c", DYING_PEER, path, "50"])
    try:
        async with asyncio.timeout(10):
            conn = await accepted.get()
        peer = Peer(conn, name="host")
        await peer.start()
        calls = [asyncio.create_task(peer.call("exec", {"i": i})) for i in range(50)]
        async with asyncio.timeout(10):
            results = await asyncio.gather(*calls, return_exceptions=True)
            await peer.wait_closed()
        assert all(isinstance(r, ChannelClosed) for r in results), results
        assert "inside a frame" in str(results[0])
        assert peer.closed
        await peer.aclose()
    finally:
        child.wait(10)
        server.close()
        server.close_clients()
        await server.wait_closed()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


async def _park(conn: SocketConnection, out: asyncio.Queue[SocketConnection]) -> None:
    await out.put(conn)
    await asyncio.Event().wait()  # the test owns the connection from here


async def test_connection_loss_fails_pending_calls_at_once(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    guest.register("hang", lambda p, c: asyncio.Event().wait())  # type: ignore[arg-type,return-value]
    calls = [asyncio.create_task(host.call("hang")) for _ in range(20)]
    async with asyncio.timeout(5):
        while guest.stats()["handler_tasks"] < 20:
            await asyncio.sleep(0.01)
        await guest.aclose()
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, ChannelClosed) for r in results)
    with pytest.raises(ChannelClosed):
        await host.call("anything")
    with pytest.raises(ChannelClosed):
        await host.notify("anything")


# -- bad input over a raw socket --------------------------------------------------------------
class RawSide:
    """The far end of a socketpair spoken to byte by byte."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.decoder = Decoder()

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def next(self) -> Any:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            while (ev := self.decoder.next_event()) is None:
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    return None
                self.decoder.receive_data(data)
        return ev


@pytest.fixture
async def raw_and_peer() -> AsyncIterator[tuple[RawSide, Peer]]:
    a, b = socket.socketpair()
    peer = Peer(unix.from_socket(a, initiator=False), name="guest", handlers={"echo": echo})
    await peer.start()
    try:
        yield RawSide(b), peer
    finally:
        await peer.aclose()
        b.close()


def raw_message(obj: Any) -> bytes:
    return encode_frame(FrameType.MESSAGE, 0, json.dumps(obj).encode())


async def test_bad_messages_get_errors_and_the_connection_stays(
    raw_and_peer: tuple[RawSide, Peer],
) -> None:
    raw, peer = raw_and_peer
    await raw.send(encode_frame(FrameType.MESSAGE, 0, b'{"jsonrpc": "2.0", "id": 1, '))
    ev = await raw.next()
    assert isinstance(ev, ErrorResponse)
    assert (ev.id, ev.error.code) == (None, -32700)
    await raw.send(raw_message({"jsonrpc": "1.0", "id": 5, "method": "echo"}))
    ev = await raw.next()
    assert (ev.id, ev.error.code) == (5, -32600)
    await raw.send(raw_message({"jsonrpc": "2.0", "id": 6, "method": "nope"}))
    ev = await raw.next()
    assert (ev.id, ev.error.code) == (6, -32601)
    await raw.send(raw_message({"jsonrpc": "2.0", "id": 7, "method": "echo", "params": 5}))
    ev = await raw.next()
    assert (ev.id, ev.error.code) == (7, -32600)
    # An invalid response is not answered (no error ping-pong), and nothing breaks.
    await raw.send(raw_message({"jsonrpc": "2.0", "id": 99, "error": "nope"}))
    await raw.send(raw_message({"jsonrpc": "2.0", "id": 8, "method": "echo", "params": [8]}))
    assert await raw.next() == Response(8, [8])
    assert not peer.closed


async def test_an_invalid_response_fails_just_its_call(raw_and_peer: tuple[RawSide, Peer]) -> None:
    raw, peer = raw_and_peer
    call = asyncio.create_task(peer.call("x"))
    req = await raw.next()
    assert isinstance(req, Request)
    await raw.send(raw_message({"jsonrpc": "2.0", "id": req.id, "error": {"code": "NaN"}}))
    with pytest.raises(MalformedFrame):
        await asyncio.wait_for(call, 5)
    assert not peer.closed


async def test_an_oversize_frame_closes_the_connection(raw_and_peer: tuple[RawSide, Peer]) -> None:
    raw, peer = raw_and_peer
    call = asyncio.create_task(peer.call("pending"))
    assert isinstance(await raw.next(), Request)
    await raw.send(HEADER.pack(2**31, FrameType.DATA, 1))
    with pytest.raises(ChannelClosed) as exc:
        await asyncio.wait_for(call, 5)
    assert isinstance(exc.value.__cause__, FrameTooLarge)
    assert isinstance(peer.close_reason, FrameTooLarge)
    assert await raw.next() is None  # the peer hung up: framing cannot be recovered


async def test_response_and_notification_in_one_read_are_both_delivered(
    raw_and_peer: tuple[RawSide, Peer],
) -> None:
    """The seed's bug, end to end: a notification right behind a response was lost."""
    raw, peer = raw_and_peer
    sub = peer.subscribe("exec/exit")
    call = asyncio.create_task(peer.call("exec", {"cmd": ["true"]}))
    req = await raw.next()
    assert isinstance(req, Request)
    tail = encode_message_frame(Notification("exec/exit", {"code": 1}))
    await raw.send(
        encode_message_frame(Response(req.id, {"pid": 42}))
        + encode_message_frame(Notification("exec/exit", {"code": 0}))
        + tail[:7]
    )
    async with asyncio.timeout(5):
        assert await call == {"pid": 42}
        assert await anext(sub) == {"code": 0}
    await raw.send(tail[7:])
    async with asyncio.timeout(5):
        assert await anext(sub) == {"code": 1}


# -- backpressure ---------------------------------------------------------------------------
async def test_a_slow_subscriber_slows_the_sender_and_memory_stays_bounded(
    peers: tuple[Peer, Peer],
) -> None:
    host, guest = peers
    sub = host.subscribe("out", maxsize=4)
    blob = "x" * 60_000
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for i in range(400):  # 24 MB of notifications
            await guest.notify("out", {"i": i, "blob": blob})
            sent += 1

    task = asyncio.create_task(flood())
    done, _ = await asyncio.wait({task}, timeout=0.5)
    assert not done, "the sender was not slowed down by a subscriber that does not read"
    assert sent < 200
    assert len(sub._queue) <= 4
    assert host.stats()["decoder_buffered"] < 2**20
    got = 0
    async with asyncio.timeout(30):
        async for params in sub:
            assert params["i"] == got
            got += 1
            if got == 400:
                break
        await task


# -- streams --------------------------------------------------------------------------------
async def test_stream_bytes_arrive_before_the_result(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    data = os.urandom(5 * 2**20 + 3)

    async def download(params: Any, ctx: CallContext) -> Any:
        await ctx.peer.send_bytes(params["stream"], data)
        await ctx.peer.end_stream(params["stream"])
        return {"size": len(data)}

    guest.register("download", download)
    sid = host.new_stream_id()
    stream = host.open_stream(sid)
    async with asyncio.timeout(20):
        call = asyncio.create_task(host.call("download", {"stream": sid}))
        got = await stream.read_all()
        assert await call == {"size": len(data)}
    assert got == data
    assert host.stats()["streams"] == 0


async def test_frames_before_open_stream_are_kept(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers

    async def push(params: Any, ctx: CallContext) -> Any:
        for i in range(10):
            await ctx.peer.send_bytes(params["stream"], b"%d," % i)
        await ctx.peer.end_stream(params["stream"])
        return "done"

    guest.register("push", push)
    sid = host.new_stream_id()
    async with asyncio.timeout(5):
        assert await host.call("push", {"stream": sid}) == "done"
        assert await host.open_stream(sid).read_all() == b"0,1,2,3,4,5,6,7,8,9,"


async def test_a_truncated_stream_raises_instead_of_ending(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    sid = guest.new_stream_id()
    stream = host.open_stream(sid)
    await guest.send_bytes(sid, b"partial")
    async with asyncio.timeout(5):
        assert await anext(stream) == b"partial"
        await guest.aclose()
        with pytest.raises(ChannelClosed):
            await anext(stream)


async def test_stream_ids_never_collide() -> None:
    a, b = memory.pair()
    host, guest = Peer(a), Peer(b)
    ours = {host.new_stream_id() for _ in range(100)}
    theirs = {guest.new_stream_id() for _ in range(100)}
    assert not ours & theirs
    assert all(i % 2 for i in ours) and not any(i % 2 for i in theirs)

    class Bare:
        async def read(self, max_bytes: int = 262144) -> bytes:
            return b""

        async def write(self, data: bytes | bytearray | memoryview) -> None:
            return None

        async def aclose(self) -> None:
            return None

        closed = False

    with pytest.raises(ConfigError, match="initiator"):
        Peer(Bare()).new_stream_id()
    assert Peer(Bare(), initiator=False).new_stream_id() == 2


# -- lifecycle -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["socket", "memory"])
async def test_aclose_leaves_no_task_behind(kind: str) -> None:
    before = asyncio.all_tasks()
    ca, cb = connections(kind)
    started = asyncio.Event()

    async def hang(params: Any, ctx: CallContext) -> Any:
        started.set()
        await asyncio.Event().wait()

    async with (
        Peer(ca, name="host") as host,
        Peer(cb, name="guest", handlers={"hang": hang, "echo": echo}) as guest,
    ):
        sub = host.subscribe("n", maxsize=1)
        for i in range(3):  # one queued, one blocking the host's reader (responses too)
            await guest.notify("n", [i])
        pending = asyncio.create_task(host.call("hang"))
        async with asyncio.timeout(5):
            await started.wait()
        timed_out = asyncio.create_task(host.call("hang", timeout=0.05))
        await asyncio.wait({timed_out}, timeout=5)
        sid = guest.new_stream_id()
        await guest.send_bytes(sid, b"never read")
    assert host.closed and guest.closed
    with pytest.raises(ChannelClosed):
        await pending
    assert isinstance(timed_out.exception(), TimeoutError | ChannelClosed)
    assert [p async for p in sub] in ([[0]], [])
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


async def test_wait_closed_returns_when_the_other_side_goes(peers: tuple[Peer, Peer]) -> None:
    host, guest = peers
    waiter = asyncio.create_task(host.wait_closed())
    await asyncio.sleep(0)
    assert not waiter.done()
    await guest.aclose()
    async with asyncio.timeout(5):
        await waiter
    assert host.closed
    assert isinstance(host.close_reason, ChannelClosed)


async def test_max_inflight_bounds_running_handlers() -> None:
    a, b = memory.pair()
    gate = asyncio.Event()
    running = 0
    peak = 0

    async def gated(params: Any, ctx: CallContext) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return params

    async with Peer(a) as host, Peer(b, handlers={"gated": gated}, max_inflight=3) as guest:
        calls = [asyncio.create_task(host.call("gated", [i])) for i in range(10)]
        async with asyncio.timeout(5):
            while running < 3:
                await asyncio.sleep(0.01)
        assert guest.stats()["handler_tasks"] == 3
        gate.set()
        async with asyncio.timeout(5):
            assert [r[0] for r in await asyncio.gather(*calls)] == list(range(10))
    assert peak == 3


async def test_first_message_behind_the_vsock_ok_line_is_delivered(tmp_path: Path) -> None:
    """Firecracker's OK line and the guest's first frame may share one read."""
    path = str(tmp_path / "fc.sock")
    hello = encode_message_frame(Notification("guest/ready", {"version": 1}))

    async def muxer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hs = HandshakeServer()
        while hs.receive_data(await reader.read(64)) is None:
            pass
        writer.write(ok_line(1073741824) + hello)
        await writer.drain()
        await reader.read()  # keep the socket open until the host hangs up
        writer.close()

    async with await asyncio.start_unix_server(muxer, path):
        conn = await hybrid_vsock.connect(path, 52, deadline=5)
        async with Peer(conn, name="host") as peer:
            ready = peer.subscribe("guest/ready")
            async with asyncio.timeout(5):
                assert await anext(ready) == {"version": 1}


def modules_outside_the_stdlib(statements: str) -> str:
    """Run ``statements`` in a bare python3 (no site-packages, as the guest has) with
    ``src`` on the path; the top-level modules it loaded that are not the standard
    library's or IronClaw's, comma-separated ("" when none)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    code = (
        f"import sys; sys.path.insert(0, sys.argv[1]); {statements}; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) "
        "- {'ironclaw', '__main__'} - set(sys.builtin_module_names)); print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, src],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


def test_channel_modules_import_only_the_standard_library() -> None:
    """The guest agent runs these with a bare python3 and no site-packages."""
    loaded = modules_outside_the_stdlib(
        "import ironclaw.proto, ironclaw.rpc, ironclaw.transport.unix, ironclaw.transport.vsock, "
        "ironclaw.transport.hybrid_vsock, ironclaw.transport.virtio_serial, "
        "ironclaw.transport.memory"
    )
    assert loaded == ""
