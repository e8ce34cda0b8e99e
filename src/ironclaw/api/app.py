"""The FastAPI app of ``ironclaw serve``, assembled in one place: :func:`create_app`.

Other routers (the web dashboard) are mounted on the app this returns and reach the
same :class:`~ironclaw.api.service.Service` through its dependencies
(``ServiceDep``, ``Read``/``Write``/``Approve``/``Admin``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import ironclaw
from ironclaw.api import (
    controls,
    dashboard,
    exec_ws,
    ports,
    problems,
    proc_ws,
    processes,
    sandboxes,
    snapshots,
    tasks,
    watch,
)
from ironclaw.api.metrics import BodyLimit, Metrics, RequestMetrics
from ironclaw.api.service import Read, Service, ServiceDep
from ironclaw.api.streams import StreamSlots
from ironclaw.api.tasks import TaskRegistry
from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager

__all__ = ["create_app"]

MIB = 1024 * 1024
meta = APIRouter(tags=["service"])


@meta.get("/healthz")
async def health(service: ServiceDep) -> dict[str, object]:
    """Liveness and a little state; needs no token."""
    return {
        "status": "ok",
        "version": ironclaw.__version__,
        "tasks": sum(1 for r in service.tasks.runs.values() if r.status == "running"),
    }


@meta.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(who: Read, service: ServiceDep) -> Response:
    """Prometheus metrics (a ``read`` token, as any scraper can send)."""
    service.metrics.approvals.set(
        sum(len(r.approver.pending()) for r in service.tasks.runs.values())
    )
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    settings: Settings | None = None,
    *,
    manager: SandboxManager | None = None,
    routers: Sequence[APIRouter] = (),
    max_body: int = 1 * MIB,
    max_upload: int = 4096 * MIB,
    max_creating: int | None = None,
) -> FastAPI:
    """Build the app. Its lifespan opens the manager (which reconciles the registry: what
    crashed processes left half done is finished or removed) unless one is given, and
    on shutdown cancels running agent tasks and closes channels; sandboxes keep running."""
    settings = settings or Settings.from_env()
    owns = manager is None
    mgr = manager or SandboxManager(settings)
    service = Service(
        settings=settings,
        manager=mgr,
        tasks=TaskRegistry(),
        metrics=Metrics(),
        max_body=max_body,
        max_upload=max_upload,
    )
    if max_creating is not None:
        service.max_creating = max_creating

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns:
            await mgr.open()
        try:
            yield
        finally:
            await service.tasks.aclose()
            if owns:
                await mgr.aclose()

    app = FastAPI(
        title="IronClaw",
        version=ironclaw.__version__,
        summary="Sandboxes for AI agents: lifecycle, exec, files, agent tasks, approvals.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.streams = StreamSlots()  # attach, pty and watch streams, capped
    problems.install(app)
    for router in (meta, sandboxes.router, exec_ws.router, tasks.router, *routers):
        app.include_router(router)
    for router in (processes.router, proc_ws.router, ports.router, watch.router):
        app.include_router(router)
    app.include_router(controls.router)  # timeout, pause/resume, live network
    app.include_router(snapshots.router)  # snapshots, restore, fork
    app.include_router(dashboard.router)  # the web dashboard at /
    app.add_middleware(BodyLimit, max_body=max_body, exempt_suffix=sandboxes.UPLOAD_SUFFIX)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return app
