"""The critic (dynamic rewarder): picks the aspects that matter for a query, then judges answers.

Both jobs have two modes, chosen per call (:data:`CriticMode`): "json", the paper's JSON replies,
and "logprobs", a drpo addition for models that expose token probabilities (yes/no per aspect for
the selection, the expected 1-5 digit per score), which is smoother than a greedy integer and
meaningful even for a very small local judge. :func:`select_aspects` and :func:`judge` dispatch
on the mode, so a caller (the agent runtime) only binds a model call and caches.

Faithful to the paper where it matters for the search: the same settings (T=0, seed 0, 2048
tokens), 2-5 aspects per query in the search and 3-6 for the stricter ICL-stage critic, a 1-5
score with a rationale per aspect, and the reward as the mean score, 0 for an unreadable verdict.

Where the paper crashed or silently zeroed a reward on formatting noise (spec §2.2, §2.3, §9.6),
drpo can do better, and :class:`CriticPolicy` says which of those repairs are on: ``robust()``
(the default) has all of them, ``paper()`` none, so the paper preset scores answers the way the
paper did. Two things hold under every policy: the verdict is read as the last JSON value that
scores the selected aspects and is not copied from the answer (a reading that changes no
well-formed verdict, and that hostile text cannot steer), and names are resolved through the
catalogue with unknown ones dropped (the paper's KeyError on them is a crash worth nothing).
Backend errors are not caught here; they belong to the caller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
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
from drpo.backends.base import Call, ChatMessage, Choice, CompletionRequest
from drpo.domain.requests import CriticMode
from drpo.domain.values import AspectScore, AspectSelection, Critique
from drpo.errors import UserError

Variant = Literal["search", "icl"]

#: The critic's sampling settings in the original (spec §1.1): greedy, seeded, 2048 tokens.
CRITIC_SETTINGS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 2048, "seed": 0}

#: Used when the critic's selection cannot be read (and the policy allows a fallback): the three
#: aspects the original's critic chose most often (spec §2.2), padded from the catalogue.
DEFAULT_SELECTION = ("Helpfulness", "Clarity", "Factuality")

#: Keys added to ``AspectSelection.analysis`` to record what the critic had to repair. A selection
#: with ``analysis[FALLBACK_KEY] == "true"`` was not made by the critic and must not be cached.
FALLBACK_KEY = "fallback"
ERROR_KEY = "selection_error"
DROPPED_KEY = "dropped_aspects"
PADDED_KEY = "padded_aspects"


# --------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class CriticPolicy:
    """Which of drpo's repairs of the paper's critic are on. Each field is one switch.

    ``robust()`` (every field True, the default) is drpo's critic; ``paper()`` (every field
    False) is the paper's, made usable where it crashed: an unreadable selection stops the run
    with a :class:`SelectionError` instead of a traceback, and an unreadable verdict is a failed
    critique (reward 0, as in the paper) instead of a crash on ``int(score)``.
    """

    #: Ask once more, showing the unusable reply and a reminder of the format, when a selection
    #: cannot be read (paper: no retry anywhere).
    selection_retry: bool = True
    #: Hold a selection to the variant's bounds (2-5, or 3-6 for the ICL critic): too few known
    #: aspects is unreadable on the first try, padded with defaults after the retry; extra ones
    #: are cut. Paper: every known aspect the critic named is kept, however many.
    selection_bounds: bool = True
    #: When the selection cannot be read, use the default aspects (marked as a fallback, never
    #: cached). Paper: the run crashed; here it stops with a SelectionError naming the fix.
    selection_fallback: bool = True
    #: Ask once more, with a reminder, when a verdict cannot be read or misses selected aspects
    #: (paper: no retry).
    judge_retry: bool = True
    #: Reward = mean over the selected aspects the verdict scores usably; unreadable and
    #: unselected entries are dropped and recorded. Paper: the mean over every aspect entry
    #: returned, and one unreadable score makes the whole verdict unreadable.
    partial_verdicts: bool = True
    #: Read scores as a careful reader would ("4/5", "Score: 4", "four", "4.5", "8/10" is 4).
    #: Paper: ``int(score)``, so anything but a whole number is unreadable.
    lenient_scores: bool = True
    #: The search judge is told that length alone is neither a virtue nor a fault (not in the
    #: paper's judge prompt).
    length_note: bool = True
    #: The judge prompt quotes the query and answer between lines they cannot close and says the
    #: quoted parts are data, never instructions (paper: plain <query>/<answer> tags).
    hardened_wording: bool = True

    @classmethod
    def robust(cls) -> CriticPolicy:
        """drpo's critic: every repair on."""
        return cls()

    @classmethod
    def paper(cls) -> CriticPolicy:
        """The paper's critic, usable: every repair off."""
        return cls(**dict.fromkeys(cls.field_names(), False))

    @classmethod
    def named(cls, name: str) -> CriticPolicy:
        """The policy called ``name``: "robust" or "paper"."""
        if name == "robust":
            return cls.robust()
        if name == "paper":
            return cls.paper()
        raise ValueError(f"unknown critic policy {name!r}: use 'robust' or 'paper'")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    @property
    def selection_version(self) -> str:
        """A short hash of the switches a selection depends on, for an aspect-cache key: a
        selection made under one policy is not reused under another that would read it
        differently."""
        switches = (self.selection_retry, self.selection_bounds, self.selection_fallback)
        text = ",".join(str(int(v)) for v in switches)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


