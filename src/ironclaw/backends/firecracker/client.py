"""Firecracker's API over its Unix socket, with errors that carry Firecracker's words.

Firecracker answers 204 on success and 400 with ``{"fault_message": ...}`` when it
refuses; that message is what a user needs, so it ends up in the :class:`BackendError`.
A ``check`` callable (the schema validator in tests, or in production when the spec is
installed) can vet every body before it leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from ironclaw.backends.firecracker.api import ApiRequest
from ironclaw.errors import BackendError, ConfigError
from ironclaw.proto.lifecycle import AsyncResource

__all__ = ["FirecrackerApi", "RequestCheck"]

#: Given (method, path, body); returns the reasons the request is invalid.
RequestCheck = Callable[[str, str, Any], list[str]]


class FirecrackerApi(AsyncResource):
    """An async client for one Firecracker process. Use as ``async with``."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        check: RequestCheck | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self._check = check
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
            # The host part is ignored on a Unix socket; Firecracker's docs use "localhost".
            base_url="http://localhost",
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(self, req: ApiRequest) -> Any:
        """Send one request; return the decoded JSON answer (``None`` for 204)."""
        if self._check is not None and req.method != "GET":
            problems = self._check(req.method, req.path, req.body)
            if problems:
                raise ConfigError(f"refusing to send {req}: " + "; ".join(problems))
        try:
            resp = await self._client.request(req.method, req.path, json=req.body)
        except httpx.TimeoutException as exc:
            raise BackendError(f"Firecracker did not answer {req} in time") from exc
        except httpx.HTTPError as exc:
            raise BackendError(
                f"cannot reach Firecracker's API at {self.socket_path} for {req}: {exc}"
            ) from exc
        if resp.is_success and (resp.status_code == 204 or not resp.content):
            return None
        if resp.is_success:
            return resp.json()
        raise BackendError(
            f"Firecracker refused {req} ({resp.status_code}): {_fault_message(resp)}"
        )

    async def run(self, requests: Sequence[ApiRequest]) -> None:
        """Send requests in order, stopping at the first refusal."""
        for req in requests:
            await self.request(req)

    async def put(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request(ApiRequest("PUT", path, body))

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request(ApiRequest("PATCH", path, body))

    async def get(self, path: str) -> Any:
        return await self.request(ApiRequest("GET", path))

    async def wait_ready(
        self, timeout: float = 5.0, *, alive: Callable[[], bool] | None = None
    ) -> Any:
        """Poll ``GET /`` until Firecracker's API answers; return its instance info.

        ``alive`` lets the caller stop early when the process already died.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.005
        last: Exception | None = None
        while True:
            if os.path.exists(self.socket_path):
                try:
                    return await self.get("/")
                except BackendError as exc:
                    last = exc
            if alive is not None and not alive():
                raise BackendError(f"Firecracker exited before its API socket answered ({last})")
            if loop.time() >= deadline:
                raise BackendError(
                    f"Firecracker's API socket {self.socket_path} did not answer within "
                    f"{timeout}s ({last or 'socket never appeared'})"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


def _fault_message(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return resp.text[:500] or resp.reason_phrase
    if isinstance(doc, dict) and isinstance(doc.get("fault_message"), str):
        return str(doc["fault_message"])
    return json.dumps(doc)[:500]
