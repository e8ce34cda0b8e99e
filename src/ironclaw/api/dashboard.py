"""The web dashboard of ``ironclaw serve``, at ``/``: sandboxes with their live state and
resource use, agent tasks with a live timeline, and held RED calls to approve or deny.

Server-rendered HTML and a little plain JavaScript (polling for the panels, Server-Sent
Events for a task's trace); nothing is loaded from elsewhere.

Security: the login form takes an API token and keeps it in an HttpOnly, SameSite=Strict
cookie. Every state-changing request is a POST that must carry a CSRF token (an HMAC of
the session token, so a page on another site cannot know it) and must not come from
another origin. Everything shown that a guest or a model could have written (cards,
commands, outputs, trace) is HTML-escaped here, or set as text by the script; the
Content-Security-Policy allows scripts from this server only, as a second line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from ironclaw.api.auth import Principal, verify_token
from ironclaw.api.dashboard_assets import APP_JS, STYLE_CSS
from ironclaw.api.service import Service, ServiceDep
from ironclaw.api.tasks import TaskRun
from ironclaw.errors import ConfigError, IronclawError, NotFound, ScopeError
from ironclaw.resources.store import SandboxRecord

__all__ = ["COOKIE", "Markup", "csrf_token", "render", "router"]

router = APIRouter(include_in_schema=False)

COOKIE = "ironclaw_token"
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- escaping


class Markup(str):
    """HTML that is already safe (built by :func:`render`); anything else is escaped."""


def render(template: str, **values: Any) -> Markup:
    """``template.format`` with every value HTML-escaped unless it is :class:`Markup`."""
    safe = {
        k: v if isinstance(v, Markup) else html.escape("" if v is None else str(v))
        for k, v in values.items()
    }
    return Markup(template.format(**safe))


def join(parts: Iterable[Markup]) -> Markup:
    return Markup("".join(parts))


# --------------------------------------------------------------------------- session


def csrf_token(token: str) -> str:
    """Derived from the session's secret token: another site cannot compute it."""
    return hmac.new(token.encode(), b"ironclaw dashboard csrf", hashlib.sha256).hexdigest()


async def _session(request: Request, service: Service) -> tuple[Principal, str] | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    try:
        return await verify_token(service.store, token), token
    except IronclawError:
        return None


def _same_origin(request: Request) -> bool:
    """A POST from a page of this server (browsers send Origin or Sec-Fetch-Site)."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host')}"


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > 64 * 1024:
        return {}
    return {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}


def _page(title: str, body: Markup, who: Principal | None = None, status: int = 200) -> Response:
    bar = Markup("")
    if who is not None:
        bar = render(
            '<span class="who">token <b>{name}</b> · {scopes}</span>'
            '<form method="post" action="/ui/logout"><button>Log out</button></form>',
            name=who.name,
            scopes=", ".join(sorted(who.scopes)),
        )
    doc = render(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>{title} · IronClaw</title>"
        '<link rel="stylesheet" href="/ui/static/style.css">'
        '<script src="/ui/static/app.js" defer></script></head><body>'
        '<header><h1><a href="/" class="home">IronClaw</a></h1>'
        "{bar}</header><main>{body}</main></body></html>",
        title=title,
        bar=bar,
        body=body,
    )
    return HTMLResponse(doc, status_code=status, headers=HEADERS)


def _login_page(error: str | None = None, status: int = 200) -> Response:
    body = render(
        '<section class="login"><h2>Log in</h2>'
        "<p class=muted>Paste an API token (<code>ironclaw token create --scope read "
        "--scope approve</code>). It is kept in an HttpOnly cookie for this browser "
        "session.</p>{error}"
        '<form method="post" action="/ui/login">'
        '<label for="token">Token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required>'
        '<button type="submit">Log in</button></form></section>',
        error=render('<p class="error" role="alert">{e}</p>', e=error) if error else Markup(""),
    )
    return _page("Log in", body, status=status)


# --------------------------------------------------------------------------- panels


def _usage(service: Service, record: SandboxRecord) -> dict[str, Any]:
    """Live resource use from the sandbox's cgroup (empty where it has none)."""
    if record.state != "running":
        return {}
    try:
        stats = service.manager.cgroups.open(record.rid).stats()
    except (IronclawError, OSError):
        return {}
    return {
        "mem": stats.memory_current_bytes,
        "pids": stats.pids_current,
        "cpu_s": stats.cpu_usage_ns / 1e9,
    }


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