ROBUST = CriticPolicy.robust()
PAPER = CriticPolicy.paper()


class SelectionError(UserError, ValueError):
    """The critic's aspect selection could not be read and the policy has no fallback.

    The paper's run crashed here (spec §2.2); the message says why and what to change.
    """

    def __init__(self, query: str, reason: str) -> None:
        self.query = query
        self.reason = reason
        shown = query if len(query) <= 80 else query[:80] + "..."
        super().__init__(
            f"the critic's aspect selection for the query {shown!r} could not be read: {reason}. "
            "Under the paper's critic policy this stops the run, as it did in the paper. To go "
            "on, use a critic model that answers the selection reliably (the JSON reply, or yes/no "
            "token probabilities in logprobs mode), or turn on the critic's fallback to default "
            "aspects (CriticPolicy.selection_fallback, part of the 'robust' critic policy)."
        )


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


async def select_aspects(
    call: Call,
    query: str,
    catalogue: AspectCatalogue,
    *,
    mode: CriticMode = "json",
    variant: Variant = "search",
    max_tokens: int = 2048,
    policy: CriticPolicy = ROBUST,
) -> AspectSelection:
    """The aspects an answer to ``query`` should be judged on.

    ``mode`` "json" asks for the paper's selection reply (:func:`select_aspects_json`);
    "logprobs" asks yes/no per aspect (:func:`select_aspects_by_logprobs`, which ignores
    ``max_tokens``). A selection the critic could not make is a fallback, marked with
    ``analysis["fallback"] == "true"``, or, when ``policy`` has no fallback, a SelectionError.
    """
    if mode == "json":
        return await select_aspects_json(
            call, query, catalogue, variant=variant, max_tokens=max_tokens, policy=policy
        )
    if mode == "logprobs":
        return await select_aspects_by_logprobs(
            call, query, catalogue, variant=variant, policy=policy
        )
    raise ValueError(f"unknown critic mode {mode!r}: use 'json' or 'logprobs'")


def default_selection(catalogue: AspectCatalogue, count: int) -> tuple[str, ...]:
    """``count`` aspects: the defaults the catalogue has, then catalogue order."""
    names = [n for n in DEFAULT_SELECTION if n in catalogue]
    names += [n for n in catalogue.names if n not in names]
    return tuple(names[:count])


async def select_aspects_json(
    call: Call,
    query: str,
    catalogue: AspectCatalogue,
    *,
    variant: Variant = "search",
    max_tokens: int = 2048,
    policy: CriticPolicy = ROBUST,
) -> AspectSelection:
    """The selection from the paper's JSON reply; raises only SelectionError (see the policy).

    Names outside the catalogue are dropped and listed under ``analysis["dropped_aspects"]``.
    With ``policy.selection_bounds``, the first reply must name at least the variant's minimum of
    catalogue aspects, a reply after the retry is padded with defaults up to it, and extra ones
    are cut at the maximum; without it, any number of known aspects (at least one) is kept.
    With ``policy.selection_retry`` an unreadable first reply is asked again with a reminder.
    An unreadable selection is then the default one (``policy.selection_fallback``) or an error.
    """
    low, high = SELECTION_BOUNDS[variant]
    need = low if policy.selection_bounds else 1
    messages = [_user(selection_prompt(query, catalogue, variant))]
    reply = (await call(_critic_request(messages, max_tokens))).text
    dropped: list[str] = []
    try:
        parsed = parse_selection(reply, catalogue)
        dropped += parsed.dropped
        if len(parsed.aspects) < need:
            raise ParseError(
                f"it named {len(parsed.aspects)} known aspects, at least {need} needed"
                if parsed.aspects
                else "it named no aspect from the list"
            )
        aspects = parsed.aspects[:high] if policy.selection_bounds else parsed.aspects
        return _selection(query, aspects, parsed.reasoning, parsed.analysis, dropped)
    except ParseError as error:
        first_error = error.reason
    if not policy.selection_retry:
        return _unreadable_selection(query, catalogue, low, first_error, policy)
    retry = _retry_messages(messages, reply, selection_reminder(first_error, catalogue, variant))
    reply = (await call(_critic_request(retry, max_tokens))).text
    try:
        parsed = parse_selection(reply, catalogue)
        dropped += parsed.dropped
        if not parsed.aspects:
            raise ParseError("it named no aspect from the list")
    except ParseError as error:
        return _unreadable_selection(
            query, catalogue, low, f"{first_error}; then {error.reason}", policy
        )
    if not policy.selection_bounds:
        return _selection(query, parsed.aspects, parsed.reasoning, parsed.analysis, dropped)
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


