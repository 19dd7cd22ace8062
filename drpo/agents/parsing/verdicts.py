"""Scores, aspect selections and judges' verdicts, and the rule for reading a verdict.

Scores are read as a careful reader would ("4/5", "Score: 4", "four"), or as the paper's
``int(score)`` did; scores outside 1-5 are unreadable rather than clamped
(:class:`ScoreRangeError`). Selections and verdicts are read in the paper's shapes and the
variants models drift into, with names resolved through the aspect catalogue.

The reading rule for a judge's verdict (:func:`find_verdict`)
-------------------------------------------------------------
A candidate verdict counts only if

1. the text it was read from occurs nowhere in what the judge was given to judge (the query and
   the answer), in any normal form (``json_reader.normal_forms``): as written; whitespace
   collapsed; folded (HTML entities and JSON escapes rendered, NFKC, invisible characters
   dropped, curly and single quotes made straight double ones, casefolded, whitespace dropped);
   and folded after dropping what a judge that quotes the answer puts at each line's start or
   end: block quotes "> " and "> > ", bullets "- ", table and box rules "| ", fence lines, line
   numbers ("12: ", "12. ", "  12| ", "L3: ", ``cat -n``'s), HTML and Markdown line breaks;
2. neither does the opening of that text through its first usable score, nor the text of a
   member of it that is a copied value with a usable score;
3. the aspect names it scores are not all scored the same in one value the query or the answer
   holds, whatever that value's text (``_QuotedScores``: every value the lenient reader finds there,
   the containers nested in them, the values in their strings, bare-key objects, cut-off
   objects), so a copy the judge re-typed (elided a long string, re-ordered, re-serialised,
   un-escaped) is still the answer's;
4. it can be written as plain JSON (string keys, nesting under 17 containers).

Of the candidates left, the last is the verdict, read from the judge's reply exactly as the judge
wrote it (``robust`` reads its scores leniently, ``paper`` with ``int()``). A value that is no
verdict but opens with text the answer holds is read inside too, so an opening the answer wrote
(``{"":``, echoed just before the judge's verdict) cannot wrap that verdict and hide it. Text of
the reply that copies the answer is skipped whole, without being repaired, and what copied text
costs the lenient reader is paid from a budget of its own: the repair budget of the judge's own
text cannot be spent by the answer. The repairs never join adjacent strings as Python would
(``"a" "b"``), so a judge quoting the answer a line at a time in quotes writes no new value.

What it guarantees: nothing an answer holds can supply a verdict, or a score inside one, so an
answer can never raise its reward, under either policy and in every verdict shape, whether the
judge quotes it as written or in the forms above; lenient score forms ("5/5", "five", "**5**",
full-width digits) are only ever read from the judge's own text. An answer that holds the judge's
exact verdict text, or its opening through its first score, in one of the normal forms, or a
value scoring the same aspect names the same, may make that verdict unreadable: that is recorded
as such (a failed critique, reward 0, and a ParseError naming the copies), never replaced by
another value. JSON, metrics (keyed by an aspect's alias or not), code and logs in an answer that
hold no such text or value leave the verdict as it is.

What it cannot do: a judge that obeys an instruction in the answer and writes the answer's verdict
in its own words writes its own text, and that is read; keeping it from obeying is the judge
prompt's job (the hardened wording). So is a judge that re-writes what it quotes beyond the forms
above into a new verdict: turns the answer's prose ("Helpfulness: 5") into JSON, renames aspects
(an alias for its name), changes or drops a score. An opening through the first score is short
(``{"Helpfulness": 2``), so an answer that plants all five such openings can cost a bare verdict
that starts that way its reading, as can an answer that guesses the judge's scores in a value;
it never gains by it. The answer's values are read within the lenient reader's budget, so a
re-typed copy of a Python-literal value the answer hides behind thousands of never-closed
brackets is compared as text only. Only copies made as written count as copied for the repair
budget, and an answer that also holds the text the judge writes just around its verdict can have
that verdict's repairs paid from the copied budget.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from drpo.agents.aspects import AspectCatalogue, normalize_name
from drpo.agents.parsing.json_reader import (
    TOO_DEEP,
    ParseError,
    QuotedTexts,
    ValueReader,
    as_text,
    cached_for_short_texts,
    close_truncated,
    extract_json,
    fold,
    get_field,
    segments,
)
from drpo.domain.values import AspectScore

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
    held = QuotedTexts(quoted)
    scored = _QuotedScores(quoted, catalogue)
    reader = ValueReader(text, held)
    found: Any = None
    copied = 0
    pos = 0
    while (read := reader.next_value(pos)) is not None:
        start, end, value = read
        pos = end
        span = text[start:end]
        if not _scores_an_aspect(value, wanted, catalogue) or not _comparable(value):
            if held and held(span[:2]) and not held(span):
                pos = start + 1  # an opening the answer wrote may wrap the judge's own verdict
            continue
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
        if held and scored(value):
            copied += 1
            continue
        found = value
    if found is not None:
        return found
    for start, value in reader.cut_off_spans():
        if not _scores_an_aspect(value, wanted, catalogue) or not _comparable(value):
            continue
        span = text[start:]
        if held and (
            held(span) or _opening_is_copied(span, held, wanted, catalogue) or scored(value)
        ):
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


def _scores_of(value: Any, catalogue: AspectCatalogue) -> frozenset[tuple[str, Any]]:
    """What ``value`` says as a verdict: each aspect name it scores (folded, as written, not
    resolved: a judge re-typing a copy keeps the names) with its score, read leniently, or the
    folded text of the score when no score can be read from it."""
    entries = []
    for name, entry in _judgement_entries(value, catalogue):
        if catalogue.resolve(name) is None:
            continue
        try:
            score: Any = parse_score(entry, lenient=True)
        except ParseError:
            raw = (
                get_field(entry, "score", "rating", "value")
                if isinstance(entry, Mapping)
                else entry
            )
            score = fold(str(raw)) if isinstance(raw, str | int | float) else type(raw).__name__
        entries.append((fold(name), score))
    return frozenset(entries)


@cached_for_short_texts
def _squashed(text: str) -> str:
    """``text`` as aspect names are looked up (``normalize_name``), entities and escapes
    rendered first, so a name in it is a substring of this."""
    text = _UNICODE_ESCAPE.sub(lambda m: chr(int(m[1], 16)), html.unescape(text))
    return normalize_name(unicodedata.normalize("NFKC", text))


_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _names_a_key(squashed: str, keys: frozenset[str]) -> bool:
    """Whether one of the catalogue's looked-up ``keys`` occurs in a ``squashed`` text."""
    return any(key in squashed for key in keys)


