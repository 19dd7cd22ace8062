"""The critic (dynamic rewarder): picks the aspects that matter for a query, then judges answers.

Faithful to the paper where it matters for the search: the same settings (T=0, seed 0, 2048
tokens), 2-5 aspects per query in the search and 3-6 for the stricter ICL-stage critic, a 1-5
score with a rationale per aspect, and the reward as the mean score, 0 for an unreadable verdict.

Where the original crashed or silently zeroed a reward on formatting noise (spec §2.2, §2.3, §9.6),
the critic instead asks once more with a reminder of the format, then degrades in a recorded way:
a selection falls back to a fixed default set, a judgement becomes ``Critique(failed=True)``.
Backend errors are not caught here; they belong to the caller.

``judge(mode="logprobs")`` is a drpo addition for models that expose token probabilities: each
aspect is scored by the expected value of the digit the judge would write, which is smoother than
a greedy integer and meaningful even for a very small local judge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import anyio

from drpo.agents.aspects import Aspect, AspectCatalogue
from drpo.agents.parsing import JudgementParse, ParseError, parse_judgement, parse_selection
from drpo.agents.prompts import (
    SELECTION_BOUNDS,
    digit_judge_prompt,
    judge_prompt,
    judge_reminder,
    relevance_prompt,
    selection_prompt,
    selection_reminder,
)
from drpo.agents.proposer import Call
from drpo.backends.base import ChatMessage, Choice, CompletionRequest
from drpo.bus.messages import AspectScore, AspectSelection, CriticMode, Critique

Variant = Literal["search", "icl"]

#: The critic's sampling settings in the original (spec §1.1): greedy, seeded, 2048 tokens.
CRITIC_SETTINGS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 2048, "seed": 0}

#: Used when the critic's selection cannot be read even after a reminder: the three aspects the
#: original's critic chose most often (spec §2.2), padded from the catalogue when more are needed.
DEFAULT_SELECTION = ("Helpfulness", "Clarity", "Factuality")

#: Keys added to ``AspectSelection.analysis`` to record what the critic had to repair.
FALLBACK_KEY = "fallback"
ERROR_KEY = "selection_error"
DROPPED_KEY = "dropped_aspects"
PADDED_KEY = "padded_aspects"


def _user(content: str) -> ChatMessage:
    return ChatMessage(role="user", content=content)


def _assistant(content: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=content)


def _critic_request(
    messages: Sequence[ChatMessage], max_tokens: int = CRITIC_SETTINGS["max_tokens"]
) -> CompletionRequest:
    return CompletionRequest(
        messages=tuple(messages), **{**CRITIC_SETTINGS, "max_tokens": max_tokens}
    )


def _retry_messages(first: Sequence[ChatMessage], reply: str, reminder: str) -> list[ChatMessage]:
    """The original conversation, the unusable reply and a reminder of the format.

    Showing the model its own reply lets it see what to fix, and makes the retry a different
    request, so the call journal does not answer it with the same cached failure.
    """
    return [*first, _assistant(reply), _user(reminder)]


# --------------------------------------------------------------------------------------------
# Aspect selection


def default_selection(catalogue: AspectCatalogue, count: int) -> tuple[str, ...]:
    """``count`` aspects: the defaults the catalogue has, then catalogue order."""
    names = [n for n in DEFAULT_SELECTION if n in catalogue]
    names += [n for n in catalogue.names if n not in names]
    return tuple(names[:count])


async def select_aspects(
    call: Call,
    query: str,
    catalogue: AspectCatalogue,
    *,
    variant: Variant = "search",
    max_tokens: int = 2048,
) -> AspectSelection:
    """The aspects an answer to ``query`` should be judged on; never raises on bad output.

    First try: the reply must name at least the variant's minimum of catalogue aspects. Retry
    (with a reminder): any catalogue aspect is kept, padded with defaults up to the minimum.
    Otherwise the default selection, marked with ``analysis["fallback"] == "true"``.
    Names outside the catalogue are dropped and listed under ``analysis["dropped_aspects"]``.
    """
    low, high = SELECTION_BOUNDS[variant]
    messages = [_user(selection_prompt(query, catalogue, variant))]
    reply = (await call(_critic_request(messages, max_tokens))).text
    dropped: list[str] = []
    try:
        parsed = parse_selection(reply, catalogue)
        dropped += parsed.dropped
        if len(parsed.aspects) < low:
            raise ParseError(f"it named {len(parsed.aspects)} known aspects, at least {low} needed")
        return _selection(query, parsed.aspects[:high], parsed.reasoning, parsed.analysis, dropped)
    except ParseError as error:
        first_error = error.reason
    retry = _retry_messages(messages, reply, selection_reminder(first_error, catalogue, variant))
    reply = (await call(_critic_request(retry, max_tokens))).text
    try:
        parsed = parse_selection(reply, catalogue)
        dropped += parsed.dropped
        if not parsed.aspects:
            raise ParseError("it named no aspect from the list")
    except ParseError as error:
        return _fallback_selection(query, catalogue, low, f"{first_error}; then {error.reason}")
    aspects = parsed.aspects[:high]
    padding = [n for n in default_selection(catalogue, len(catalogue)) if n not in aspects]
    padded = tuple(padding[: max(0, low - len(aspects))])
    analysis = dict(parsed.analysis)
    if padded:
        analysis[PADDED_KEY] = ", ".join(padded)
    return _selection(query, (*aspects, *padded), parsed.reasoning, analysis, dropped)


def _selection(
    query: str,
    aspects: Sequence[str],
    reasoning: str,
    analysis: dict[str, str],
    dropped: Sequence[str],
) -> AspectSelection:
    analysis = dict(analysis)
    if dropped:
        analysis[DROPPED_KEY] = ", ".join(dict.fromkeys(dropped))
    return AspectSelection(
        query=query, aspects=tuple(aspects), reasoning=reasoning, analysis=analysis
    )


def _fallback_selection(
    query: str, catalogue: AspectCatalogue, count: int, error: str
) -> AspectSelection:
    aspects = default_selection(catalogue, max(count, len(DEFAULT_SELECTION)))
    return AspectSelection(
        query=query,
        aspects=aspects,
        reasoning=(
            "Default aspects, used because the critic's selection could not be read: " + error
        ),
        analysis={FALLBACK_KEY: "true", ERROR_KEY: error},
    )


# --------------------------------------------------------------------------------------------
# Judging


async def judge(
    call: Call,
    query: str,
    answer: str,
    selection: AspectSelection,
    catalogue: AspectCatalogue,
    *,
    mode: CriticMode = "json",
    variant: Variant = "search",
    max_tokens: int = 2048,
) -> Critique:
    """Score ``answer`` on each selected aspect; the reward is the mean score.

    Selected names are resolved through the catalogue (aliases included); unknown ones are left
    out. A judgement with no usable score is ``Critique(failed=True)`` with reward 0, as in the
    paper. When some aspects have scores and others do not, the reward is the mean of those that
    do and ``error`` says which were missing, while ``failed`` stays False.
    """
    aspects = _resolve_selection(selection, catalogue)
    if not aspects:
        return Critique(
            failed=True,
            error=f"none of the selected aspects {list(selection.aspects)} is in the catalogue",
        )
    if mode == "json":
        return await _judge_json(
            call, query, answer, aspects, selection.reasoning, variant, catalogue, max_tokens
        )
    if mode == "logprobs":
        return await _judge_logprobs(call, query, answer, aspects, variant)
    raise ValueError(f"unknown judge mode {mode!r}: use 'json' or 'logprobs'")


def _resolve_selection(selection: AspectSelection, catalogue: AspectCatalogue) -> list[Aspect]:
    resolved: dict[str, Aspect] = {}
    for name in selection.aspects:
        aspect = catalogue.resolve(name)
        if aspect is not None:
            resolved.setdefault(aspect.name, aspect)
    return list(resolved.values())


async def _judge_json(
    call: Call,
    query: str,
    answer: str,
    aspects: Sequence[Aspect],
    reasoning: str,
    variant: Variant,
    catalogue: AspectCatalogue,
    max_tokens: int = 2048,
) -> Critique:
    names = [a.name for a in aspects]
    messages = [_user(judge_prompt(query, answer, aspects, reasoning, variant))]
    reply = (await call(_critic_request(messages, max_tokens))).text
    first, first_error = _try_judgement(reply, names, catalogue)
    if first is not None and not first.missing:
        return _critique(first)
    retry = _retry_messages(messages, reply, judge_reminder(first_error, aspects))
    second, second_error = _try_judgement(
        (await call(_critic_request(retry, max_tokens))).text, names, catalogue
    )
    candidates = [p for p in (second, first) if p is not None]
    if not candidates:
        return Critique(
            failed=True,
            error=f"judge output unreadable after a retry: {first_error}; then {second_error}",
        )
    return _critique(max(candidates, key=lambda p: len(p.scores)))


def _try_judgement(
    reply: str, names: Sequence[str], catalogue: AspectCatalogue
) -> tuple[JudgementParse | None, str]:
    """The parsed judgement (None if unreadable) and what to tell the judge about it."""
    try:
        parsed = parse_judgement(reply, names, catalogue)
    except ParseError as error:
        return None, error.reason
    if parsed.missing:
        return parsed, f"it has no usable score for {', '.join(parsed.missing)}"
    return parsed, ""


def _critique(parsed: JudgementParse) -> Critique:
    critique = Critique.from_scores(parsed.scores)
    notes = []
    if parsed.missing:
        notes.append(f"no score for {', '.join(parsed.missing)}")
    if parsed.dropped:
        notes.append(f"ignored {', '.join(parsed.dropped)}")
    return critique.model_copy(update={"error": "; ".join(notes)}) if notes else critique


# --------------------------------------------------------------------------------------------
# Aspect selection by yes/no probabilities (for small critics; the paper selects with JSON)


def first_token_alternatives(choice: Choice) -> dict[str, float]:
    """Token -> logprob at the first generated position (the token itself and its top
    alternatives); empty when the backend returned no logprobs."""
    if not choice.logprobs:
        return {}
    first = choice.logprobs[0]
    alternatives = {top.token: top.logprob for top in first.top}
    alternatives.setdefault(first.token, first.logprob)
    return alternatives


def yes_probability(choice: Choice) -> float | None:
    """P(yes) / (P(yes) + P(no)) at the first generated token; None when neither has mass."""
    alternatives = first_token_alternatives(choice)
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in alternatives.items():
        word = token.strip(_TOKEN_MARKERS).lower()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


async def select_aspects_by_logprobs(
    call: Call, query: str, catalogue: AspectCatalogue, *, variant: Variant = "search"
) -> AspectSelection:
    """Ask, for every aspect at once, whether it matters for ``query``; keep those more likely
    "yes" than "no", most likely first, within the variant's 2-5 (or 3-6) bounds."""
    low, high = SELECTION_BOUNDS[variant]
    aspects = list(catalogue)
    relevance: dict[str, float] = {}

    async def ask(aspect: Aspect) -> None:
        request = CompletionRequest(
            messages=(_user(relevance_prompt(query, aspect)),), **DIGIT_SETTINGS
        )
        completion = await call(request)
        p_yes = yes_probability(completion.choices[0]) if completion.choices else None
        if p_yes is not None:
            relevance[aspect.name] = p_yes

    async with anyio.create_task_group() as group:
        for aspect in aspects:
            group.start_soon(ask, aspect)
    if not relevance:
        return _fallback_selection(query, catalogue, low, "no yes/no probability for any aspect")
    ranked = sorted(relevance, key=lambda name: -relevance[name])  # stable: catalogue order
    likely = [name for name in ranked if relevance[name] > 0.5]
    chosen = ranked[: max(low, min(high, len(likely)))]
    shown = ", ".join(f"{name} {relevance[name]:.2f}" for name in ranked)
    return AspectSelection(
        query=query,
        aspects=tuple(chosen),
        reasoning=f"P(yes) that each quality matters for this query: {shown}",
        analysis={"method": "logprobs"},
    )


