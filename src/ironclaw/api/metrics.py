"""Prometheus metrics, on a registry of the app's own (two apps never collide), and the
ASGI middleware that counts requests by route template (not by raw path: ids would
make the label set unbounded) and refuses oversized bodies early."""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ironclaw.api.problems import PROBLEM_JSON
from ironclaw.errors import BodyTooLarge

__all__ = ["BodyLimit", "Metrics", "RequestMetrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ironclaw_api_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "ironclaw_api_request_seconds", "HTTP request latency", ["method", "route"], registry=r
        )
        self.created = Counter("ironclaw_api_sandboxes_created", "Sandboxes created", registry=r)
        self.destroyed = Counter(
            "ironclaw_api_sandboxes_destroyed", "Sandboxes destroyed", registry=r
        )
        self.execs = Counter("ironclaw_api_execs", "Commands run", ["kind"], registry=r)
        self.bytes_up = Counter("ironclaw_api_upload_bytes", "File bytes uploaded", registry=r)
        self.bytes_down = Counter(
            "ironclaw_api_download_bytes", "File bytes downloaded", registry=r
        )
        self.tasks = Gauge("ironclaw_api_tasks_running", "Agent tasks running", registry=r)
        self.approvals = Gauge("ironclaw_api_approvals_pending", "RED calls waiting", registry=r)


class RequestMetrics:
    """Counts each HTTP request and its latency under its route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method, template, str(status[0])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)


class BodyLimit:
    """413 for bodies over ``max_body``, except uploads (their route bounds them).

    Declared lengths are refused before the body is read; chunked bodies are counted as
    they arrive, and the route's read fails with :class:`BodyTooLarge` at the limit.
    """

    def __init__(self, app: ASGIApp, max_body: int, exempt_suffix: str) -> None:
        self.app = app
        self.max_body = max_body
        self.exempt_suffix = exempt_suffix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope["path"]).endswith(self.exempt_suffix):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _too_large(send, self.max_body)
            return
        seen = [0]
        limit = self.max_body

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge(f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


async def _too_large(send: Send, limit: int) -> None:
    body: dict[str, Any] = {
        "type": "/problems/body-too-large",
        "title": "body too large",
        "status": 413,
        "detail": f"request body exceeds {limit} bytes; upload files through "
        "PUT /v1/sandboxes/{id}/files/content",
        "error": "BodyTooLarge",
    }
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
