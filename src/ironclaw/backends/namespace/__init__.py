"""Namespace backend: bubblewrap jails (:mod:`.backend`), their launch (:mod:`.launch`) and
command lines (:mod:`.cmdline`).

The backend and its record load on first use: the one-shot CLI imports :mod:`.launch` without
pulling in asyncio and subprocess through :mod:`.backend`.
"""

from typing import TYPE_CHECKING, Any

from ironclaw.backends.namespace.cmdline import GUEST_GID, GUEST_UID, bwrap_argv, etc_files

if TYPE_CHECKING:
    from ironclaw.backends.namespace.backend import NamespaceBackend, NamespaceInfo

__all__ = ["GUEST_GID", "GUEST_UID", "NamespaceBackend", "NamespaceInfo", "bwrap_argv", "etc_files"]


def __getattr__(name: str) -> Any:
    if name in ("NamespaceBackend", "NamespaceInfo"):
        from ironclaw.backends.namespace import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
