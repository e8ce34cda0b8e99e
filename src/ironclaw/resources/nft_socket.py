"""The nf_tables netlink socket: batches with acks, gets, dumps; and kernel probes.

Blocking, and used from one thread at a time (:class:`~ironclaw.resources.firewall.Firewall`
gives it a worker thread). Messages are built by :mod:`ironclaw.policy.netlink`; here they
are sent, and the kernel's answers turned into errors that say which message failed.

Deletions use ``DESTROY`` messages where the kernel has them (Linux 6.3+); whether it
does is probed once per process (:func:`destroy_supported`), and
``IRONCLAW_NFT_NO_DESTROY=1`` forces the DEL fallback older kernels need.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator

from ironclaw.errors import NetworkError
from ironclaw.policy import netlink as nl
from ironclaw.policy.netlink import Msg
from ironclaw.policy.network import TABLE

__all__ = [
    "NO_DESTROY_ENV",
    "BatchFailed",
    "GenerationChanged",
    "Missing",
    "NfTablesSocket",
    "check_nftables",
    "destroy_supported",
    "forced_fallback",
    "probe_destroy",
]

NETLINK_NETFILTER = 12
NO_DESTROY_ENV = "IRONCLAW_NFT_NO_DESTROY"
_PROBE_COUNTER = "icc-probe"  # never created: sandbox counters are icc-<16 hex digits>
# What nfnetlink answers for a message type its nf_tables does not know (EINVAL; the
# other is accepted in case a kernel ever says so more precisely).
UNKNOWN_MESSAGE = frozenset({errno.EINVAL, errno.EOPNOTSUPP})


# --- the socket --------------------------------------------------------------------------


class NfTablesSocket:
    """A blocking nf_tables netlink socket: batches with acks, gets and dumps."""

    def __init__(self, timeout: float = 5.0) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
            for opt in (33, socket.SO_SNDBUF):  # SO_SNDBUFFORCE (root), else capped
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 23)
                    break
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        except OSError as exc:
            raise NetworkError(f"cannot open an nf_tables netlink socket: {exc}") from exc
        sock.settimeout(timeout)
        self._sock = sock
        self._seq = int.from_bytes(os.urandom(2)) << 8

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self, count: int = 1) -> int:
        """Reserve ``count`` consecutive sequence numbers; return the first."""
        first = (self._seq + 1) & nl.SEQ_MASK
        self._seq = (self._seq + count) & nl.SEQ_MASK
        return first

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise NetworkError(f"nf_tables netlink send failed: {exc}") from exc

    def _replies(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(type, flags, seq, payload) of every message received, forever."""
        while True:
            try:
                buf = self._sock.recv(1 << 20)
            except OSError as exc:  # includes the socket timeout
                raise NetworkError(f"nf_tables netlink receive failed: {exc!r}") from exc
            yield from nl.messages(buf)

    def transact(self, msgs: list[Msg], *, what: str, genid: int | None = None) -> None:
        """Apply ``msgs`` as one kernel transaction; raise with the first failure."""
        if not msgs:
            return
        begin_seq = self._next_seq(len(msgs) + 2)
        pending = {(begin_seq + 1 + i) & nl.SEQ_MASK: i for i in range(len(msgs))}
        self._send(nl.encode_batch(msgs, begin_seq, genid=genid))
        failure: tuple[int, int] | None = None
        for msg_type, _, seq, payload in self._replies():
            if msg_type != nl.NLMSG_ERROR:
                continue
            code = nl.error_code(payload)
            if seq == begin_seq and code:
                raise _error(what, code, None)
            if seq in pending:
                failed = pending.pop(seq)
                if code and failure is None:
                    failure = (code, failed)
            if not pending:
                break
        if failure is not None:
            raise _error(what, *failure)

    def request(self, kind: int, payload: bytes, *, dump: bool = False) -> list[bytes]:
        """One get (``ENOENT`` raises :class:`Missing`) or dump: the reply payloads."""
        seq = self._next_seq()
        self._send(nl.encode_request(kind, payload, seq, dump=dump))
        out: list[bytes] = []
        for msg_type, _, rseq, body in self._replies():
            if rseq != seq:
                continue
            if msg_type == nl.NLMSG_DONE:
                break
            if msg_type == nl.NLMSG_ERROR:
                code = nl.error_code(body)
                if code == errno.ENOENT:
                    raise Missing
                if code:
                    raise _error(f"get {kind}", code, None)
                break
            out.append(body)
        return out

    def generation(self) -> int:
        (reply,) = self.request(nl.MSG_GETGEN, b"")
        return int(struct.unpack(">I", nl.attr_map(reply[4:])[1])[0])


