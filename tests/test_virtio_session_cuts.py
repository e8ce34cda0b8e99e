"""A new host session on a virtio-serial port, wherever the previous one was cut off.

The guest's :class:`SessionTracker` and the host's re-hello (:func:`virtio_serial.
handshake`) are played against each other here, sans-IO: a previous host leaves its
session at any byte of a frame (well-formed, or hostile: fake hellos in payloads,
headers claiming gigabytes, garbage), the next host's hello follows at once, the port's
bytes reach the guest in any pieces, and the old session's reader may close it at any
moment (it sees a broken frame). The next session must begin after at most one more
hello, and get exactly the new host's bytes. The same driver runs on real file
descriptors in test_virtio_sessions.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ironclaw.proto.frames import FrameType, encode_frame
from ironclaw.transport._sessions import HELLO_SIZE, NONCE_SIZE, SessionTracker, hello_frame

REQUEST = encode_frame(FrameType.MESSAGE, 0, b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
NEXT = REQUEST + encode_frame(FrameType.DATA, 3, bytes(range(256)) * 2)  # the new host's


class Guest:
    """What ``PortSessions`` does with the tracker's events, minus the descriptors."""

    def __init__(self) -> None:
        self.tracker = SessionTracker()
        self.sessions: list[tuple[bytes, bytearray]] = []  # (nonce, bytes it got)
        self.open: int | None = None  # index into sessions

    def feed(self, data: bytes) -> None:
        for kind, value in self.tracker.feed(data):
            if kind == "data":
                if self.open is not None:
                    self.sessions[self.open][1].extend(value)
            elif kind == "end":
                self.open = None
            else:
                self._begin(value)

    def idle(self) -> None:
        """The port stayed quiet for ``settle_s``."""
        nonce = self.tracker.idle()
        if nonce is not None:
            self._begin(nonce)

    def close_current(self) -> None:
        """The current session's reader closed it (a broken frame, say)."""
        if self.open is not None:
            self.tracker.end(self.open + 1)
            self.open = None

    def current_nonce(self) -> bytes | None:
        return None if self.open is None else self.sessions[self.open][0]

    def _begin(self, nonce: bytes) -> None:
        self.sessions.append((nonce, bytearray()))
        self.open = len(self.sessions) - 1


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    at = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at)]


def new_session(
    previous: bytes,
    cuts: list[int],
    closes: list[bool],
    nonces: list[bytes],
    *,
    noticed: bool = False,
) -> Guest:
    """An old session gets ``previous`` (its host vanished there), then the new host's
    hello arrives (in the same read unless ``noticed``: the guest saw the old end first),
    the port goes quiet; with no session of its nonce, the host sends another hello
    (:func:`handshake` after ``rehello_s``). Then the new host's bytes. ``closes``: after
    which piece an old session's reader closes it."""
    guest = Guest()
    guest.feed(hello_frame(b"\x00" * NONCE_SIZE))  # the previous host's session
    mine: set[bytes] = set()
    stream = previous
    close_at = iter(closes)
    for hellos, nonce in enumerate(nonces, 1):
        mine.add(nonce)
        if noticed and hellos == 1:
            guest.feed(previous)
            guest.close_current()  # a read of 0: its host is gone
            stream = b""
        for piece in _pieces(stream + hello_frame(nonce), cuts):
            guest.feed(piece)
            if next(close_at, False) and guest.current_nonce() not in mine:
                guest.close_current()
        guest.idle()
        if guest.current_nonce() == nonce:
            break
        assert hellos < 2, "a second hello always begins the session"
        stream = b""
    for piece in _pieces(NEXT, cuts):
        guest.feed(piece)
    guest.idle()  # nothing to begin: the session's bytes are whole frames
    assert guest.open is not None
    nonce, got = guest.sessions[guest.open]
    assert nonce == nonces[hellos - 1]
    assert bytes(got) == NEXT
    begun = [n for n, _ in guest.sessions]
    assert begun.count(nonce) == 1  # one ack: a second would reach the host as a frame
    return guest


def test_a_session_whose_frame_ends_with_hello_bytes_goes_on() -> None:
    """A file sent in a DATA frame may end with a hello's bytes: at a frame's end, and
    once the session began at that very hello, no session begins when the port idles."""
    guest = Guest()
    guest.feed(hello_frame(NONCES[0]))
    guest.idle()
    tricky = encode_frame(FrameType.DATA, 5, b"file" + hello_frame(NONCES[1]))
    for piece in _pieces(tricky + tricky, [len(tricky) - 3]):
        guest.feed(piece)
        guest.idle()
    assert guest.sessions == [(NONCES[0], bytearray(tricky + tricky))]
    # A session that ended at once (its reader closed it) is not begun again by its hello.
    guest.feed(hello_frame(NONCES[2]))
    guest.close_current()
    guest.idle()
    assert [n for n, _ in guest.sessions] == [NONCES[0], NONCES[2]]


