"""Word-level diffs between a node's prompt and its parent's (for the tree and the report)."""

from __future__ import annotations

import re
from difflib import SequenceMatcher

#: Whitespace runs, words (with inner apostrophes and hyphens), or single other characters:
#: every character of a text falls in exactly one token, so joining the tokens gives it back.
_TOKEN = re.compile(r"\s+|[\w'’-]+|[^\w\s]")

EQUAL, INSERT, DELETE = "=", "+", "-"


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def word_diff(old: str | None, new: str) -> list[tuple[str, str]]:
    """``new`` as a list of ``(op, text)`` against ``old``: ``=`` kept, ``+`` added, ``-`` removed.

    Joining the ``=`` and ``+`` parts gives ``new``; joining ``=`` and ``-`` gives ``old``.
    Without an ``old`` (the root), the whole text is one ``=`` part.
    """
    if old is None:
        return [(EQUAL, new)] if new else []
    if old == new:
        return [(EQUAL, new)] if new else []
    ops: list[tuple[str, str]] = []

    def put(op: str, text: str) -> None:
        if not text:
            return
        if ops and ops[-1][0] == op:
            ops[-1] = (op, ops[-1][1] + text)
        else:
            ops.append((op, text))

    # Lines first (prompts are mostly lists of instructions), then words inside changed lines.
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    lines = SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in lines.get_opcodes():
        before, after = "".join(old_lines[i1:i2]), "".join(new_lines[j1:j2])
        if tag == "equal":
            put(EQUAL, after)
        elif tag == "replace":
            for op, text in _word_ops(before, after):
                put(op, text)
        else:
            put(DELETE, before)
            put(INSERT, after)
    return ops


def _word_ops(old: str, new: str) -> list[tuple[str, str]]:
    a, b = tokens(old), tokens(new)
    result: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            result.append((EQUAL, "".join(b[j1:j2])))
        else:
            if i2 > i1:
                result.append((DELETE, "".join(a[i1:i2])))
            if j2 > j1:
                result.append((INSERT, "".join(b[j1:j2])))
    return result


def new_text(ops: list[tuple[str, str]]) -> str:
    return "".join(text for op, text in ops if op != DELETE)


def old_text(ops: list[tuple[str, str]]) -> str:
    return "".join(text for op, text in ops if op != INSERT)


def diff_stats(ops: list[tuple[str, str]]) -> tuple[int, int]:
    """Words added and removed."""
    added = sum(len(text.split()) for op, text in ops if op == INSERT)
    removed = sum(len(text.split()) for op, text in ops if op == DELETE)
    return added, removed


def changed_line(ops: list[tuple[str, str]], limit: int = 60) -> str:
    """The line of the new text where the first addition is (``+ line``), else the line of the
    old text where the first removal is (``- line``): what a rewrite changed, in one line."""
    from drpo.inspect.common import excerpt

    for wanted, sides in ((INSERT, (EQUAL, INSERT)), (DELETE, (EQUAL, DELETE))):
        position = 0
        text_of_side = "".join(text for op, text in ops if op in sides)
        for op, text in ops:
            if op == wanted and text.strip():
                at = position + (len(text) - len(text.lstrip()))
                start = text_of_side.rfind("\n", 0, at) + 1
                end = text_of_side.find("\n", at)
                line = text_of_side[start : end if end >= 0 else len(text_of_side)]
                return f"{wanted} {excerpt(line, limit)}"
            if op in sides:
                position += len(text)
    return ""
