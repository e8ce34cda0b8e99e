"""Sans-IO wire protocol of the host<->sandbox channel: frames, messages, handshake.

No asyncio and no sockets here: the same code runs in the host orchestrator and in the
guest agent (plain ``python3``, standard library only), and it is tested by feeding it
bytes. See ``docs/CHANNEL.md`` for the wire format.

The modules' names are loaded on first use (see :func:`__getattr__`).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs an import
if TYPE_CHECKING:
    from typing import Any

    # Each module lists its public names once, in its own ``__all__``; this package is
    # their union.
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

_MODULES = ("frames", "handshake", "limits", "messages")


def __getattr__(name: str) -> Any:
    """The union of the modules' names, loaded on first use: importing one module of
    the package (``ironclaw.proto.lifecycle``, as the registry does) loads only that one,
    which the one-shot CLI's start-up counts on."""
    import importlib

    names: list[str] = []
    for module in _MODULES:
        mod = importlib.import_module(f"{__name__}.{module}")
        names += mod.__all__
        globals().update({n: getattr(mod, n) for n in mod.__all__})
    globals()["__all__"] = names
    if name in globals():
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