NONCES = [bytes(range(16)), bytes(range(100, 116)), bytes(range(200, 216))]


def test_a_cut_at_every_byte_of_a_frame_is_followed_by_the_next_session() -> None:
    frames = [
        REQUEST,
        encode_frame(FrameType.DATA, 7, b"d" * 41),  # its end is a hello's length
        encode_frame(FrameType.DATA, 7, b"\x00" * 70),
        encode_frame(FrameType.END, 7, b""),
    ]
    for frame in frames:
        whole = REQUEST + frame
        for cut in range(len(REQUEST), len(whole) + 1):
            for cuts, closes in (([], []), ([1, 7, 20], [True] * 4), ([cut, cut + 3], [False])):
                for noticed in (False, True):
                    new_session(whole[:cut], cuts, closes, NONCES, noticed=noticed)


def test_a_hello_that_completes_the_frame_exactly_needs_the_second_hello() -> None:
    frame = encode_frame(FrameType.DATA, 7, b"d" * 100)
    guest = new_session(frame[:-HELLO_SIZE], [], [], NONCES)
    assert [n for n, _ in guest.sessions][-1] == NONCES[1]


def test_the_nonce_spilling_into_a_header_is_not_taken_for_one() -> None:
    """The hello completes the frame and its nonce is read as the next header: of a
    session type (the frame then claims up to 4 GiB; the old session's reader closes
    it), or of the hello's type, or none."""
    for spill in (1, 2, 3, 0x68, 0x55):
        for length in (0, 3, 2**32 - 1):
            nonce = bytearray(NONCES[0])
            nonce[4:9] = struct.pack(">IB", length, spill)
            cut = 20  # 11 bytes into REQUEST's payload: the hello's last 12 bytes spill
            if spill == 0x68:  # a broken header: rescanned from before it, found at once
                guest = Guest()
                guest.feed(hello_frame(NONCES[2]) + REQUEST[:cut] + hello_frame(bytes(nonce)))
                assert guest.current_nonce() == bytes(nonce)
            for closes in ([], [True]):
                guest = new_session(REQUEST[:cut], [], closes, [bytes(nonce), NONCES[1]])
                # A frame of the nonce's last 3 bytes ends it exactly: the second hello
                # begins the session (unless the old session's reader closed it first).
                second = spill in (1, 2, 3) and length == 3 and not closes
                assert guest.current_nonce() == (NONCES[1] if second else bytes(nonce))


def test_fake_hellos_and_huge_headers_of_a_hostile_host_do_not_hold_the_next_one() -> None:
    fake = hello_frame(b"F" * NONCE_SIZE)
    bad = [
        encode_frame(FrameType.DATA, 1, b"xy" + fake + b"z"),  # a hello as payload
        encode_frame(FrameType.DATA, 1, fake),
        struct.pack(">IBI", 2**32 - 1, FrameType.DATA, 1) + fake,  # 4 GiB claimed
        struct.pack(">IBI", 2**31, FrameType.MESSAGE, 0) + fake[:30],
        fake[:25] + fake,  # a prefix without a nonce, then a fake hello
        fake[:24],  # the border of a prefix (one NUL) with the real hello's first byte
        b"\xff" * 30,
    ]
    for prefix in bad:
        for cut in range(len(prefix) + 1):
            for closes in ([], [True], [False, True]):
                new_session(prefix[:cut], [3], closes, NONCES)


@st.composite
def previous_sessions(draw: st.DrawFn) -> bytes:
    """What a previous host sent: frames, some hostile, cut anywhere."""
    fake = hello_frame(draw(st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)))
    payload = st.one_of(
        st.binary(max_size=80),
        st.builds(lambda a, b: a + fake + b, st.binary(max_size=20), st.binary(max_size=20)),
        st.just(fake[: draw(st.integers(0, HELLO_SIZE))]),
    )
    frame = st.one_of(
        st.builds(encode_frame, st.sampled_from(list(FrameType)), st.integers(0, 9), payload),
        st.builds(
            lambda n, t, rest: struct.pack(">IBI", n, t, 0) + rest,
            st.integers(0, 2**32 - 1),
            st.integers(0, 255),
            payload,
        ),
        payload,  # garbage between frames
    )
    data = b"".join(draw(st.lists(frame, max_size=4)))
    return data[: draw(st.integers(0, len(data)))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    previous=previous_sessions(),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    closes=st.lists(st.booleans(), max_size=8),
    nonces=st.lists(
        st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE), min_size=2, max_size=2, unique=True
    ),
    noticed=st.booleans(),
)
def test_the_next_session_is_always_established(
    previous: bytes, cuts: list[int], closes: list[bool], nonces: list[bytes], noticed: bool
) -> None:
    # Nonces are 16 random bytes: none is the old session's or in the old host's bytes.
    assume(all(n not in previous and any(n) for n in nonces))
    new_session(previous, cuts, closes, nonces, noticed=noticed)
