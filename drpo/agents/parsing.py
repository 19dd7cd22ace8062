"""Reading what models write: JSON objects, 1-5 scores, aspect selections, judgements, prompts.

The original code stripped code fences and called ``json.loads``; any preamble, trailing comma or
"4.5" score crashed the run or zeroed the reward (spec §2.3, §9.2). Models, small local ones above
all, wrap JSON in prose and fences, use single quotes, leave trailing commas, run out of tokens in
the middle of an object, and write scores as "4/5" or "Score: 4". Everything here accepts what a
careful human reader would accept, rejects what they would not, and raises :class:`ParseError`
with the reason and a snippet of the text when nothing usable is there.

A judge's verdict is read with the text it judged in mind (:func:`find_verdict`): the last JSON
value that scores the selected aspects and is not a copy of something in the query or answer, so
neither a quoted list before the verdict nor a verdict-shaped object planted in the answer can
take its place. Scores outside 1-5 are unreadable rather than clamped (:class:`ScoreRangeError`).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from drpo.agents.aspects import AspectCatalogue, normalize_name
from drpo.domain.values import AspectScore

_SNIPPET = 200


class ParseError(ValueError):
    """A model output with nothing usable in it; the message says what was expected and shows
    the start of the text."""

    def __init__(self, reason: str, text: str | None = None) -> None:
        self.reason = reason
        self.text = text
        if text is not None:
            shown = text.strip()
            if len(shown) > _SNIPPET:
                shown = shown[:_SNIPPET] + "..."
            reason = f"{reason} (output began: {shown!r})"
        super().__init__(reason)


# --------------------------------------------------------------------------------------------
# JSON extraction

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_LEADING_JSON_WORD = re.compile(r"^\s*(?:json|JSON)\s*(?=[\[{])")


def extract_json(text: str, *, allow_list: bool = False, repair_truncated: bool = True) -> Any:
    """The first JSON object (or list, with ``allow_list``) in ``text``.

    Tried in order: the whole text, then the inside of each code fence, then every balanced
    ``{...}`` span from left to right (so text before and after is ignored and the outermost object
    wins), each with light repairs (trailing commas, Python-style single quotes and literals).
    With ``repair_truncated`` an object cut off by the token limit is closed and read as far as it
    goes; callers that must not accept a cut-off value (a system prompt) turn it off.
    """
    if not isinstance(text, str):
        raise ParseError(f"expected model text, got {type(text).__name__}")
    wanted: tuple[type, ...] = (dict, list) if allow_list else (dict,)
    stripped = _LEADING_JSON_WORD.sub("", text.strip().lstrip("\ufeff"))
    candidates = [stripped]
    candidates += [_LEADING_JSON_WORD.sub("", m.group(1).strip()) for m in _FENCE.finditer(text)]
    for candidate in candidates:
        value = _loads_repaired(candidate)
        if isinstance(value, wanted):
            return value
    openers = "{[" if allow_list else "{"
    repairs_left = 3 if repair_truncated else 0
    for start, char in enumerate(stripped):
        if char not in openers:
            continue
        end = _balanced_end(stripped, start)
        if end is not None:
            value = _loads_repaired(stripped[start : end + 1])
        elif repairs_left and char == "{":
            # An object the token limit cut off: read it before any complete inner object.
            repairs_left -= 1
            value = _close_truncated(stripped[start:])
            value = value if value else None
        else:
            continue
        if isinstance(value, wanted):
            return value
    kind = "JSON object or list" if allow_list else "JSON object"
    raise ParseError(f"no {kind} found", text)


def _loads_repaired(candidate: str) -> Any:
    """``json.loads`` with control characters allowed, then with repairs; None when all fail."""
    if not candidate or candidate[0] not in "{[":
        return None
    attempts = (candidate, _drop_trailing_commas(candidate))
    for attempt in attempts:
        try:
            return json.loads(attempt, strict=False)
        except (json.JSONDecodeError, RecursionError):
            pass
    try:  # single quotes, True/None, or true/null written Python-style
        return ast.literal_eval(_pythonize_literals(attempts[1]))
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def _segments(text: str, begin: int = 0) -> Iterator[tuple[str, int]]:
    """Split ``text[begin:]`` into (chunk, state) pieces, honouring both quote styles and escapes.

    state is 0 outside strings, 1 for a closed string, 2 for a string still open at the end
    (cut off), so callers can use it as a truth value for "inside a string".
    """
    start, i, quote = begin, begin, ""
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 2
                continue
            if char == quote:
                yield text[start : i + 1], 1
                start, quote = i + 1, ""
        elif char in "\"'":
            if i > start:
                yield text[start:i], 0
            start, quote = i, char
        i += 1
    if start < len(text):
        yield text[start:], 2 if quote else 0


def _drop_trailing_commas(text: str) -> str:
    out = [
        chunk if in_string else re.sub(r",(\s*[}\]])", r"\1", chunk)
        for chunk, in_string in _segments(text)
    ]
    return "".join(out)


def _pythonize_literals(text: str) -> str:
    words = {"true": "True", "false": "False", "null": "None"}
    return "".join(
        chunk if in_string else re.sub(r"\b(true|false|null)\b", lambda m: words[m[1]], chunk)
        for chunk, in_string in _segments(text)
    )


def _balanced_end(text: str, start: int) -> int | None:
    """Index of the bracket closing the one at ``start``, skipping brackets inside strings."""
    stack: list[str] = []
    pairs = {"{": "}", "[": "]"}
    pos = start
    for chunk, in_string in _segments(text, start):
        if not in_string:
            for offset, char in enumerate(chunk):
                if char in pairs:
                    stack.append(pairs[char])
                elif char in "}]":
                    if not stack or stack.pop() != char:
                        return None
                    if not stack:
                        return pos + offset
        pos += len(chunk)
    return None


def _close_truncated(text: str) -> Any:
    """Read an object cut off mid-way: close the open string and brackets, and if that is not
    valid, cut back to the last complete member (up to a bounded number of tries)."""
    cuts = [len(text)]
    pos = 0
    for chunk, in_string in _segments(text):
        if not in_string:
            cuts += [pos + m.start() for m in re.finditer(",", chunk)]
        pos += len(chunk)
    for cut in sorted(set(cuts), reverse=True)[:64]:
        value = _loads_repaired(_with_closers(text[:cut]))
        if value is not None:
            return value
    return None


def _with_closers(prefix: str) -> str:
    stack: list[str] = []
    tail = ""
    for chunk, state in _segments(prefix):
        if state:
            tail = chunk[0] if state == 2 else ""  # close a string the token limit cut off
            continue
        for char in chunk:
            if char in "{[":
                stack.append("}" if char == "{" else "]")
            elif char in "}]" and stack:
                stack.pop()
    body = (prefix + tail).rstrip().rstrip(",:")
    return body + "".join(reversed(stack))


_DECODER = json.JSONDecoder(strict=False)
_OPENER = re.compile(r"[{\[]")
#: What may follow an opening bracket (after spaces) for a strict read to be worth trying.
_STRICT_AFTER = {"{": '"}', "[": '"-0123456789{[]tfn'}
#: What may follow an opening bracket for the repairing reader to try it: a key or an empty
#: object after "{", an object after "[". Braces in prose and code ("{ return x; }") are skipped.
_JSONISH_AFTER = {"{": "\"'}", "[": "{"}
#: Characters the repairing reader may scan per text. Strict JSON is read at C speed; the repairs
#: scan in Python, and without a bound a long reply full of braces (a judge echoing a 100k-character
#: answer made of code) would take quadratic time.
_REPAIR_SCAN_BUDGET = 400_000
#: The first stretch of text a strict read looks at (it grows when a value runs past it): a
#: failed read computes its error's line number from the start of what it was given, so reading
#: in the whole remaining text at every bracket would be quadratic in a long reply.
_DECODE_WINDOW = 4096


def iter_json_values(text: str) -> Iterator[tuple[int, Any]]:
    """Every complete top-level JSON object or list in ``text``, in reading order, as
    ``(start, value)``.

    Reading resumes after each value's end, so objects nested inside one are not yielded again.
    Each value is read strictly first, then with the light repairs of :func:`extract_json`
    (trailing commas, Python-style quotes and literals). Values cut off by the token limit are not
    yielded; :func:`cut_off_values` reads those.
    """
    budget = _REPAIR_SCAN_BUDGET
    pos = 0
    while (match := _OPENER.search(text, pos)) is not None:
        start = match.start()
        after = text[start + 1 : start + 200].lstrip()[:1]
        value: Any = None
        end = -1
        if after and after in _STRICT_AFTER[match[0]]:
            try:
                value, end = _decode_at(text, start)
            except (json.JSONDecodeError, RecursionError):
                value = None
        if value is None and budget > 0 and (not after or after in _JSONISH_AFTER[match[0]]):
            close = _balanced_end(text, start)
            budget -= (len(text) if close is None else close) - start
            if close is not None:
                value, end = _loads_repaired(text[start : close + 1]), close + 1
        if isinstance(value, dict | list):
            yield start, value
            pos = end
        else:
            pos = start + 1


def _decode_at(text: str, start: int) -> tuple[Any, int]:
    """``raw_decode`` at ``start``, over a window that grows while the value runs past it."""
    window = _DECODE_WINDOW
    while True:
        chunk = text[start : start + window]
        try:
            value, end = _DECODER.raw_decode(chunk)
            return value, start + end
        except json.JSONDecodeError as error:
            ran_out = error.msg.startswith("Unterminated") or error.pos >= len(chunk) - 16
            if start + window >= len(text) or not ran_out:
                raise
            window *= 4


def cut_off_values(text: str, tries: int = 3) -> Iterator[Any]:
    """Objects the token limit cut off, each closed and read as far as it goes (see
    :func:`extract_json`): from the first ``tries`` object openings that never close."""
    budget = _REPAIR_SCAN_BUDGET
    for match in re.finditer(r"\{", text):
        start = match.start()
        if tries <= 0 or budget <= 0:
            return
        if not _looks_like_json(text, start):
            continue
        close = _balanced_end(text, start)
        budget -= (len(text) if close is None else close) - start
        if close is None:
            tries -= 1
            value = _close_truncated(text[start:])
            if value:
                yield value


def _looks_like_json(text: str, start: int) -> bool:
    rest = text[start + 1 : start + 200].lstrip()
    return not rest or rest[0] in _JSONISH_AFTER[text[start]]


# --------------------------------------------------------------------------------------------
# Fields, text and scores


def get_field(obj: Any, *names: str) -> Any:
    """The value of the first key of ``obj`` matching one of ``names``, ignoring case, spaces,
    hyphens and underscores ("Selected Aspects" finds ``selected_aspects``); None if absent."""
    if not isinstance(obj, Mapping):
        return None
    keys = {normalize_name(str(k)): k for k in obj}
    for name in names:
        key = keys.get(normalize_name(name))
        if key is not None:
            return obj[key]
    return None


def as_text(value: Any) -> str:
    """A model's free-text field as one string: lists become lines, None becomes ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list | tuple):
        return "\n".join(as_text(v) for v in value if as_text(v))
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {as_text(v)}" for k, v in value.items())
    return str(value)


