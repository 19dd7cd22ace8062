"""Issue 18 made the verdict reader cheaper (a judge reply's reading was a fifth of a search
call's CPU); these properties hold it to reading exactly what it read before.

* ``QuotedTexts(texts)(span)`` makes a span's normal forms only as needed; it must answer what
  testing all four forms of :func:`normal_forms` answers, for spans cut from the quoted texts and
  re-formatted the way judges quote (markers, renderings) as well as unrelated text.
* ``parse_judgement`` must give the same scores, drops and missing aspects (or the same error) as
  the reader at :data:`BEFORE` (the commit before these changes, loaded from git) for the hostile
  replies of ``test_hostile_answers_properties``: quoted slices of answers holding planted
  verdicts, around an honest verdict.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.parsing import ParseError, QuotedTexts, normal_forms, parse_judgement
from tests.test_attack_corpus import load_parsing_at
from tests.test_hostile_answers_properties import ANSWERS, honest_text, quote, quoting

#: The reader before issue 18's second round (today's results must equal its results).
BEFORE = "773c9a8"
CATALOGUE = AspectCatalogue.load_default()
QUERY = "How do tides work?"
SELECTED = ("Helpfulness", "Clarity", "Factuality")


def held_by_every_form(texts: tuple[str, ...], span: str) -> bool:
    """The test as it was: every normal form of ``span`` made, each looked up in its own form."""
    forms = [normal_forms(t) for t in texts if t]
    if not forms:
        return False
    wholes = ["\x00".join(f[i] for f in forms) for i in range(4)]
    return any(
        form and form in whole for form, whole in zip(normal_forms(span), wholes, strict=True)
    )


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    answer=ANSWERS,
    cut=st.tuples(st.integers(0, 300), st.integers(0, 300)),
    how=quoting(),
    noise=st.text(max_size=12),
    mode=st.sampled_from(["slice", "quoted slice", "slice plus noise", "noise"]),
)
def test_a_span_is_held_exactly_when_one_of_its_forms_is(
    answer: str, cut: tuple[int, int], how: tuple[str, int, bool, bool], noise: str, mode: str
) -> None:
    texts = (QUERY, answer)
    piece = answer[min(cut) : max(cut)]
    span = {
        "slice": piece,
        "quoted slice": quote(piece, how),
        "slice plus noise": piece + noise,
        "noise": noise,
    }[mode]
    held = QuotedTexts(texts)
    assert held(span) == held_by_every_form(texts, span)
    for length in range(0, len(span) + 1, max(1, len(span) // 8)):
        assert held(span[:length]) == held_by_every_form(texts, span[:length])


@pytest.fixture(scope="module")
def reader_before() -> Any:
    return load_parsing_at(BEFORE)


def outcome(
    parse: Any, parse_error: type[Exception], reply: str, answer: str, lenient: bool
) -> Any:
    try:
        parsed = parse(
            reply,
            SELECTED,
            CATALOGUE,
            lenient_scores=lenient,
            partial=lenient,
            quoted=(QUERY, answer),
        )
    except parse_error as error:
        return ("unreadable", str(error))
    scores = {name: (s.score, s.rationale) for name, s in parsed.scores.items()}
    return (scores, tuple(parsed.dropped), tuple(parsed.missing))


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    answer=ANSWERS,
    cut=st.tuples(
        st.integers(0, 400), st.integers(0, 400), st.integers(0, 400), st.integers(0, 400)
    ),
    where=st.sampled_from(["before", "after", "both"]),
    how=quoting(),
    shape=st.sampled_from(["paper", "bare", "commas"]),
    lenient=st.booleans(),
)
def test_the_reader_reads_what_it_read_before(
    reader_before: Any,
    answer: str,
    cut: tuple[int, int, int, int],
    where: str,
    how: tuple[str, int, bool, bool],
    shape: str,
    lenient: bool,
) -> None:
    a, b, c, d = cut
    before = answer[min(a, b) : max(a, b)] if where in ("before", "both") else ""
    after = answer[min(c, d) : max(c, d)] if where in ("after", "both") else ""
    reply = f"{quote(before, how)}\n{honest_text(shape)}\n{quote(after, how)}"
    today = outcome(parse_judgement, ParseError, reply, answer, lenient)
    then = outcome(reader_before.parse_judgement, reader_before.ParseError, reply, answer, lenient)
    assert today == then, reply


def test_the_lookup_keys_are_every_name_and_alias_looked_up() -> None:
    from drpo.agents.aspects import normalize_name

    custom = CATALOGUE.with_custom(
        [
            {
                "name": "Wit",
                "aliases": ["Humour", "humor"],
                "description": "d",
                "rubric": {str(s): f"level {s}" for s in range(1, 6)},
            }
        ]
    )
    for catalogue in (CATALOGUE, custom):
        names = {normalize_name(n) for a in catalogue for n in (a.name, *a.aliases)}
        assert catalogue.lookup_keys == names


def test_a_span_with_a_brace_is_held_only_where_a_form_of_the_texts_has_one() -> None:
    """The shortcut: quoted texts with no "{" in any form hold no span with one; a brace the
    fold makes (a full-width one, an entity) still counts."""
    assert not QuotedTexts(("a plain answer",))('{"a plain answer": 1}')
    for answer in ('see \uff5b"x": 1\uff5d', 'see &#123;"x": 1}', 'see &lbrace;"x": 1}'):
        assert QuotedTexts((answer,))('{"x": 1}') == held_by_every_form((answer,), '{"x": 1}')
    assert QuotedTexts(('see \uff5b"x": 1\uff5d',))('{"x": 1}')
