"""The approval cliff: every tool call is GREEN (runs at once) or RED (waits for a decision).

Classification happens on the host, before the call reaches an MCP server. Defaults:
reads and listings are GREEN, and so are writes inside the workspace; deletions,
writes outside the workspace, network use, package installs, and shell commands not on
the allow-list are RED, as is any tool IronClaw does not know (a user's own MCP
server). Rules (JSON, first match wins) change any of this. The classifier reads the
call the way a reviewer would; it is a guard against surprises, not the security
boundary (the jail is).

What happens to a RED call depends on the mode:

``prompt``      a person decides: the CLI's interactive prompt, or an API caller through
                :meth:`Approver.decide` (refused if nobody can be asked)
``green-only``  RED calls are refused without asking
``all``         RED calls run too
``never``       nothing runs, GREEN included (see what an agent would do)
"""

from __future__ import annotations

import asyncio
import difflib
import fnmatch
import itertools
import json
import re
import shlex
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from ironclaw.errors import ConfigError

__all__ = [
    "CARD_MAX_CHARS",
    "CARD_READ_LIMIT",
    "DEFAULT_GREEN_COMMANDS",
    "ApprovalMode",
    "ApprovalPolicy",
    "ApprovalRequest",
    "Approver",
    "Classification",
    "Color",
    "Decision",
    "FilePrefix",
    "Rule",
    "build_card",
]

WORKSPACE = "/workspace"


class Color(StrEnum):
    GREEN = "GREEN"
    RED = "RED"


class ApprovalMode(StrEnum):
    PROMPT = "prompt"
    GREEN_ONLY = "green-only"
    ALL = "all"
    NEVER = "never"


#: Commands (first word) that only read or compute inside the sandbox.
DEFAULT_GREEN_COMMANDS: tuple[str, ...] = (
    "ls", "cat", "head", "tail", "wc", "grep", "find", "echo", "printf", "pwd", "true",
    "false", "test", "[", "stat", "file", "sort", "uniq", "cut", "tr", "diff", "cmp", "date",
    "env", "id", "whoami", "uname", "which", "python3", "python", "sh", "bash", "mkdir",
    "touch", "cp", "sed", "awk", "sha256sum", "md5sum", "du", "df", "tree", "make", "gcc",
    "cc", "seq", "sleep", "basename", "dirname", "realpath", "jq", "xargs", "tee",
)  # fmt: skip
_NETWORK_COMMANDS = frozenset(
    {"curl", "wget", "nc", "ncat", "netcat", "ssh", "scp", "sftp", "rsync", "ftp", "telnet",
     "ping", "dig", "nslookup", "host", "git", "socat"}
)  # fmt: skip
_INSTALL_COMMANDS = frozenset({"pip", "pip3", "apt", "apt-get", "dpkg", "npm", "yarn", "gem",
                               "cargo", "go", "conda", "uv", "poetry"})  # fmt: skip
_DELETE_COMMANDS = frozenset({"rm", "rmdir", "unlink", "shred", "truncate", "dd", "mkfs"})
_SHELL_SPLIT = re.compile(r"\|\||&&|[;|&\n]|\$\(|`")
_PY_NETWORK = re.compile(
    r"\b(socket|urllib|http\.client|requests|httpx|aiohttp|ftplib|smtplib|telnetlib)\b"
)
_PY_DELETE = re.compile(r"\b(os\.remove|os\.unlink|os\.rmdir|shutil\.rmtree|\.unlink\(|rmdir\()")
_PY_INSTALL = re.compile(r"\b(pip|ensurepip)\b")


@dataclass(frozen=True)
class Classification:
    """A call's color and the reason for it, which the approval card and the decision
    both carry, so a person (and the trace) sees why the call was stopped or let through."""

    color: Color
    reason: str