def unescape_newlines(text: str) -> str:
    r"""Turn a literal backslash-n the model wrote inside a JSON string into a real newline.

    Models double-escape newlines in long string fields, so the decoded prompt shows "\n" as two
    characters; the original code made the same replacement on optimizer output.
    """
    return text.replace("\\r\\n", "\n").replace("\\n", "\n").replace("\\t", "\t")


_NUMBER = re.compile(
    r"(?<![\w.])(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?", re.IGNORECASE
)
_WORD_SCORES = {"one": 1.0, "two": 2.0, "three": 3.0, "four": 4.0, "five": 5.0}
#: What Python's ``int()`` reads from a string (the paper's score reader), bar digit separators.
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


class ScoreRangeError(ParseError):
    """A score that is a number, but not on the 1-5 scale ("7", 0, "6/5").

    Not clamped: a judge that writes 7 on a 1-5 scale has misread the scale or been steered (a
    hostile answer can ask for "10/5"), and clamping it to 5 would hand that answer a perfect
    score that can trigger the skip rule. The whole verdict is unreadable instead.
    """


def parse_score(value: Any, *, lenient: bool = True) -> float:
    """A 1-5 score from what a judge wrote.

    ``lenient`` (drpo's reading) accepts what a careful reader would: 4, 4.5, "4", "4/5",
    "Score: 4", "**5**", "four"; an explicit fraction is rescaled to 5 points ("8/10" is 4, and a
    fraction's own bottom, "0/10", is our bottom, 1). Without it, the paper's ``int(score)``: a
    whole number, as a number or a string of digits; "4.5" or "4/5" is a ParseError.
    Either way a number outside 1-5 raises :class:`ScoreRangeError`, and anything with no number,
    a boolean or NaN raises ParseError. A mapping is read through its "score" field.
    """
    if isinstance(value, Mapping):
        return parse_score(get_field(value, "score", "rating", "value"), lenient=lenient)
    if isinstance(value, bool) or value is None or not isinstance(value, int | float | str):
        raise ParseError(f"score {value!r} is not a number")
    number = _lenient_number(value) if lenient else _whole_number(value)
    if not math.isfinite(number) or not 1 <= number <= 5:
        raise ScoreRangeError(f"score {value!r} is outside the 1-5 scale")
    return number


