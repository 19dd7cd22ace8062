"""The editor's text fields: a rewritten prompt or answer as the string value of one field of a
JSON object, read even when the model left the object invalid.

Long prompts are where models break JSON: unescaped double quotes inside the value, literal
backslash-n for newlines. A value is cut out between its key and the next key (or the object's
end) when the object does not parse; a value cut off by the token limit is never accepted, since a
truncated system prompt is worse than none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from drpo.agents.parsing.json_reader import ParseError, extract_json, get_field

_NEXT_KEY = re.compile(r'"\s*,\s*"[A-Za-z_ ]{1,40}"\s*:')
_OBJECT_END = re.compile(r'"\s*}\s*(?:```)?\s*$')


def unescape_newlines(text: str) -> str:
    r"""Turn a literal backslash-n the model wrote inside a JSON string into a real newline.

    Models double-escape newlines in long string fields, so the decoded prompt shows "\n" as two
    characters; the original code made the same replacement on optimizer output.
    """
    return text.replace("\\r\\n", "\n").replace("\\n", "\n").replace("\\t", "\t")


def parse_text_field(text: str, *names: str, newlines: bool = True) -> str:
    """The string value of the first of ``names`` in a JSON object in ``text``.

    When the JSON is invalid because the value itself holds unescaped double quotes (common with
    long prompts), the value is cut out between its key and the next key or the object's end.
    A cut-off value is never accepted: a truncated system prompt is worse than none.
    With ``newlines`` a literal backslash-n becomes a newline.
    """
    value: Any = None
    try:
        value = get_field(extract_json(text, repair_truncated=False), *names)
    except ParseError:
        pass
    if value is None:  # invalid JSON, or only an inner object without the field parsed
        value = _cut_field(text, names)
    if isinstance(value, list):
        value = "\n".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        raise ParseError(f"no non-empty '{names[0]}' field", text)
    return (unescape_newlines(value) if newlines else value).strip()


def _cut_field(text: str, names: Sequence[str]) -> str | None:
    for name in names:
        key = re.search(rf"[\"']{re.escape(name)}[\"']\s*:\s*\"", text, re.IGNORECASE)
        if key is None:
            continue
        rest = text[key.end() :]
        end = _NEXT_KEY.search(rest) or _OBJECT_END.search(rest)
        if end is None:
            return None  # cut off by the token limit
        raw = rest[: end.start()]
        try:
            return json.loads(f'"{raw}"', strict=False)
        except json.JSONDecodeError:
            return raw.replace('\\"', '"').replace("\\\\", "\\")
    return None
