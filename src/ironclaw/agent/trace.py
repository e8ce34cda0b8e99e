"""The task trace: every event as one JSON line, and a readable timeline of it.

Events are appended (one ``write`` each, so lines never interleave) to the sandbox's run
directory and to ``<state>/traces/<id>.jsonl``; the second copy outlives the sandbox so
``ironclaw logs ID`` works after a one-shot run. Each line has ``seq``, ``ts`` (Unix
time), ``source`` and ``event`` (all four stamped here, by the host) and the event's
fields. ``source`` says who the event is from:

``host``   what the host saw and decided::

               task.start  model.request  model.response  model.refused  tool.call
               tool.classified  tool.decision  network  trace.truncated  task.end

``guest``  what the guest reports (``agent.event``), one of :data:`GUEST_KINDS`. The guest
           is hostile by assumption: it cannot choose ``seq``, ``ts``, ``source`` or a
           host kind (:meth:`TraceWriter.emit_guest` refuses such an event outright), so
           a forged approval can never look like the host's.

A task's trace is bounded: an event over :data:`MAX_EVENT_BYTES` has its long strings
cut (``oversize_bytes`` says so), and past :data:`MAX_TRACE_EVENTS` events or
:data:`MAX_TRACE_BYTES` bytes one ``trace.truncated`` event is written and the rest are
dropped and counted; ``task.end`` is always written and carries that count.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from ironclaw.agent.render import literal
from ironclaw.config import Settings, ensure_private_dir, safe_join
from ironclaw.errors import ConfigError, SandboxNotFound
from ironclaw.ids import validate_sandbox_id
from ironclaw.proto.jsonval import JsonObject, JsonValue

__all__ = [
    "GUEST_KINDS",
    "MAX_EVENT_BYTES",
    "MAX_TRACE_BYTES",
    "MAX_TRACE_EVENTS",
    "TraceEvent",
    "TraceWriter",
    "event_line",
    "merge_network_audit",
    "read_trace",
    "render_timeline",
    "state_trace_path",
]

#: The only event kinds a guest may report.
GUEST_KINDS = frozenset({"tool.result", "step", "agent.log"})
#: Fields only the host stamps.
STAMPED = frozenset({"seq", "ts", "source", "event"})
MAX_EVENT_BYTES = 64 * 1024
MAX_TRACE_EVENTS = 20_000
MAX_TRACE_BYTES = 32 * 2**20
_ALWAYS = frozenset({"task.end"})

#: One event: ``seq`` (int), ``ts`` (float), ``source`` and ``event`` (str), stamped here
#: (:func:`read_trace` checks them), and the event's own fields, free-form JSON: what a
#: model said, a tool's arguments, a guest's report.
TraceEvent: TypeAlias = JsonObject


def state_trace_path(settings: Settings, sandbox_id: str) -> Path:
    return safe_join(settings.state_dir, "traces", f"{validate_sandbox_id(sandbox_id)}.jsonl")


def _dumps(record: Mapping[str, JsonValue]) -> bytes:
    return (json.dumps(record, default=str) + "\n").encode()


def _shrink(value: JsonValue, cap: int, depth: int = 0) -> JsonValue:
    """``value`` with strings cut to ``cap`` characters and containers to 64 items."""
    if isinstance(value, str):
        return value if len(value) <= cap else value[:cap] + f"…[{len(value) - cap} chars cut]"
    if depth > 8:
        return "…[nested too deep]"
    if isinstance(value, dict):
        items = list(value.items())[:64]
        return {str(k)[:cap]: _shrink(v, cap, depth + 1) for k, v in items}
    if isinstance(value, list):
        return [_shrink(v, cap, depth + 1) for v in list(value)[:64]]
    return value


class TraceWriter:
    """Appends events to every path given (the run directory and the state copy)."""

    def __init__(
        self,
        paths: Iterable[Path],
        *,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_events: int = MAX_TRACE_EVENTS,
        max_bytes: int = MAX_TRACE_BYTES,
    ) -> None:
        self.paths = list(paths)
        self.events: list[TraceEvent] = []
        self.max_event_bytes = max_event_bytes
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        self._seq = 0
        self._lock = threading.Lock()
        for p in self.paths:
            ensure_private_dir(p.parent)

    def emit(self, event: str, /, **fields: JsonValue) -> TraceEvent | None:
        """Record a host event; None if the trace is full and it was dropped."""
        return self._append(event, "host", fields)

    def emit_guest(self, doc: Any) -> TraceEvent | None:
        """Record what a guest reported (``{"type": kind, ...}``) as a ``source: guest`` event.

        Refused with :class:`ConfigError` (the guest's call fails): a kind outside
        :data:`GUEST_KINDS`, or any of ``seq``, ``ts``, ``source``, ``event`` set by the
        guest. Refusing rather than silently dropping keeps a forgery attempt visible to
        the guest's own logic and, through the RPC error, to whoever debugs it.
        """
        if not isinstance(doc, Mapping):
            raise ConfigError("agent.event needs an object {type, ...}")
        kind = doc.get("type")
        if not isinstance(kind, str) or kind not in GUEST_KINDS:
            raise ConfigError(
                f"agent.event: a guest may report only {', '.join(sorted(GUEST_KINDS))}, "
                f"not {str(kind)[:80]!r}; the host records everything else itself"
            )
        forged = sorted(STAMPED & set(doc))
        if forged:
            raise ConfigError(f"agent.event: {', '.join(forged)} are stamped by the host")
        fields = {str(k): v for k, v in doc.items() if k != "type"}
        return self._append(kind, "guest", fields)

    def _fit(self, record: TraceEvent) -> tuple[TraceEvent, bytes]:
        line = _dumps(record)
        if len(line) <= self.max_event_bytes:
            return record, line
        stamp = {k: record[k] for k in ("seq", "ts", "source", "event")}
        rest = {k: v for k, v in record.items() if k not in stamp}
        cut = _shrink(rest, max(64, self.max_event_bytes // 16))
        shrunk = {**stamp, **(cut if isinstance(cut, dict) else {})}
        shrunk["oversize_bytes"] = len(line)
        small = _dumps(shrunk)
        if len(small) <= self.max_event_bytes:
            return shrunk, small
        names: list[JsonValue] = list(sorted(rest)[:32])
        keep: TraceEvent = {**stamp, "oversize_bytes": len(line), "fields": names}
        return keep, _dumps(keep)

    def _append(
        self, event: str, source: str, fields: Mapping[str, JsonValue]
    ) -> TraceEvent | None:
        with self._lock:
            full = len(self.events) >= self.max_events or self.bytes >= self.max_bytes
            if full and event not in _ALWAYS:
                if not self.dropped:
                    # Past the bound on purpose: one marker, then silence.
                    why = (f"trace bound reached ({self.max_events} events or {self.max_bytes} "
                           "bytes): later events are counted, not kept")  # fmt: skip
                    self._write("trace.truncated", "host", {"reason": why})
                self.dropped += 1
                return None
            if event in _ALWAYS and self.dropped:
                fields = {**fields, "trace_dropped": self.dropped}
            return self._write(event, source, fields)

    def _write(self, event: str, source: str, fields: Mapping[str, JsonValue]) -> TraceEvent:
        self._seq += 1
        record: TraceEvent = {"seq": self._seq, "ts": round(time.time(), 6), "source": source,
                  "event": event}  # fmt: skip
        record.update((k, v) for k, v in fields.items() if k not in STAMPED)
        record, line = self._fit(record)
        for p in self.paths:
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue  # the run directory went away with the sandbox
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        self.bytes += len(line)
        self.events.append(record)
        return record


def _stamped(doc: JsonValue) -> bool:
    """Whether a line read back has the host's four stamps with their types."""
    if not isinstance(doc, dict):
        return False
    seq, ts = doc.get("seq"), doc.get("ts")
    return (
        isinstance(seq, int)
        and isinstance(ts, int | float)
        and isinstance(doc.get("source"), str)
        and isinstance(doc.get("event"), str)
    )


def read_trace(path: Path) -> list[TraceEvent]:
    """Events of a trace file; a torn last line (a crash mid-write) is skipped, and so
    is a line without the host's stamps (``seq``, ``ts``, ``source``, ``event``)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SandboxNotFound(f"no trace at {path}: was a task run in that sandbox?") from None
    out: list[TraceEvent] = []
    for line in text.splitlines():
        try:
            doc: JsonValue = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and _stamped(doc):
            out.append(doc)
    return out


def merge_network_audit(trace: TraceWriter, audit_path: Path, *, since: float = 0.0) -> int:
    """Copy the firewall's and proxy's decisions into the trace as ``network`` events.

    The audit file is the host's own (written by the firewall and the proxy outside the
    sandbox); its ``event`` becomes the ``audit`` field.
    """
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
        if not isinstance(doc, dict):
            continue
        ts = doc.get("ts", since)
        if (ts if isinstance(ts, int | float) else since) < since:
            continue
        fields = {k: v for k, v in doc.items() if k not in STAMPED}
        fields["audit"] = doc.get("event", "net")
        fields["audit_ts"] = doc.get("ts")
        trace.emit("network", **fields)
        n += 1
    return n


def _short(value: JsonValue, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _t(*parts: str | Text | tuple[str, str]) -> Text:
    """Host-chosen labels (plain str or (text, style)) and literal guest text, assembled.

    A plain ``str`` here must come from the host's own vocabulary; anything a guest
    could have influenced is passed through :func:`literal` first.
    """
    return Text.assemble(*parts)


def _num(value: JsonValue, default: float) -> float:
    return float(value) if isinstance(value, int | float) else default


def _items(value: JsonValue) -> list[JsonValue]:
    return value if isinstance(value, list) else []


def _body(ev: TraceEvent) -> Text:
    kind = str(ev.get("event", "?"))
    if kind == "task.start":
        return _t(("task ", "bold"), literal(_short(ev.get("task", ""), 200)),
                  " (model ", literal(ev.get("model")), ")")  # fmt: skip
    if kind == "model.request":
        return _t(("model ← ", "blue"), literal(ev.get("messages")), " messages, ",
                  literal(ev.get("tools")), " tools")  # fmt: skip
    if kind == "model.refused":
        return _t(("model ✗ ", "red"), literal(ev.get("reason", "")))
    if kind == "model.response":
        calls = ", ".join(str(c.get("name", "?")) if isinstance(c, dict) else "?"
                          for c in _items(ev.get("tool_calls")))  # fmt: skip
        what = f"calls {calls}" if calls else f"answers: {_short(ev.get('content') or '')}"
        tokens = f" ({ev.get('input_tokens')}+{ev.get('output_tokens')} tokens)"
        return _t(("model → ", "blue"), literal(what), literal(tokens, "dim"))
    if kind == "tool.call":
        return _t(("tool ", "cyan"), literal(ev.get("name")), " ",
                  literal(_short(ev.get("arguments", {}))))  # fmt: skip
    if kind == "tool.classified":
        color = str(ev.get("color"))
        return _t("  ", literal(color, "green" if color == "GREEN" else "red"), " ",
                  literal(ev.get("reason", "")))  # fmt: skip
    if kind == "tool.decision":
        verdict = ("approved", "green") if ev.get("approved") else ("refused", "red")
        return _t("  ", verdict, " by ", literal(ev.get("decided_by")), ": ",
                  literal(ev.get("reason", "")))  # fmt: skip
    if kind == "tool.result":
        mark = ("error", "red") if ev.get("is_error") else ("ok", "green")
        return _t("  ", mark, " ", literal(ev.get("name", "")), " ",
                  literal(_short(ev.get("content", ""), 200)))  # fmt: skip
    if kind == "network" and ev.get("audit") == "net.summary":
        dropped = int(_num(ev.get("dropped_packets"), 0.0))
        style = "red" if dropped else "green"
        return _t(("net ", "magenta"), "firewall dropped ", (str(dropped), style),
                  " packet(s) in all")  # fmt: skip
    if kind == "network":
        decision = str(ev.get("decision") or ev.get("audit"))
        target = ev.get("host") or ev.get("target") or ev.get("dropped_packets")
        bad = decision in ("deny", "drop", "error") or ev.get("dropped_packets")
        return _t(("net ", "magenta"), literal(decision, "red" if bad else ""), " ",
                  literal(_short(target or "")), " ", literal(ev.get("reason", "")))  # fmt: skip
    if kind == "task.end":
        st = str(ev.get("status"))
        style = "bold green" if st == "completed" else "bold red"
        extra = f" ({ev.get('reason')})" if ev.get("reason") else ""
        return _t(("end: ", style), literal(st + extra, style), " ",
                  literal(ev.get("steps")), " steps")  # fmt: skip
    rest = {k: v for k, v in ev.items() if k not in STAMPED}
    return _t(literal(kind), " ", literal(_short(rest)))


def event_line(ev: TraceEvent) -> Text:
    """One event as a line: who it is from (``host``/``guest``) and what it says."""
    source = ev.get("source")
    tag = ("guest ", "yellow") if source == "guest" else ("host  ", "dim")
    if source not in ("host", "guest"):
        tag = ("?     ", "dim")
    return _t(tag, _body(ev))


def render_timeline(events: list[TraceEvent], console: Console | None = None) -> None:
    """Print the trace as a timeline with offsets from the task's start."""
    console = console or Console()
    if not events:
        console.print("(empty trace)")
        return
    t0 = _num(events[0].get("ts"), 0.0)
    for ev in events:
        offset = _num(ev.get("ts"), t0) - t0
        console.print(_t((f"{offset:8.3f}s ", "dim"), event_line(ev)), highlight=False)
        if ev.get("event") == "tool.decision" and ev.get("card"):
            console.print(Panel(literal(ev["card"]), title=Text("diff card"), expand=False))
    end = next((e for e in reversed(events) if e.get("event") == "task.end"), None)
    u = end.get("usage") if end is not None else None
    if isinstance(u, dict):
        cost = u.get("cost_usd")
        money = "unknown" if not isinstance(cost, int | float) else f"${cost:.4f}"
        console.print(literal(f"usage: {u.get('requests')} requests, "
                              f"{u.get('total_tokens')} tokens, cost {money}", "dim"))  # fmt: skip
