"""The web dashboard of ``ironclaw serve`` in a real headless Chromium, and its guards.

A real server in a child process, real sandboxes, a scripted agent whose RED call waits
for a decision; the browser logs in with a token, sees the running sandbox and the held
call's card (guest markup shown as text, never run), approves it, and watches the task
finish on its live timeline. Screenshots are kept in the test's tmp directory.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from apiserver import Server, serve
from ironclaw.client import ApiClient
from ironclaw.config import Settings

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Markup a guest (or a model) could put in a file: it must reach the page as text.
EVIL = "<script>window.pwned=1</script><b>bold</b><img src=x onerror=window.pwned=2>"
TURNS = [
    {"tool_calls": [{"name": "files__write_file",
                     "arguments": {"path": "/tmp/outside.txt", "content": EVIL}}]},
    {"tool_calls": [{"name": "shell__run", "arguments": {"command": "cat /tmp/outside.txt"}}]},
    {"content": "done <i>here</i>"},
]  # fmt: skip


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


def test_render_escapes_all_but_markup() -> None:
    from ironclaw.api.dashboard import Markup, csrf_token, render

    out = render('<p title="{t}">{body}{safe}</p>', t='"><x', body="<b>&", safe=Markup("<i>"))
    assert out == '<p title="&quot;&gt;&lt;x">&lt;b&gt;&amp;<i></p>'
    assert isinstance(out, Markup) and render("{x}", x=out) == out  # not escaped twice
    assert render("{x}", x=None) == ""
    assert csrf_token("a") != csrf_token("b") and len(csrf_token("a")) == 64


async def _held(api: ApiClient) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while not (pending := await api.approvals()):
            await asyncio.sleep(0.1)
    return pending[0]


async def _cookie(url: str, token: str) -> httpx.Cookies:
    async with httpx.AsyncClient(base_url=url) as http:
        resp = await http.post("/ui/login", data={"token": token})
        assert resp.status_code == 303, resp.text
        return resp.cookies


async def test_login_cookie_csrf_and_escaping_without_a_browser(server: Server) -> None:
    owner, admin = server.token("read", "write"), server.token("admin")
    reader = server.token("read")
    async with httpx.AsyncClient(base_url=server.url) as http:
        # No session: the login page, and the fragments refuse.
        page = await http.get("/")
        assert page.status_code == 200 and 'name="token"' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert (await http.get("/ui/panels")).status_code == 401
        bad = await http.post("/ui/login", data={"token": "icw_nope_nope"})
        assert bad.status_code == 401 and "unknown token" in bad.text
        assert "set-cookie" not in bad.headers
        # Login: the token goes into an HttpOnly, SameSite=Strict cookie.
        ok = await http.post("/ui/login", data={"token": admin})
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        # Cross-site login is refused.
        other = await http.post(
            "/ui/login", data={"token": admin}, headers={"Origin": "http://evil.example"}
        )
        assert other.status_code == 403 and "set-cookie" not in other.headers

    async with ApiClient(server.url, owner) as api, ApiClient(server.url, admin) as adm:
        task = await api.start_task(f"escape {EVIL}", script=TURNS, keep=True)
        held = await _held(api)
        admin_cookies = await _cookie(server.url, admin)
        async with httpx.AsyncClient(base_url=server.url, cookies=admin_cookies) as http:
            panels = (await http.get("/ui/panels")).text
            # The card is there, escaped: no live tag from the guest's text.
            assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in panels
            assert "<script>" not in panels and "<img" not in panels
            assert "&lt;b&gt;bold&lt;/b&gt;" in panels
            assert task["sandbox_id"] in panels  # the task's running sandbox
            # Deciding needs the CSRF token: without it, or from another origin, refused.
            target = f"/ui/approvals/{held['id']}"
            r = await http.post(target, data={"decision": "approve"})
            assert r.status_code == 403 and "CSRF" in r.text
            csrf = panels.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            r = await http.post(
                target,
                data={"decision": "approve", "csrf": csrf},
                headers={"Origin": "http://evil.example"},
            )
            assert r.status_code == 403
            assert [a["id"] for a in await adm.approvals()] == [held["id"]]  # still waiting
        # A token without the approve scope sees the card but no buttons, and is refused.
        reader_cookies = await _cookie(server.url, reader)
        async with httpx.AsyncClient(base_url=server.url, cookies=reader_cookies) as http:
            assert "No sandboxes." in (await http.get("/ui/panels")).text  # not its own
        owner_cookies = await _cookie(server.url, owner)
        async with httpx.AsyncClient(base_url=server.url, cookies=owner_cookies) as http:
            panels = (await http.get("/ui/panels")).text
            assert "lacks the approve scope" in panels and 'name="csrf"' not in panels
        await adm.decide(held["id"], False)
        async with asyncio.timeout(60):
            while (await api.task(task["id"]))["status"] == "running":
                await asyncio.sleep(0.1)
        await api.delete(task["sandbox_id"])


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make deps installs it)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def test_browser_logs_in_sees_sandbox_and_approves_a_held_red_call(
    server: Server, browser: Any, tmp_path: Path
) -> None:
    owner, admin = server.token("read", "write"), server.token("admin")
    async with ApiClient(server.url, owner) as api, ApiClient(server.url, admin) as adm:
        task = await api.start_task(f"escape {EVIL}", script=TURNS, keep=True)
        held = await _held(api)
        sid = task["sandbox_id"]

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        outside: list[str] = []
        page.on(
            "request",
            lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None,
        )
        await page.goto(server.url + "/")
        await page.fill("#token", admin)
        await page.click("button[type=submit]")
        row = page.locator(f'tr[data-sandbox="{sid}"]')
        await row.wait_for(timeout=30_000)
        assert (await row.locator(".state").inner_text()).startswith("running")
        card = page.locator(f'[data-approval="{held["id"]}"]')
        await card.wait_for(timeout=30_000)
        diff = card.locator("pre.diff")
        # The guest's markup is on the page as text: no script ran, no tag was made.
        assert "<script>window.pwned=1</script>" in await diff.inner_text()
        assert await diff.locator("script, b, img").count() == 0
        assert await page.evaluate("window.pwned === undefined")
        # Live: a sandbox made after the page loaded shows up without a reload.
        late = (await adm.create({"limits": {"memory_mib": 128}}))["id"]
        await page.locator(f'tr[data-sandbox="{late}"] .state-running').wait_for(timeout=30_000)
        assert await card.count() == 1  # the held card stayed while the table changed
        await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

        await card.locator("button.approve").click()
        await page.wait_for_url(server.url + "/")
        # The task finishes (its second call is GREEN); follow it on its timeline.
        await page.goto(f"{server.url}/ui/tasks/{task['id']}")
        status = page.locator("#task-status")
        # The stream's "end" event marks the list done (the page's CSP forbids eval).
        await page.locator("#timeline[data-done='1']").wait_for(state="attached", timeout=60_000)
        assert await status.inner_text() == "completed"
        await page.locator("#panels .status-completed").wait_for(timeout=30_000)  # refreshed
        timeline = await page.locator("#timeline").inner_text()
        assert "approved by api" in timeline and "end: completed" in timeline
        assert f"task escape {EVIL}" in timeline  # the task's text, literally
        assert "done <i>here</i>" in timeline
        assert await page.locator("#timeline script, #timeline img, #timeline i").count() == 0
        assert await page.evaluate("window.pwned === undefined")
        await page.screenshot(path=str(tmp_path / "task.png"), full_page=True)
        assert errors == [] and outside == []

        done = await api.task(task["id"])
        assert done["status"] == "completed" and done["answer"] == "done <i>here</i>"
        assert await api.read_file(sid, "/tmp/outside.txt") == EVIL.encode()
        assert await adm.approvals() == []
        await api.delete(sid)
        await adm.delete(late)
    print(f"screenshots: {tmp_path}")
