"""The aspect catalogue: the shipped data, tolerant lookup, custom aspects and the version hash."""

from __future__ import annotations

import pytest

from drpo.agents.aspects import Aspect, AspectCatalogue, AspectError, normalize_name
from drpo.agents.prompts import judge_template, rubric_block, selection_prompt

PAPER_ASPECTS = (
    "Helpfulness",
    "Clarity",
    "Factuality",
    "Depth",
    "Engagement",
    "Conciseness",
    "Safety",
    "Compliance",
    "Limitations",
    "Critical-Thinking",
    "Creativity",
    "Interactivity",
    "Empathy",
    "Sensitivity",
)

CUSTOM = {
    "name": "Humor",
    "should": "be funny where the user wants fun",
    "rubric": {"1": "grim", "2": "flat", "3": "mild", "4": "funny", "5": "delightful"},
}


def test_the_default_catalogue_has_the_papers_fourteen_aspects_in_order() -> None:
    catalogue = AspectCatalogue.load_default()
    assert catalogue.names == PAPER_ASPECTS
    for aspect in catalogue:
        assert [score for score, _ in aspect.rubric] == [1, 2, 3, 4, 5]
        assert all(text for _, text in aspect.rubric)
        assert aspect.should and not aspect.should.endswith(".")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("Clarity", "Clarity"),
        ("clarity", "Clarity"),
        ("  CLARITY ", "Clarity"),
        ("**Clarity**", "Clarity"),
        ("Critical Thinking", "Critical-Thinking"),
        ("critical_thinking", "Critical-Thinking"),
        # the ICL-stage vocabulary of the original code (spec §2.1)
        ("Compliance with Instructions", "Compliance"),
        ("Acknowledgement of Limitations", "Limitations"),
        ("Cultural Sensitivity", "Sensitivity"),
        ("accuracy", "Factuality"),
    ],
)
def test_resolve_is_tolerant_to_case_spacing_and_aliases(name: str, canonical: str) -> None:
    aspect = AspectCatalogue.load_default().resolve(name)
    assert aspect is not None and aspect.name == canonical


@pytest.mark.parametrize("name", ["Humor", "", "   ", "Clarity and Depth"])
def test_resolve_returns_none_for_unknown_names(name: str) -> None:
    catalogue = AspectCatalogue.load_default()
    assert catalogue.resolve(name) is None
    assert name not in catalogue
    with pytest.raises(KeyError):
        catalogue[name]


def test_version_is_a_stable_content_hash() -> None:
    a = AspectCatalogue.load_default()
    b = AspectCatalogue.from_dicts(a.to_dicts())
    assert a.version == b.version and len(a.version) == 16
    changed = a.to_dicts()
    changed[0]["rubric"]["5"] = "something else"
    assert AspectCatalogue.from_dicts(changed).version != a.version
    reordered = a.to_dicts()[::-1]
    assert AspectCatalogue.from_dicts(reordered).version != a.version


def test_with_custom_adds_an_aspect_and_changes_the_version() -> None:
    base = AspectCatalogue.load_default()
    extended = base.with_custom([CUSTOM])
    assert extended.names == (*PAPER_ASPECTS, "Humor")
    assert extended.resolve("humor").rubric[4] == (5, "delightful")
    assert extended.version != base.version
    assert base.resolve("Humor") is None  # the original is untouched


def test_with_custom_replaces_an_existing_aspect_in_place() -> None:
    base = AspectCatalogue.load_default()
    override = {**CUSTOM, "name": "cultural sensitivity", "should": "respect everyone"}
    replaced = base.with_custom([override])
    assert replaced.names == PAPER_ASPECTS
    sensitivity = replaced["Sensitivity"]
    assert sensitivity.should == "respect everyone"
    assert replaced.resolve("Cultural Sensitivity") is sensitivity


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({**CUSTOM, "name": ""}, "'name'"),
        ({**CUSTOM, "should": ""}, "'should'"),
        ({**CUSTOM, "rubric": "funny is good"}, "'rubric'"),
        ({**CUSTOM, "rubric": {"1": "a", "2": "b", "3": "c", "4": "d"}}, r"missing \[5\]"),
        ({**CUSTOM, "rubric": {**CUSTOM["rubric"], "6": "x"}}, "'rubric'"),
        ({**CUSTOM, "rubric": {**CUSTOM["rubric"], "high": "x"}}, "'high'"),
        ({**CUSTOM, "aliases": "Funny"}, "'aliases'"),
    ],
)
def test_invalid_custom_aspects_are_rejected_with_a_reason(bad: dict, message: str) -> None:
    with pytest.raises(AspectError, match=message):
        AspectCatalogue.load_default().with_custom([bad])


def test_an_alias_may_not_name_another_aspect() -> None:
    with pytest.raises(AspectError, match="already names"):
        AspectCatalogue.load_default().with_custom([{**CUSTOM, "aliases": ["Depth"]}])
    with pytest.raises(AspectError, match="defined twice"):
        AspectCatalogue([Aspect.from_dict(CUSTOM), Aspect.from_dict(CUSTOM)])


def test_normalize_name() -> None:
    assert normalize_name("Critical-Thinking") == normalize_name("critical thinking")
    assert normalize_name("Compliance with Instructions") == "compliancewithinstructions"


def test_prompts_show_every_aspect_and_every_rubric_level() -> None:
    catalogue = AspectCatalogue.load_default()
    selection = selection_prompt("How do tides work?", catalogue, "search")
    assert all(f"- {name}: the answer should" in selection for name in catalogue.names)
    assert "2 to 5" in selection and "How do tides work?" in selection
    assert "3 to 6" in selection_prompt("q", catalogue, "icl")
    chosen = [catalogue["Clarity"], catalogue["Safety"]]
    rubric = rubric_block(chosen)
    assert all(f"  {score}: {text}" in rubric for a in chosen for score, text in a.rubric)
    template = judge_template(chosen)
    assert '"Clarity": {"rationale": "...", "score": <1-5>},' in template
    assert template.rstrip().endswith('"Safety": {"rationale": "...", "score": <1-5>}\n}')


@pytest.mark.parametrize(
    "name",
    ["_JUDGE_TEMPLATE", "_JUDGE_LENGTH_NOTE", "_DATA_NOTE", "_FENCED_DATA", "_PLAIN_DATA"],
)
def test_prompts_version_tracks_the_prompt_texts(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from drpo.agents import prompts

    assert len(prompts.PROMPTS_VERSION) == 16
    assert prompts._prompts_version() == prompts.PROMPTS_VERSION
    monkeypatch.setattr(prompts, name, getattr(prompts, name) + " ")
    assert prompts._prompts_version() != prompts.PROMPTS_VERSION
