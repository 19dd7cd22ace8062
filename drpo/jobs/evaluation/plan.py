"""What an evaluation will run, from what a user gives (``drpo eval``'s options, or
:func:`drpo.evaluate`'s arguments): the prompts, the chosen queries, and the recorded settings.

Planning is here, below both front doors, so that the command and the Python API plan the same
evaluation from the same inputs; every mistake in them is a :class:`~drpo.errors.UserError`
whose message names the option to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from drpo.backends.kinds import DEFAULT_MODEL, parse_model_spec
from drpo.errors import UserError
from drpo.jobs.config import build_config, load_toml
from drpo.jobs.evaluation.protocol import (
    EvalPrompt,
    EvalQuery,
    attach_tags,
    load_eval_queries,
    load_tags,
    resolve_prompt,
    sample_queries,
    unique_labels,
)
from drpo.jobs.evaluation.runner import EvalSettings


class EvalOptionError(UserError, ValueError):
    """An evaluation option that cannot be used (a bad count, a value out of range)."""


@dataclass(frozen=True)
class EvalPlan:
    """An evaluation ready to be recorded by :func:`~drpo.jobs.evaluation.runner.create_eval_run`."""

    prompts: list[EvalPrompt]
    queries: list[EvalQuery]
    settings: EvalSettings
    #: The config file's ``[endpoints]`` (limits, prices, capabilities of the models).
    endpoints: dict[str, Any] = field(default_factory=dict)
    #: Queries a tags file matched (None without one): 0 deserves a warning.
    tagged: int | None = None


def plan_evaluation(
    prompts: Sequence[str] = (),
    texts: Sequence[str] = (),
    labels: Sequence[str] = (),
    *,
    queries: str | Path,
    tags: str | Path | None = None,
    model: str | None = None,
    judge: str | None = None,
    judge_mode: str | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int | None = None,
    k: int | None = None,
    max_tokens: int | None = None,
    judge_max_tokens: int | None = None,
    temperature: float | None = None,
    framing: str | None = None,
    resamples: int | None = None,
    top: int | None = None,
    concurrency: int | None = None,
    max_calls: int | None = None,
    max_cost: float | None = None,
) -> EvalPlan:
    """Resolve the prompts (``prompts``: artifact or text files, ``none``, ``default``;
    ``texts``: those or a system prompt written out; the first prompt is the baseline), load and
    choose the queries (``sample``, then ``limit``), and build the settings: the judge's mode and
    policy from ``preset`` or ``config``, else logprobs for a local judge and JSON otherwise."""
    chosen = [resolve_prompt(p, text_allowed=False, index=i) for i, p in enumerate(prompts)]
    chosen += [
        resolve_prompt(t, text_allowed=True, index=len(chosen) + i) for i, t in enumerate(texts)
    ]
    if not chosen:
        chosen = [resolve_prompt("default", text_allowed=False)]
    if len(labels) > len(chosen):
        raise EvalOptionError(f"{len(labels)} --label values for {len(chosen)} prompts")
    chosen = unique_labels(chosen, labels)

    query_set = load_eval_queries(queries)
    tagged = None
    if tags is not None:
        query_set, tagged = attach_tags(query_set, load_tags(tags))
    seed = seed if seed is not None else 0
    if sample is not None:
        if sample < 1:
            raise EvalOptionError("--sample must be at least 1")
        query_set = sample_queries(query_set, sample, seed)
    if limit is not None:
        if limit < 1:
            raise EvalOptionError("--limit must be at least 1")
        query_set = query_set[:limit]

    judge = judge or DEFAULT_MODEL
    file_settings = load_toml(config) if config else {}
    chosen_config = build_config(file_settings, {"preset": preset} if preset else {})
    critic = chosen_config.critic
    if judge_mode is None and (preset or file_settings):
        judge_mode = critic.mode
    if judge_mode is None:
        judge_mode = "logprobs" if parse_model_spec(judge).kind == "local" else "json"
    fields = {
        "judge": judge,
        "judge_mode": judge_mode,
        "judge_policy": critic.policy,
        "judge_max_tokens": judge_max_tokens or critic.max_tokens,
        # plain prompts answer with the artifacts' model, so a comparison is like for like
        "model": next((p.model for p in chosen if p.model), DEFAULT_MODEL),
        "model_override": model,
        "framing": framing,
        "k": k,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "resamples": resamples,
        "seed": seed,
        "top": top,
        "concurrency": concurrency,
        "max_calls": max_calls,
        "max_cost_usd": max_cost,
        "queries_path": str(queries),
        "tags_path": str(tags) if tags else None,
        "sample": sample,
        "limit": limit,
    }
    try:
        settings = EvalSettings(**{key: v for key, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise EvalOptionError(f"invalid options: {problems}") from None
    return EvalPlan(chosen, query_set, settings, dict(chosen_config.endpoints), tagged)
