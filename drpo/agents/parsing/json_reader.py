"""The lenient JSON reader: JSON values in what a model wrote, with the repairs a careful human
reader would make, in time linear in the text's length.

The original code stripped code fences and called ``json.loads``; any preamble, trailing comma or
"4.5" score crashed the run or zeroed the reward (spec §2.3, §9.2). Models, small local ones above
all, wrap JSON in prose and fences, use single quotes, leave trailing commas, and run out of tokens
in the middle of an object. This module reads every JSON value in such a text, in order, strictly
first (at C speed) and then with light repairs (trailing commas, Python-style quotes and
literals, an object closed where the token limit cut it), and raises :class:`ParseError` with the
reason and a snippet when nothing usable is there.

Why not ``json-repair`` (json_repair 0.64 on PyPI, maintained, MIT): tried, and it does a
different job. It turns any text into *some* value (prose becomes "", ``{1: 2}`` becomes
``{"1": 2}``, ``{"Helpfulness": five}`` becomes ``{"Helpfulness": "five"}``), where this reader
must say "nothing here" and must know that a key was not a string (a value that is not plain
JSON is never a verdict); it reads one value per text and gives no positions, while the verdict
rule needs each value's span in the reply to compare it with the answer; and its parser recurses
in Python, so a deeply nested reply raises instead of being skipped (3,000 nested brackets: a
ValueError). Using it would mean re-finding spans and re-checking keys around it, which is the
part of this module that is not a plain ``json`` call anyway.

Cost: strict reads are bounded by a window that grows only while a value runs past it; a value
too deep for the decoder's recursion limit marks the brackets inside it that can only open values
too deep to be verdicts, so they are not decoded again; the repairs scan in Python under a budget
of characters, kept apart for text copied from what was judged (see :class:`QuotedTexts`) and for
the rest, so an echoed answer can never spend the budget that the judge's own text needs.
"""

from __future__ import annotations

import ast
import html
import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from drpo.agents.aspects import normalize_name

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
# The first JSON object of a text (selections, prompts)

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_LEADING_JSON_WORD = re.compile(r"^\s*(?:json|JSON)\s*(?=[\[{])")


def extract_json(text: str, *, allow_list: bool = False, repair_truncated: bool = True) -> Any:
    """The first JSON object (or list, with ``allow_list``) in ``text``.

    Tried in order: the whole text, then the inside of each code fence, then every value in the
    text from left to right (so text before and after is ignored and the outermost object wins),
    each with light repairs (trailing commas, Python-style single quotes and literals).
    With ``repair_truncated`` an object cut off by the token limit is closed and read as far as it
    goes, before any complete object inside it; callers that must not accept a cut-off value (a
    system prompt) turn it off.

    Linear in the text's length: the spans are read by :class:`ValueReader` (strict reads at C
    speed, repairs under its character budget, too-deep values skipped once), so a reply of
    60,000 nested or never-closed brackets reads in a fraction of a second (it used to try every
    span, a repair scan each: quadratic; ``benchmarks/parsing.py`` has the line).
    """
    if not isinstance(text, str):
        raise ParseError(f"expected model text, got {type(text).__name__}")
    wanted: tuple[type, ...] = (dict, list) if allow_list else (dict,)
    stripped = _LEADING_JSON_WORD.sub("", text.strip().lstrip("\ufeff"))
    candidates = [stripped]
    candidates += [_LEADING_JSON_WORD.sub("", m.group(1).strip()) for m in _FENCE.finditer(text)]
    for candidate in candidates:
        value = loads_repaired(candidate)
        if isinstance(value, wanted):
            return value
    reader = ValueReader(stripped)
    found: tuple[int, Any] | None = None
    pos = 0
    while (read := reader.next_value(pos)) is not None:
        start, _, value = read
        if isinstance(value, wanted):
            found = (start, value)
            break
        pos = start + 1  # a list when only objects will do: the objects inside it are read
    if repair_truncated:
        # An object the token limit cut off is read before any complete object inside it.
        for start, value in reader.cut_off_spans():
            if found is not None and start > found[0]:
                break
            if isinstance(value, wanted):
                return value
    if found is not None:
        return found[1]
    kind = "JSON object or list" if allow_list else "JSON object"
    raise ParseError(f"no {kind} found", text)


# --------------------------------------------------------------------------------------------
# Repairs


