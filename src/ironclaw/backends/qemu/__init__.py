"""QEMU microvm backend: the VM process and its command line (:mod:`.vm`), QMP
(:mod:`.qmp`) and the :class:`~ironclaw.backends.base.Backend` implementation."""

from ironclaw.backends.qemu.backend import QemuBackend

__all__ = ["QemuBackend"]
