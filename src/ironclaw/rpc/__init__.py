"""JSON-RPC 2.0 between host and sandbox, over any :class:`ironclaw.transport.Connection`.

A :class:`Peer` multiplexes many concurrent calls by id (responses may come back in
any order), delivers notifications in arrival order to subscribers, and carries bulk
bytes as binary stream frames (never base64). Standard library only.

Rules, which ``docs/CHANNEL.md`` states with the wire format:

* **Errors.** This layer is the one place where exceptions become wire errors and back:
  a handler's exception is sent through :func:`ironclaw.errors.to_wire`; an error
  response is raised at the caller as :func:`ironclaw.errors.from_wire` rebuilds it
  (IronClaw errors as their own class, anything else as ``RpcError`` with ``data.type``).
* **Bad input keeps the connection.** Malformed JSON gets ``-32700`` and a non-2.0 or
  otherwise invalid message gets ``-32600``, both with ``id: null`` when the id could
  not be read; an unknown method gets ``-32601``. Invalid *responses* are never
  answered (that could loop): the matching call fails with ``MalformedFrame``.
* **Limits.** ``Peer(limits=ChannelLimits(...))`` caps what the other end may make this
  end hold; the host uses :data:`HOST_LIMITS` (its stream ids checked, small frames,
  JSON depth and size checked before parsing). A breach closes the channel with
  ``ChannelViolation``/``LimitExceeded`` and calls ``on_protocol_error(peer, error)``
  once, for the owner's trace and audit log.
* **Broken framing closes it.** A frame header over ``max_frame`` (``FrameTooLarge``,
  detected before anything is allocated) or an unknown frame type (``MalformedFrame``)
  means the byte stream cannot be resynchronised: the connection is closed and every
  pending call fails with ``ChannelClosed`` whose ``__cause__`` is that error.
* **Connection loss** (EOF, also in the middle of a frame, or a transport error) fails
  every pending call at once with ``ChannelClosed``; open byte streams raise it after
  their buffered chunks; subscriptions end.
* **Timeouts and cancellation.** ``call(timeout=)`` raises the builtin ``TimeoutError``;
  a timed-out or cancelled call sends ``$/cancel {"id": id}`` and the other side cancels
  that handler (which answers ``RequestCancelled``, ignored by then).
* **Backpressure.** Every queue is bounded: subscriptions (``maxsize``), streams
  (``max_buffered`` chunks, also before ``open_stream``, and ``max_buffered_bytes`` in
  all), running handlers and calls (``max_inbound_calls``/``max_outbound_calls``).
  When one is full the reader waits, the transport stops reading, and the remote
  writer's ``drain`` blocks. Consumers must therefore read subscriptions
  and streams they asked for concurrently with awaiting calls; an unread full queue
  stalls the whole channel rather than dropping or growing without bound.
* **Order.** Frames are processed in the order they arrive, so bytes a handler sent with
  ``send_bytes``/``end_stream`` before returning reach the stream before the call's
  result reaches the caller.
"""

from __future__ import annotations

from ironclaw.proto import ChannelLimits

from . import peer
from .peer import *  # noqa: F403 -- the names in peer.__all__, listed once there

# The Peer's names, and the limits type its constructor takes.
__all__ = ["ChannelLimits"]
__all__ += peer.__all__
