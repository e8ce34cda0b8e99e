"""Apply a unified diff to one text, strictly: every context and removed line must match.

Standard library only, so the host's approval card and the files server share it. A
hunk may float (its line numbers are hints, as with ``patch``): it is placed where its
old lines match, nearest the stated position first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["PatchError", "apply_patch"]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(ValueError):
    """The patch is malformed or does not apply to the text."""


@dataclass
class _Hunk:
    old_start: int
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)


def _parse(patch: str) -> list[_Hunk]:
    hunks: list[_Hunk] = []
    cur: _Hunk | None = None
    for line in patch.splitlines():
        m = _HUNK.match(line)
        if m:
            cur = _Hunk(old_start=int(m.group(1)))
            hunks.append(cur)
            continue
        if cur is None:
            if line.startswith(("---", "+++", "diff ", "index ")) or not line.strip():
                continue
            raise PatchError(f"text before the first hunk header: {line[:80]!r}")
        if line.startswith("\\"):
            continue  # "\ No newline at end of file"
        tag, body = (line[:1], line[1:]) if line else (" ", "")
        if tag == " ":
            cur.old.append(body)
            cur.new.append(body)
        elif tag == "-":
            cur.old.append(body)
        elif tag == "+":
            cur.new.append(body)
        else:
            raise PatchError(f"bad hunk line: {line[:80]!r}")
    if not hunks:
        raise PatchError("no hunks (expected '@@ -a,b +c,d @@' headers)")
    return hunks


def _find(lines: list[str], old: list[str], hint: int, lo: int) -> int:
    if not old:
        return max(lo, min(hint, len(lines)))
    candidates = range(lo, len(lines) - len(old) + 1)
    for i in sorted(candidates, key=lambda i: abs(i - hint)):
        if lines[i : i + len(old)] == old:
            return i
    raise PatchError(f"hunk at line {hint + 1} does not apply: its context is not in the file")


def apply_patch(text: str, patch: str) -> str:
    """Return ``text`` with ``patch`` applied; raise :class:`PatchError` if it cannot be."""
    trailing_nl = text.endswith("\n") or not text
    lines = text.splitlines()
    offset = 0
    lo = 0
    for hunk in _parse(patch):
        hint = max(0, hunk.old_start - 1 + offset) if hunk.old else hunk.old_start + offset
        at = _find(lines, hunk.old, hint, lo)
        lines[at : at + len(hunk.old)] = hunk.new
        offset += len(hunk.new) - len(hunk.old)
        lo = at + len(hunk.new)
    out = "\n".join(lines)
    return out + "\n" if trailing_nl and lines else out