# --------------------------------------------------------------------------------------------
# Judging by digit probabilities

DIGITS = (1, 2, 3, 4, 5)
#: Sampling settings of a one-digit verdict: only the distribution at the first token is used.
DIGIT_SETTINGS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 1, "top_logprobs": 20, "seed": 0}
#: Word-start markers some tokenizers leave in decoded tokens (SentencePiece, byte-level BPE).
_TOKEN_MARKERS = " \t\n\u2581\u0120"


def digit_request(query: str, answer: str, aspect: Aspect, variant: Variant) -> CompletionRequest:
    prompt = digit_judge_prompt(query, answer, aspect, variant)
    return CompletionRequest(messages=(_user(prompt),), **DIGIT_SETTINGS)


def digit_distribution(choice: Choice) -> dict[int, float]:
    """P(score = d) for d in 1..5 from the first generated token's top alternatives.

    Tokens that decode to a digit with surrounding space (" 4", "4") add up to that digit; the
    result is normalised over the digits, and empty when no digit has any probability mass.
    """
    alternatives = first_token_alternatives(choice)
    mass = dict.fromkeys(DIGITS, 0.0)
    for token, logprob in alternatives.items():
        text = token.strip(_TOKEN_MARKERS)
        if len(text) == 1 and text.isdigit() and int(text) in mass:
            mass[int(text)] += math.exp(logprob)
    total = sum(mass.values())
    if total <= 0 or not math.isfinite(total):
        return {}
    return {digit: p / total for digit, p in mass.items()}