def _whole_number(value: int | float | str) -> float:
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ParseError(f"score {value!r} is not a whole number")
        return value
    if not _INTEGER.fullmatch(value):
        raise ParseError(f"score {value!r} is not a whole number")
    return float(int(value))


def _lenient_number(value: int | float | str) -> float:
    if not isinstance(value, str):
        return float(value)
    match = _NUMBER.search(value)
    if match is None:
        word = value.strip().strip("*.").lower()
        if word not in _WORD_SCORES:
            raise ParseError(f"score {value!r} has no number in it")
        return _WORD_SCORES[word]
    number = float(match[1])
    if match[2] is None:
        return number
    denominator = float(match[2])
    if denominator <= 0:
        raise ParseError(f"score {value!r} divides by zero")
    if not 0 <= number <= denominator:
        raise ScoreRangeError(f"score {value!r} is outside its own scale")
    return max(1.0, number / denominator * 5)


# --------------------------------------------------------------------------------------------
# Aspect selections


@dataclass(frozen=True)
class SelectionParse:
    """The aspects a selection named, resolved to catalogue names, plus what had to be dropped."""

    aspects: tuple[str, ...]
    reasoning: str = ""
    analysis: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


def parse_selection(source: str | Mapping[str, Any], catalogue: AspectCatalogue) -> SelectionParse:
    """Read an aspect selection in the paper's shape
    ``{query_analysis: {...}, aspects_selection: {reasoning, selected_aspects}}`` or a flat
    ``{reasoning, selected_aspects}``; names may be a list, a comma-separated string, or objects
    with a ``name``. Names outside the catalogue (the prompt invites new ones) are dropped and
    listed in ``dropped``; duplicates collapse to one."""
    obj = extract_json(source) if isinstance(source, str) else source
    text = source if isinstance(source, str) else None
    block = get_field(obj, "aspects_selection", "aspect_selection", "selection")
    if not isinstance(block, Mapping):
        block = obj
    raw = get_field(block, "selected_aspects", "aspects", "selected")
    if raw is None:
        raw = get_field(obj, "selected_aspects", "aspects")
    if raw is None:
        raise ParseError("the selection has no 'selected_aspects' list", text)
    reasoning = as_text(get_field(block, "reasoning", "rationale", "explanation"))
    if not reasoning:
        reasoning = as_text(get_field(obj, "reasoning", "rationale"))
    analysis_raw = get_field(obj, "query_analysis", "analysis")
    analysis = (
        {str(k): as_text(v) for k, v in analysis_raw.items()}
        if isinstance(analysis_raw, Mapping)
        else {}
    )
    chosen: dict[str, None] = {}
    dropped: list[str] = []
    for name in _aspect_names(raw):
        aspect = catalogue.resolve(name)
        if aspect is None:
            dropped.append(name)
        else:
            chosen.setdefault(aspect.name)
    return SelectionParse(tuple(chosen), reasoning, analysis, tuple(dropped))