def loads_repaired(candidate: str) -> Any:
    """``json.loads`` with control characters allowed, then with repairs; None when all fail."""
    if not candidate or candidate[0] not in "{[":
        return None
    attempts = (candidate, _drop_trailing_commas(candidate))
    for attempt in attempts[: 1 if attempts[1] is candidate else 2]:
        try:
            return json.loads(attempt, strict=False)
        except (json.JSONDecodeError, RecursionError):
            pass
    if _adjacent_strings(attempts[1]):
        return None  # Python would join "a" "b" into one string: no JSON reader would
    try:  # single quotes, True/None, or true/null written Python-style
        return ast.literal_eval(_pythonize_literals(attempts[1]))
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def _adjacent_strings(text: str) -> bool:
    """Whether two string literals follow each other with only spaces between them, which
    Python's literal reader joins into one: a reply that quotes an answer line by line in quotes
    (``"{"a": "`` then ``", "Helpfulness": 5}"``) would be read as a value no one wrote."""
    previous = 0
    for chunk, state in segments(text):
        if state and previous == 1:
            return True
        if state:
            previous = 1
        elif chunk.strip():
            previous = 0
    return False


def segments(text: str, begin: int = 0) -> Iterator[tuple[str, int]]:
    """Split ``text[begin:]`` into (chunk, state) pieces, honouring both quote styles and escapes.

    state is 0 outside strings, 1 for a closed string, 2 for a string still open at the end
    (cut off), so callers can use it as a truth value for "inside a string". Jumps from quote to
    quote by regular expression (C time), not a Python step per character.
    """
    pos, size = begin, len(text)
    while pos < size:
        quote = _QUOTE.search(text, pos)
        if quote is None:
            yield text[pos:], 0
            return
        at = quote.start()
        if at > pos:
            yield text[pos:at], 0
        rest = _STRING_REST[quote[0]].match(text, at + 1)
        if rest is None:
            yield text[at:], 2
            return
        yield text[at : rest.end()], 1
        pos = rest.end()


#: A trailing comma, and the literals Python spells differently: texts without them (most) are
#: returned as they are, without splitting them into strings.
_TRAILING_COMMA = re.compile(r",\s*[}\]]")
_LOWER_LITERAL = re.compile(r"\b(?:true|false|null)\b")


def _drop_trailing_commas(text: str) -> str:
    if not _TRAILING_COMMA.search(text):
        return text
    out = [
        chunk if in_string else re.sub(r",(\s*[}\]])", r"\1", chunk)
        for chunk, in_string in segments(text)
    ]
    return "".join(out)


def _pythonize_literals(text: str) -> str:
    if not _LOWER_LITERAL.search(text):
        return text
    words = {"true": "True", "false": "False", "null": "None"}
    return "".join(
        chunk if in_string else re.sub(r"\b(true|false|null)\b", lambda m: words[m[1]], chunk)
        for chunk, in_string in segments(text)
    )


#: A quote that opens a string (either style).
_QUOTE = re.compile(r"[\"']")
#: Brackets outside strings, as :func:`_with_closers` counts them.
_BRACKET = re.compile(r"[\[\]{}]")
#: Characters :func:`close_truncated` may hand the repairing reader in all its tries together:
#: a short cut-off object gets all 64 tries, a 60,000-character one a few, so closing one costs
#: time linear in its length.
_CLOSE_BUDGET = 256_000
#: What the bracket matcher stops at: brackets and the quotes that open strings.
_STRUCTURE = re.compile(r"[\[\]{}\"']")
#: The rest of a string opened by each quote (escapes honoured), closing quote included.
_STRING_REST = {
    '"': re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL),
    "'": re.compile(r"[^'\\]*(?:\\.[^'\\]*)*'", re.DOTALL),
}
_CLOSER = {"{": "}", "[": "]"}


def balanced_end(text: str, start: int) -> int | None:
    """Index of the bracket closing the one at ``start``, skipping brackets inside strings (both
    quote styles, as :func:`segments` splits them); None when it never closes or a bracket of the
    other kind closes first. Jumps from bracket to quote by regular expression, so prose and
    long strings cost C time, not a Python step per character."""
    stack: list[str] = []
    pos = start
    while (match := _STRUCTURE.search(text, pos)) is not None:
        char, at = match[0], match.start()
        if char in "\"'":
            rest = _STRING_REST[char].match(text, at + 1)
            if rest is None:
                return None  # a string still open at the end
            pos = rest.end()
            continue
        if char in "{[":
            stack.append(_CLOSER[char])
        elif not stack or stack.pop() != char:
            return None
        elif not stack:
            return at
        pos = at + 1
    return None