async def _sandboxes_panel(service: Service, who: Principal) -> Markup:
    rows = []
    for record, owner in await service.listing(who):
        use = _usage(service, record)
        limit_mib = ((record.spec or {}).get("limits") or {}).get("memory_mib")
        mem = Markup("<span class=muted>-</span>")
        if "mem" in use:
            pct = min(100.0, 100.0 * use["mem"] / (limit_mib * 1024 * 1024)) if limit_mib else 0
            mem = render(
                '<meter min="0" max="100" value="{pct}"></meter> {used} / {limit}',
                pct=f"{pct:.0f}",
                used=_mib(use["mem"]),
                limit=f"{limit_mib} MiB" if limit_mib else "no limit",
            )
        rows.append(
            render(
                '<tr data-sandbox="{id}"><td><code>{id}</code></td><td>{backend}</td>'
                '<td class="state state-{state}">{state}{reason}</td><td>{mem}</td>'
                "<td>{pids}</td><td>{cpu}</td><td>{owner}</td><td>{age}</td></tr>",
                id=record.id,
                backend=record.backend,
                state=record.state,
                reason=render(" <span class=muted>({r})</span>", r=record.reason)
                if record.reason
                else Markup(""),
                mem=mem,
                pids=use.get("pids", "-"),
                cpu=f"{use['cpu_s']:.2f} s" if "cpu_s" in use else "-",
                owner=owner or "-",
                age=_age(record.created_at),
            )
        )
    head = ("Sandbox", "Backend", "State", "Memory", "Processes", "CPU", "Token", "Age")
    return _table_panel("sandboxes", "Sandboxes", head, rows, "No sandboxes.")


def _table_panel(
    section: str, title: str, head: tuple[str, ...], rows: list[Markup], empty: str
) -> Markup:
    """A dashboard section: a table of ``rows`` under ``head``, or ``empty`` when none."""
    cells = join(render("<th>{h}</th>", h=h) for h in head)
    table = (
        render(
            "<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>",
            cells=cells,
            rows=join(rows),
        )
        if rows
        else render("<p class=muted>{e}</p>", e=empty)
    )
    return render('<section id="{s}"><h2>{t}</h2>{tb}</section>', s=section, t=title, tb=table)


def _age(created: float) -> str:
    secs = max(0, int(time.time() - created)) if created else 0
    return f"{secs // 60}m {secs % 60:02d}s" if secs >= 60 else f"{secs}s"


def _task_text(run: TaskRun) -> str:
    first = run.events[0] if run.events else {}
    text = str(first.get("task", "")) if first.get("event") == "task.start" else ""
    return text if len(text) <= 120 else text[:120] + "…"


def _visible_runs(service: Service, who: Principal) -> list[TaskRun]:
    return [r for r in service.tasks.runs.values() if who.admin or r.owner == who.token_id]


def _tasks_panel(service: Service, who: Principal) -> Markup:
    rows = [
        render(
            '<tr data-task="{id}"><td><a href="/ui/tasks/{id}"><code>{id}</code></a></td>'
            '<td>{text}</td><td><code>{sid}</code></td><td class="status-{status}">{status}'
            "</td><td>{steps}</td><td>{events}</td></tr>",
            id=run.id,
            text=_task_text(run),
            sid=run.sandbox_id,
            status=run.status,
            steps=run.outcome.steps if run.outcome else "-",
            events=len(run.events),
        )
        for run in reversed(_visible_runs(service, who))
    ]
    head = ("Task", "What", "Sandbox", "Status", "Steps", "Events")
    return _table_panel("tasks", "Agent tasks", head, rows, "No agent tasks.")


