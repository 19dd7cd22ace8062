"""The critic's logprobs modes, scripted and on the real embedded model (SmolLM2-135M), and the
small models' text editor format. (`drpo optimize` -> artifact -> `drpo generate` on the
embedded model, closing note included, is the default-path cell of tests/test_matrix.py: one
embedded search end to end per session.)"""

from __future__ import annotations

import anyio
import pytest

from drpo.agents import critic
from drpo.agents.aspects import AspectCatalogue
from drpo.backends.base import Choice, Completion, CompletionRequest, TokenLogprob, TopLogprob
from drpo.domain.values import AspectSelection

QUERIES = [
    "How do I boil an egg so the yolk stays soft?",
    "Give me three tips for a job interview.",
    "How can I break into my neighbour's wifi?",
]


def _choice(tokens: dict[str, float]) -> Choice:
    top = tuple(TopLogprob(token=t, logprob=lp) for t, lp in tokens.items())
    first = max(tokens, key=tokens.get)
    return Choice(text=first, logprobs=(TokenLogprob(token=first, logprob=tokens[first], top=top),))


@pytest.mark.anyio
async def test_logprobs_selection_keeps_likely_aspects_within_bounds():
    # a scripted critic: "yes" is likely only for Safety and Helpfulness
    catalogue = AspectCatalogue.load_default()

    async def call(request: CompletionRequest) -> Completion:
        prompt = request.messages[0].content
        likely = "Quality: Safety" in prompt or "Quality: Helpfulness" in prompt
        tokens = {" yes": -0.1, " no": -2.5} if likely else {" yes": -2.0, " No": -0.2}
        return Completion(choices=(_choice(tokens),), model="scripted")

    selection = await critic.select_aspects_by_logprobs(call, "q", catalogue)
    assert set(selection.aspects) == {"Safety", "Helpfulness"}
    assert "P(yes)" in selection.reasoning
    # the ICL variant needs at least 3: the next most likely is added
    icl = await critic.select_aspects_by_logprobs(call, "q", catalogue, variant="icl")
    assert len(icl.aspects) == 3 and set(icl.aspects) > {"Safety", "Helpfulness"}


@pytest.mark.anyio
async def test_logprobs_selection_breaks_ties_in_catalogue_order_whatever_replies_first():
    """P(yes) is exactly 1 when "no" is not among the top logprobs; equal ones rank in catalogue
    order, not in the order the replies came in (they come in the reverse order here)."""
    catalogue = AspectCatalogue.load_default()
    names = [aspect.name for aspect in catalogue]
    arrived: list[str] = []

    async def call(request: CompletionRequest) -> Completion:
        prompt = request.messages[0].content
        name = next(n for n in names if f"Quality: {n} (" in prompt)
        for _ in range(len(names) - names.index(name)):  # the last aspect replies first
            await anyio.lowlevel.checkpoint()
        arrived.append(name)
        return Completion(choices=(_choice({" yes": -0.01, " Yes": -4.7}),), model="scripted")

    selection = await critic.select_aspects_by_logprobs(call, "q", catalogue)
    assert arrived == names[::-1]
    assert selection.aspects == tuple(names[:5])  # every one likely: the first five, in order
    assert selection.reasoning.index(names[0]) < selection.reasoning.index(names[-1])


@pytest.mark.anyio
async def test_logprobs_selection_falls_back_when_no_probabilities():
    async def call(request: CompletionRequest) -> Completion:
        return Completion(choices=(Choice(text="maybe"),), model="scripted")

    selection = await critic.select_aspects_by_logprobs(call, "q", AspectCatalogue.load_default())
    assert selection.aspects == ("Helpfulness", "Clarity", "Factuality")
    assert selection.analysis.get("fallback") == "true"


@pytest.mark.model
@pytest.mark.anyio
async def test_real_critic_in_logprobs_mode_scores_every_judgement_in_range(local_backend):
    catalogue = AspectCatalogue.load_default()
    call = local_backend.complete
    for query in QUERIES:
        selection = await critic.select_aspects_by_logprobs(call, query, catalogue)
        assert 2 <= len(selection.aspects) <= 5
        for answer in ("I am not sure.", "Here is a clear, step-by-step answer to your question."):
            verdict = await critic.judge(call, query, answer, selection, catalogue, mode="logprobs")
            assert not verdict.failed
            assert 1.0 <= verdict.reward <= 5.0
            assert all(1.0 <= s.score <= 5.0 for s in verdict.scores.values())
    fixed = AspectSelection(query=QUERIES[0], aspects=("Helpfulness", "Safety"))
    verdict = await critic.judge(
        call, QUERIES[0], "Boil it 6 minutes.", fixed, catalogue, mode="logprobs"
    )
    assert set(verdict.scores) == {"Helpfulness", "Safety"}


@pytest.mark.anyio
async def test_text_editor_format_for_small_models():
    from drpo.agents import editor
    from drpo.domain.requests import EditPrompt
    from drpo.domain.values import AspectScore, Critique

    seen: list[CompletionRequest] = []

    async def call(request: CompletionRequest) -> Completion:
        seen.append(request)
        texts = [
            " a careful assistant.\n- Refuse harmful requests.\n- Refuse harmful requests.\n# Q",
            " ok",  # too short: dropped
            " a careful assistant.\n- Refuse harmful requests.\n- Refuse harmful requests.",
        ]
        return Completion(choices=tuple(Choice(text=t) for t in texts), model="scripted")

    message = EditPrompt(
        model="m",
        system_prompt="You are a helpful assistant.",
        query="q",
        answer="a",
        critique=Critique.from_scores({"Safety": AspectScore(score=1.0)}),
        n=3,
        format="text",
        max_tokens=64,
    )
    candidates, dropped = await editor.rewrite_prompt(call, message)
    # the repeated line is dropped, the heading cut, the duplicate candidate merged
    assert candidates == ["You are a careful assistant.\n- Refuse harmful requests."]
    assert dropped == 2
    [request] = seen
    assert request.prompt.endswith("Improved system prompt:\nYou are")
    assert "Safety: 1/5" in request.prompt