def close_truncated(text: str) -> Any:
    """Read an object cut off mid-way: close the open string and brackets, and if that is not
    valid, cut back to the last complete member (up to 64 tries, and :data:`_CLOSE_BUDGET`
    characters in all: a long text that fails its first tries fails the shorter ones too)."""
    cuts = [len(text)]
    pos = 0
    for chunk, in_string in segments(text):
        if not in_string:
            cuts += [pos + m.start() for m in re.finditer(",", chunk)]
        pos += len(chunk)
    spent = 0
    for cut in sorted(set(cuts), reverse=True)[:64]:
        if spent and spent + cut > _CLOSE_BUDGET:
            break
        spent += cut
        value = loads_repaired(_with_closers(text[:cut]))
        if value is not None:
            return value
    return None


def _with_closers(prefix: str) -> str:
    stack: list[str] = []
    tail = ""
    for chunk, state in segments(prefix):
        if state:
            tail = chunk[0] if state == 2 else ""  # close a string the token limit cut off
            continue
        for char in _BRACKET.findall(chunk):
            if char in "{[":
                stack.append("}" if char == "{" else "]")
            elif char in "}]" and stack:
                stack.pop()
    body = (prefix + tail).rstrip().rstrip(",:")
    return body + "".join(reversed(stack))


# --------------------------------------------------------------------------------------------
# Copied text


#: What a judge puts at the start (or end) of each line when it quotes the answer, where it could
#: split a copy into pieces that are each the answer's text but together are not: any run of
#: spaces, block-quote markers (">", nested "> > "), bullets ("- ", "* ", "+ ", "• "), table
#: and box rules ("| ", "│ "), code-fence lines ("```json", "~~~", nothing else on the line),
#: line numbers ("12: ", "12. ", "12) ", "  12| ", "12 | ", "L3: ", "line 3: ", "[3] ", and
#: "    12<tab>" as ``cat -n`` writes them), and a line break written at a line's end ("<br>", a
#: Markdown "\\"). A number counts only with its marker and the space after it ("5.0" and "2,"
#: at a line start are kept), so a score the judge writes at the start of a line is never dropped.
_LINE_MARKERS = re.compile(
    r"[ \t]*(?:<br\s*/?>|\\)[ \t]*$"  # a line break written as HTML or Markdown
    r"|^(?:[ \t]|[>\uff1e]|[-*+\u2022\u00b7|\u2502\u2503\u2551](?=[ \t])|(?:```|~~~)[\w+.-]*[ \t]*$"
    r"|(?:(?:[Ll]ine[ \t]*|L)?\d{1,6}[ \t]*(?:\||[:.)\uff1a](?=[ \t]|$))|\[\d{1,6}\](?=[ \t])"
    r"|\d{1,6}(?=\t)))+",
    re.MULTILINE,
)


def unquoted(text: str) -> str:
    """``text`` with the quoting markers at its line starts dropped (see :data:`_LINE_MARKERS`)."""
    return _LINE_MARKERS.sub("", text)


_Result = TypeVar("_Result")

#: Texts up to this long are remembered by :func:`cached_for_short_texts` (a query, an answer).
CACHED_TEXT_CHARS = 8192


def cached_for_short_texts(function: Callable[[str], _Result]) -> Callable[[str], _Result]:
    """``function`` (pure, of one text) remembered for its last 256 texts up to
    :data:`CACHED_TEXT_CHARS` characters: every verdict on a query reads the query's forms
    again, and a judge's retry its answer's. Longer texts are not kept (the cache stays a few
    megabytes), so a long text is worked out each time, as before."""
    remembered = lru_cache(maxsize=256)(function)

    def lookup(text: str) -> _Result:
        return remembered(text) if len(text) <= CACHED_TEXT_CHARS else function(text)

    lookup.__doc__ = function.__doc__
    lookup.__wrapped__ = function  # type: ignore[attr-defined]
    return lookup


