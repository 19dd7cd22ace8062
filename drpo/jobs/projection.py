"""How many calls a search will make, before it starts (spec §8), and what they may cost.

The count assumes no skips (a skip only saves calls) and a cold aspect cache, so it is an upper
bound at the configured depth; the depth extension can add up to ``depth_extension`` levels, each
of which needs a skip at the level before, so the bound at the extended depth is also shown.

The cost is the projected calls of each role times an estimate of that role's tokens per call,
priced like the backends price real calls (``[endpoints."SPEC"]`` prices, else the built-in
table for known API models; local models are free). Tokens are counted as characters /
:data:`~drpo.backends.base.CHARS_PER_TOKEN`, the rule the API backend's own token estimates use,
over the role's real prompt template:

* texts the run knows (templates, aspect rubrics, the initial prompt, training queries and ICL
  examples) at their mean length;
* texts a model writes (answers, rewritten prompts, critiques, selection reasoning) at their
  token limit, and every reply at its ``max_tokens`` (``n`` of them for the editor).

So the cost is a ceiling rather than a forecast: real replies are usually shorter. Retries of
unreadable replies are not counted (they are a failure path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from drpo.backends.base import CHARS_PER_TOKEN
from drpo.backends.pricing import PER_MILLION, ModelPrice
from drpo.jobs.config import RunSettings

#: Aspects judged per verdict when counting logprobs-mode calls: the middle of the critic's 2-5.
ASPECTS_PER_VERDICT = 4
#: Stand-in length of a training query when the query file cannot be read.
FALLBACK_QUERY_CHARS = 200


@dataclass(frozen=True)
class CallProjection:
    depth: int
    proposer: int
    critic_select: int
    critic_judge: int
    editor: int

    @property
    def total(self) -> int:
        return self.proposer + self.critic_select + self.critic_judge + self.editor


def _catalogue_size(config: RunSettings) -> int:
    from drpo.agents.aspects import AspectCatalogue

    catalogue = AspectCatalogue.load_default().with_custom(list(config.critic.custom_aspects))
    return len(catalogue)


def project_calls(config: RunSettings, depth: int | None = None) -> CallProjection:
    """Calls per role for a search of ``depth`` levels (spec §8: total = 2G + O + M).

    In ``logprobs`` judge mode each aspect is one short call: a selection asks about every
    aspect of the catalogue, and we count 4 aspects per verdict, the middle of the critic's 2-5.
    """
    search = config.search
    d = min(depth or search.depth, search.num_train_queries)
    a, b = search.n_actions, search.beam_size
    generations = 1 + a + max(d - 2, 0) * a * min(a, b) if d >= 2 else 1
    editor_requests = 1 + max(d - 2, 0) * min(a, b) if d >= 2 else 0
    logprobs = config.critic.mode == "logprobs"
    judge_calls = generations * (ASPECTS_PER_VERDICT if logprobs else 1)
    select_calls = d * (_catalogue_size(config) if logprobs else 1)
    return CallProjection(
        depth=d,
        proposer=generations,
        critic_select=select_calls,
        critic_judge=judge_calls,
        editor=editor_requests,
    )


# ------------------------------------------------------------------------------------ cost


@dataclass(frozen=True)
class TokensPerCall:
    """Estimated prompt tokens and reply tokens (a ceiling) of one call."""

    input: int
    output: int


@dataclass(frozen=True)
class CostProjection:
    """Projected USD per role (None for a role whose model has no known price)."""

    depth: int
    tokens: dict[str, TokensPerCall]
    calls: dict[str, int]
    cost: dict[str, float | None]
    unpriced: tuple[str, ...]
    #: True when some API model of the run has a price (local models are free, not "priced").
    priced: bool

    @property
    def total(self) -> float:
        return sum(value for value in self.cost.values() if value is not None)


def _cost(price: ModelPrice, tokens: TokensPerCall, calls: int) -> float:
    """USD of ``calls`` calls of ``tokens`` each, every input token fresh (a ceiling: the
    provider may bill some as cached)."""
    per_call = tokens.input * price.input_per_m + tokens.output * price.output_per_m
    return calls * per_call / PER_MILLION


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _mean(lengths: Sequence[int], fallback: int) -> int:
    return round(sum(lengths) / len(lengths)) if lengths else fallback


def _filler(tokens: int) -> str:
    """Text of about ``tokens`` tokens, standing in for something a model writes."""
    return "x" * (tokens * CHARS_PER_TOKEN)


def _data_lengths(config: RunSettings) -> tuple[int, list[tuple[int, int]]]:
    """Mean training-query length, and (query, answer) lengths of the ICL pool."""
    from drpo.data.loaders import (
        DataFormatError,
        default_icl_examples,
        default_train_queries,
        load_icl_examples,
        load_queries,
    )

    try:
        queries = load_queries(config.data.train) if config.data.train else default_train_queries()
        query_chars = _mean([len(q) for q in queries], FALLBACK_QUERY_CHARS)
    except (DataFormatError, OSError):
        query_chars = FALLBACK_QUERY_CHARS
    try:
        pool = load_icl_examples(config.data.icl) if config.data.icl else default_icl_examples()
        examples = [(len(e.query), len(e.answer)) for e in pool]
    except (DataFormatError, OSError):
        examples = []
    return query_chars, examples


def estimate_tokens_per_call(config: RunSettings) -> dict[str, TokensPerCall]:
    """Tokens of one call of each kind (``proposer``, ``critic_select``, ``critic_judge``,
    ``editor``), from the real prompt templates; see the module docstring for the rules."""
    from drpo.agents.aspects import AspectCatalogue
    from drpo.agents.prompts import (
        digit_judge_prompt,
        judge_prompt,
        optimizer_prompt,
        relevance_prompt,
        selection_prompt,
    )
    from drpo.agents.proposer import build_answer_request
    from drpo.domain.values import Critique, ICLExample

    catalogue = AspectCatalogue.load_default().with_custom(list(config.critic.custom_aspects))
    aspects = list(catalogue)
    query_chars, pool = _data_lengths(config)
    query = "q" * query_chars
    answer_limit = config.proposer.max_tokens
    critic_limit = config.critic.max_tokens
    editor_limit = config.editor.max_tokens
    answer = _filler(answer_limit)
    rewritten = _filler(editor_limit)  # a rewritten system prompt is one editor reply

    k = min(config.proposer.k, len(pool))
    mean_q = _mean([q for q, _ in pool], 0)
    mean_a = _mean([a for _, a in pool], 0)
    examples = [ICLExample(query="q" * mean_q, answer="a" * mean_a) for _ in range(k)]
    request = build_answer_request(
        rewritten, examples, query, framing=config.proposer_framing(), max_tokens=answer_limit
    )
    if request.messages is not None:
        proposer_chars = sum(len(m.content) for m in request.messages)
    else:
        proposer_chars = len(request.prompt or "")
    tokens = {"proposer": TokensPerCall(_tokens(proposer_chars), answer_limit)}

    if config.critic.mode == "logprobs":
        select = [_tokens(len(relevance_prompt(query, aspect))) for aspect in aspects]
        judge = [_tokens(len(digit_judge_prompt(query, answer, a, "search"))) for a in aspects]
        tokens["critic_select"] = TokensPerCall(_mean(select, 0), 1)
        tokens["critic_judge"] = TokensPerCall(_mean(judge, 0), 1)
    else:
        chosen = aspects[:ASPECTS_PER_VERDICT]
        select_chars = len(selection_prompt(query, catalogue, "search"))
        judge_chars = len(judge_prompt(query, answer, chosen, _filler(critic_limit), "search"))
        tokens["critic_select"] = TokensPerCall(_tokens(select_chars), critic_limit)
        tokens["critic_judge"] = TokensPerCall(_tokens(judge_chars), critic_limit)

    history = [rewritten] * max(config.search.history - 1, 0)
    editor_chars = len(optimizer_prompt(rewritten, query, answer, Critique(), history))
    tokens["editor"] = TokensPerCall(
        _tokens(editor_chars) + critic_limit,  # the critique is one critic reply
        editor_limit * config.search.n_actions,
    )
    return tokens


def price_of(config: RunSettings, spec_text: str) -> ModelPrice | None:
    """What the backend for ``spec_text`` charges (its kind's price lookup, with the run's
    ``[endpoints]`` settings); None when nothing is known."""
    from drpo.backends.kinds import parse_model_spec, price_of

    return price_of(spec_text, config.endpoints.get(str(parse_model_spec(spec_text))))


def project_cost(config: RunSettings, depth: int | None = None) -> CostProjection:
    """Projected cost per role: projected calls x estimated tokens per call x price."""
    calls = project_calls(config, depth)
    per_call = estimate_tokens_per_call(config)
    models = {
        "proposer": config.models.base,
        "critic_select": config.models.critic,
        "critic_judge": config.models.critic,
        "editor": config.models.editor,
    }
    counts = {
        "proposer": calls.proposer,
        "critic_select": calls.critic_select,
        "critic_judge": calls.critic_judge,
        "editor": calls.editor,
    }
    from drpo.backends.kinds import parse_model_spec

    cost: dict[str, float | None] = {}
    unpriced: list[str] = []
    priced = False
    for kind, model in models.items():
        price = price_of(config, model)
        cost[kind] = None if price is None else _cost(price, per_call[kind], counts[kind])
        if price is None and model not in unpriced:
            unpriced.append(model)
        priced = priced or (price is not None and parse_model_spec(model).kind != "local")
    return CostProjection(calls.depth, per_call, counts, cost, tuple(unpriced), priced)


def describe_projection(config: RunSettings) -> str:
    low = project_calls(config)
    high = project_calls(config, config.search.depth + config.search.depth_extension)
    text = (
        f"projected calls for {config.models.base} (depth {low.depth}, up to {high.depth} with "
        f"extensions): proposer {low.proposer}, critic {low.critic_select} aspect-selection + "
        f"{low.critic_judge} judging calls, editor {low.editor} requests "
        f"(n={config.search.n_actions}); total {low.total} (at most {high.total})"
    )
    cost = project_cost(config)
    if cost.priced:
        extended = project_cost(config, high.depth)
        per_role = ", ".join(
            f"{kind} ${value:.4f}" for kind, value in cost.cost.items() if value is not None
        )
        text += (
            f"\nprojected cost: at most ${cost.total:.4f} (${extended.total:.4f} with "
            f"extensions; {per_role}; replies at their token limits)"
        )
        if cost.unpriced:
            text += f"; no price for {', '.join(cost.unpriced)}"
    return text
