"""The pieces declared once and used by many: the channel records re-exported by
``proto.methods``, the SDKs' shared surface, the one ``async with`` shape, the blocking
client made from the async one, and wire codes named as class keywords."""

from __future__ import annotations

import inspect

import pytest

from ironclaw.client.sandbox import RemoteFiles
from ironclaw.client.sandbox import Sandbox as RemoteSandbox
from ironclaw.client.sync import SyncFiles, SyncSandbox
from ironclaw.errors import IronclawError, SandboxNotFound, from_wire, to_wire
from ironclaw.proto import agent_methods, methods, proc_methods, sandbox_methods
from ironclaw.proto.lifecycle import AsyncResource, or_close
from ironclaw.proto.surface import Creating, ExecResult, SandboxHandle


def test_methods_exports_every_record_of_every_area_and_every_registered_type() -> None:
    for area in (sandbox_methods, proc_methods, agent_methods):
        for name in area.__all__:
            assert name in methods.__all__, name
            assert getattr(methods, name) is getattr(area, name)
    for spec in methods.METHODS.values():
        for record in (spec.request, spec.result):
            assert record.__name__ in methods.__all__, record.__name__


class _Resource(AsyncResource):
    def __init__(self) -> None:
        self.log: list[str] = []

    async def open(self) -> None:
        self.log.append("open")

    async def aclose(self) -> None:
        self.log.append("close")


async def test_async_resource_opens_and_closes_even_when_the_block_raises() -> None:
    r = _Resource()
    seen: list[list[str]] = []

    async def use() -> None:
        async with r as got:
            assert got is r
            seen.append(list(r.log))
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError):
        await use()
    assert seen == [["open"]] and r.log == ["open", "close"]


async def test_or_close_closes_what_was_opened_for_a_failed_step_only() -> None:
    async def ok() -> int:
        return 7

    async def broken() -> int:
        raise SandboxNotFound("gone")

    r = _Resource()
    assert await or_close(r, ok()) == 7
    assert r.log == []
    with pytest.raises(SandboxNotFound):
        await or_close(r, broken())
    assert r.log == ["close"]
    with pytest.raises(SandboxNotFound):
        await or_close(None, broken())  # nothing of ours to close


class _Handle(SandboxHandle):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def _destroy(self) -> None:
        self.calls.append("destroy")

    async def aclose(self) -> None:
        self.calls.append("aclose")


async def test_creating_destroys_once_and_detaches_on_leaving_async_with() -> None:
    made: list[_Handle] = []

    async def make() -> _Handle:
        made.append(_Handle())
        return made[-1]

    with pytest.raises(KeyError):
        async with Creating(make) as h:
            raise KeyError("inside")
    assert h.calls == ["destroy", "aclose"]
    await h.destroy()  # a second destroy does nothing
    assert h.calls == ["destroy", "aclose"]
    awaited = await Creating(make)
    assert awaited is made[-1] and awaited.calls == []


def test_blocking_methods_keep_the_async_methods_parameters() -> None:
    pairs = [(SyncFiles, RemoteFiles, n) for n in ("write", "read", "list", "stat", "remove")]
    pairs += [(SyncSandbox, RemoteSandbox, n) for n in ("exec", "ping", "destroy")]
    for sync_cls, async_cls, name in pairs:
        sync_params = inspect.signature(getattr(sync_cls, name)).parameters
        async_params = inspect.signature(getattr(async_cls, name)).parameters
        assert list(sync_params) == list(async_params), name
        assert not inspect.iscoroutinefunction(getattr(sync_cls, name)), name


def test_exec_result_json_names_truncation_for_both_sdks() -> None:
    doc = ExecResult("sb-1", 0, None, b"hi", b"", 1.23456, truncated=True).to_json("namespace")
    assert doc["truncated"] is True and doc["stdout"] == "hi" and doc["duration_ms"] == 1.235


def test_a_wire_code_given_as_a_class_keyword_crosses_the_wire() -> None:
    assert SandboxNotFound.wire_code == -32011
    assert IronclawError.wire_code == -32000

    class Local(IronclawError, wire_code=-32099):
        """A test-only error."""

    assert Local.wire_code == -32099
    wire = to_wire(SandboxNotFound("no sandbox sb-x"))
    assert wire["code"] == -32011
    back = from_wire(wire)
    assert type(back) is SandboxNotFound and str(back) == "no sandbox sb-x"