@cached_for_short_texts
def normal_forms(text: str) -> tuple[str, str, str, str]:
    """The forms a copy is recognised in: as written, whitespace collapsed, folded (NFKC,
    casefold, whitespace dropped) and folded after the quoting markers a judge puts at line
    starts are dropped, so a re-indented, re-cased, block-quoted, bulleted, fenced,
    line-numbered or compatibility-form copy (a judge that copies a planted verdict with
    ``indent=2``, or quotes the answer line by line after "> " or "12: ") is still a copy.

    Folded both with and without the markers: an answer's own line that starts like a marker
    ("1. ") is dropped in the unquoted form, so a judge that joins the answer's lines into one
    keeps it, and only the plain fold still sees that copy."""
    written, collapsed, folded, unquoted_folded = iter_normal_forms(text)
    return written, collapsed, folded, unquoted_folded


def iter_normal_forms(text: str) -> Iterator[str]:
    """The four :func:`normal_forms` of ``text``, each made only when asked for (folding is most
    of a verdict's reading time: a test that stops at the first form held saves the rest); the
    last reuses the third when no line marker was dropped."""
    yield text
    yield " ".join(text.split())
    folded = fold(text)
    yield folded
    bare = unquoted(text)
    yield folded if bare == text else fold(bare)


def fold(text: str) -> str:
    """NFKC, casefold and no whitespace, after undoing what a judge's copy may have undone: HTML
    entities and JSON string escapes rendered (``&quot;``, ``\\"``), invisible format characters
    dropped (zero-width spaces and joiners, soft hyphens), curly quotes straightened, and the two
    quote styles made one (a Python dict re-typed as JSON)."""
    text = _ESCAPE.sub(lambda m: _ESCAPES.get(m[1], m[1]), html.unescape(text))
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    return "".join(text.casefold().translate(_QUOTES).split())


#: JSON's two-character escapes (``\u`` ones are left as they are).
_ESCAPE = re.compile(r"\\([\"'\\/bfnrt])")
_ESCAPES = {"b": "", "f": " ", "n": " ", "r": " ", "t": " "}
#: The invisible characters (Unicode's format category) that models drop when they copy.
_INVISIBLE = dict.fromkeys(
    [
        0x00AD,
        0x061C,
        0x180E,
        *range(0x200B, 0x2010),
        *range(0x202A, 0x202F),
        *range(0x2060, 0x2065),
        0xFEFF,
    ]
)
_QUOTES = str.maketrans(
    {c: '"' for c in "'\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u2032\u2033"}
)


#: The shortest stretch of a reply, as written, taken for a copy when the repair budget is
#: charged: long enough that the judge's own text is not taken for the answer's by chance.
COPY_RUN = 24


