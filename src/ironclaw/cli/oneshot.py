"""The direct one-shot: ``ironclaw exec -- CMD`` with the default spec, without an agent.

A one-shot through the manager starts the guest agent, pings it, asks it over RPC to run
the command and tears it down: about 90 ms of work around the command plus asyncio's
imports, on every run. Here the jail is the same (the one builder of
:mod:`ironclaw.backends.namespace.launch`: cgroups, rlimits, the drop to the sandbox's
unprivileged host uid, the network namespace, ``timeout``, bubblewrap with the cached
seccomp program, the synthetic ``/etc``, hostname, env, workspace), but bubblewrap's
process is the command itself: its stdout and stderr are pipes read here with ``poll``
and copied to this process's own descriptors (the host's terminal never enters the
jail), its stdin is ``/dev/null`` as the agent gives it, and its exit status comes from
bubblewrap's ``--json-status-fd``. No event loop, no agent, no RPC.

Crash safety is the manager's: the sandbox is reserved in the registry before anything
is made, each resource's intent is recorded before it exists, and a one-shot whose owner
died is what ``gc`` (and every manager's start) removes; the jail dies with this
process (``--pdeathsig``). ``--json`` prints the agent path's :class:`ExecResult` with
its capture limit. What this path cannot answer identically it leaves to the agent path
(:func:`run` returns None): a warm pool, an unusual ``--timeout``, or
``IRONCLAW_ONESHOT=agent``. Known difference: bubblewrap reports a command killed by
signal N as exit code 128+N, so a command that itself exits with 129-192 reads as
killed by a signal (``signal`` in ``--json``); the agent path tells the two apart.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ironclaw.backends.namespace.launch import (
    COMMAND_OOM_SCORE_ADJ,
    Jail,
    Payload,
    SpawnedChild,
    Tools,
    launch,
    spawn_here,
)
from ironclaw.cli.fast import EXIT_PIPE, ExecArgs
from ironclaw.config import DEFAULT_UID_BASE, Settings, ensure_private_dir
from ironclaw.errors import BackendError, ConfigError, IronclawError, SandboxError
from ironclaw.ids import new_sandbox_id, validate_sandbox_id
from ironclaw.resources import audit
from ironclaw.resources.cgroups import CgroupManager, limit_status
from ironclaw.resources.procs import process_start_time
from ironclaw.resources.store import Batch, BlockingStore
from ironclaw.spec_light import DEFAULT_SPEC

if TYPE_CHECKING:
    from ironclaw.backends.namespace.launch import JailRecord
    from ironclaw.policy.limits import ResourceLimits
    from ironclaw.resources.cgroups import Cgroup

__all__ = ["CAPTURE_LIMIT", "run"]

#: What ``--json`` keeps of each stream: the agent path's default (host.guest's, which
#: loads asyncio; a test holds the two equal).
CAPTURE_LIMIT = 16 * 2**20
READ = 64 * 1024
PIPE_IDLE_S = 0.2  # as the agent: output pipes held open once the command has ended
MAX_UID = 2**31 - 1  # as the manager: user-namespace maps refuse larger ids


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the sandbox is destroyed, the CLI exits 130."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


class _Streams:
    """The command's output: copied to this process's stdout/stderr, or kept for
    ``--json`` (the first :data:`CAPTURE_LIMIT` bytes of each, every byte counted)."""

    def __init__(self, argv0: str, *, capture: bool) -> None:
        self.capture = capture
        self.kept = [bytearray(), bytearray()]
        self.counts = [0, 0]
        self.gone = False  # our reader left (EPIPE)
        # bubblewrap's words when the command cannot be started, held back until they
        # are known to be something else (see :meth:`spawn_failure`).
        self._prefix = f"bwrap: execvp {argv0}: ".encode()
        self._held: bytearray | None = bytearray()

    def feed(self, i: int, chunk: bytes) -> None:
        if i == 1 and self._held is not None:
            self._held += chunk
            held = bytes(self._held)
            maybe = self._prefix.startswith(held) or (
                held.startswith(self._prefix)
                and b"\n" not in held[:-1]
                and len(held) < len(self._prefix) + 256
            )
            if maybe:
                return
            self._held = None
            chunk = held
        self.take(i, chunk)

    def take(self, i: int, chunk: bytes) -> None:
        self.counts[i] += len(chunk)
        if self.capture:
            buf = self.kept[i]
            if len(buf) < CAPTURE_LIMIT:
                buf += chunk[: CAPTURE_LIMIT - len(buf)]
            return
        if self.gone:
            return
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(i + 1, view) :]
        except BrokenPipeError:
            self.gone = True

    def spawn_failure(self, exit_code: int) -> tuple[int, str] | None:
        """(127 or 126, the agent's message) if bubblewrap could not exec the command.

        bubblewrap then exits 1 after ``bwrap: execvp CMD: <strerror>`` (and writes no
        exit code); the agent answers ``CMD: command not found`` (127) or
        ``CMD: <strerror>`` (126), as a shell would. Anything else held is let through.
        """
        held = bytes(self._held or b"")
        if exit_code == 1 and self.counts == [0, 0] and held.startswith(self._prefix):
            self._held = None
            reason = held[len(self._prefix) :].decode(errors="replace").rstrip("\n")
            argv0 = self._prefix[len("bwrap: execvp ") : -2].decode(errors="replace")
            if reason == os.strerror(2):  # ENOENT
                return 127, f"{argv0}: command not found\n"
            return 126, f"{argv0}: {reason}\n"
        self.flush_held()
        return None

    def flush_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self.take(1, bytes(held))


def _exit_code_from(status_file: str) -> int | None:
    """The payload's exit code, from bubblewrap's JSON status lines (None: it was killed)."""
    import json

    code: int | None = None
    try:
        with open(status_file) as f:
            for line in f:
                if line.strip():
                    doc = json.loads(line)
                    if "exit-code" in doc:
                        code = int(doc["exit-code"])
    except (OSError, ValueError):
        return None
    return code


class _Result:
    __slots__ = ("duration_ms", "exit_code", "signal", "status", "timed_out")

    def __init__(self) -> None:
        self.exit_code = 0
        self.signal: int | None = None
        self.status = "exited"
        self.timed_out = False
        self.duration_ms = 0.0


class _OneShot:
    """One sandbox of the direct path: registered, made, run, removed, in the manager's
    order (each resource's intent recorded before it is made)."""

    def __init__(self, settings: Settings, store: BlockingStore, sandbox_id: str) -> None:
        uid_base = int(os.environ.get("IRONCLAW_UID_BASE", DEFAULT_UID_BASE))
        if not 65536 <= uid_base <= MAX_UID - 16384:
            raise ConfigError(f"uid base {uid_base} must lie between 65536 and {MAX_UID - 16384}")
        self.settings = settings
        self.store = store
        self.sid = sandbox_id
        self.uid_base = uid_base
        self.cgroups = CgroupManager(os.environ.get("IRONCLAW_CGROUP_ROOT", "ironclaw"))
        self.run_dir = settings.sandbox_runtime_dir(sandbox_id)
        self.reserved = False
        self.created = False  # and audited: its destroy is audited too
        self.child: SpawnedChild | None = None
        self.cgroup: Cgroup | None = None
        self.info: JailRecord | None = None

    def create(self, command: list[str], stdout: int, stderr: int) -> None:
        sid, store = self.sid, self.store
        tools = Tools.find()
        tools.check(agent=False)
        owner = {"owner_start": process_start_time(os.getpid())}
        spec = DEFAULT_SPEC.model_dump(mode="json")
        record = store.reserve(
            sid, backend="namespace", spec=spec, owner_pid=os.getpid(), one_shot=True, info=owner
        )
        self.reserved = True
        # Every intent before anything is made: a crash from here on leaves rows that
        # reconcile finishes (removing what was not made yet is a no-op).
        run_dir = str(self.run_dir)
        store.write(
            Batch()
            .intend(sid, "runtime_dir", run_dir)
            .intend(sid, "cgroup", sid)
            .intend(sid, "process", "supervisor")
        )
        ensure_private_dir(self.run_dir.parent)
        if self.run_dir.exists():
            raise SandboxError(f"runtime directory {run_dir} already exists; run `ironclaw gc`")
        self.run_dir.mkdir(mode=0o700)
        # The light limits record has every attribute the cgroup files are made from.
        limits = cast("ResourceLimits", DEFAULT_SPEC.limits)
        self.cgroup = self.cgroups.create_blocking(sid, limits)
        host_uid = self.uid_base + record.slot
        jail = Jail(
            spec=DEFAULT_SPEC,
            sandbox_id=sid,
            host_uid=host_uid,
            run_dir=self.run_dir,
            state_dir=self.settings.state_dir,
            one_shot=True,
            cgroup=self.cgroup,
        )
        payload = Payload(
            stdout=stdout, stderr=stderr, oom_score_adj=COMMAND_OOM_SCORE_ADJ, argv=command
        )
        # This process has one thread and no loop to stall: it steps into every v1
        # hierarchy for the fork, the CPU one too (no grace period moving the child).
        self.child, self.info = launch(jail, tools, payload, spawn_here, place_cpu=True)
        store.write(
            Batch()
            .created(sid, "runtime_dir", run_dir)
            .created(sid, "cgroup", sid)
            .update(sid, state="running", info=dict(self.info))
            .created(sid, "process", "supervisor")
        )
        audit.record(self.settings, sid, "sandbox.create", backend="namespace")
        self.created = True

    def run(self, out_r: int, err_r: int, streams: _Streams, timeout: float | None) -> _Result:
        """Copy the output until the command ended; its status as the agent reports it."""
        child, info, cg = self.child, self.info, self.cgroup
        assert child is not None and info is not None and cg is not None
        result = _Result()
        before = cg.limit_hits()
        started = last_output = time.monotonic()
        deadline = None if timeout is None else started + timeout
        pidfd = os.pidfd_open(child.pid)
        poller = select.poll()
        pipes = {out_r: 0, err_r: 1}
        for fd in (out_r, err_r, pidfd):
            poller.register(fd, select.POLLIN)
        exited = stopped = False
        try:
            while pipes or not exited:
                now = time.monotonic()
                if deadline is not None and now >= deadline and not exited:
                    result.timed_out, deadline = True, None
                    child.kill()
                if streams.gone and not stopped:
                    stopped = True  # as SIGPIPE would stop a local command
                    child.kill()
                if exited:
                    wait: float | None = PIPE_IDLE_S - (now - last_output)
                    if wait is not None and wait <= 0:
                        break
                else:
                    wait = None if deadline is None else max(0.0, deadline - now)
                for fd, _ev in poller.poll(None if wait is None else wait * 1000):
                    if fd == pidfd:
                        poller.unregister(fd)
                        exited = True
                        child.wait()
                        continue
                    chunk = os.read(fd, READ)
                    if chunk:
                        streams.feed(pipes[fd], chunk)
                        last_output = time.monotonic()
                    else:
                        poller.unregister(fd)
                        del pipes[fd]
        finally:
            os.close(pidfd)
        result.duration_ms = (time.monotonic() - started) * 1000
        # bubblewrap's last status line has the command's exit code; without one,
        # bubblewrap itself ended: it could not exec the command, or it was killed.
        code = _exit_code_from(info["status_file"])
        supervisor = child.wait()
        failure = streams.spawn_failure(supervisor) if code is None else None
        streams.flush_held()  # what was held back and is the command's own
        if failure is not None:
            result.exit_code, message = failure
            result.duration_ms = 0.0  # as the agent reports a command that never started
            streams.take(1, message.encode())
        elif code is not None:
            result.exit_code = code
            if 128 < code <= 128 + 64:
                result.signal = code - 128
        elif result.timed_out or stopped:
            result.exit_code, result.signal = 128 + signal.SIGKILL, signal.SIGKILL
        elif supervisor > 0:
            raise BackendError(
                f"the sandbox failed to start (bubblewrap exited {supervisor}; its message is "
                "above). Unprivileged user namespaces may be disabled: see `ironclaw doctor`."
            )
        else:
            raise SandboxError(f"sandbox {self.sid} went away during the command: killed")
        if result.timed_out:
            result.status = "timeout"
        result.status = limit_status(cg, before) or result.status
        return result

    def destroy(self) -> None:
        """Remove everything, as the manager's teardown does; idempotent for ``gc``."""
        if not self.reserved:
            return
        sid = self.sid
        _fresh, rows = self.store.begin_teardown(sid, "destroyed")
        kinds = {r.kind for r in rows}
        errors: list[str] = []
        if self.child is not None:
            self.child.kill()  # bubblewrap dies with it, and its pid namespace with that
            self.child.wait()
        if "cgroup" in kinds:
            try:
                self.cgroups.destroy_blocking(sid)
            except IronclawError as exc:
                errors.append(f"cgroup: {exc}")
        if "runtime_dir" in kinds:
            _remove_run_dir(self.run_dir)
        if errors:
            self.store.failed(sid, "; ".join(errors))
            raise SandboxError(
                f"sandbox {sid} was not fully removed ({'; '.join(errors)}); `ironclaw gc` retries"
            )
        self.store.delete(sid)
        if self.created:  # as the manager: a create that failed is undone, not destroyed
            audit.record(self.settings, sid, "sandbox.destroy")


def _remove_run_dir(path: os.PathLike[str]) -> None:
    """The run directory holds bubblewrap's status file only: no shutil needed for it."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                os.unlink(entry.path)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def run(args: ExecArgs, mark: Callable[[str], None]) -> int | None:
    """Run the one-shot directly; its exit status, or None to leave it to the agent path."""
    timeout = args.timeout
    if timeout is not None and not 0 < timeout < float("inf"):
        return None  # the agent path's own checks and wording
    try:
        return _run(args, mark)
    except IronclawError as exc:
        from ironclaw.cli.common import fail  # rich, but only to report an error

        return fail(exc, args.as_json)


def _run(args: ExecArgs, mark: Callable[[str], None]) -> int | None:
    begun = time.monotonic()
    sid = validate_sandbox_id(args.sandbox_id) if args.sandbox_id else new_sandbox_id()
    settings = Settings.from_env()
    settings.ensure()
    mark("imports")
    # Not closed: all is committed, and the exit follows (see BlockingStore.close).
    store = BlockingStore(settings.registry_path).open()
    mark("open")
    if store.has_pooled():
        store.close()
        return None  # a warm sandbox may serve it: the manager knows which
    shot = _OneShot(settings, store, sid)
    streams = _Streams(args.command[0], capture=args.as_json)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            try:
                shot.create(args.command, out_w, err_w)
            finally:
                os.close(out_w)
                os.close(err_w)
            mark("create")
            result = shot.run(out_r, err_r, streams, args.timeout)
        finally:
            # Not interrupted half-way: the agent path shields its destroy too.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            mark("exec")
            os.close(out_r)
            os.close(err_r)
            shot.destroy()
            mark("destroy")
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    mark("close")
    if interrupted:
        return EXIT_PIPE if streams.gone else 130
    if args.as_json:
        _print_json(sid, result, streams, total_ms=(time.monotonic() - begun) * 1000)
    elif result.status != "exited" and not streams.gone:
        with contextlib.suppress(OSError):
            os.write(2, f"ironclaw: {result.status}\n".encode())
    return EXIT_PIPE if streams.gone else result.exit_code


def _print_json(sid: str, result: _Result, streams: _Streams, *, total_ms: float) -> None:
    import json

    from ironclaw.proto.surface import ExecResult

    out, err = streams.kept
    doc = ExecResult(
        sandbox_id=sid,
        exit_code=result.exit_code,
        signal=result.signal,
        stdout=bytes(out),
        stderr=bytes(err),
        duration_ms=round(result.duration_ms, 3),
        status=result.status,
        timed_out=result.timed_out,
        stdout_bytes=streams.counts[0],
        stderr_bytes=streams.counts[1],
        truncated=len(out) < streams.counts[0] or len(err) < streams.counts[1],
    ).to_json("namespace")
    doc["total_ms"] = round(total_ms, 3)
    try:
        print(json.dumps(doc), flush=True)
    except BrokenPipeError:
        streams.gone = True
