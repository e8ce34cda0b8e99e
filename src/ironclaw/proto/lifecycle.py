"""The open/close shape shared by IronClaw's long-lived objects (the registry, a channel
peer, the sandbox manager, an agent's tool servers): ``async with`` opens one and closes
it on the way out, whatever happened inside. Standard library only.
"""

from __future__ import annotations

from typing import Self

__all__ = ["AsyncResource"]


class AsyncResource:
    """``async with x`` awaits ``x.open()`` and, on leaving, ``x.aclose()``."""

    async def open(self) -> None:
        """Acquire what the object needs (nothing by default)."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
