"""The typed channel API: every method round-trips, and bad params never decode.

Strategies are built from each record's field checks (``methods.schema``), so a new
method or field is covered without touching this file; a new kind of field check fails
:func:`test_every_method_has_strategies` until this file learns it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ironclaw.errors import (
    ConfigError,
    InvalidParams,
    ProtocolError,
    RpcError,
    UnknownMethod,
    from_wire,
)
from ironclaw.errors import to_wire as error_to_wire
from ironclaw.guest.agent import GuestAgent
from ironclaw.host.manager import SandboxManager
from ironclaw.proto import methods
from ironclaw.proto.records import (
    MAX_JSON_NODES,
    MISSING,
    Bool,
    Field,
    Float,
    Int,
    Json,
    Nested,
    Opt,
    Record,
    Seq,
    Str,
    StrMap,
)

EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
JSON_SCALARS |= st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _text(f: Str) -> st.SearchStrategy[str]:
    if f.choices:
        return st.sampled_from(f.choices)
    alphabet = st.characters(blacklist_characters="\0" if f.no_nul else "")
    text = st.text(alphabet, min_size=f.min_len, max_size=min(f.max_len, 24))
    return text.filter(lambda s: not f.without or f.without not in s)


def strategy(f: Field) -> st.SearchStrategy[Any]:
    """Values a field check accepts (as decoded, so tuples for lists)."""
    if isinstance(f, Str):
        return _text(f)
    if isinstance(f, Bool):
        return st.booleans()
    if isinstance(f, Int):
        return st.integers(f.lo, f.hi)
    if isinstance(f, Float):
        lo = 0.0 if f.positive else None if math.isinf(f.lo) else f.lo
        return st.floats(
            min_value=lo, exclude_min=f.positive, allow_infinity=False, allow_nan=False
        )
    if isinstance(f, Opt):
        return st.none() | strategy(f.inner)
    if isinstance(f, Seq):
        items = st.lists(strategy(f.inner), min_size=f.min_items, max_size=min(f.max_items, 4))
        return items.map(tuple)
    if isinstance(f, StrMap):
        key = st.text(st.characters(blacklist_characters="\0"), max_size=8)
        return st.dictionaries(key, key, max_size=4)
    if isinstance(f, Json):
        return st.dictionaries(st.text(max_size=6), JSON, max_size=4) if f.obj else JSON
    if isinstance(f, Nested):
        return records(f.cls)
    raise AssertionError(f"no strategy for the field check {type(f).__name__}")


def records(cls: type[Record]) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{name: strategy(f) for name, f, _ in methods.schema(cls)})


def wrong_type(f: Field) -> Any:
    """A JSON value of the wrong type for ``f``."""
    if isinstance(f, Opt):
        return wrong_type(f.inner)
    wrong: dict[type[Field], Any] = {
        Str: 7, Int: "7", Float: "7.5", Bool: 1, Seq: {"a": 1}, StrMap: ["a"], Nested: "x",
        Json: ["not", "an", "object"],
    }  # fmt: skip
    return wrong[type(f)]


def out_of_range(f: Field) -> list[Any]:
    """JSON values of the right type that ``f`` must still refuse."""
    if isinstance(f, Opt):
        return out_of_range(f.inner)
    bad: list[Any] = []
    if isinstance(f, Int):
        bad += [f.lo - 1, f.hi + 1, True]
    elif isinstance(f, Float):
        bad += [0.0, -1.0] if f.positive else []
        bad += [f.lo - 1] if not math.isinf(f.lo) else []
    elif isinstance(f, Str):
        bad += ["" if f.min_len else None, "a\0b" if f.no_nul else None]
        bad += ["not-one-of-them"] if f.choices else []
        bad += [f"a{f.without}b"] if f.without else []
        bad += ["a" * (f.max_len + 1)] if f.max_len <= 4096 and not f.choices else []
    elif isinstance(f, Seq):
        bad += [[]] if f.min_items else []
        bad += [[wrong_type(f.inner)]]
    elif isinstance(f, StrMap):
        bad += [{"a": 1}, {"a\0": "b"}]
    elif isinstance(f, Nested):
        bad += [{"no_such_field": 1}]
    elif isinstance(f, Json) and f.obj:
        deep: Any = {}
        for _ in range(100):
            deep = {"d": deep}
        bad += [deep, {"x": math.nan}]
    return [b for b in bad if b is not None]


def wire(value: Any) -> Any:
    """Through real JSON, as the channel carries it."""
    return json.loads(json.dumps(value, allow_nan=False))


def test_every_method_has_strategies() -> None:
    for spec in methods.METHODS.values():
        records(spec.request)
        records(spec.result)
        for cls in (spec.request, spec.result):
            for _, f, _ in methods.schema(cls):
                wrong_type(f)
                out_of_range(f)


def test_the_guest_serves_exactly_the_host_to_guest_methods() -> None:
    to_guest = {name for name, spec in methods.METHODS.items() if spec.to_guest}
    assert set(GuestAgent(workdir=".").handlers) == to_guest
    assert {"model.complete", "tool.authorize", "agent.event"} == set(methods.METHODS) - to_guest


@pytest.mark.parametrize("method", sorted(methods.METHODS))
@EXAMPLES
@given(data=st.data())
def test_requests_and_results_round_trip(method: str, data: st.DataObject) -> None:
    spec = methods.METHODS[method]
    request = data.draw(records(spec.request))
    name, params = methods.encode(request)
    assert name == method
    assert methods.decode_request(method, wire(params)) == request
    result = data.draw(records(spec.result))
    assert methods.decode_result(method, wire(methods.encode_result(result))) == result


@pytest.mark.parametrize("method", sorted(methods.METHODS))
@EXAMPLES
@given(data=st.data())
def test_mutated_params_never_decode(method: str, data: st.DataObject) -> None:
    spec = methods.METHODS[method]
    params = wire(methods.encode(data.draw(records(spec.request)))[1])
    extra = data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in params))
    bad: list[Any] = [{**params, extra: data.draw(JSON)}, [params], "params", 3]
    for name, f, default in methods.schema(spec.request):
        bad.append({**params, name: wrong_type(f)})
        bad += [{**params, name: value} for value in out_of_range(f)]
        if default is MISSING:
            bad.append({k: v for k, v in params.items() if k != name})
    for params_ in bad:
        with pytest.raises(InvalidParams):
            methods.decode_request(method, params_)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
@EXAMPLES
@given(junk=JSON)
def test_random_junk_is_refused_or_is_exactly_a_request(method: str, junk: Any) -> None:
    try:
        request = methods.decode_request(method, junk)
    except InvalidParams:
        return
    # Junk that decodes is a real request: only known fields, each read back as sent.
    sent = junk or {}
    assert isinstance(sent, dict)
    fields = {name for name, _, _ in methods.schema(type(request))}
    assert set(sent) <= fields
    written = methods.encode(request)[1]
    assert {k: written[k] for k in sent} == sent


def test_unknown_methods_and_non_request_records_are_refused() -> None:
    for name in ("no.such", "", "files.chmod", None):
        with pytest.raises(UnknownMethod):
            methods.decode_request(name, {})  # type: ignore[arg-type]
        with pytest.raises(UnknownMethod):
            methods.decode_result(name, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        methods.encode(methods.FileEntry("a", "/a", "file", 0, 0o644, 0.0))


def test_nested_json_is_bounded() -> None:
    huge = {"role": "user", "content": ["x"] * MAX_JSON_NODES}
    with pytest.raises(InvalidParams, match="larger than"):
        methods.decode_request("model.complete", {"messages": [huge]})
    long_text = "x" * ((1 << 20) + 1)
    with pytest.raises(InvalidParams, match="characters"):
        methods.decode_request("agent.run", {"task": long_text})


def test_invalid_params_is_a_protocol_error_faithful_across_the_wire() -> None:
    with pytest.raises(InvalidParams) as info:
        methods.decode_request("exec", {"argv": ["true"], "bogus": 1})
    exc = info.value
    assert isinstance(exc, ProtocolError) and isinstance(exc, ConfigError)
    wire_error = error_to_wire(exc)
    assert wire_error["code"] == -32602 and "bogus" in wire_error["message"]
    back = from_wire(wire_error)
    assert type(back) is InvalidParams and str(back) == str(exc)
    assert type(from_wire(error_to_wire(UnknownMethod("x")))) is UnknownMethod


def test_records_are_frozen_and_compare_by_value() -> None:
    a = methods.Budget(max_steps=3)
    assert a == methods.Budget(3) and a != methods.Budget() and hash(a) == hash(methods.Budget(3))
    with pytest.raises(AttributeError):
        a.max_steps = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        methods.Budget(nope=1)  # type: ignore[call-arg]
    assert not hasattr(a, "__dict__")
    assert methods.Budget.from_json(None) == methods.Budget()
    with pytest.raises(ConfigError):
        methods.Budget.from_json({"max_steps": 0})


@pytest.mark.root
async def test_a_real_guest_refuses_bad_params_and_changes_nothing(
    manager: SandboxManager,
) -> None:
    record = await manager.create({})
    guest = await manager.guest(record.id)
    peer = guest.peer  # raw calls, bypassing the typed client
    sid = peer.new_stream_id()
    bad_calls: list[tuple[str, Any]] = [
        ("exec", {"argv": ["touch", "made-by-exec"], "timeout": "soon"}),
        ("exec", {"argv": ["touch", "made-by-exec"], "shell": True}),
        ("files.mkdir", {"path": "made-dir", "parents": "yes"}),
        ("files.mkdir", {"path": "made-dir", "mode": 0o700}),
        ("files.write", {"path": "made.txt", "stream": sid, "mode": 0o10000}),
        ("files.write", {"path": "made.txt", "stream": 0}),
        ("files.remove", {"path": "keep.txt", "recursive": 1}),
        ("files.remove", {"path": "keep.txt\0"}),
        ("exec.signal", {"exec_id": "x1", "signal": 999}),
    ]
    await guest.write_file("keep.txt", b"kept")
    for method, params in bad_calls:
        with pytest.raises(InvalidParams) as info:
            await peer.call(method, params, timeout=30)
        assert info.value.wire_code == -32602, method
    with pytest.raises(RpcError) as unknown:
        await peer.call("files.chmod", {"path": "keep.txt"}, timeout=30)
    assert unknown.value.code == -32601
    # Nothing changed, and the channel still serves well-formed calls.
    assert [e.name for e in await guest.list(".")] == ["keep.txt"]
    assert await guest.read_file("keep.txt") == b"kept"
    assert (await guest.ping()).pong is True


async def test_the_host_checks_the_guests_replies_and_requests() -> None:
    """A lying guest (an in-memory fake, as an extra layer) cannot hand the host junk."""
    from ironclaw.host.guest import GuestClient
    from ironclaw.rpc import CallContext, Peer
    from ironclaw.transport import memory

    async def bad_stat(params: Any, ctx: CallContext) -> Any:
        return {"name": "a", "path": "/a", "type": "file", "size": -1, "mode": 0, "mtime": 0}

    async def extra_field(params: Any, ctx: CallContext) -> Any:
        return {"pong": True, "debug": "x"}

    host_conn, guest_conn = memory.pair()
    handled: list[Any] = []

    async def authorize(params: Any, ctx: CallContext) -> Any:
        handled.append(params)
        return {"approved": False, "color": "RED", "reason": "no", "decided_by": "policy"}

    fake = Peer(guest_conn, handlers={"files.stat": bad_stat, "ping": extra_field})
    async with Peer(host_conn, name="host") as host, fake:
        client = GuestClient(host, "fake")
        with pytest.raises(InvalidParams, match="size"):
            await client.stat("a")
        with pytest.raises(InvalidParams, match="debug"):
            await client.ping()
        client.serve("tool.authorize", authorize)
        with pytest.raises(ConfigError):
            client.serve("exec", authorize)  # not a method the guest calls
        with pytest.raises(InvalidParams):
            await fake.call("tool.authorize", {"call": {"id": "1", "name": ""}}, timeout=10)
        assert handled == []
        ok = {"call": {"id": "1", "name": "shell__run", "arguments": {}}}
        decision = await fake.call("tool.authorize", ok, timeout=10)
        assert decision["approved"] is False and handled[0]["call"]["name"] == "shell__run"
