"""The task trace: every event as one JSON line, and a readable timeline of it.

Events are appended (one ``write`` each, so lines never interleave) to the sandbox's run
directory and to ``<state>/traces/<id>.jsonl``; the second copy outlives the sandbox so
``ironclaw logs ID`` works after a one-shot run. Each line has ``seq``, ``ts`` (Unix
time), ``event`` and the event's fields. Event names::

    task.start  model.request  model.response  tool.call  tool.classified
    tool.decision  tool.result  network  task.end
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import SandboxNotFound
from ironclaw.ids import validate_sandbox_id

__all__ = [
    "TraceWriter",
    "merge_network_audit",
    "read_trace",
    "render_timeline",
    "state_trace_path",
]


def state_trace_path(settings: Settings, sandbox_id: str) -> Path:
    return safe_join(settings.state_dir, "traces", f"{validate_sandbox_id(sandbox_id)}.jsonl")


class TraceWriter:
    """Appends events to every path given (the run directory and the state copy)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = list(paths)
        self.events: list[dict[str, Any]] = []
        self._seq = 0
        self._lock = threading.Lock()
        for p in self.paths:
            ensure_private_dir(p.parent)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            record = {"seq": self._seq, "ts": round(time.time(), 6), "event": event, **fields}
            line = (json.dumps(record, default=str) + "\n").encode()
            for p in self.paths:
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                except FileNotFoundError:
                    continue  # the run directory went away with the sandbox
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            self.events.append(record)
            return record


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Events of a trace file; a torn last line (a crash mid-write) is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SandboxNotFound(f"no trace at {path}: was a task run in that sandbox?") from None
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def merge_network_audit(trace: TraceWriter, audit_path: Path, *, since: float = 0.0) -> int:
    """Copy the firewall's and proxy's decisions into the trace as ``network`` events."""
    try:
        lines = audit_path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    n = 0
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict) or float(doc.get("ts", since) or since) < since:
            continue
        fields = {k: v for k, v in doc.items() if k not in ("event", "seq")}
        fields["source"] = doc.get("event", "net")
        fields["audit_ts"] = fields.pop("ts", None)
        trace.emit("network", **fields)
        n += 1
    return n


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _line(ev: dict[str, Any]) -> str:
    kind = ev.get("event", "?")
    if kind == "task.start":
        return f"[bold]task[/] {escape(_short(ev.get('task', ''), 200))} (model {ev.get('model')})"
    if kind == "model.request":
        return f"[blue]model ←[/] {ev.get('messages')} messages, {ev.get('tools')} tools"
    if kind == "model.response":
        calls = ", ".join(c.get("name", "?") for c in ev.get("tool_calls") or [])
        what = f"calls {calls}" if calls else f"answers: {_short(ev.get('content') or '')}"
        tokens = f"{ev.get('input_tokens')}+{ev.get('output_tokens')} tokens"
        return f"[blue]model →[/] {escape(what)} [dim]({tokens})[/]"
    if kind == "tool.call":
        return f"[cyan]tool[/] {ev.get('name')} {escape(_short(ev.get('arguments', {})))}"
    if kind == "tool.classified":
        color = ev.get("color")
        style = "green" if color == "GREEN" else "red"
        return f"  [{style}]{color}[/] {escape(str(ev.get('reason', '')))}"
    if kind == "tool.decision":
        verdict = "[green]approved[/]" if ev.get("approved") else "[red]refused[/]"
        return f"  {verdict} by {ev.get('decided_by')}: {escape(str(ev.get('reason', '')))}"
    if kind == "tool.result":
        mark = "[red]error[/]" if ev.get("is_error") else "[green]ok[/]"
        return f"  {mark} {escape(_short(ev.get('content', ''), 200))}"
    if kind == "network" and ev.get("source") == "net.summary":
        dropped = int(ev.get("dropped_packets") or 0)
        style = "red" if dropped else "green"
        return f"[magenta]net[/] firewall dropped [{style}]{dropped}[/] packet(s) in all"
    if kind == "network":
        decision = ev.get("decision") or ev.get("source")
        target = ev.get("host") or ev.get("target") or ev.get("dropped_packets")
        reason = ev.get("reason", "")
        style = "red" if decision in ("deny", "drop", "error") or ev.get("dropped_packets") else ""
        label = f"[{style}]{decision}[/]" if style else str(decision)
        return f"[magenta]net[/] {label} {escape(_short(target or ''))} {escape(str(reason))}"
    if kind == "task.end":
        st = ev.get("status")
        style = "green" if st == "completed" else "red"
        extra = f" ({ev.get('reason')})" if ev.get("reason") else ""
        return f"[bold {style}]end: {st}{escape(extra)}[/] {ev.get('steps')} steps"
    return f"{kind} {escape(_short({k: v for k, v in ev.items() if k not in ('seq', 'ts')}))}"


def render_timeline(events: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the trace as a timeline with offsets from the task's start."""
    console = console or Console()
    if not events:
        console.print("(empty trace)")
        return
    t0 = float(events[0].get("ts", 0.0))
    for ev in events:
        offset = float(ev.get("ts", t0)) - t0
        console.print(f"[dim]{offset:8.3f}s[/] {_line(ev)}", highlight=False)
        if ev.get("event") == "tool.decision" and ev.get("card"):
            console.print(Panel(escape(str(ev["card"])), title="diff card", expand=False))
    end = next((e for e in reversed(events) if e.get("event") == "task.end"), None)
    if end is not None and end.get("usage"):
        u = end["usage"]
        cost = u.get("cost_usd")
        console.print(
            f"[dim]usage: {u.get('requests')} requests, {u.get('total_tokens')} tokens, "
            f"cost {'unknown' if cost is None else f'${cost:.4f}'}[/]"
        )
