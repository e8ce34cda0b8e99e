"""Namespace backend: bubblewrap jails (:mod:`.backend`), their command lines (:mod:`.cmdline`)."""

from ironclaw.backends.namespace.backend import NamespaceBackend, NamespaceInfo
from ironclaw.backends.namespace.cmdline import GUEST_GID, GUEST_UID, bwrap_argv, etc_files

__all__ = ["GUEST_GID", "GUEST_UID", "NamespaceBackend", "NamespaceInfo", "bwrap_argv", "etc_files"]