def _approvals_panel(
    service: Service, who: Principal, token: str, task_id: str | None, back: str
) -> Markup:
    cards = []
    can = who.admin or "approve" in who.scopes
    for run, req in service.tasks.pending(who):
        if task_id is not None and run.id != task_id:
            continue
        buttons = (
            render(
                '<form method="post" action="/ui/approvals/{aid}" class="actions">'
                '<input type="hidden" name="csrf" value="{csrf}">'
                '<input type="hidden" name="next" value="{back}">'
                '<button class="approve" name="decision" value="approve">Approve</button>'
                '<button class="deny" name="decision" value="deny">Deny</button></form>',
                aid=f"{run.id}.{req.id}",
                csrf=csrf_token(token),
                back=back,
            )
            if can
            else Markup("<p class=muted>This token lacks the approve scope.</p>")
        )
        cards.append(
            render(
                '<div class="card" data-approval="{aid}"><div><b class="{color}">{color}</b> '
                "<code>{name}</code> · {reason} · task "
                '<a href="/ui/tasks/{task}"><code>{task}</code></a></div>'
                '<pre class="diff">{card}</pre>'
                "<details><summary>arguments</summary><pre>{args}</pre></details>{buttons}</div>",
                aid=f"{run.id}.{req.id}",
                color=req.classification.color.value,
                name=req.name,
                reason=req.classification.reason,
                task=run.id,
                card=req.card,
                args=json.dumps(dict(req.arguments), indent=2, default=str),
                buttons=buttons,
            )
        )
    inner = join(cards) if cards else Markup("<p class=muted>Nothing is waiting.</p>")
    return render(
        '<section id="approvals"><h2>Waiting for approval ({n})</h2>{inner}</section>',
        n=len(cards),
        inner=inner,
    )


async def _panels(service: Service, who: Principal, token: str, task_id: str | None) -> Markup:
    back = f"/ui/tasks/{task_id}" if task_id else "/"
    approvals = _approvals_panel(service, who, token, task_id, back)
    if task_id is not None:
        run = service.tasks.get(who, task_id)
        return join([approvals, render(
            '<p>Status: <b class="status-{s}">{s}</b> · sandbox <code>{sid}</code>{ans}</p>',
            s=run.status, sid=run.sandbox_id,
            ans=render(" · answer: <q>{a}</q>", a=run.outcome.answer)
            if run.outcome and run.outcome.answer else Markup(""),
        )])  # fmt: skip
    return join([approvals, await _sandboxes_panel(service, who), _tasks_panel(service, who)])


# --------------------------------------------------------------------------- routes


@router.get("/")
async def home(request: Request, service: ServiceDep) -> Response:
    session = await _session(request, service)
    if session is None:
        return _login_page()
    who, token = session
    body = render(
        '<div id="panels" data-src="/ui/panels" aria-live="polite">{p}</div>',
        p=await _panels(service, who, token, None),
    )
    return _page("Overview", body, who)


@router.post("/ui/login")
async def login(request: Request, service: ServiceDep) -> Response:
    if not _same_origin(request):
        return _login_page("Cross-site login refused.", 403)
    token = (await _form(request)).get("token", "").strip()
    try:
        await verify_token(service.store, token)
    except IronclawError as exc:
        return _login_page(str(exc), 401)
    resp = RedirectResponse("/", status_code=303, headers=HEADERS)
    resp.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return resp


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    resp = RedirectResponse("/", status_code=303, headers=HEADERS)
    if _same_origin(request):
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return resp


