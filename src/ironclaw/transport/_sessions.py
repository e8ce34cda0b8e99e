"""Host sessions on one virtio-serial port, sans-IO: the host's hello, the guest's ack.

A virtio-serial port is one byte stream for the whole life of a VM, while host
connections to its socket come and go. The guest keeps the port open (closing it makes
the guest kernel drop unread bytes, and the host's next connection may already be
sending), so the byte stream itself must say where a host session begins:

* every host connection starts with a **hello** carrying a fresh random nonce;
* the guest answers with an **ack** carrying the same nonce before anything else of
  that session, and the host discards whatever reaches it first (output of an earlier
  session still in flight);
* the guest splits the port's bytes into sessions with :class:`SessionTracker`: once it
  knows a session ended it discards bytes up to the next hello (:class:`HelloScanner`:
  the old connection may have left half a frame); inside a session whose end it missed
  (a reconnect before it noticed the disconnect) it finds the hello at a frame boundary
  (:class:`FrameTracker`), or, swallowed by a frame the old host left unfinished, as the
  last bytes on the port, unclaimed, while nothing more comes (:meth:`SessionTracker.idle`);
* a hello that completes an unfinished frame exactly looks like the end of a frame whose
  payload ends with hello bytes, which is no reason to end a session: the host sends a
  new hello when no ack comes (the next one is at a frame boundary).

The hello and the ack are shaped like channel frames (the 9-byte header of
:mod:`ironclaw.proto.frames`) of types the rpc decoder does not know, so neither can pass
for a frame of a session.
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
    "SessionTracker",
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
_HELLO_HEADER: Final = _HEADER.pack(32, HELLO_TYPE, _ID)
_HELLO_PREFIX: Final = _HELLO_HEADER + _HELLO_MAGIC
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
    nothing for bulk data. The last :data:`HELLO_SIZE` bytes are kept, so that a broken
    header can be rescanned with the bytes before it.
    """

    __slots__ = ("_head", "_need", "_tail", "carry", "lost")

    def __init__(self) -> None:
        self._need = 0  # payload bytes of the current frame still to come
        self._head = bytearray()  # a header cut between chunks
        self._tail = bytearray()  # the last HELLO_SIZE bytes of the session
        self.lost = False
        #: After :meth:`find_hello`: the bytes to scan for a hello from (see there).
        self.carry = b""

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes so far end exactly at the end of a frame."""
        return not (self._need or self._head or self.lost)

    def find_hello(self, data: bytes) -> int:
        """Where in ``data`` the session ends, or -1 (all of ``data`` is the session's).

        At a frame boundary a hello's header ends it (its first bytes, from earlier
        chunks, are in :attr:`carry`); so does a header no frame can have (:attr:`lost`),
        and then :attr:`carry` holds the bytes before it that a hello cut by it may start
        in. A header of the hello's type but not the hello's (bytes of a nonce that
        completed a swallowing frame) is such a header.
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
            hello = head == _HELLO_HEADER
            head.clear()
            if hello:
                self.carry = carried
                return begun
            if ftype not in _SESSION_TYPES:
                self.lost = True
                self.carry = (before + data[:begun])[-(HELLO_SIZE - 1) :]
                return begun
            self._need = length
        return -1


#: What :meth:`SessionTracker.feed` reports, in stream order: ``("data", bytes)`` of the
#: current session, ``("end", b"")`` of it, ``("begin", nonce)`` of a new one.
Event = tuple[str, bytes]


class SessionTracker:
    """Guest side of a whole port: which of its bytes belong to which host session.

    A session begins at a hello found by a :class:`HelloScanner` (between sessions) or by
    the session's :class:`FrameTracker` (at a frame boundary, ending the session before).
    A hello swallowed as payload by a frame the previous host left unfinished is seen by
    :meth:`idle`: a host sends nothing after its hello until the ack, so the port's last
    :data:`HELLO_SIZE` bytes are then that hello. Positions on the port tell it apart from
    the hello that began the current session; a session whose bytes end exactly at a
    frame's end is left alone (those may be a frame's payload: the host's next hello,
    sent when no ack comes, is then at a frame boundary).
    """

    __slots__ = ("_claimed", "_frames", "_pos", "_scanner", "_tail", "session")

    def __init__(self) -> None:
        self._frames: FrameTracker | None = None  # None: between sessions
        self._scanner = HelloScanner()
        self._tail = bytearray()  # the port's last HELLO_SIZE bytes
        self._pos = 0  # bytes read from the port so far
        self._claimed = -1  # where (port position) the last hello that began a session ends
        #: The number of sessions begun so far: the current one's, while in one.
        self.session = 0

    @property
    def in_session(self) -> bool:
        return self._frames is not None

    def feed(self, data: bytes) -> list[Event]:
        """Split the port's next bytes into events (see :data:`Event`)."""
        self._pos += len(data)
        tail = self._tail
        tail += data
        del tail[:-HELLO_SIZE]
        events: list[Event] = []
        while True:
            frames = self._frames
            if frames is None:
                found = self._scanner.feed(data)
                if found is None:
                    return events
                nonce, data = found  # ``data`` is a suffix of what was read
                self._begin(nonce, self._pos - len(data), events)
                continue
            at = frames.find_hello(data)
            if at < 0:
                if data:
                    events.append(("data", data))
                return events
            if at:
                events.append(("data", data[:at]))
            events.append(("end", b""))
            data = frames.carry + data[at:]
            self._frames, self._scanner = None, HelloScanner()

    def end(self, session: int) -> None:
        """Session ``session`` ended off the stream (its host left, its reader closed)."""
        if self._frames is not None and session == self.session:
            self._frames, self._scanner = None, HelloScanner()

    def swallowed(self) -> bytes | None:
        """The nonce of a hello the port's bytes end with that began no session, if it
        can only be a new host's: between sessions, or inside an unfinished frame."""
        tail = self._tail
        if self._pos == self._claimed or not tail.startswith(_HELLO_PREFIX):
            return None
        if len(tail) < HELLO_SIZE or (self._frames is not None and self._frames.at_boundary):
            return None
        return bytes(tail[len(_HELLO_PREFIX) :])

    def idle(self) -> bytes | None:
        """The port has stayed quiet for a moment: begin the session of a swallowed hello
        (:meth:`swallowed`; the current one, if any, ends) and return its nonce."""
        nonce = self.swallowed()
        if nonce is not None:
            self._begin(nonce, self._pos, [])
        return nonce

    def _begin(self, nonce: bytes, at: int, events: list[Event]) -> None:
        if self._frames is not None:
            events.append(("end", b""))
        events.append(("begin", nonce))
        self._frames, self._scanner = FrameTracker(), HelloScanner()
        self._claimed = at
        self.session += 1


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

    def expect(self, nonce: bytes) -> None:
        """A new hello was sent: only its ack counts now (what is buffered came before)."""
        self._want = ack_frame(nonce)
        self._buf.clear()

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
