"""drpo from Python: each job as one call, the same runs the ``drpo`` command makes.

Every function opens the run database (``db``, default ``$DRPO_DB`` or the per-user one), runs
one job as a run of it (journaled, resumable with :func:`resume` or ``drpo resume``), and returns
its :class:`~drpo.jobs.lifecycle.RunOutcome`: ``status``, ``error``, ``summary`` and ``result``.
Settings come from a preset, a TOML file and keyword sections, as on the command line::

    import drpo

    run = drpo.optimize(
        preset="robust",
        base_model="openai:gpt-4o-mini",
        critic_model="openai:gpt-4o",
        editor_model="openai:gpt-4o",
        search={"depth": 10},
    )
    if run.finished:
        print(run.result.best.system_prompt)
        answers = drpo.generate(["How do I start running?"], artifact=run.summary["artifact"])

Each function has an ``a``-prefixed coroutine twin (:func:`aoptimize`, ...) for async callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drpo.agents.search import SearchResult
from drpo.bus import loop
from drpo.data.loaders import default_icl_examples
from drpo.domain.values import ICLExample
from drpo.jobs.config import (
    BudgetSettings,
    RunSettings,
    build_config,
    load_toml,
)
from drpo.jobs.evaluation.plan import plan_evaluation
from drpo.jobs.evaluation.runner import EvalOutcome, create_eval_run, run_evaluation
from drpo.jobs.generate import create_generate_run, generation_plan, run_generate
from drpo.jobs.icl import ExampleTrace, create_icl_run, run_icl
from drpo.jobs.lifecycle import RunOutcome
from drpo.jobs.optimize import RunPlan, run_searches
from drpo.jobs.registry import job_for
from drpo.jobs.session import agent_session
from drpo.runs.paths import default_db_path
from drpo.runs.store import RunStore


def settings(
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    base_model: str | None = None,
    critic_model: str | None = None,
    editor_model: str | None = None,
    **sections: Any,
) -> RunSettings:
    """A job's settings: the preset, then the TOML file ``config``, then ``sections`` given as
    keyword dicts (``search={"depth": 10}``) and the three model shortcuts."""
    layer: dict[str, Any] = {key: value for key, value in sections.items() if value is not None}
    models = {"base": base_model, "critic": critic_model, "editor": editor_model}
    models = {role: spec for role, spec in models.items() if spec is not None}
    if models:
        layer["models"] = {**layer.get("models", {}), **models}
    if preset is not None:
        layer["preset"] = preset
    return build_config(load_toml(config) if config else {}, layer)


def _db(db: str | Path | None) -> Path:
    return Path(db) if db is not None else default_db_path()


async def aoptimize(
    *, db: str | Path | None = None, artifact: str | Path | None = None, **options: Any
) -> RunOutcome[SearchResult]:
    """Search for the system prompt that aligns the base model; ``options`` as :func:`settings`."""
    config = settings(**options)
    async with RunStore.open(_db(db)) as store:
        plan = RunPlan(config=config, artifact_path=Path(artifact) if artifact else None)
        [outcome] = await run_searches([plan], store=store)
    return outcome


async def aicl(
    examples: Sequence[ICLExample] | None = None,
    *,
    out: str | Path = "icl_examples.optimized.json",
    limit: int | None = None,
    db: str | Path | None = None,
    **options: Any,
) -> RunOutcome[list[ExampleTrace]]:
    """Optimize the ICL examples' answers (default: the shipped seed examples)."""
    config = settings(**options)
    pool = list(examples) if examples is not None else default_icl_examples()
    async with RunStore.open(_db(db)) as store, agent_session(store) as session:
        run_id = await create_icl_run(store, pool, config, Path(out), limit=limit)
        return await run_icl(session, run_id)


async def agenerate(
    queries: Sequence[str],
    *,
    artifact: str | Path | None = None,
    model: str | None = None,
    db: str | Path | None = None,
    **sampling: Any,
) -> list[str]:
    """Answers to ``queries`` with an aligned prompt (the artifact's; none: the unaligned
    default prompt). ``sampling`` overrides the generate settings (k, max_tokens, temperature,
    top_p, framing). Raises RuntimeError when the run does not finish."""
    path = Path(artifact) if artifact is not None else None
    plan = generation_plan(path, model=model, sampling=sampling)
    async with RunStore.open(_db(db)) as store, agent_session(store) as session:
        run_id = await create_generate_run(store, queries, plan)
        outcome = await run_generate(session, run_id)
    if outcome.result is None:
        raise RuntimeError(f"generation run {outcome.run_id} {outcome.status}: {outcome.error}")
    return outcome.result


async def aevaluate(
    prompts: Sequence[str] = (),
    *,
    queries: str | Path,
    texts: Sequence[str] = (),
    labels: Sequence[str] = (),
    name: str | None = None,
    db: str | Path | None = None,
    **options: Any,
) -> RunOutcome[EvalOutcome]:
    """Evaluate prompts on a query set, paired against the first (as ``drpo eval``).

    ``prompts``: artifact files from :func:`optimize`, text files holding a system prompt,
    ``"none"`` or ``"default"``; ``texts``: those or system prompts written out; ``options``:
    the command's options by name (``judge``, ``judge_mode``, ``preset``, ``config``, ``sample``,
    ``limit``, ``seed``, ``k``, ``max_tokens``, ...). The outcome's ``summary`` is the report,
    its ``result`` every answer and score.
    """
    plan = plan_evaluation(prompts, texts, labels, queries=queries, **options)
    async with RunStore.open(_db(db)) as store, agent_session(store) as session:
        run_id = await create_eval_run(
            store, plan.prompts, plan.queries, plan.settings, name=name, endpoints=plan.endpoints
        )
        return await run_evaluation(session, run_id)


async def aresume(
    run_id: str,
    *,
    db: str | Path | None = None,
    max_calls: int | None = None,
    max_cost_usd: float | None = None,
    force: bool = False,
) -> RunOutcome[Any]:
    """Continue a run of any kind from its journal (recorded calls are free); the job that
    runs it is the one :mod:`drpo.jobs.registry` names for its kind."""
    budget = BudgetSettings(max_calls=max_calls, max_cost_usd=max_cost_usd)
    async with RunStore.open(_db(db)) as store:
        record = await store.get_run(run_id)
        job = job_for(record.kind)
        async with agent_session(store) as session:
            return await job.run(session, record.run_id, budget=budget, force=force)


def optimize(**options: Any) -> RunOutcome[SearchResult]:
    """:func:`aoptimize`, for synchronous callers."""
    return loop.run(lambda: aoptimize(**options))


def icl(examples: Sequence[ICLExample] | None = None, **options: Any) -> RunOutcome[Any]:
    """:func:`aicl`, for synchronous callers."""
    return loop.run(lambda: aicl(examples, **options))


def generate(queries: Sequence[str], **options: Any) -> list[str]:
    """:func:`agenerate`, for synchronous callers."""
    return loop.run(lambda: agenerate(queries, **options))


def evaluate(prompts: Sequence[str] = (), **options: Any) -> RunOutcome[EvalOutcome]:
    """:func:`aevaluate`, for synchronous callers."""
    return loop.run(lambda: aevaluate(prompts, **options))


def resume(run_id: str, **options: Any) -> RunOutcome[Any]:
    """:func:`aresume`, for synchronous callers."""
    return loop.run(lambda: aresume(run_id, **options))