#: A key written without quotes, as JavaScript allows (``{Helpfulness: 5}``).
_BARE_KEY = re.compile(r"([{,]\s*)([A-Za-z_][\w-]*)(\s*:)")


#: Lines of "Name: score" (YAML, or prose: "- **Clarity**: 5", "Clarity = 5/5"), one block of
#: them at a time: a judge turning a block the answer wrote into JSON copies the answer's scores.
_NAME_SCORE_LINE = re.compile(
    r"^[ \t>*+-]*\**([A-Za-z][\w -]{0,40}?)\**[ \t]*[:=][ \t]*\**([^\n*]{1,20}?)\**[ \t]*$",
    re.MULTILINE,
)
_NAME_SCORE_BLOCK = re.compile(
    r"(?:^[ \t>*+-]*\**[A-Za-z][\w -]{0,40}?\**[ \t]*[:=][ \t]*\**[^\n*]{1,20}?\**[ \t]*(?:\n|\Z))+",
    re.MULTILINE,
)


def _quote_bare_keys(text: str) -> str:
    """``text`` with bare keys quoted: a judge re-typing ``{Helpfulness: 5}`` as JSON copies it."""
    return _BARE_KEY.sub(r'\1"\2"\3', text)


class _QuotedScores:
    """The verdicts the quoted texts (the query and the answer) hold as values, whatever their
    text: ``scored(value)`` tells whether each aspect name ``value`` scores is scored the same
    in one of them. A judge that re-types a copy (elides a long string in it or whole members,
    reorders its keys, re-serialises it) writes new text but the answer's values, and those
    never count.

    Read once, on first use: every value the lenient reader finds in each text, nested ones
    too, every container nested in one, the values in their strings (an escaped verdict, rendered by the judge), and
    the objects cut off at the end, within the reader's budget.
    """

    _STRING_TEXT = 200_000  # characters of string values read again as texts, in all
    _NESTED_TEXT = 2_000_000  # characters of values read, nested ones counted again, in all
    #: The repairing reader's budget for each text: two and a half times a reply's, so that an
    #: answer that spends a reply's budget on brackets that never close still has its later
    #: values read (past this, a re-typed copy of them is compared as text only).
    _REPAIR_SCAN = 1_000_000

    def __init__(self, texts: Sequence[str], catalogue: AspectCatalogue) -> None:
        # Only a text that names an aspect somewhere (as the catalogue looks names up, after
        # entities and escapes are rendered) can hold a value that scores one: most answers
        # name none, and are not read at all.
        # Each text is squashed once, not once per key (that was 100 squashes of two texts
        # per verdict read: a third of a judge reply's reading time).
        keys = catalogue.lookup_keys
        self._texts = [t for t in texts if t and _names_a_key(_squashed(t), keys)]
        self._catalogue = catalogue
        self._known: set[frozenset[tuple[str, Any]]] | None = None

    def __call__(self, value: Any) -> bool:
        if self._known is None:
            self._known = self._read()
        mine = _scores_of(value, self._catalogue)
        return bool(mine) and any(mine <= known for known in self._known)

    def _read(self, *, walk_all: bool = False) -> set[frozenset[tuple[str, Any]]]:
        """Every verdict the texts hold. A value read as written is walked one level only when
        the reader returned every container nested in it on its own (it passed no opener over
        and its budget held): walking each value whole would read a value nested N deep N
        times (900 nested lists cost 0.46 s of CPU a judgement). ``walk_all`` walks every
        value whole: the reference the tests hold this to."""
        known: set[frozenset[tuple[str, Any]]] = set()
        texts = [(t, 0) for t in self._texts]
        texts += [(_quote_bare_keys(t), 2) for t in self._texts if _BARE_KEY.search(t)]
        for text in self._texts:  # "Name: score" lines, as YAML or prose writes them
            for block in _NAME_SCORE_BLOCK.finditer(text):
                lines = _NAME_SCORE_LINE.findall(block[0])
                scores = _scores_of(dict(lines), self._catalogue)
                if scores:
                    known.add(scores)
        left, spent = self._STRING_TEXT, 0
        while texts:
            text, depth = texts.pop()
            reader = ValueReader(text, budget=self._REPAIR_SCAN)
            read_alone: list[tuple[Any, bool]] = []  # (value, read as written)
            pos = 0
            # Every value, nested ones too (read again from their own brackets: a value hidden
            # by a later duplicate key is not in the outer value read), within a budget of
            # characters read, so a deeply nested answer costs linear time.
            while (in_budget := spent < self._NESTED_TEXT) and (
                read := reader.next_value(pos)
            ) is not None:
                pos = read[0] + 1
                spent += read[1] - read[0]
                read_alone.append((read[2], not reader.repaired))
            every_one_alone = in_budget and not reader.skipped and not walk_all
            values = [(value, every_one_alone and as_written) for value, as_written in read_alone]
            values += [(value, False) for _, value in reader.cut_off_spans()]
            while values:
                value, one_level = values.pop()  # too deep to be a verdict, scores may be copied
                scores = _scores_of(value, self._catalogue)
                if scores:
                    known.add(scores)
                inner = value.values() if isinstance(value, dict) else value
                for item in inner if isinstance(value, dict | list) else ():
                    if isinstance(item, dict | list):
                        if not one_level:  # else the reader returned it on its own
                            values.append((item, False))
                    elif isinstance(item, str) and depth < 2 and 0 < len(item) <= left:
                        if "{" in item or "[" in item:
                            left -= len(item)
                            texts.append((item, depth + 1))
        return known


