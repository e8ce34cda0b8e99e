"""First stage of the guest agent: answer the first ``ping`` and ``exec`` with almost no imports.

Starting the full agent (asyncio, the typed protocol, the RPC peer) costs tens of
milliseconds of imports, and a one-shot sandbox is usually asked for nothing but a ping
and one command. This stage imports only C modules (``_socket``, ``_json``, ``select``)
and answers exactly those two requests, in their plain form, with a blocking poll loop.
It hands the connection over to the full agent (:func:`ironclaw.guest.__main__.handover`)
on anything else: another method, an unusual field, a stdin stream, a DATA frame, a second
connection, the connection going quiet for a moment, or any byte arriving while its own
command runs. The handover loses nothing: every byte not yet answered is replayed into the
full agent's peer, in order, including the frame of a command still running, which the
full agent then adopts (:class:`Running`) instead of starting it again. So every guarantee
of the channel stays the full agent's: what this stage answers, it answers exactly as the
full agent would (same checks or stricter, same reply), and what it does not, it never
touched.

A method added to the full agent needs nothing here: it is handed over.
"""

from __future__ import annotations

import _json
import _socket
import os
import select
import sys
import time

TYPE_CHECKING = False  # typing itself costs an import; mypy reads the block anyway
if TYPE_CHECKING:
    from typing import Any

MESSAGE, DATA, END = 1, 2, 3
HEADER_SIZE = 9
MAX_REQUEST = 64 * 1024  # larger requests are the full agent's (with its real limits)
READ = 64 * 1024  # one pipe's capacity: a DATA frame well below any channel's cap
IDLE_HANDOVER_S = 0.1  # quiet this long after a request: start the full agent meanwhile
PIPE_IDLE_S = 0.2  # as the full agent: output pipes held open by a background child
MAX_ARG = 128 * 1024
MAX_ITEMS = 4096
MAX_STREAM_ID = 2**32 - 1
SIGPIPE, SIGXFSZ, SIGKILL = 13, 25, 9  # Linux numbers; signal.py would cost an enum import
_EXEC_KEYS = frozenset(
    {"argv", "env", "cwd", "timeout", "stdout_stream", "stderr_stream", "stdin_stream"}
    | {"exec_id", "keep_background"}
)