@dataclass(frozen=True)
class Rule:
    """``tool`` (a glob on ``server__tool``) and optionally ``command`` (a glob on a
    shell command line) map to ``color``."""

    tool: str
    color: Color
    command: str | None = None
    reason: str = "configured rule"

    @classmethod
    def from_json(cls, doc: Any) -> Rule:
        if not isinstance(doc, dict) or not isinstance(doc.get("tool"), str):
            raise ConfigError(f"approval rule {doc!r}: needs 'tool' and 'color'")
        try:
            color = Color(str(doc.get("color", "")).upper())
        except ValueError:
            raise ConfigError(f"approval rule {doc!r}: color must be GREEN or RED") from None
        cmd = doc.get("command")
        return cls(doc["tool"], color, str(cmd) if cmd is not None else None,
                   str(doc.get("reason") or "configured rule"))  # fmt: skip


def _inside(path: str, workspace: str) -> bool:
    p = PurePosixPath(path if path.startswith("/") else f"{workspace}/{path}")
    parts: list[str] = []
    for part in p.parts[1:]:
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    norm = "/" + "/".join(parts)
    return norm == workspace or norm.startswith(workspace.rstrip("/") + "/")


def _write_targets(exe: str, words: list[str]) -> list[str]:
    """Paths a simple command writes: redirection targets, and the operands of writers."""
    out: list[str] = []
    for i, w in enumerate(words):
        if w in (">", ">>") and i + 1 < len(words):
            out.append(words[i + 1])
        elif w.startswith(">"):
            out.append(w.lstrip(">"))
        elif i > 0 and exe in ("cp", "tee", "touch", "mkdir", "sed") and not w.startswith("-"):
            out.append(w)
    return out


@dataclass
class ApprovalPolicy:
    """GREEN/RED per call: rules first, then the built-in defaults."""

    rules: list[Rule] = field(default_factory=list)
    green_commands: tuple[str, ...] = DEFAULT_GREEN_COMMANDS
    workspace: str = WORKSPACE

    @classmethod
    def from_file(cls, path: str | Path) -> ApprovalPolicy:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the approval policy {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected an object with 'rules'")
        extra = doc.get("green_commands") or []
        return cls(
            rules=[Rule.from_json(r) for r in doc.get("rules") or []],
            green_commands=DEFAULT_GREEN_COMMANDS + tuple(str(c) for c in extra),
        )

    def classify(self, name: str, arguments: Mapping[str, Any]) -> Classification:
        command = arguments.get("command") if isinstance(arguments.get("command"), str) else None
        for rule in self.rules:
            if not fnmatch.fnmatchcase(name, rule.tool):
                continue
            if rule.command is not None and (
                command is None or not fnmatch.fnmatchcase(command, rule.command)
            ):
                continue
            return Classification(rule.color, rule.reason)
        server, _, tool = name.partition("__")
        if server == "files":
            return self._files(tool, arguments)
        if server == "shell" and tool == "run":
            return self.classify_command(str(arguments.get("command", "")))
        if server == "python" and tool == "run_python":
            return self._python(str(arguments.get("code", "")))
        return Classification(Color.RED, f"unknown tool {name}: not classified by any rule")

    def _files(self, tool: str, args: Mapping[str, Any]) -> Classification:
        path = str(args.get("path", "."))
        if tool in ("read_file", "list_dir"):
            return Classification(Color.GREEN, "read-only")
        if tool in ("write_file", "edit_file"):
            if _inside(path, self.workspace):
                return Classification(Color.GREEN, "write inside the workspace")
            return Classification(Color.RED, f"write outside the workspace: {path}")
        if tool == "delete_file":
            return Classification(Color.RED, f"deletes {path}")
        return Classification(Color.RED, f"unknown files tool {tool}")

    def _python(self, code: str) -> Classification:
        if _PY_NETWORK.search(code):
            return Classification(Color.RED, "python code uses the network")
        if _PY_DELETE.search(code):
            return Classification(Color.RED, "python code deletes files")
        if _PY_INSTALL.search(code):
            return Classification(Color.RED, "python code installs packages")
        return Classification(Color.GREEN, "python code without network, deletion or installs")

    def classify_command(self, command: str) -> Classification:
        """Every segment of a pipeline or list must be GREEN for the line to be GREEN."""
        if not command.strip():
            return Classification(Color.RED, "empty command")
        for segment in _SHELL_SPLIT.split(command):
            try:
                words = shlex.split(segment)
            except ValueError:
                return Classification(Color.RED, "command line does not parse")
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]
            if not words:
                continue
            exe = PurePosixPath(words[0]).name
            if exe in _NETWORK_COMMANDS:
                return Classification(Color.RED, f"network use: {exe}")
            if exe in _INSTALL_COMMANDS or (
                "install" in words and any(w in _INSTALL_COMMANDS for w in words)
            ):
                return Classification(Color.RED, f"package install: {' '.join(words[:3])}")
            if exe in _DELETE_COMMANDS:
                return Classification(Color.RED, f"deletion: {exe}")
            if exe not in self.green_commands:
                return Classification(Color.RED, f"command not on the allow-list: {exe}")
            if exe in ("python3", "python", "sh", "bash") and "-c" in words:
                code = words[words.index("-c") + 1] if words.index("-c") + 1 < len(words) else ""
                inner = (
                    self._python(code) if exe.startswith("python") else self.classify_command(code)
                )
                if inner.color is Color.RED:
                    return inner
            for target in _write_targets(exe, words):
                if target.startswith("/") and not _inside(target, self.workspace):
                    return Classification(Color.RED, f"writes outside the workspace: {target}")
        return Classification(Color.GREEN, "allow-listed commands")