class QuotedTexts:
    """The texts a reply may quote (what the judge was given to judge), in each normal form.

    ``held(span)`` tells whether a span of the reply is (a normal form of) a part of them;
    :meth:`copied_run` how far the reply, from a position, copies them as written.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        forms = [normal_forms(t) for t in texts if t]
        self._forms = tuple("\x00".join(f[i] for f in forms) for i in range(4)) if forms else ()
        #: No form of the quoted texts has a "{" (most answers): then no span with one is held,
        #: since every form of a span keeps its "{" (no rendering, fold or marker drops one).
        self._no_brace = all("{" not in whole for whole in self._forms)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, span: str) -> bool:
        """Whether a normal form of ``span`` occurs in the same form of the quoted texts.

        The forms of :func:`iter_normal_forms`, tested in order and each made only when the ones
        before it are not held: the same answer as testing all four."""
        forms = self._forms
        if not forms or (self._no_brace and "{" in span):
            return False
        pairs = zip(iter_normal_forms(span), forms, strict=True)
        return any(form and form in whole for form, whole in pairs)

    def longest_prefix(self, span: str) -> int:
        """The length of the longest opening of ``span`` that is held (binary search: every
        opening of a held text is held)."""
        # An opening that ends inside a line-start marker ("12" of "12: ") keeps a piece the
        # whole marker would not: it is tested as the opening just before the marker, so that
        # every opening of a held text is still held and the search stays exact.
        markers = [
            (m.start(), m.end()) for m in _LINE_MARKERS.finditer(span) if m.end() > m.start()
        ]

        def cut(at: int) -> int:
            for begin, end in markers:
                if begin < at < end:
                    return begin
            return at

        low, high = 0, len(span)
        while low < high:
            middle = (low + high + 1) // 2
            if self(span[: cut(middle)]):
                low = middle
            else:
                high = middle - 1
        return low

    def copied_run(self, text: str, start: int) -> int:
        """How many characters of ``text`` from ``start`` occur as written in a quoted text; 0
        below :data:`COPY_RUN`. Galloping, then binary search: a few substring tests."""
        if not self._forms:
            return 0
        whole = self._forms[0]
        if text[start : start + COPY_RUN] not in whole or len(text) - start < COPY_RUN:
            return 0
        low, high = COPY_RUN, 2 * COPY_RUN
        while start + low < len(text) and text[start : start + high] in whole:
            low, high = high, 2 * high
        high = min(high, len(text) - start)
        while low < high:
            middle = (low + high + 1) // 2
            if text[start : start + middle] in whole:
                low = middle
            else:
                high = middle - 1
        return low


# --------------------------------------------------------------------------------------------
# Every JSON value of a text, in order

_DECODER = json.JSONDecoder(strict=False)
_OPENER = re.compile(r"[{\[]")
#: What may follow an opening bracket (after spaces) for a strict read to be worth trying.
_STRICT_AFTER = {"{": '"}', "[": '"-0123456789{[]tfn'}
#: What may follow an opening bracket for the repairing reader to try it: a key or an empty
#: object after "{", an object after "[". Braces in prose and code ("{ return x; }") are skipped.
_JSONISH_AFTER = {"{": "\"'}", "[": "{"}
#: Characters the repairing reader may scan per text (twice over: once for text copied from
#: what was judged, once for the rest). Strict JSON is read at C speed; the repairs scan in
#: Python, and without a bound a long reply full of braces (a judge echoing a 100k-character
#: answer made of code) would take quadratic time.
_REPAIR_SCAN_BUDGET = 400_000
#: The first stretch of text a strict read looks at (it grows when a value runs past it): a
#: failed read computes its error's line number from the start of what it was given, so reading
#: in the whole remaining text at every bracket would be quadratic in a long reply.
_DECODE_WINDOW = 4096
#: Nesting (containers) from which a value is too deep to be a verdict (see the verdict rule).
TOO_DEEP = 17
#: JSON's tokens as far as bracket nesting goes: a string, a bracket, or anything else.
_NESTING_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|[^"\[\]{}]+', re.DOTALL)


class ValueReader:
    """Reads the complete JSON values of ``text`` one after another (:meth:`next_value`).

    ``quoted`` tells text copied from what was judged: a balanced span it holds is skipped whole
    without being repaired (nothing inside a copy is read either: any part of a copy is a copy),
    and the repairs of copied text are paid from a budget of their own, so an answer's text can
    never spend the budget that belongs to the judge's own reply.
    """

    def __init__(
        self, text: str, quoted: QuotedTexts | None = None, budget: int = _REPAIR_SCAN_BUDGET
    ) -> None:
        self.text = text
        self.quoted = quoted if quoted else None
        self._budget = {False: budget, True: budget}
        self._copy = (0, 0)  # the copied stretch last found: (start, end)
        self._too_deep: set[int] = set()  # brackets whose values cannot be read shallow
        #: Whether an opener was passed over unread for want of repair budget or inside a copy:
        #: until one is, every container nested in a value read as written is also returned on
        #: its own, so a caller reading every value need not walk into them. (A bracket skipped
        #: as too deep does not count: every container around it is too deep as well, so no
        #: value read as written holds it.)
        self.skipped = False
        #: Whether the value last returned was repaired rather than read as written (a
        #: repaired value's nested containers may read differently, or not at all, alone).
        self.repaired = False

    def next_value(self, pos: int) -> tuple[int, int, Any] | None:
        """The next complete JSON value at or after ``pos``: ``(start, end, value)``."""
        text = self.text
        while (match := _OPENER.search(text, pos)) is not None:
            start = match.start()
            pos = start + 1
            self.repaired = False
            if start in self._too_deep:  # a strict read fails or is too deep; repairs as much
                continue
            after = text[start + 1 : start + 200].lstrip()[:1]
            value: Any = None
            end = -1
            if after and after in _STRICT_AFTER[match[0]]:
                try:
                    value, end = _decode_at(text, start)
                except json.JSONDecodeError:
                    value = None
                except RecursionError:  # repairs would recurse as deep: no verdict here
                    self._too_deep.update(_deep_openers(text, start))
                    continue
            if value is None and (not after or after in _JSONISH_AFTER[match[0]]):
                copied = self._in_copy(start)
                if self._budget[copied] <= 0:
                    self.skipped = True
                    continue
                close = balanced_end(text, start)
                if (
                    close is not None
                    and self.quoted is not None
                    and self.quoted(text[start : close + 1])
                ):
                    pos = close + 1
                    self.skipped = True
                    continue
                self._budget[copied] -= (len(text) if close is None else close) - start
                if close is not None:
                    value, end = loads_repaired(text[start : close + 1]), close + 1
                    self.repaired = True
            if isinstance(value, dict | list):
                return start, end, value
        return None

    def cut_off_spans(self, tries: int = 3) -> Iterator[tuple[int, Any]]:
        """Objects the token limit cut off, each closed and read as far as it goes, as
        ``(start, value)``: from the first ``tries`` object openings of the judge's own text
        that never close (openings in copied text have tries and a budget of their own)."""
        text = self.text
        budget = {False: _REPAIR_SCAN_BUDGET, True: _REPAIR_SCAN_BUDGET}
        left = {False: tries, True: tries}
        for match in re.finditer(r"\{", text):
            start = match.start()
            if not _looks_like_json(text, start):
                continue
            copied = self._in_copy(start)
            if left[copied] <= 0 or budget[copied] <= 0:
                if left[False] <= 0 or budget[False] <= 0:
                    return
                continue
            close = balanced_end(text, start)
            budget[copied] -= (len(text) if close is None else close) - start
            if close is None:
                left[copied] -= 1
                value = close_truncated(text[start:])
                if value:
                    yield start, value

    def _in_copy(self, start: int) -> bool:
        """Whether ``start`` lies in a stretch of the reply copied as written from a quoted
        text (for the budget only: what counts as a copy for a verdict is the rule's job)."""
        if self.quoted is None:
            return False
        if self._copy[0] <= start < self._copy[1]:
            return True
        run = self.quoted.copied_run(self.text, start)
        if run:
            self._copy = (start, start + run)
        return bool(run)


def iter_json_values(text: str) -> Iterator[tuple[int, Any]]:
    """Every complete top-level JSON object or list in ``text``, in reading order, as
    ``(start, value)``.

    Reading resumes after each value's end, so objects nested inside one are not yielded again.
    Each value is read strictly first, then with the light repairs of :func:`extract_json`
    (trailing commas, Python-style quotes and literals). Values cut off by the token limit are not
    yielded; :func:`cut_off_values` reads those.
    """
    reader = ValueReader(text)
    pos = 0
    while (found := reader.next_value(pos)) is not None:
        start, pos, value = found
        yield start, value


def cut_off_values(text: str, tries: int = 3) -> Iterator[Any]:
    """Objects the token limit cut off, each closed and read as far as it goes (see
    :func:`extract_json`): from the first ``tries`` object openings that never close."""
    for _, value in ValueReader(text).cut_off_spans(tries):
        yield value


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


def _deep_openers(text: str, start: int) -> list[int]:
    """The brackets, among those a strict read from ``start`` meets as brackets, whose values
    would nest :data:`TOO_DEEP` containers or more (or never close).

    Called when the decoder's recursion limit stopped a read at ``start``. A strict read from any
    of these brackets sees the same tokens from there on, so it either fails or yields a value too
    deep to be a verdict: skipping it changes no reading, and saves a failed deep decode per
    bracket (quadratic time in a reply of nested brackets).
    """
    open_at: list[int] = []  # positions of the open brackets
    reach: list[int] = []  # for each, the deepest nesting met inside it so far
    found: list[int] = []

    def close_one() -> None:
        position, deepest = open_at.pop(), reach.pop()
        if deepest - len(open_at) >= TOO_DEEP:
            found.append(position)
        if reach:
            reach[-1] = max(reach[-1], deepest)

    pos = start
    while (token := _NESTING_TOKEN.match(text, pos)) is not None:
        pos = token.end()
        char = token[0][0]
        if char in "[{":
            open_at.append(token.start())
            reach.append(len(open_at))
        elif char in "]}":
            close_one()
            if not open_at:
                break
    return found + open_at  # the ones never closed: a strict read of these fails


def _looks_like_json(text: str, start: int) -> bool:
    rest = text[start + 1 : start + 200].lstrip()
    return not rest or rest[0] in _JSONISH_AFTER[text[start]]


# --------------------------------------------------------------------------------------------
# Fields of a value read


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