class _Ctx:
    """What ``_json.make_scanner`` reads: json.JSONDecoder's defaults, NaN refused."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")


_scan = _json.make_scanner(_Ctx())  # type: ignore[arg-type]  # duck-typed by _json


def _not_json(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON")


# As json.dumps(..., separators=(",", ":"), ensure_ascii=False, allow_nan=False).
_encode = _json.make_encoder(
    None, _not_json, _json.encode_basestring, None, ":", ",", False, False, False
)


class Running:
    """A command this stage started and the full agent adopts (it owns every fd here)."""

    __slots__ = (
        "deadline",
        "err_r",
        "keep_background",
        "last_output",
        "out_r",
        "pid",
        "pidfd",
        "request_id",
        "returncode",
        "started",
        "stderr_stream",
        "stdout_stream",
        "timed_out",
    )

    def __init__(self, pid: int, pidfd: int, out_r: int, err_r: int, req: dict[str, Any]) -> None:
        self.pid, self.pidfd, self.out_r, self.err_r = pid, pidfd, out_r, err_r
        self.request_id: int | str = req["id"]
        params = req["params"]
        self.stdout_stream: int | None = params.get("stdout_stream")
        self.stderr_stream: int | None = params.get("stderr_stream")
        self.keep_background: bool = params.get("keep_background", False)
        self.started = self.last_output = time.monotonic()
        timeout = params.get("timeout")
        self.deadline: float | None = None if timeout is None else self.started + timeout
        self.returncode: int | None = None
        self.timed_out = False


class Handover:
    """Everything the full agent needs to carry on where this stage stopped."""

    __slots__ = ("conn_fd", "replay", "running")

    def __init__(self, conn_fd: int, replay: bytes, running: Running | None) -> None:
        self.conn_fd = conn_fd  # -1: the connection already ended
        self.replay = replay  # bytes received and not answered, to be read first
        self.running = running


def _frame(ftype: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(4, "big") + bytes((ftype,)) + stream_id.to_bytes(4, "big") + payload
    )


def _response(rid: int | str, result: dict[str, Any]) -> bytes:
    body = "".join(_encode({"jsonrpc": "2.0", "id": rid, "result": result}, 0))
    return _frame(MESSAGE, 0, body.encode())


def _is_int(v: object, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _strings(items: object) -> bool:
    return all(type(s) is str and len(s) <= MAX_ARG and "\0" not in s for s in items)  # type: ignore[attr-defined]


def _plain_exec(params: object) -> bool:
    """An exec this stage can run exactly as the full agent would (else: hand it over)."""
    if type(params) is not dict or not _EXEC_KEYS.issuperset(params):
        return False
    argv, env = params.get("argv"), params.get("env")
    if type(argv) is not list or not 1 <= len(argv) <= MAX_ITEMS or not _strings(argv):
        return False
    if env is not None:
        if type(env) is not dict or len(env) > MAX_ITEMS or not _strings(env):
            return False
        if not _strings(env.values()) or any(len(k) + len(v) > MAX_ARG for k, v in env.items()):
            return False
        if env.get("PATH", os.environ.get("PATH")) != os.environ.get("PATH"):
            return False  # the full agent searches the command in the child's PATH
    timeout = params.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or not 0 < timeout < 1e9):
        return False
    streams = [params.get("stdout_stream"), params.get("stderr_stream")]
    if not all(s is None or _is_int(s, 1, MAX_STREAM_ID) for s in streams):
        return False
    return (
        params.get("cwd") is None
        and params.get("stdin_stream") is None
        and params.get("exec_id") is None
        and type(params.get("keep_background", False)) is bool
    )


def _decode(payload: bytes) -> dict[str, Any] | None:
    """The request in ``payload`` if it is one this stage answers, else None."""
    try:
        text = str(payload, "utf-8")
        obj, end = _scan(text, 0)
    except (ValueError, RecursionError, StopIteration):
        return None
    if end != len(text) or type(obj) is not dict or obj.get("jsonrpc") != "2.0":
        return None
    rid, method, params = obj.get("id"), obj.get("method"), obj.get("params")
    if not set(obj) <= {"jsonrpc", "id", "method", "params"}:
        return None
    if not (type(rid) is str or _is_int(rid, -(2**63), 2**63 - 1)):
        return None
    if method == "ping" and params in (None, {}):
        return obj
    if method == "exec" and _plain_exec(params):
        return obj
    return None


class FirstStage:
    """Serves one connection until the first thing it leaves to the full agent."""

    def __init__(self, listener: _socket.socket, workdir: str) -> None:
        self.listener = listener
        self.workdir = workdir if os.path.isdir(workdir) else os.getcwd()
        self.conn: _socket.socket | None = None
        self.buf = b""
        self.running: Running | None = None

    def run(self) -> Handover:
        try:
            return self._serve()
        except OSError:
            # The host went away (a reset, a broken pipe): as the full agent does when a
            # connection drops, its command is killed; the full agent serves what comes.
            if self.running is not None:
                _abandon(self.running)
            if self.conn is not None:
                self.conn.close()
            return Handover(-1, b"", None)

    def _serve(self) -> Handover:
        listener = self.listener
        fd, _addr = listener._accept()  # type: ignore[attr-defined]
        self.conn = conn = _socket.socket(fileno=fd)
        conn.setblocking(True)
        served = False
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(listener.fileno(), select.POLLIN)
        while True:
            if len(self.buf) >= HEADER_SIZE:
                size = int.from_bytes(self.buf[:4], "big")
                if self.buf[4] != MESSAGE or size > MAX_REQUEST:
                    return self._handover(None)
                if len(self.buf) >= HEADER_SIZE + size:
                    raw = self.buf[: HEADER_SIZE + size]
                    req = _decode(raw[HEADER_SIZE:])
                    if req is None:
                        return self._handover(None)
                    if req["method"] == "ping":
                        self.buf = self.buf[len(raw) :]
                        conn.sendall(_response(req["id"], self._ping()))
                    elif len(self.buf) > len(raw):
                        # More is waiting behind this command: running it here would
                        # hold that up until it ends. The full agent runs both at once.
                        return self._handover(None)
                    else:
                        self.buf = b""
                        self.running = running = self._exec(req)
                        if running is None:  # could not start: the full agent says why
                            self.buf = raw
                            return self._handover(None)
                        if not self._finish(running, poller):
                            self.buf = raw + self.buf
                            return self._handover(running)
                        self.running = None
                    served = True
                    continue
            events = poller.poll(IDLE_HANDOVER_S * 1000 if served else None)
            if not events or any(fd == listener.fileno() for fd, _ in events):
                return self._handover(None)
            data = conn.recv(READ)
            if not data:
                return self._handover(None, eof=True)
            self.buf += data

    def _handover(self, running: Running | None, *, eof: bool = False) -> Handover:
        assert self.conn is not None
        if eof:
            self.conn.close()
            return Handover(-1, self.buf, running)
        return Handover(self.conn.detach(), self.buf, running)

    def _ping(self) -> dict[str, Any]:
        uname = os.uname()
        return {
            "pong": True,
            "kernel": uname.release,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "pid": os.getpid(),
            "hostname": uname.nodename,
            "workdir": self.workdir,
            "python": sys.version.split()[0],
        }

    def _exec(self, req: dict[str, Any]) -> Running | None:
        params = req["params"]
        argv, env = params["argv"], params.get("env")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        if os.getcwd() != self.workdir:
            os.chdir(self.workdir)
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                dict(os.environ) if env is None else {**os.environ, **env},
                file_actions=actions,
                setsid=True,
                setsigdef=(SIGPIPE, SIGXFSZ),
            )
        except OSError:
            for fd in (out_r, err_r):
                os.close(fd)
            return None
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        return Running(pid, os.pidfd_open(pid), out_r, err_r, req)

    def _finish(self, run: Running, poller: select.poll) -> bool:
        """Run the command to its end and answer; False: something else came, hand over."""
        assert self.conn is not None
        streams = {run.out_r: run.stdout_stream, run.err_r: run.stderr_stream}
        open_pipes = set(streams)
        for fd in (*open_pipes, run.pidfd):
            poller.register(fd, select.POLLIN)
        try:
            while open_pipes or run.returncode is None:
                now = time.monotonic()
                if run.returncode is None and run.deadline is not None and now >= run.deadline:
                    run.timed_out = True
                    _killpg(run.pid)
                    run.deadline = None
                if run.returncode is not None:
                    wait = PIPE_IDLE_S - (now - run.last_output)
                    if wait <= 0:
                        break
                elif run.deadline is not None:
                    wait = run.deadline - now
                else:
                    wait = -1
                events = poller.poll(wait * 1000 if wait >= 0 else None)
                for fd, _ev in events:
                    if fd in open_pipes:
                        try:
                            chunk = os.read(fd, READ)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            open_pipes.discard(fd)
                            poller.unregister(fd)
                            continue
                        sid = streams[fd]
                        if sid is not None:
                            self.conn.sendall(_frame(DATA, sid, chunk))
                        run.last_output = time.monotonic()
                    elif fd == run.pidfd:
                        poller.unregister(fd)
                        os.close(run.pidfd)
                        run.pidfd = -1
                        run.returncode = os.waitstatus_to_exitcode(os.waitpid(run.pid, 0)[1])
                    else:  # a request, stream data or a new connection: not ours to serve
                        return False
        finally:
            for fd in (*open_pipes, run.pidfd):
                if fd >= 0:
                    poller.unregister(fd)
        if not run.keep_background:
            _killpg(run.pid)
        os.close(run.out_r)
        os.close(run.err_r)
        run.out_r = run.err_r = -1
        rc = run.returncode
        assert rc is not None
        out = [_frame(END, sid, b"") for sid in streams.values() if sid is not None]
        sig = -rc if rc < 0 else None
        result = {
            "exit_code": 128 + sig if sig is not None else rc,
            "signal": sig,
            "timed_out": run.timed_out,
            "duration_ms": round((time.monotonic() - run.started) * 1000, 3),
            "pid": run.pid,
            "spawn_error": None,
        }
        out.append(_response(run.request_id, result))
        self.conn.sendall(b"".join(out))
        return True


def _abandon(run: Running) -> None:
    _killpg(run.pid)
    if run.returncode is None:
        os.waitpid(run.pid, 0)  # killed: it exits at once
    for fd in (run.out_r, run.err_r, run.pidfd):
        if fd >= 0:
            os.close(fd)


def _killpg(pid: int) -> None:
    try:  # noqa: SIM105 (contextlib would cost an import)
        os.killpg(pid, SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def first_stage(listen_fd: int, workdir: str) -> Handover:
    """Serve the first connection on ``listen_fd`` until the full agent must take over."""
    # Commands must not inherit the agent's descriptors (the full agent spawns with
    # close_fds): the inherited listening socket and whatever else came along.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:  # noqa: SIM105
                os.set_inheritable(fd, False)
            except OSError:
                pass
    listener = _socket.socket(fileno=listen_fd)
    listener.setblocking(True)
    try:
        return FirstStage(listener, workdir).run()
    finally:
        listener.detach()  # the full agent serves it next
