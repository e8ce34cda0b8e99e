"""The remote SDK's lifetimes, pause/resume, snapshots and live network policy: the
routes of ``api/controls`` and ``api/snapshots``, with the in-process SDK's names
(``sb.pause()``, ``sb.snapshot(name)``, ``sb.network.update(...)``,
``client.snapshots.list()``) so code runs against either.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Unpack
from urllib.parse import quote

from ironclaw.errors import ApiError
from ironclaw.proto.surface import SnapshotInfo

if TYPE_CHECKING:
    from ironclaw.client.api import ApiClient, SandboxDoc
    from ironclaw.policy.network import NetworkChange, NetworkPolicy

__all__ = ["RemoteNetwork", "RemoteSnapshot", "RemoteSnapshots", "restore_doc"]


@dataclass(frozen=True)
class RemoteSnapshot(SnapshotInfo):
    """A snapshot as the API describes it (the in-process SDK's has its files too)."""

    @classmethod
    def from_doc(cls, doc: dict[str, Any], route: str = "the server") -> RemoteSnapshot:
        """The server's answer read as a snapshot; :class:`ApiError` if it is none."""
        try:
            return cls(
                name=str(doc["name"]), kind=str(doc["kind"]), sha256=str(doc["sha256"]),
                size=int(doc["size"]), created_at=float(doc["created"]),
                source=str(doc["source"]), backend=str(doc["backend"]),
                spec=dict(doc.get("spec") or {}),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            why = f"{exc!r:.200}"
            raise ApiError(f"{route}: the server's answer is no snapshot ({why})") from None


def _seg(value: str) -> str:
    return quote(value, safe="")


def sandbox_path(sandbox_id: str, tail: str) -> str:
    return f"/v1/sandboxes/{_seg(sandbox_id)}/{tail}"


class RemoteSnapshots:
    """``client.snapshots``: the caller's snapshots on the server."""

    def __init__(self, api: ApiClient) -> None:
        self._api = api

    async def list(self) -> list[RemoteSnapshot]:
        docs = await self._api.request("GET", "/v1/snapshots")
        if not isinstance(docs, builtins.list):
            raise ApiError("GET /v1/snapshots: the server's answer is not a list")
        return [RemoteSnapshot.from_doc(d, "GET /v1/snapshots") for d in docs]

    async def get(self, name: str) -> RemoteSnapshot:
        route = f"/v1/snapshots/{_seg(name)}"
        return RemoteSnapshot.from_doc(await self._api.request("GET", route), f"GET {route}")

    async def remove(self, name: str) -> None:
        await self._api.request("DELETE", f"/v1/snapshots/{_seg(name)}")

    async def create(self, sandbox_id: str, name: str) -> RemoteSnapshot:
        route = sandbox_path(sandbox_id, "snapshots")
        doc = await self._api.request("POST", route, json={"name": name})
        return RemoteSnapshot.from_doc(doc, f"POST {route}")

    async def fork(
        self, name: str, count: int, spec: dict[str, Any] | None = None
    ) -> builtins.list[SandboxDoc]:
        """``count`` new sandboxes from the snapshot (all made, or none)."""
        body = {"count": count, "spec": spec or {}}
        route = f"/v1/snapshots/{_seg(name)}/fork"
        return await self._api.request_sandboxes("POST", route, json=body)


async def restore_doc(
    api: ApiClient,
    snapshot: str | RemoteSnapshot,
    spec: dict[str, Any] | None,
    sandbox_id: str | None,
) -> SandboxDoc:
    """A new sandbox from ``snapshot`` with its recorded spec and ``spec`` on top."""
    name = snapshot if isinstance(snapshot, str) else snapshot.name
    body: dict[str, Any] = {"spec": spec or {}}
    if sandbox_id is not None:
        body["id"] = sandbox_id
    return await api.request_sandbox("POST", f"/v1/snapshots/{_seg(name)}/restore", json=body)


class RemoteNetwork:
    """``sb.network``: the sandbox's egress policy, changeable while it runs."""

    def __init__(self, api: ApiClient, sandbox_id: str) -> None:
        self._api, self._id = api, sandbox_id

    async def update(self, **change: Unpack[NetworkChange]) -> NetworkPolicy:
        """Replace ``allow``/``allow_domains``/``deny_domains`` when given; ``deny`` removes
        allow rules. Applied at once on the server; returns the new policy."""
        from ironclaw.policy.network import NetworkPolicy

        body = {k: v for k, v in change.items() if v is not None}
        route = sandbox_path(self._id, "network")
        doc = await self._api.request("PATCH", route, json=body)
        try:
            return NetworkPolicy.model_validate(doc)
        except ValueError as exc:  # pydantic's ValidationError
            why = f"{exc!s:.300}"
            raise ApiError(
                f"PATCH {route}: the server's answer is no network policy ({why})"
            ) from None