def expected_score(distribution: dict[int, float]) -> float:
    return sum(digit * p for digit, p in distribution.items())


async def _judge_logprobs(
    call: Call, query: str, answer: str, aspects: Sequence[Aspect], variant: Variant
) -> Critique:
    results: dict[str, AspectScore | str] = {}

    async def score_one(aspect: Aspect) -> None:
        completion = await call(digit_request(query, answer, aspect, variant))
        distribution = digit_distribution(completion.choices[0]) if completion.choices else {}
        if not distribution:
            results[aspect.name] = "no probability on any digit 1-5"
            return
        score = expected_score(distribution)
        shown = " ".join(f"p({d})={p:.2f}" for d, p in distribution.items())
        results[aspect.name] = AspectScore(
            score=score, rationale=f"expected score {score:.2f} from digit probabilities {shown}"
        )

    async with anyio.create_task_group() as group:
        for aspect in aspects:
            group.start_soon(score_one, aspect)
    scores = {a.name: r for a in aspects if isinstance(r := results[a.name], AspectScore)}
    failures = [f"{a.name}: {results[a.name]}" for a in aspects if a.name not in scores]
    if not scores:
        return Critique(failed=True, error="; ".join(failures))
    critique = Critique.from_scores(scores)
    return critique.model_copy(update={"error": "; ".join(failures)}) if failures else critique
