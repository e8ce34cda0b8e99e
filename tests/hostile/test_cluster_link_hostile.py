"""The cluster's relay of a guest's calls to the head, facing a guest that floods it.

On a node, :class:`~ironclaw.cluster.links.GuestLink` turns the guest's calls to the
host (``model.complete``, ``agent.event``, ...) into a queue the head drains over Ray.
The guest is hostile: it fires calls faster than the head answers, or sends one that is
too big. What the node holds must stay bounded by the channel's limits (the host's
``Peer`` with ``HOST_LIMITS``, then the link's queue), a flood must end that sandbox's
channel with a typed violation, and the head's reader must see the link end rather than
wait forever. No Ray here: the link is driven the way the node actor drives it, over a
real socket to a raw guest that writes frames itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from ironclaw.cluster.links import LINK_QUEUE, GuestLink
from ironclaw.errors import ChannelViolation, LimitExceeded, ProtocolError, SandboxError
from ironclaw.proto import Decoder, ErrorResponse, Response
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.transport.unix import from_socket

from . import hostile_guest as hg

pytestmark = pytest.mark.timeout(120)
MiB = 2**20


@dataclass
class Node:
    peer: Peer
    link: GuestLink
    guest: socket.socket
    violations: list[ProtocolError] = field(default_factory=list)


@contextlib.asynccontextmanager
async def node() -> AsyncIterator[Node]:
    """The node's end of a sandbox channel with a link open, and the raw guest socket."""
    host_sock, guest = socket.socketpair()
    seen: list[ProtocolError] = []
    peer = Peer(
        from_socket(host_sock, initiator=True),
        name="node:hostile",
        limits=HOST_LIMITS,
        on_protocol_error=lambda _p, exc: seen.append(exc),
    )
    await peer.start()
    link = GuestLink(peer, ["model.complete", "agent.event"])
    guest.setblocking(False)
    try:
        yield Node(peer, link, guest, seen)
    finally:
        link.close()
        await peer.aclose()
        guest.close()


def call(rid: int, method: str = "model.complete", params: Any = None) -> bytes:
    return hg.message({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})


async def send(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        await loop.sock_sendall(sock, data)


async def responses(sock: socket.socket, count: int) -> list[Response | ErrorResponse]:
    loop, dec, got = asyncio.get_running_loop(), Decoder(), []
    while len(got) < count:
        data = await loop.sock_recv(sock, 65536)
        assert data, f"closed after {len(got)} responses"
        dec.receive_data(data)
        got += [ev for ev in dec.events() if isinstance(ev, Response | ErrorResponse)]
    return got


async def _all(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


async def test_calls_past_the_inbound_cap_close_the_channel_and_end_the_link() -> None:
    async with node() as n:
        cap = HOST_LIMITS.max_inbound_calls
        await send(n.guest, b"".join(call(i) for i in range(1, cap + 50)))
        await asyncio.wait_for(n.peer.wait_closed(), 30)
        assert any(isinstance(v, LimitExceeded) for v in n.violations), n.violations
        assert n.link.queue.qsize() <= min(cap, LINK_QUEUE)
        # The head's reader gets at most what was queued, then sees the link end.
        taken = await asyncio.wait_for(_all(n.link.requests()), 30)
        assert len(taken) <= cap
        assert len(n.link.waiting) == 0  # every relayed call failed with the channel
        assert n.link.closed


async def test_a_full_set_of_calls_is_relayed_and_answered_in_bounds() -> None:
    async with node() as n:
        cap = HOST_LIMITS.max_inbound_calls
        await send(n.guest, b"".join(call(i, params={"i": i}) for i in range(1, cap + 1)))
        reader = n.link.requests()
        seen = []
        for _ in range(cap):
            rid, method, params = await asyncio.wait_for(anext(reader), 30)
            assert method == "model.complete" and len(n.link.waiting) <= cap
            seen.append(params["i"])
            n.link.reply(rid, True, {"echo": params["i"]})
        got = await asyncio.wait_for(responses(n.guest, cap), 30)
        assert all(isinstance(r, Response) for r in got)
        echoed = {r.id: r.result["echo"] for r in got if isinstance(r, Response)}
        assert echoed == {i: i for i in range(1, cap + 1)} and sorted(seen) == sorted(echoed)
        assert not n.peer.closed and not n.violations


async def test_an_oversized_or_forged_call_never_reaches_the_head() -> None:
    async with node() as n:
        # A method the link does not relay: answered "not found", nothing queued.
        await send(n.guest, call(1, "node.exec"))
        [r] = await asyncio.wait_for(responses(n.guest, 1), 30)
        assert isinstance(r, ErrorResponse) and r.error.code == -32601
        assert n.link.queue.qsize() == 0
        # A head's error crosses back with its class name only: a guest cannot make the
        # node build another kind of object from a reply.
        await send(n.guest, call(2))
        reader = n.link.requests()
        rid, _, _ = await asyncio.wait_for(anext(reader), 30)
        n.link.reply(rid, False, ("__class__", "x"))
        [r] = await asyncio.wait_for(responses(n.guest, 1), 30)
        assert isinstance(r, ErrorResponse) and r.error.message == "x"
        assert r.error.data == {"type": "SandboxError"}
        # One call over the channel's message cap: the channel closes before it is parsed.
        big = call(3, params={"blob": "a" * (HOST_LIMITS.max_message + 1)})
        await send(n.guest, big)
        await asyncio.wait_for(n.peer.wait_closed(), 30)
        assert any(isinstance(v, ChannelViolation) for v in n.violations), n.violations
        assert n.link.queue.qsize() == 0
        n.link.close()
        with pytest.raises(SandboxError, match="no longer answers"):
            await n.link._relay("model.complete")({}, cast(Any, None))
