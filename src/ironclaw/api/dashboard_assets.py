"""The dashboard's stylesheet and script, served from the app itself (nothing loads from
elsewhere; the Content-Security-Policy forbids it). Guest text reaches the page only
escaped by the server or set as ``textContent`` by this script, never as markup."""

from __future__ import annotations

__all__ = ["APP_JS", "STYLE_CSS"]

STYLE_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --bg:#f5f6f8; --card:#fff; --line:#d9dde5;
        --green:#17803d; --red:#b42318; --blue:#1d4ed8; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, sans-serif; color:var(--fg); background:var(--bg); }
header { display:flex; align-items:center; gap:1rem; padding:.6rem 1.2rem;
         background:#111827; color:#f9fafb; }
header h1 { font-size:1.1rem; margin:0; }
header a.home { color:inherit; text-decoration:none; }
meter { width:5rem; vertical-align:middle; }
header .who { margin-left:auto; color:#cbd5e1; }
header form { margin:0; }
main { padding:1rem 1.2rem; max-width:1200px; }
section { background:var(--card); border:1px solid var(--line); border-radius:6px;
          padding:.8rem 1rem; margin-bottom:1rem; }
h2 { font-size:1rem; margin:.1rem 0 .6rem; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:.3rem .5rem; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { color:var(--muted); font-weight:600; }
code, pre { font:12.5px/1.4 ui-monospace, monospace; }
pre { background:#f1f3f6; border:1px solid var(--line); padding:.5rem; overflow:auto;
      max-height:22rem; white-space:pre-wrap; word-break:break-word; margin:.4rem 0; }
.state-running, .ok { color:var(--green); font-weight:600; }
.state-failed, .state-destroyed, .bad, .RED { color:var(--red); font-weight:600; }
.GREEN { color:var(--green); font-weight:600; }
.muted { color:var(--muted); }
.card { border:1px solid var(--line); border-left:4px solid var(--red); border-radius:4px;
        padding:.5rem .8rem; margin:.5rem 0; }
.actions { display:flex; gap:.5rem; }
button { font:inherit; padding:.3rem .9rem; border-radius:4px; border:1px solid var(--line);
         background:#fff; cursor:pointer; }
button.approve { background:var(--green); color:#fff; border-color:var(--green); }
button.deny { background:var(--red); color:#fff; border-color:var(--red); }
.login { max-width:26rem; margin:4rem auto; }
.login input { width:100%; padding:.4rem; font:inherit; margin:.4rem 0 .8rem; }
.error { color:var(--red); }
ol.timeline { padding-left:2.4rem; margin:0; }
ol.timeline li { padding:.15rem 0; border-bottom:1px dotted var(--line); }
ol.timeline li .kind { display:inline-block; width:9rem; color:var(--blue); vertical-align:top; }
ol.timeline li .text { display:inline-block; width:calc(100% - 9.5rem); vertical-align:top;
                       word-break:break-word; }
"""

APP_JS = r"""
"use strict";
// Live panels: the server renders (and escapes) them; each <section> is swapped only when
// its HTML changed, so a card being read (or a button being pressed) is left alone while
// the sandbox figures tick.
function pollPanels() {
  const box = document.getElementById("panels");
  if (!box) return;
  const src = box.dataset.src;
  async function tick() {
    try {
      const resp = await fetch(src, {credentials: "same-origin", cache: "no-store"});
      if (resp.status === 401) { location.href = "/"; return; }
      if (!resp.ok) return;
      const fresh = document.createElement("template");
      fresh.innerHTML = await resp.text();
      const kids = Array.from(fresh.content.children);
      const old = Array.from(box.children);
      if (kids.length !== old.length) { box.replaceChildren(...kids); return; }
      kids.forEach((kid, i) => {
        if (kid.outerHTML !== old[i].outerHTML) old[i].replaceWith(kid);
      });
      box.dataset.updated = String(Date.now());
    } catch (e) { /* the server restarts: try again next tick */ }
  }
  setInterval(tick, 1500);
  window.refreshPanels = tick;
}

function short(value, n) {
  let s = typeof value === "string" ? value : JSON.stringify(value);
  if (s === undefined || s === null) s = "";
  return s.length > n ? s.slice(0, n) + "…" : s;
}

// One line of plain text per trace event (set with textContent: guest text stays text).
function describe(ev) {
  switch (ev.event) {
    case "task.start": return "task " + short(ev.task, 300) + " (model " + ev.model + ")";
    case "model.request": return ev.messages + " messages, " + ev.tools + " tools";
    case "model.response": {
      const calls = (ev.tool_calls || []).map(c => c.name).join(", ");
      return calls ? "calls " + calls : "answers: " + short(ev.content || "", 300);
    }
    case "tool.call": return ev.name + " " + short(ev.arguments || {}, 300);
    case "tool.classified": return ev.color + ": " + (ev.reason || "");
    case "tool.decision":
      return (ev.approved ? "approved" : "refused") + " by " + ev.decided_by + ": " +
             (ev.reason || "");
    case "tool.result": return (ev.is_error ? "error " : "ok ") + short(ev.content || "", 300);
    case "task.end":
      return "end: " + ev.status + (ev.reason ? " (" + ev.reason + ")" : "") +
             (ev.answer ? ": " + short(ev.answer, 300) : "");
    case "task.error": return ev.error + ": " + ev.message;
    default: {
      const rest = Object.assign({}, ev); delete rest.seq; delete rest.ts; delete rest.event;
      return short(rest, 300);
    }
  }
}

function followTimeline() {
  const list = document.getElementById("timeline");
  if (!list) return;
  const status = document.getElementById("task-status");
  const source = new EventSource(list.dataset.src);
  function add(ev) {
    const li = document.createElement("li");
    li.className = "ev ev-" + String(ev.event).replace(/[^a-z.]/g, "").replace(/\./g, "-");
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = ev.event;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = describe(ev);
    if (ev.color) text.classList.add(ev.color === "RED" ? "RED" : "GREEN");
    li.append(kind, text);
    list.append(li);
    if (ev.event === "task.end" && status) {
      status.textContent = ev.status;
      status.className = ev.status === "completed" ? "ok" : "bad";
    }
  }
  // Every trace event arrives unnamed ("message"); the stream's close is named "end".
  source.onmessage = m => add(JSON.parse(m.data));
  source.addEventListener("end", () => {
    source.close();
    list.dataset.done = "1";
    if (window.refreshPanels) window.refreshPanels();
  });
}

document.addEventListener("DOMContentLoaded", () => { pollPanels(); followTimeline(); });
"""
