"""The open/close shape shared by IronClaw's long-lived objects (the registry, a channel
peer, the sandbox manager, an agent's tool servers): ``async with`` opens one and closes
it on the way out, whatever happened inside. Standard library only.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, Self, TypeVar

__all__ = ["AsyncResource", "or_close"]

T = TypeVar("T")


class _Closable(Protocol):
    async def aclose(self) -> None: ...


async def or_close(owned: _Closable | None, step: Awaitable[T]) -> T:
    """``step``'s result; if it fails, ``owned`` (opened just for it) is closed first."""
    try:
        return await step
    except BaseException:
        if owned is not None:
            await owned.aclose()
        raise


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
