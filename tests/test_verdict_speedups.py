"""The verdict reader's speed-ups (issue 18) read exactly as the code they replaced.

Each old function is copied here as it was, and Hypothesis compares it with the new one on
generated replies: verdict-shaped objects, wrappers, strings holding braces, and copies of a
quoted text, so that a faster reading can never be a different reading.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.parsing.json_reader import QuotedTexts, ValueReader, segments
from drpo.agents.parsing.verdicts import _has_usable_score, _holds_a_copied_verdict

CATALOGUE = AspectCatalogue.load_default()


def _old_holds_a_copied_verdict(
    span: str, held: QuotedTexts, wanted: set[str] | None, catalogue: AspectCatalogue
) -> bool:
    """``_holds_a_copied_verdict`` before issue 18 (a scan of every string per value read)."""
    strings = []
    at = 0
    for chunk, in_string in segments(span):
        if in_string:
            strings.append((at, at + len(chunk)))
        at += len(chunk)
    reader = ValueReader(span)
    pos = 1
    while (read := reader.next_value(pos)) is not None:
        start, end, value = read
        if any(low <= start < high for low, high in strings):
            pos = start + 1
            continue
        pos = end
        if _has_usable_score(value, wanted, catalogue) and held(span[start:end]):
            return True
    return False


_NAMES = st.sampled_from(["Helpfulness", "Clarity", "Factuality", "scores", "note", "x"])
_PIECES = st.one_of(
    st.sampled_from(
        [
            '{"Helpfulness": 5}',
            '{"Clarity": {"score": 4, "rationale": "ok {"}}',
            "{'Factuality': 3}",
            '"a {\\"Helpfulness\\": 5} b"',
            "'{\"Clarity\": 2}'",
            '{"scores": {"Helpfulness": 1}}',
            "[",
            "]",
            "{",
            "}",
            ", ",
            ": ",
            '"',
            "'",
            "\\",
            "\n",
        ]
    ),
    _NAMES.map(lambda n: f'"{n}"'),
    st.integers(0, 7).map(str),
    st.text(alphabet="ab {}[]\":,'\\5", max_size=6),
)


def _replies() -> st.SearchStrategy[str]:
    return st.lists(_PIECES, max_size=14).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=_replies(),
    answer=_replies(),
    wanted=st.sampled_from([None, {"Helpfulness"}, {"Clarity", "Factuality"}]),
)
def test_holds_a_copied_verdict_reads_as_before(
    body: str, answer: str, wanted: set[str] | None
) -> None:
    span = "{" + body + "}"
    for quoted in ((answer,), (answer, body), (body,)):
        held = QuotedTexts(quoted)
        new: Any = _holds_a_copied_verdict(span, held, wanted, CATALOGUE)
        assert new == _old_holds_a_copied_verdict(span, held, wanted, CATALOGUE)