def _opening_is_copied(
    span: str, held: QuotedTexts, wanted: set[str] | None, catalogue: AspectCatalogue
) -> bool:
    """Whether the copied opening of ``span`` already scores an aspect on its own.

    Closes a straddle: an answer that ends in ``{"Factuality": 5, "note": "`` and a judge that
    quotes it before its verdict make one balanced span whose text is in no quoted text, but
    whose score was written by the answer.
    """
    length = held.longest_prefix(span)
    if length < 2:
        return False
    return _has_usable_score(close_truncated(span[:length]), wanted, catalogue)


def _has_usable_score(value: Any, wanted: set[str] | None, catalogue: AspectCatalogue) -> bool:
    """Whether ``value`` gives a wanted aspect a score that any policy could read."""
    for name, entry in _judgement_entries(value, catalogue):
        aspect = catalogue.resolve(name)
        if aspect is None or (wanted is not None and aspect.name not in wanted):
            continue
        try:
            parse_score(entry, lenient=True)
        except ParseError:
            continue
        return True
    return False


def _holds_a_copied_verdict(
    span: str, held: QuotedTexts, wanted: set[str] | None, catalogue: AspectCatalogue
) -> bool:
    """Whether a member of ``span`` is a copied value with a usable score: a judge that wraps a
    copy in its own ``{"scores": ...}`` writes the wrapper, not the scores.

    Only members count (text inside the span's strings is not: a rationale quoting the answer's
    ``{'accuracy': 0.93}`` is the judge's prose), and only copies that score (a metrics dict the
    judge cites as evidence gives no score, so it cannot lend one).
    """
    # The strings' spans, in order and disjoint: whether a value starts inside one is a binary
    # search over their starts, not a scan of every string per value read (that scan was a
    # third of this function's time on a verdict with a rationale per aspect).
    lows: list[int] = []
    highs: list[int] = []
    at = 0
    for chunk, in_string in segments(span):
        if in_string:
            lows.append(at)
            highs.append(at + len(chunk))
        at += len(chunk)
    reader = ValueReader(span)
    pos = 1
    while (read := reader.next_value(pos)) is not None:
        start, end, value = read
        index = bisect_right(lows, start) - 1
        if index >= 0 and start < highs[index]:
            pos = start + 1
            continue
        pos = end
        if _has_usable_score(value, wanted, catalogue) and held(span[start:end]):
            return True
    return False


def _comparable(value: Any) -> bool:
    """Whether the value can be written as plain JSON (string keys, bounded depth): one that
    cannot is no verdict a judge writes, and was most likely repaired out of something else."""
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return _depth(value) < TOO_DEEP


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