@dataclass(frozen=True)
class ApprovalRequest:
    """A RED call waiting for a decision, with the card a person reviews."""

    id: str
    name: str
    arguments: Mapping[str, Any]
    classification: Classification
    card: str


@dataclass(frozen=True)
class Decision:
    """The verdict on one tool call; :meth:`to_json` is the wire's
    :class:`~ironclaw.proto.agent_methods.Decision`, the guest's ``tool.authorize`` answer."""

    approved: bool
    color: Color
    reason: str
    decided_by: str  # "policy", "mode", "person", "api", "budget"

    def to_json(self) -> dict[str, Any]:
        return {
            "approved": self.approved,
            "color": self.color.value,
            "reason": self.reason,
            "decided_by": self.decided_by,
        }


@dataclass(frozen=True)
class FilePrefix:
    """What a card reader saw of a file: its text (None: not shown) and why it is partial."""

    text: str | None
    note: str | None = None


Prompt = Callable[[ApprovalRequest], Awaitable[bool]]
CardReader = Callable[[str], Awaitable[str | FilePrefix | None]]
#: A card reads at most this much of the file it shows (the rest is not read at all).
CARD_READ_LIMIT = 64 * 1024
#: And is itself at most this long: arguments come from the guest, as large as it likes.
CARD_MAX_CHARS = 64 * 1024


def _bounded(text: str, what: str) -> tuple[str, str | None]:
    if len(text) <= CARD_READ_LIMIT:
        return text, None
    return text[:CARD_READ_LIMIT], (
        f"{what} is {len(text)} characters; only the first {CARD_READ_LIMIT} are shown"
    )


async def build_card(name: str, arguments: Mapping[str, Any], read: CardReader | None) -> str:
    """What a reviewer needs: a unified diff for file changes, the command line and cwd.

    Bounded: the file is read only up to :data:`CARD_READ_LIMIT` (the reader's note says
    when it was cut or not shown) and the card is cut at :data:`CARD_MAX_CHARS`.
    """
    card = await _card(name, arguments, read)
    if len(card) > CARD_MAX_CHARS:
        cut = len(card) - CARD_MAX_CHARS
        card = card[:CARD_MAX_CHARS] + f"\n[card truncated: {cut} more characters not shown]"
    return card


