"""Reading what models write: JSON objects, 1-5 scores, aspect selections, judgements, prompts.

The original code stripped code fences and called ``json.loads``; any preamble, trailing comma or
"4.5" score crashed the run or zeroed the reward (spec §2.3, §9.2). Models, small local ones above
all, wrap JSON in prose and fences, use single quotes, leave trailing commas, run out of tokens in
the middle of an object, and write scores as "4/5" or "Score: 4". Everything here accepts what a
careful human reader would accept, rejects what they would not, and raises :class:`ParseError`
with the reason and a snippet of the text when nothing usable is there.

The reading rule for a judge's verdict (:func:`find_verdict`): a candidate verdict counts only
if the text it was read from (its span in the judge's reply, and the opening of that span through
its first usable score) occurs nowhere in what the judge was given to judge (the query and the
answer, compared as written, whitespace-collapsed, and NFKC-casefolded with whitespace
dropped), whether that text parses
or not; a value that cannot be written as plain JSON (non-string keys, nesting deeper than 16) is
never a verdict; of the candidates left, the last one is the verdict, read from the judge's reply
exactly as the judge wrote it. Text held by the answer is skipped whole without being repaired,
so it cannot spend the repair budget, which belongs to the judge's own text.

What it guarantees: nothing an answer holds can supply a verdict, or a score inside one, so an
answer can never raise its reward; an answer that holds the judge's exact verdict text (or its
opening through its first score) may make that verdict unreadable, which is recorded as such
(a ParseError naming the copies), never replaced. JSON, metrics, code and logs in an answer that
do not hold the judge's text leave the verdict as it is, under either policy and in every shape;
lenient score forms ("5/5", "five") are therefore only ever read from the judge's own text.
What it cannot do: a judge that obeys an instruction in the answer and writes the answer's
verdict in its own words writes its own text; keeping it from obeying is the prompt's job (the
hardened wording). Unbalanced openers copied from the answer still cost scan time, and a
verdict whose text the answer happens to hold is lost rather than guessed at.
Scores outside 1-5 are unreadable rather than clamped (:class:`ScoreRangeError`).
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    pos, budget = 0, _REPAIR_SCAN_BUDGET
    while (found := _next_value(text, pos, budget)) is not None:
        start, end, value, budget = found
        yield start, value
        pos = end


def _next_value(
    text: str, pos: int, budget: int, held: Callable[[str], bool] | None = None
) -> tuple[int, int, Any, int] | None:
    """The next complete JSON value at or after ``pos``: ``(start, end, value, budget_left)``.

    ``held`` tells text copied from what was judged: a balanced span it holds is skipped whole
    without being repaired, so that text never spends the repair budget (it belongs to the
    judge's own reply), and nothing inside it is read either (any part of a copy is a copy).
    """
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
            if close is not None and held is not None and held(text[start : close + 1]):
                pos = close + 1
                continue
            budget -= (len(text) if close is None else close) - start
            if close is not None:
                value, end = _loads_repaired(text[start : close + 1]), close + 1
        if isinstance(value, dict | list):
            return start, end, value, budget
        pos = start + 1
    return None


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
    for _, value in _cut_off_spans(text, tries):
        yield value


def _cut_off_spans(text: str, tries: int = 3) -> Iterator[tuple[int, Any]]:
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
                yield start, value


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
    """The verdict in a judge's reply: the last JSON value that scores a ``wanted`` aspect and
    was read from the judge's own text (the reading rule in this module's docstring).

    Not the first JSON value: a judge may quote a list or an object (often from the answer)
    before its verdict. A candidate whose source text occurs in a ``quoted`` text (the query and
    the answer), or whose opening through a usable score does, is the answer's text, not the
    judge's, wherever it sits in the reply, so it never counts; nor does a value that cannot be
    written as plain JSON. None of this changes the reading of a reply that holds one verdict and
    nothing else. When no complete value qualifies, an object cut off by the token limit is read
    if its text passes the same test.
    """
    held = _Quoted(quoted)
    found: Any = None
    copied = 0
    pos, budget = 0, _REPAIR_SCAN_BUDGET
    while (read := _next_value(text, pos, budget, held if held else None)) is not None:
        start, end, value, budget = read
        pos = end
        if not _scores_an_aspect(value, wanted, catalogue):
            continue
        if not _comparable(value):
            continue
        span = text[start:end]
        if held and held(span):
            copied += 1
            continue
        if held and (
            _opening_is_copied(span, held, wanted, catalogue)
            or _holds_a_copied_verdict(span, held, wanted, catalogue)
        ):
            copied += 1
            pos = start + 1  # the judge's own verdict may sit inside the straddling span
            continue
        found = value
    if found is not None:
        return found
    for start, value in _cut_off_spans(text):
        if not _scores_an_aspect(value, wanted, catalogue) or not _comparable(value):
            continue
        span = text[start:]
        if held and (held(span) or _opening_is_copied(span, held, wanted, catalogue)):
            copied += 1
            continue
        return value
    names = ", ".join(sorted(wanted)) if wanted else "any aspect"
    detail = (
        f"; {copied} verdict-shaped object(s) only repeat text from the query or answer"
        if copied
        else ""
    )
    raise ParseError(f"no JSON object with scores for {names}{detail}", text)


def _normal_forms(text: str) -> tuple[str, str, str]:
    """The forms a copy is recognised in: as written, whitespace collapsed, and folded (NFKC,
    casefold, whitespace dropped) so a re-indented, re-cased or compatibility-form copy (a judge
    that copies a planted verdict with ``indent=2``) is still a copy."""
    collapsed = " ".join(text.split())
    folded = "".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text, collapsed, folded


class _Quoted:
    """What the judge was given to judge, in each normal form; ``held(span)`` tells whether a
    span of the reply is (a normal form of) a part of it."""

    def __init__(self, texts: Sequence[str]) -> None:
        forms = [_normal_forms(t) for t in texts if t]
        self._forms = tuple("\x00".join(f[i] for f in forms) for i in range(3)) if forms else ()

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, span: str) -> bool:
        if not self._forms:
            return False
        pairs = zip(_normal_forms(span), self._forms, strict=True)
        return any(form and form in whole for form, whole in pairs)

    def longest_prefix(self, span: str) -> int:
        """The length of the longest opening of ``span`` that is held (binary search: every
        opening of a held text is held)."""
        low, high = 0, len(span)
        while low < high:
            middle = (low + high + 1) // 2
            if self(span[:middle]):
                low = middle
            else:
                high = middle - 1
        return low


def _opening_is_copied(
    span: str, held: _Quoted, wanted: set[str] | None, catalogue: AspectCatalogue
) -> bool:
    """Whether the copied opening of ``span`` already scores an aspect on its own.

    Closes a straddle: an answer that ends in ``{"Factuality": 5, "note": "`` and a judge that
    quotes it before its verdict make one balanced span whose text is in no quoted text, but
    whose score was written by the answer.
    """
    length = held.longest_prefix(span)
    if length < 2:
        return False
    opening = _close_truncated(span[:length])
    if not _scores_an_aspect(opening, wanted, catalogue):
        return False
    for name, value in _judgement_entries(opening, catalogue):
        aspect = catalogue.resolve(name)
        if aspect is None or (wanted is not None and aspect.name not in wanted):
            continue
        try:
            parse_score(value, lenient=True)
        except ParseError:
            continue
        return True
    return False


def _holds_a_copied_verdict(
    span: str, held: _Quoted, wanted: set[str] | None, catalogue: AspectCatalogue
) -> bool:
    """Whether a value inside ``span`` that scores an aspect is copied text: a judge that wraps
    a copy in its own ``{"scores": ...}`` writes the wrapper, not the scores."""
    pos, budget = 1, _REPAIR_SCAN_BUDGET
    while (read := _next_value(span, pos, budget)) is not None:
        start, end, value, budget = read
        pos = end
        if _scores_an_aspect(value, wanted, catalogue) and held(span[start:end]):
            return True
    return False


def _comparable(value: Any) -> bool:
    """Whether the value can be written as plain JSON (string keys, bounded depth): one that
    cannot is no verdict a judge writes, and was most likely repaired out of something else."""
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return _depth(value) <= 16


def _depth(value: Any, limit: int = 17) -> int:
    depth, level = 0, [value]
    while level and depth < limit:
        depth += 1
        level = [
            item
            for v in level
            if isinstance(v, dict | list)
            for item in (v.values() if isinstance(v, dict) else v)
        ]
    return depth


def _scores_an_aspect(value: Any, wanted: set[str] | None, catalogue: AspectCatalogue) -> bool:
    for name, _ in _judgement_entries(value, catalogue):
        aspect = catalogue.resolve(name)
        if aspect is not None and (wanted is None or aspect.name in wanted):
            return True
    return False


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
