"""Firecracker hybrid-vsock handshake, sans-IO.

The host connects to Firecracker's Unix socket and writes ``CONNECT <port>\\n``;
Firecracker forwards to the guest's vsock port and answers ``OK <hostport>\\n``. If no
guest process listens yet, Firecracker closes the socket instead: the caller sees EOF,
which here is a :class:`ConnectError` it may retry (guest boot races are the norm).

Only the handshake line is consumed: bytes that arrive behind ``OK ...\\n`` in the same
read are returned as :attr:`HandshakeClient.leftover` so the channel loses none of them.
"""

from __future__ import annotations

from typing import Final

from ironclaw.errors import ConnectError

__all__ = ["MAX_LINE", "HandshakeClient", "HandshakeServer", "connect_line", "ok_line"]

MAX_LINE: Final = 64


def connect_line(port: int) -> bytes:
    if not 0 <= port <= 0xFFFFFFFF:
        raise ValueError(f"vsock port out of range: {port}")
    return b"CONNECT %d\n" % port


def ok_line(host_port: int) -> bytes:
    return b"OK %d\n" % host_port


def _parse_port(raw: bytes) -> int | None:
    if not raw.isdigit() or len(raw) > 10:
        return None
    value = int(raw)
    return value if value <= 0xFFFFFFFF else None


class HandshakeClient:
    """Host side: ``initiate()`` gives the bytes to send, then feed replies until done."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._buf = bytearray()
        self.host_port: int | None = None
        self.leftover = b""

    def initiate(self) -> bytes:
        return connect_line(self.port)

    @property
    def done(self) -> bool:
        return self.host_port is not None

    def receive_data(self, data: bytes) -> bool:
        """Return True once ``OK`` arrived; raise :class:`ConnectError` on anything else."""
        if self.done:
            self.leftover += data
            return True
        self._buf += data
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > MAX_LINE:
                raise ConnectError(
                    f"vsock port {self.port}: no handshake line within {MAX_LINE} bytes"
                )
            return False
        line = bytes(self._buf[:nl])
        parts = line.split(b" ")
        port = _parse_port(parts[1]) if len(parts) == 2 and parts[0] == b"OK" else None
        if port is None:
            raise ConnectError(
                f"vsock port {self.port}: unexpected handshake reply {line[:MAX_LINE]!r}"
            )
        self.host_port = port
        self.leftover = bytes(self._buf[nl + 1 :])
        self._buf.clear()
        return True

    def eof(self) -> None:
        """The socket closed before ``OK``: the guest is not listening (yet)."""
        if not self.done:
            raise ConnectError(
                f"vsock port {self.port}: connection closed during handshake "
                "(is the guest listening yet?)"
            )


class HandshakeServer:
    """Muxer side (what Firecracker does); used by tests and by fake muxers."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.port: int | None = None
        self.leftover = b""

    def receive_data(self, data: bytes) -> int | None:
        """Return the requested port once the line is complete; ValueError if malformed."""
        if self.port is not None:
            self.leftover += data
            return self.port
        self._buf += data
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > MAX_LINE:
                raise ValueError("handshake line too long")
            return None
        parts = bytes(self._buf[:nl]).split(b" ")
        port = _parse_port(parts[1]) if len(parts) == 2 and parts[0] == b"CONNECT" else None
        if port is None:
            raise ValueError("malformed CONNECT line")
        self.port = port
        self.leftover = bytes(self._buf[nl + 1 :])
        self._buf.clear()
        return port