async def _card(name: str, arguments: Mapping[str, Any], read: CardReader | None) -> str:
    server, _, tool = name.partition("__")
    if server == "files" and tool in ("write_file", "edit_file", "delete_file"):
        path = str(arguments.get("path", ""))
        got = await read(path) if read is not None else None
        prefix = got if isinstance(got, FilePrefix) else FilePrefix(got)
        notes = [f"note: {prefix.note}"] if prefix.note else []
        old = prefix.text
        if tool == "edit_file":
            from ironclaw.mcp_servers.patch import PatchError, apply_patch

            patch, cut = _bounded(str(arguments.get("patch", "")), "the patch")
            notes += [f"note: {cut}"] if cut else []
            try:
                new: str | None = apply_patch(old or "", patch)
            except PatchError as exc:
                return "\n".join([*notes, f"edit {path} (patch does not apply: {exc})", patch])
        elif tool == "write_file":
            new = str(arguments.get("content", ""))
        else:
            new = ""
        new, cut = _bounded(new or "", "the new content")
        notes += [f"note: {cut}"] if cut else []
        diff = difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"a/{path}" if old is not None else "/dev/null",
            tofile=f"b/{path}" if tool != "delete_file" else "/dev/null",
        )
        body = "".join(diff) or f"{tool} {path}: no change"
        return "\n".join([*notes, body])
    if server == "shell":
        cwd = str(arguments.get("cwd") or ".")
        return f"$ {arguments.get('command', '')}\n(cwd: {cwd if cwd != '.' else WORKSPACE})"
    if server == "python":
        return f"python3 <<'EOF'\n{arguments.get('code', '')}\nEOF"
    return f"{name} {json.dumps(dict(arguments), indent=2)}"


class Approver:
    """Turns classifications into decisions, asking a person or an API caller for RED."""

    def __init__(
        self,
        policy: ApprovalPolicy | None = None,
        mode: ApprovalMode | str = ApprovalMode.PROMPT,
        *,
        prompt: Prompt | None = None,
        api: bool = False,
    ) -> None:
        self.policy = policy or ApprovalPolicy()
        try:
            self.mode = ApprovalMode(mode)
        except ValueError:
            raise ConfigError(f"--approve {mode!r}: use prompt, green-only, all or never") from None
        self.prompt = prompt
        self.api = api
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[ApprovalRequest, asyncio.Future[bool]]] = {}

    def pending(self) -> list[ApprovalRequest]:
        """RED calls waiting for :meth:`decide` (API mode)."""
        return [req for req, _ in self._pending.values()]

    def decide(self, request_id: str, approved: bool) -> None:
        """Answer a waiting RED call from outside (an API caller)."""
        entry = self._pending.get(request_id)
        if entry is None:
            raise ConfigError(f"no approval request {request_id!r} is waiting")
        if not entry[1].done():
            entry[1].set_result(approved)

    async def decide_call(
        self, name: str, arguments: Mapping[str, Any], read: CardReader | None = None
    ) -> tuple[Decision, ApprovalRequest | None]:
        cls = self.policy.classify(name, arguments)
        if self.mode is ApprovalMode.NEVER:
            return Decision(False, cls.color, "--approve never: no tool call runs", "mode"), None
        if cls.color is Color.GREEN:
            return Decision(True, cls.color, cls.reason, "policy"), None
        req = ApprovalRequest(
            f"a{next(self._ids)}",
            name,
            dict(arguments),
            cls,
            await build_card(name, arguments, read),
        )
        if self.mode is ApprovalMode.ALL:
            return Decision(True, cls.color, f"{cls.reason}; --approve all", "mode"), req
        if self.mode is ApprovalMode.GREEN_ONLY:
            return Decision(False, cls.color, f"{cls.reason}; --approve green-only", "mode"), req
        if self.prompt is not None:
            ok = await self.prompt(req)
            verdict = "approved" if ok else "refused"
            return Decision(ok, cls.color, f"{cls.reason}; {verdict} by a person", "person"), req
        if self.api:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._pending[req.id] = (req, fut)
            try:
                ok = await fut
            finally:
                self._pending.pop(req.id, None)
            verdict = "approved" if ok else "refused"
            return Decision(ok, cls.color, f"{cls.reason}; {verdict} over the API", "api"), req
        return Decision(False, cls.color, f"{cls.reason}; nobody to ask", "mode"), req