@router.get("/ui/panels")
async def panels(request: Request, service: ServiceDep, task: str | None = None) -> Response:
    session = await _session(request, service)
    if session is None:
        return Response("log in again", status_code=401, headers=HEADERS)
    try:
        inner = await _panels(service, *session, task)
    except NotFound as exc:
        return Response(str(exc), status_code=404, headers=HEADERS)
    return HTMLResponse(inner, headers=HEADERS)


@router.get("/ui/tasks/{task_id}")
async def task_page(task_id: str, request: Request, service: ServiceDep) -> Response:
    session = await _session(request, service)
    if session is None:
        return RedirectResponse("/", status_code=303, headers=HEADERS)
    who, token = session
    try:
        inner = await _panels(service, who, token, task_id)
    except NotFound as exc:
        return _page("No such task", render("<p class=error>{e}</p>", e=exc), who, 404)
    body = render(
        '<section><h2>Task <code>{id}</code>: <span id="task-status">{status}</span></h2>'
        '<div id="panels" data-src="/ui/panels?task={id}" aria-live="polite">{inner}</div>'
        "</section><section><h2>Timeline</h2>"
        '<ol id="timeline" class="timeline" data-src="/ui/tasks/{id}/events"></ol></section>',
        id=task_id,
        status=service.tasks.get(who, task_id).status,
        inner=inner,
    )
    return _page(f"Task {task_id}", body, who)


@router.get("/ui/tasks/{task_id}/events")
async def task_events(task_id: str, request: Request, service: ServiceDep) -> Response:
    """The task's trace from its first event, as unnamed SSE messages, then ``end``."""
    session = await _session(request, service)
    if session is None:
        return Response("log in again", status_code=401, headers=HEADERS)
    try:
        run = service.tasks.get(session[0], task_id)
    except NotFound as exc:
        return Response(str(exc), status_code=404, headers=HEADERS)

    async def stream() -> AsyncIterator[bytes]:
        sent = 0
        while True:
            while sent < len(run.events):
                sent += 1
                yield f"id: {sent}\ndata: {json.dumps(run.events[sent - 1])}\n\n".encode()
            if run.job is None or run.job.done():
                yield b"event: end\ndata: {}\n\n"
                return
            change = run.next_change()  # registered before waiting: nothing slips between
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change, timeout=15)
            if sent >= len(run.events):
                yield b": keep-alive\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={**HEADERS, "X-Accel-Buffering": "no"}
    )


@router.post("/ui/approvals/{approval_id}")
async def decide(approval_id: str, request: Request, service: ServiceDep) -> Response:
    session = await _session(request, service)
    if session is None:
        return _login_page("Log in again to decide.", 401)
    who, token = session
    form = await _form(request)
    if not _same_origin(request) or not hmac.compare_digest(
        form.get("csrf", ""), csrf_token(token)
    ):
        return _page("Refused", Markup("<p class=error>Bad or missing CSRF token.</p>"), who, 403)
    decision = form.get("decision")
    if decision not in ("approve", "deny"):
        return _page("Refused", Markup("<p class=error>Decide approve or deny.</p>"), who, 400)
    task_id, _, req_id = approval_id.partition(".")
    try:
        who.require("approve")
        service.tasks.get(who, task_id).approver.decide(req_id, decision == "approve")
    except ScopeError as exc:
        return _page("Refused", render("<p class=error>{e}</p>", e=exc), who, 403)
    except (NotFound, ConfigError):
        msg = render("<p class=error>{a} is no longer waiting.</p>", a=approval_id)
        return _page("Not waiting", msg, who, 404)
    back = form.get("next", "/")
    if not back.startswith("/") or back.startswith("//"):
        back = "/"
    return RedirectResponse(back, status_code=303, headers=HEADERS)


@router.get("/ui/static/app.js")
async def app_js() -> Response:
    return Response(APP_JS, media_type="text/javascript", headers=HEADERS)


@router.get("/ui/static/style.css")
async def style_css() -> Response:
    return Response(STYLE_CSS, media_type="text/css", headers=HEADERS)
