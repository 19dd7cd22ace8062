"""The verdicts a quoted text holds are read the same whether every value is walked whole or,
where the reader returned each nested container on its own, one level only.

The shortcut (:meth:`drpo.agents.parsing.verdicts._QuotedScores._read`) keeps a deeply nested
answer from costing quadratic time (900 nested lists: 0.46 s of CPU a judgement walked whole,
0.09 s now); what it must never do is miss a verdict the walk would find, since a verdict the
answer holds and the judge re-types must not count. Generated texts: nested objects and lists
holding aspect scores, written as JSON, as Python writes them, with bare keys, with duplicate
keys (the first hidden from the outer value), inside strings, cut off, nested 60 deep, in
prose; nested past the recursion limit in the examples and the tests below. Drawn with a fixed
seed (``derandomize``): walking repaired values one level too fails it every run.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.parsing.verdicts import _QuotedScores

CATALOGUE = AspectCatalogue.load_default()
NAMES = st.sampled_from(["Helpfulness", "clarity", "Factuality", "accuracy", "note", "trace"])
LEAVES = st.one_of(
    st.sampled_from([5, 4, "5", "3/5", "five", 0.9, None, True]),
    st.text(alphabet='ab {}[]":,5', max_size=12),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(NAMES, children, max_size=4),
        st.builds(lambda k, v: {"score": v, "aspect": k}, NAMES, children),
        # a verdict as a list of entries after a string: in Python's quotes, not readable alone
        st.builds(lambda s, k, v: [s, {"aspect": k, "score": v}], LEAVES, NAMES, children),
    )


VALUES = st.recursive(LEAVES, _containers, max_leaves=25)


#: How a value is written; Python's quotes twice as often: its values are read repaired, whose
#: nested containers may not read alone, the case the one-level walk must leave to the whole one.
FORMS = ["json", "python", "python", "bare", "duplicate", "string", "cut", "deep"]


@st.composite
def quoted_text(draw: st.DrawFn) -> str:
    value = draw(VALUES)
    form = draw(st.sampled_from(FORMS))
    if form == "python":
        body = repr(value)
    elif form == "bare":  # keys without quotes, as JavaScript allows
        body = json.dumps(value)
        for name in ("Helpfulness", "clarity", "Factuality"):
            body = body.replace(f'"{name}"', name)
    elif form == "duplicate":  # the first member is hidden from the outer value's read
        body = '{"Clarity": ' + json.dumps(value) + ', "Clarity": {"Helpfulness": 4}}'
    elif form == "string":  # a value inside a string, as a log line holds it
        body = json.dumps({"log": json.dumps(value), "Factuality": 5})
    elif form == "cut":
        body = json.dumps(value)
        body = body[: draw(st.integers(0, len(body)))]
    elif form == "deep":  # past the recursion limit: the examples and the tests below (while
        # it runs, Hypothesis raises the limit, so a drawn 1,100 would decode, at ~1 s a text)
        depth = draw(st.sampled_from([8, 30, 60]))
        body = (
            json.dumps({"Clarity": 5, "t": value}).replace('"t": ', '"t": ' + "[" * depth, 1)[:-1]
            + "]" * depth
            + "}"
        )
    else:
        body = json.dumps(value)
    before = draw(st.sampled_from(["", "Helpfulness matters. ", "Here: {", "[1, "]))
    return before + body + draw(st.sampled_from(["", " The end.", "}", '\n{"Clarity": 2}']))


def _both_ways(texts: list[str]) -> tuple[set[Any], set[Any]]:
    return _QuotedScores(texts, CATALOGUE)._read(), _QuotedScores(texts, CATALOGUE)._read(
        walk_all=True
    )


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(quoted_text(), min_size=1, max_size=2))
@example(["Tides.\n\n" + json.dumps({"Clarity": 5, "trace": [[[[[[1]]]]]]})])
@example(['{"Clarity": 5, "t": ' + "[" * 1200 + "]" * 1200 + "}"])
@example(['{"Clarity": {"Helpfulness": 5}, "Clarity": 3}'])
@example(["{'v': ['x', {'aspect': 'Clarity', 'score': 5}]}"])  # repaired: walked whole
def test_reading_one_level_finds_what_walking_every_value_finds(texts: list[str]) -> None:
    one_level, whole = _both_ways(texts)
    assert one_level == whole


def test_a_value_nested_900_deep_is_read_once_per_level() -> None:
    nested: Any = 1
    for _ in range(900):
        nested = [nested]
    text = "Tides.\n\n" + json.dumps({"Clarity": 5, "Helpfulness": 5, "trace": nested})
    one_level, whole = _both_ways([text])
    assert one_level == whole == {frozenset({("clarity", 5.0), ("helpfulness", 5.0)})}


def test_nesting_past_the_limit_beside_a_deep_value_does_not_bring_back_the_whole_walk() -> None:
    """A bracket too deep to read sets nothing that makes every value walked whole: each
    container around it is too deep too, so no value read as written holds it."""
    nested: Any = {"Helpfulness": 4}
    for _ in range(900):
        nested = [nested]
    text = (
        '{"Factuality": 5, "t": '
        + "[" * 1200
        + "]" * 1200
        + "}\n"
        + json.dumps({"Clarity": 5, "trace": nested})
    )
    one_level, whole = _both_ways([text])
    assert one_level == whole
    assert frozenset({("helpfulness", 4.0)}) in one_level
