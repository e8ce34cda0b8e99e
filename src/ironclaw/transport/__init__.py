"""Byte transports between host and sandbox: one module per medium.

Every medium yields a :class:`Connection`: bytes in, bytes out, nothing else. Each
connection owns one receive buffer for its whole life, so bytes that arrive behind
whatever a reader asked for (the next message, half a frame) stay buffered until the
next ``read``; nothing is thrown away between requests.

* :mod:`.unix` - Unix stream sockets (host side of everything; virtio-serial host side)
* :mod:`.vsock` - AF_VSOCK, where the kernel has it
* :mod:`.hybrid_vsock` - Firecracker's UDS-multiplexed vsock with ``CONNECT``/``OK``
* :mod:`.virtio_serial` - the guest end of a virtio-serial port (a character device)
* :mod:`.memory` - an in-process pair for tests

Standard library only (plus :mod:`ironclaw.errors`): the guest agent imports this.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._server import SocketServer
from ._socket import SocketConnection
from ._stream import StreamConnection

__all__ = ["Connection", "SocketConnection", "SocketServer", "StreamConnection"]


@runtime_checkable
class Connection(Protocol):
    """A reliable, ordered, bidirectional byte stream."""

    async def read(self, max_bytes: int = 262144) -> bytes:
        """Up to ``max_bytes``; ``b""`` means EOF. Raises ReadError / ChannelClosed."""
        ...

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` and wait while the medium is congested (backpressure)."""
        ...

    async def aclose(self) -> None: ...

    @property
    def closed(self) -> bool: ...