class Missing(Exception):
    """A get found no such table, set, element or object."""


class BatchFailed(NetworkError):
    """The kernel refused a batch; ``index`` is the first failing message (None: all)."""

    def __init__(self, text: str, code: int, index: int | None) -> None:
        super().__init__(text)
        self.code = code
        self.index = index


class GenerationChanged(BatchFailed):
    """Someone else committed between our read and our write: read again."""


def _error(what: str, code: int, index: int | None) -> BatchFailed:
    where = f" (message {index})" if index is not None else ""
    text = f"nftables {what} failed{where}: {os.strerror(code)}"
    if code == errno.ERESTART:
        return GenerationChanged(text, code, index)
    return BatchFailed(text, code, index)


# --- which deletions the kernel knows ------------------------------------------------------

_destroy_known: bool | None = None  # per process: the running kernel does not change


def probe_destroy(sock: NfTablesSocket, table: str, *, msg_type: int = nl.MSG_DESTROYOBJ) -> bool:
    """Send a ``DESTROY`` of a counter that never exists in ``table``; nothing can change.

    A kernel that knows the message answers success (or ENOENT while the table does not
    exist yet); one older than 6.3 answers EINVAL, as for any message type it lacks.
    ``msg_type`` lets a test send a type no kernel has yet, to see that answer here.
    """
    payload = nl.counter_msg(table, _PROBE_COUNTER, nl.MSG_DESTROYOBJ)[2]
    try:
        sock.transact([(msg_type, 0, payload)], what="probe for DESTROY messages")
    except BatchFailed as exc:
        if exc.code == errno.ENOENT:
            return True
        if exc.code in UNKNOWN_MESSAGE:
            return False
        raise
    return True


def destroy_supported(sock: NfTablesSocket, table: str = TABLE) -> bool:
    """Whether this kernel has nf_tables ``DESTROY`` messages; probed once per process.

    A probe rather than the kernel version: distribution kernels backport nf_tables.
    """
    global _destroy_known
    if _destroy_known is None:
        _destroy_known = probe_destroy(sock, table)
    return _destroy_known


def forced_fallback() -> bool:
    """Whether the environment asks for the DEL fallback (``IRONCLAW_NFT_NO_DESTROY=1``)."""
    return os.environ.get(NO_DESTROY_ENV, "") not in ("", "0")


def check_nftables(timeout: float = 2.0) -> tuple[bool, bool]:
    """For ``ironclaw doctor``: (DESTROY messages known, fallback forced by the environment).

    Proves nf_tables takes a transaction here by creating and deleting a private table
    inside one batch (so nothing is left and no other table is touched); the DESTROY probe
    targets a counter in that table. Raises :class:`NetworkError` when nf_tables is unusable.
    """
    global _destroy_known
    table = f"ironclaw_probe_{os.urandom(4).hex()}"
    create = (nl.MSG_NEWTABLE, nl.NLM_F_CREATE | nl.NLM_F_EXCL, nl.strz(1, table))
    delete = (nl.MSG_DELTABLE, 0, nl.strz(1, table))
    sock = NfTablesSocket(timeout)
    try:
        probe = (nl.MSG_DESTROYOBJ, 0, nl.counter_msg(table, _PROBE_COUNTER, nl.MSG_DESTROYOBJ)[2])
        try:
            sock.transact([create, probe, delete], what="table create and delete")
            known = True
        except BatchFailed as exc:
            if exc.index != 1 or exc.code not in UNKNOWN_MESSAGE:
                raise NetworkError(str(exc)) from exc
            try:
                sock.transact([create, delete], what="table create and delete")
            except BatchFailed as exc2:
                raise NetworkError(str(exc2)) from exc2
            known = False
    finally:
        sock.close()
    _destroy_known = known
    return known, forced_fallback()