def _aspect_names(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [part.strip(" *-.\"'") for part in re.split(r"[,;\n]", raw) if part.strip(" *-.")]
    if isinstance(raw, Mapping):  # {"Clarity": "why", ...}
        return [str(k) for k in raw]
    if isinstance(raw, list | tuple):
        names = []
        for item in raw:
            if isinstance(item, Mapping):
                item = get_field(item, "name", "aspect")
            if isinstance(item, str) and item.strip():
                names.append(item.strip())
        return names
    return []


# --------------------------------------------------------------------------------------------
# Judgements


@dataclass(frozen=True)
class JudgementParse:
    """Scores for the aspects that count, the entries that could not be used, and the selected
    aspects the judge left out."""

    scores: dict[str, AspectScore]
    dropped: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


_WRAPPERS = ("scores", "evaluation", "evaluations", "assessment", "aspects", "ratings")


def parse_judgement(
    source: str | Mapping[str, Any] | list[Any],
    selected: Sequence[str] | None,
    catalogue: AspectCatalogue,
    *,
    lenient_scores: bool = True,
    partial: bool = True,
    quoted: Sequence[str] = (),
) -> JudgementParse:
    """Read ``{Aspect: {"rationale": ..., "score": ...}}`` (the paper's shape) or the variants
    models drift into: bare scores ``{Aspect: 4}``, a wrapper ``{"scores": {...}}``, or a list of
    ``{"aspect", "score", "rationale"}`` objects.

    From a text, the verdict is the **last** JSON value that names a ``selected`` aspect (any
    catalogue aspect when None) and is not a copy of a value in the ``quoted`` texts (the query and
    the answer being judged): see :func:`find_verdict`. Names are resolved through the catalogue
    (aliases included) and names outside it are dropped, under either setting below: the paper's
    KeyError on an unknown name would crash a run for nothing.

    ``partial`` (drpo): the verdict counts its selected aspects with a usable score; unselected
    entries and scores with no number are dropped and recorded. Without it (the paper): every
    catalogue aspect the verdict returns counts, selected or not, and one unreadable score makes
    the whole verdict unreadable, as ``int(score)`` raised in the original.
    ``lenient_scores`` is :func:`parse_score`'s ``lenient``. A score outside 1-5 makes the whole
    verdict unreadable in every setting (see :class:`ScoreRangeError`).
    Raises ParseError when no aspect that counts has a usable score.
    """
    text = source if isinstance(source, str) else None
    wanted = None if selected is None else {catalogue[n].name for n in selected if n in catalogue}
    obj = find_verdict(source, wanted, catalogue, quoted) if isinstance(source, str) else source
    scores: dict[str, AspectScore] = {}
    dropped: list[str] = []
    for name, value in _judgement_entries(obj, catalogue):
        aspect = catalogue.resolve(name)
        if aspect is None:
            dropped.append(f"{name} (not an aspect in the catalogue)")
            continue
        if partial and wanted is not None and aspect.name not in wanted:
            dropped.append(f"{name} (not a selected aspect)")
            continue
        if aspect.name in scores:
            continue
        try:
            score = parse_score(value, lenient=lenient_scores)
        except ParseError as error:
            if partial and not isinstance(error, ScoreRangeError):
                dropped.append(f"{name} ({error.reason})")
                continue
            raise ParseError(f"{name}: {error.reason}", text) from None
        rationale = as_text(get_field(value, "rationale", "reason", "explanation", "justification"))
        scores[aspect.name] = AspectScore(score=score, rationale=rationale)
    if not scores:
        detail = f"; dropped: {', '.join(dropped)}" if dropped else ""
        raise ParseError(f"no usable aspect scores{detail}", text)
    order = dict.fromkeys(catalogue[n].name for n in selected or () if n in catalogue)
    missing = tuple(name for name in order if name not in scores)
    return JudgementParse(scores, tuple(dropped), missing)


def find_verdict(
    text: str,
    wanted: set[str] | None,
    catalogue: AspectCatalogue,
    quoted: Sequence[str] = (),
) -> Any:
    """The verdict in a judge's reply: the last JSON value that scores a ``wanted`` aspect.

    Not the first JSON value: a judge may quote a list or an object (often from the answer)
    before its verdict, and a hostile answer may carry a verdict-shaped object of its own. The
    last one is where a judge that writes prose, quotes and then its verdict puts the verdict. A
    value equal to one found anywhere in the ``quoted`` texts is an echo of the material under
    judgement, not the judge's own verdict, wherever it sits in the reply, so it never counts.
    None of this changes the reading of a reply that holds one verdict and nothing else.
    When no complete value qualifies, an object cut off by the token limit is read if it does.
    """
    echoes = _json_fingerprints(quoted)
    found: Any = None
    copied = 0
    for _, value in iter_json_values(text):
        if not _scores_an_aspect(value, wanted, catalogue):
            continue
        if _is_echo(value, echoes, catalogue):
            copied += 1
            continue
        found = value
    if found is not None:
        return found
    for value in cut_off_values(text):
        if _scores_an_aspect(value, wanted, catalogue) and not _is_echo(value, echoes, catalogue):
            return value
    names = ", ".join(sorted(wanted)) if wanted else "any aspect"
    detail = (
        f"; {copied} verdict-shaped object(s) only repeat one from the query or answer"
        if copied
        else ""
    )
    raise ParseError(f"no JSON object with scores for {names}{detail}", text)


def _scores_an_aspect(value: Any, wanted: set[str] | None, catalogue: AspectCatalogue) -> bool:
    for name, _ in _judgement_entries(value, catalogue):
        aspect = catalogue.resolve(name)
        if aspect is not None and (wanted is None or aspect.name in wanted):
            return True
    return False


def _is_echo(value: Any, echoes: set[str], catalogue: AspectCatalogue) -> bool:
    if not echoes:
        return False
    return _fingerprint(value) in echoes or _fingerprint(_verdict_body(value, catalogue)) in echoes


def _json_fingerprints(texts: Sequence[str]) -> set[str]:
    """A fingerprint of every JSON object and list in ``texts``, nested ones included."""
    found: set[str] = set()
    for text in texts:
        for _, value in iter_json_values(text):
            stack = [value]
            while stack:
                item = stack.pop()
                if isinstance(item, dict | list):
                    found.add(_fingerprint(item))
                    stack.extend(item.values() if isinstance(item, dict) else item)
    found.discard("")
    return found


def _fingerprint(value: Any) -> str:
    """The value as canonical JSON ("" when it cannot be written): equal values, equal text."""
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        return ""


def _verdict_body(obj: Any, catalogue: AspectCatalogue) -> Any:
    """The object or list that holds the verdict's entries (inside a wrapper, if any; a few
    levels at most, so a hostile tower of wrappers cannot exhaust the stack)."""
    for _ in range(4):
        if not isinstance(obj, Mapping) or any(catalogue.resolve(str(k)) for k in obj):
            break
        inner = get_field(obj, *_WRAPPERS)
        if not isinstance(inner, Mapping | list):
            break
        obj = inner
    return obj


def _judgement_entries(obj: Any, catalogue: AspectCatalogue) -> list[tuple[str, Any]]:
    body = _verdict_body(obj, catalogue)
    if isinstance(body, list):
        entries = []
        for item in body:
            name = get_field(item, "aspect", "name", "criterion")
            if isinstance(name, str):
                entries.append((name, item))
        return entries
    if not isinstance(body, Mapping):
        return []
    return [(str(k), v) for k, v in body.items()]


# --------------------------------------------------------------------------------------------
# Free-text fields (rewritten prompts and answers)

_NEXT_KEY = re.compile(r'"\s*,\s*"[A-Za-z_ ]{1,40}"\s*:')
_OBJECT_END = re.compile(r'"\s*}\s*(?:```)?\s*$')


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
