"""Host sessions on one virtio-serial port, sans-IO: the host's hello, the guest's ack.

A virtio-serial port is one byte stream for the whole life of a VM, while host
connections to its socket come and go. The guest keeps the port open (closing it makes
the guest kernel drop unread bytes, and the host's next connection may already be
sending), so the byte stream itself must say where a host session begins:

* every host connection starts with a **hello** carrying a fresh random nonce;
* the guest answers with an **ack** carrying the same nonce before anything else of
  that session, and the host discards whatever reaches it first (output of an earlier
  session still in flight);
* once the guest knows a session ended it discards bytes up to the next hello
  (:class:`HelloScanner`: the old connection may have left half a frame); inside a
  session whose end it missed (a reconnect before it noticed the disconnect) it finds
  the hello at a frame boundary (:class:`FrameTracker`).

Both are shaped like channel frames (the 9-byte header of :mod:`ironclaw.proto.frames`)
of types the rpc decoder does not know, so neither can pass for a frame of a session.
"""

from __future__ import annotations

import struct
from typing import Final

from ironclaw.errors import ChannelViolation

__all__ = [
    "ACK_TYPE",
    "HELLO_SIZE",
    "HELLO_TYPE",
    "NONCE_SIZE",
    "AckScanner",
    "FrameTracker",
    "HelloScanner",
    "ack_frame",
    "hello_frame",
]

_HEADER: Final = struct.Struct(">IBI")  # length, type, stream id: as proto.frames.HEADER
_SESSION_TYPES: Final = frozenset({1, 2, 3})  # MESSAGE, DATA, END
HELLO_TYPE: Final = 0x68
ACK_TYPE: Final = 0x61
NONCE_SIZE: Final = 16
_ID: Final = 0x49434C57
_HELLO_MAGIC: Final = b"\x00ironclaw-hello\x00"
_ACK_MAGIC: Final = b"\x00ironclaw-ack\x00\x00\x00"
_HELLO_PREFIX: Final = _HEADER.pack(32, HELLO_TYPE, _ID) + _HELLO_MAGIC
HELLO_SIZE: Final = len(_HELLO_PREFIX) + NONCE_SIZE


def hello_frame(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return _HELLO_PREFIX + nonce


def ack_frame(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return _HEADER.pack(32, ACK_TYPE, _ID) + _ACK_MAGIC + nonce


class HelloScanner:
    """Guest side between sessions: discard bytes until a whole hello has arrived."""

    __slots__ = ("_buf", "discarded")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.discarded = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """``(nonce, bytes after the hello)`` once a hello is complete, else None."""
        buf = self._buf
        buf += data
        at = buf.find(_HELLO_PREFIX)
        if at < 0:
            keep = len(_HELLO_PREFIX) - 1  # a prefix cut at the end of this chunk
            if len(buf) > keep:
                self.discarded += len(buf) - keep
                del buf[:-keep]
            return None
        self.discarded += at
        del buf[:at]
        if len(buf) < HELLO_SIZE:
            return None
        nonce, rest = bytes(buf[len(_HELLO_PREFIX) : HELLO_SIZE]), bytes(buf[HELLO_SIZE:])
        buf.clear()
        return nonce, rest


class FrameTracker:
    """Guest side inside a session: follow frame boundaries to spot the next host's hello.

    Only headers are looked at (payloads are skipped by length), so this costs next to
    nothing for bulk data. The last :data:`HELLO_SIZE` bytes are kept: a hello swallowed
    by a frame the previous host left unfinished is seen at the end of them
    (:meth:`trailing_hello`), and a broken header is rescanned with the bytes before it.
    """

    __slots__ = ("_head", "_need", "_tail", "carry", "lost")

    def __init__(self) -> None:
        self._need = 0  # payload bytes of the current frame still to come
        self._head = bytearray()  # a header cut between chunks
        self._tail = bytearray()  # the last HELLO_SIZE bytes of the session
        self.lost = False
        #: After :meth:`find_hello`: the bytes to scan for a hello from (see there).
        self.carry = b""

    def find_hello(self, data: bytes) -> int:
        """Where in ``data`` the session ends, or -1 (all of ``data`` is the session's).

        At a frame boundary a hello ends it (its first bytes, from earlier chunks, are
        in :attr:`carry`); so does a header no frame can have (:attr:`lost`), and then
        :attr:`carry` holds the bytes before it that a hello cut by it may start in.
        """
        if self.lost:
            return -1
        tail = self._tail
        before = bytes(tail)
        tail += data
        del tail[:-HELLO_SIZE]
        pos, end = 0, len(data)
        head = self._head
        while pos < end:
            if self._need:
                step = min(self._need, end - pos)
                self._need -= step
                pos += step
                continue
            begun, carried = pos, bytes(head)
            take = min(_HEADER.size - len(head), end - pos)
            head += data[pos : pos + take]
            pos += take
            if len(head) < _HEADER.size:
                return -1
            length, ftype, _ = _HEADER.unpack(head)
            head.clear()
            if ftype == HELLO_TYPE:
                self.carry = carried
                return begun
            if ftype not in _SESSION_TYPES:
                self.lost = True
                self.carry = (before + data[:begun])[-(HELLO_SIZE - 1) :]
                return begun
            self._need = length
        return -1

    def trailing_hello(self) -> bytes | None:
        """The nonce of a hello the session's bytes end with, inside an unfinished frame.

        A host never leaves a frame unfinished on its own: this is the next host's hello
        landing in what its predecessor did not finish (when it stays the last thing
        received for a moment, which the port driver waits for).
        """
        inside = self._need or self._head
        tail = self._tail
        if inside and len(tail) == HELLO_SIZE and tail.startswith(_HELLO_PREFIX):
            return bytes(tail[len(_HELLO_PREFIX) :])
        return None


class AckScanner:
    """Host side: discard what the guest sent before the ack of this connection's hello.

    At most ``limit`` bytes are skipped (a stale session's output in flight); more means
    the other end does not speak this protocol, a :class:`ChannelViolation`.
    """

    __slots__ = ("_buf", "_limit", "_want", "discarded")

    def __init__(self, nonce: bytes, *, limit: int = 64 * 2**20) -> None:
        self._want = ack_frame(nonce)
        self._buf = bytearray()
        self._limit = limit
        self.discarded = 0

    def feed(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The bytes after the ack once it has arrived, else None."""
        buf = self._buf
        buf += data
        at = buf.find(self._want)
        if at >= 0:
            self.discarded += at
            rest = bytes(buf[at + len(self._want) :])
            buf.clear()
            return rest
        keep = len(self._want) - 1
        if len(buf) > keep:
            self.discarded += len(buf) - keep
            del buf[:-keep]
        if self.discarded > self._limit:
            raise ChannelViolation(
                f"the guest sent {self.discarded} bytes without acknowledging the channel "
                "handshake: its agent does not speak this protocol (rebuild the image?)"
            )
        return None
