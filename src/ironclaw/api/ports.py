"""Routes: expose a port of a sandbox on the server's host, list and unexpose them.

The forward listens on the host running ``ironclaw serve`` (127.0.0.1 unless ``bind``
names another address, which must be asked for explicitly and, beyond loopback, by an
``admin`` token: it opens the server's host to its network; so must a ``host_port``
below 1024, which only root could bind there), and it
reaches only that one port inside the sandbox (see :mod:`ironclaw.host.ports`). The
returned ``url`` is as seen from that host.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field, IPvAnyAddress

from ironclaw.api.service import Read, ServiceDep, Write
from ironclaw.errors import ConfigError, Conflict, NotFound
from ironclaw.host import ports
from ironclaw.host.ports import ExposedPort

__all__ = ["PortExpose", "PortOut", "router"]

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/ports", tags=["ports"])
PortNumber = Annotated[int, Path(ge=1, le=65535, description="The port inside the sandbox.")]


class PortExpose(BaseModel):
    port: int = Field(ge=1, le=65535, description="The port inside the sandbox.")
    bind: IPvAnyAddress | None = Field(
        default=None, description="Host address to listen on (default 127.0.0.1)."
    )
    host_port: int = Field(default=0, ge=0, le=65535, description="0: any free port.")


class PortOut(BaseModel):
    port: int
    host: str
    host_port: int
    url: str


class PortList(BaseModel):
    ports: list[PortOut]


def _out(p: ExposedPort) -> PortOut:
    return PortOut(port=p.port, host=p.host, host_port=p.host_port, url=p.url)


async def _exposed(service: ServiceDep, sandbox_id: str) -> dict[int, ExposedPort]:
    return {p.port: p for p in await ports.list_ports(service.manager, sandbox_id)}


@router.post("", status_code=201, response_model=PortOut)
async def expose(sandbox_id: str, body: PortExpose, who: Write, service: ServiceDep) -> PortOut:
    """Forward a host port to ``port`` inside; 409 if that port is exposed already."""
    await service.visible(who, sandbox_id)
    taken = f"port {body.port} of {sandbox_id} is already exposed: unexpose it first"
    if body.port in await _exposed(service, sandbox_id):
        raise Conflict(taken)
    host = str(body.bind) if body.bind is not None else "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        who.require("admin")  # beyond loopback opens the server's host to its network
    if 0 < body.host_port < 1024:
        who.require("admin")  # only root may bind these: local peers trust them as root's
    try:
        made = await ports.expose(
            service.manager, sandbox_id, body.port, host=host, host_port=body.host_port
        )
    except ConfigError:
        if body.port in await _exposed(service, sandbox_id):
            raise Conflict(taken) from None  # another request won the race
        raise
    return _out(made)


@router.get("", response_model=PortList)
async def list_(sandbox_id: str, who: Read, service: ServiceDep) -> PortList:
    await service.visible(who, sandbox_id)
    return PortList(ports=[_out(p) for p in (await _exposed(service, sandbox_id)).values()])


@router.delete("/{port}", status_code=204)
async def unexpose(sandbox_id: str, port: PortNumber, who: Write, service: ServiceDep) -> Response:
    """Stop forwarding ``port``; 404 if it is not exposed."""
    await service.visible(who, sandbox_id)
    if port not in await _exposed(service, sandbox_id):
        raise NotFound(f"port {port} of {sandbox_id} is not exposed: GET its /ports lists them")
    await ports.unexpose(service.manager, sandbox_id, port)
    return Response(status_code=204)
