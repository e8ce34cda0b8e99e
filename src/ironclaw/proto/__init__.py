"""Sans-IO wire protocol of the host<->sandbox channel: frames, messages, handshake.

No asyncio and no sockets here: the same code runs in the host orchestrator and in the
guest agent (plain ``python3``, standard library only), and it is tested by feeding it
bytes. See ``docs/CHANNEL.md`` for the wire format.
"""

from __future__ import annotations

# Each module lists its public names once, in its own ``__all__``; this package is their union.
from . import frames, handshake, limits, messages
from .frames import *  # noqa: F403
from .handshake import *  # noqa: F403
from .limits import *  # noqa: F403
from .messages import *  # noqa: F403

__all__ = []
__all__ += frames.__all__
__all__ += handshake.__all__
__all__ += limits.__all__
__all__ += messages.__all__