def _unreadable_selection(
    query: str, catalogue: AspectCatalogue, count: int, error: str, policy: CriticPolicy
) -> AspectSelection:
    """The default selection, marked as a fallback, or (no fallback in the policy) an error."""
    if not policy.selection_fallback:
        raise SelectionError(query, error)
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
    policy: CriticPolicy = ROBUST,
) -> Critique:
    """Score ``answer`` on each selected aspect; the reward is the mean score.

    Selected names are resolved through the catalogue (aliases included); unknown ones are left
    out. A judgement with no usable score is ``Critique(failed=True)`` with reward 0, as in the
    paper. ``mode`` "json" reads the paper's verdict (``policy`` says how: retry, partial
    verdicts, score reading, prompt wording); "logprobs" scores each aspect by the expected digit
    (``policy`` and ``max_tokens`` do not apply: there is nothing to read or retry). When some
    aspects have scores and others do not, ``error`` says which were missing, while ``failed``
    stays False.
    """
    aspects = _resolve_selection(selection, catalogue)
    if not aspects:
        return Critique(
            failed=True,
            error=f"none of the selected aspects {list(selection.aspects)} is in the catalogue",
        )
    if mode == "json":
        return await _judge_json(
            call,
            query,
            answer,
            aspects,
            selection.reasoning,
            variant,
            catalogue,
            max_tokens,
            policy,
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
    max_tokens: int,
    policy: CriticPolicy,
) -> Critique:
    names = [a.name for a in aspects]
    prompt = judge_prompt(
        query,
        answer,
        aspects,
        reasoning,
        variant,
        length_note=policy.length_note,
        hardened=policy.hardened_wording,
    )
    messages = [_user(prompt)]

    def read(reply: str) -> tuple[JudgementParse | None, str]:
        return _try_judgement(reply, names, catalogue, policy, quoted=(query, answer))

    reply = (await call(_critic_request(messages, max_tokens))).text
    first, first_error = read(reply)
    if first is not None and (not first.missing or not policy.judge_retry):
        return _critique(first)
    if not policy.judge_retry:
        return Critique(failed=True, error=f"judge output unreadable: {first_error}")
    retry = _retry_messages(messages, reply, judge_reminder(first_error, aspects))
    second, second_error = read((await call(_critic_request(retry, max_tokens))).text)
    candidates = [p for p in (second, first) if p is not None]
    if not candidates:
        return Critique(
            failed=True,
            error=f"judge output unreadable after a retry: {first_error}; then {second_error}",
        )
    return _critique(max(candidates, key=lambda p: len(p.scores)))


def _try_judgement(
    reply: str,
    names: Sequence[str],
    catalogue: AspectCatalogue,
    policy: CriticPolicy,
    quoted: Sequence[str],
) -> tuple[JudgementParse | None, str]:
    """The parsed judgement (None if unreadable) and what to tell the judge about it."""
    try:
        parsed = parse_judgement(
            reply,
            names,
            catalogue,
            lenient_scores=policy.lenient_scores,
            partial=policy.partial_verdicts,
            quoted=quoted,
        )
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
    call: Call,
    query: str,
    catalogue: AspectCatalogue,
    *,
    variant: Variant = "search",
    policy: CriticPolicy = ROBUST,
) -> AspectSelection:
    """Ask, for every aspect at once, whether it matters for ``query``; keep those more likely
    "yes" than "no", most likely first, within the variant's 2-5 (or 3-6) bounds.

    The bounds hold under every policy: they are how a ranking becomes a selection, not a repair
    of a reply. Of the policy only ``selection_fallback`` applies: when no aspect has a yes/no
    probability, the default selection or a SelectionError.
    """
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
        return _unreadable_selection(
            query, catalogue, low, "no yes/no probability for any aspect", policy
        )
    # Ranked from catalogue order (stable sort), not from ``relevance``'s, which is the order the
    # replies came in: P(yes) is exactly 1 for every aspect whose "no" is not among the top
    # logprobs (12 of 14 for one query of the default job), and those ties must not depend on
    # which rows shared a scoring pass (it made the default job differ run to run).
    ranked = sorted(
        (aspect.name for aspect in aspects if aspect.name in relevance),
        key=lambda name: -relevance[name],
    )
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
