"""Run one or many DRPO searches in one process: one bus, one set of agents, one store.

:func:`run_searches` is what ``drpo optimize`` and ``drpo resume`` call (through
:func:`drpo.jobs.workers.run_sweep`, which spreads a sweep over worker processes with
``workers`` > 1, each running this function on its share of the searches). Every search is a run in
the store; they share the backends (so rate limits and batches are shared) and run at the same
time. A run that stops for any reason records why (interrupted, budget exhausted, failed) and
keeps everything recorded so far, so ``drpo resume RUN`` can finish it without paying twice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.retrieval import ICLRetriever
from drpo.agents.search import (
    BeamSearch,
    CriticCalls,
    EditorCalls,
    ProposerCalls,
    SearchPlan,
    SearchResult,
)
from drpo.backends.registry import BackendRegistry
from drpo.data.loaders import (
    default_icl_examples,
    default_train_queries,
    load_icl_examples,
    load_queries,
)
from drpo.domain.events import RunStarted
from drpo.domain.values import ICLExample
from drpo.jobs.artifact import AlignedPrompt, LevelTrace
from drpo.jobs.config import BudgetSettings, RunSettings
from drpo.jobs.lifecycle import JobResult, RunLifecycle, RunOutcome, run_versions
from drpo.jobs.registry import Job
from drpo.jobs.session import Session, agent_session
from drpo.runs.paths import run_artifacts_dir
from drpo.runs.store import RunRecord, RunStore, new_run_id

log = structlog.get_logger("drpo.jobs.optimize")

RUN_KIND = "optimize"


@dataclass
class RunPlan:
    """A search to run: a new one (``run_id`` None) or one to resume.

    ``artifact_path`` may hold ``{run_id}``, filled in when the run is created (a sweep's
    artifacts in one folder); None: ``artifacts/<run>/aligned_prompt.json`` beside the database.
    """

    config: RunSettings
    artifact_path: Path | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class LevelProgress:
    """Where a search stands after a level: for progress bars and progress lines."""

    run_id: str
    level: int
    depth_limit: int
    best_score: float
    mean_score: float
    calls: int
    cost_usd: float


def draw_query_order(queries: Sequence[str], count: int, seed: int) -> list[str]:
    """The training queries in the order the search consumes them: a seeded sample, recorded
    with the run (the paper's order is unseeded and cannot be regenerated, spec §6)."""
    rng = random.Random(seed)
    return rng.sample(list(queries), min(count, len(queries)))


def prepare_inputs(config: RunSettings) -> tuple[list[str], list[ICLExample]]:
    """Load training queries and ICL examples; bad files raise a clear DataFormatError."""
    queries = load_queries(config.data.train) if config.data.train else default_train_queries()
    examples = load_icl_examples(config.data.icl) if config.data.icl else default_icl_examples()
    order = draw_query_order(queries, config.search.num_train_queries, config.search.seed)
    return order, list(examples)


def run_record(config: RunSettings, queries: list[str], examples: list[ICLExample]) -> dict:
    """Everything needed to redo the run exactly: settings, query order and ICL pool."""
    return {
        "settings": config.model_dump(mode="json"),
        "queries": queries,
        "icl_examples": [example.model_dump() for example in examples],
    }


async def create_search_run(
    store: RunStore, config: RunSettings, *, artifact_path: Path | None = None
) -> str:
    """Record a new search (status ``created``) with everything needed to run it again exactly:
    its settings (the layout settled for its base model), query order, ICL pool, where its
    artifact goes, and the versions its requests depend on."""
    config = config.settled()
    queries, examples = prepare_inputs(config)
    run_id = new_run_id()
    record = {
        **run_record(config, queries, examples),
        "artifact": str(artifact_path).replace("{run_id}", run_id) if artifact_path else None,
        "versions": run_versions(),
    }
    return await store.create_run(RUN_KIND, record, name=config.name, run_id=run_id)


async def run_searches(
    plans: Sequence[RunPlan],
    *,
    store: RunStore,
    registry: BackendRegistry | None = None,
    on_level: Callable[[LevelProgress], None] | None = None,
    on_created: Callable[[str, RunSettings], None] | None = None,
    force: bool = False,
) -> list[RunOutcome[SearchResult]]:
    """Run every plan concurrently on one bus; returns one outcome per plan, in order.

    A new plan (no ``run_id``) is created first; a plan with a ``run_id`` resumes that run, the
    limits its ``config.budget`` sets overriding the recorded ones.
    """
    registry = registry or BackendRegistry()
    for plan in plans:
        registry.configure(plan.config.endpoints)
    outcomes: list[RunOutcome[SearchResult] | None] = [None] * len(plans)

    async def one(index: int, plan: RunPlan, session: Session) -> None:
        run_id = plan.run_id
        if run_id is None:
            run_id = await create_search_run(store, plan.config, artifact_path=plan.artifact_path)
        if on_created is not None:
            on_created(run_id, plan.config)
        outcomes[index] = await run_search(
            session,
            run_id,
            budget=plan.config.budget,
            artifact_path=plan.artifact_path if plan.run_id else None,
            force=force,
            on_level=on_level,
        )

    trace = plans[0].config.trace if plans else None  # one process, one place to send to
    async with agent_session(store, registry, trace) as session:
        async with anyio.create_task_group() as searches:
            for index, plan in enumerate(plans):
                searches.start_soon(one, index, plan, session)
    return [outcome for outcome in outcomes if outcome is not None]


def resumed_settings(record: RunRecord, budget: BudgetSettings | None = None) -> RunSettings:
    """The settings a search run runs with: the recorded ones, with the limits ``budget`` sets
    (a resume's) overriding the recorded limits. The CLI prints its projection from these."""
    return RunSettings.model_validate(record.config["settings"]).with_budget(budget)


async def run_search(
    session: Session,
    run_id: str,
    *,
    budget: BudgetSettings | None = None,
    artifact_path: Path | None = None,
    force: bool = False,
    on_level: Callable[[LevelProgress], None] | None = None,
) -> RunOutcome[SearchResult]:
    """Run (or resume) the search recorded as ``run_id``, from its record alone (the limits
    ``budget`` sets override the recorded ones; ``artifact_path`` replaces the recorded one)."""
    record = await session.store.get_run(run_id)
    run_id = record.run_id
    if record.kind != RUN_KIND:
        raise ValueError(f"run {run_id} is a {record.kind} run, not a search")
    config = resumed_settings(record, budget)
    queries = list(record.config["queries"])
    examples = [ICLExample.model_validate(item) for item in record.config["icl_examples"]]
    catalogue = AspectCatalogue.load_default().with_custom(list(config.critic.custom_aspects))
    lifecycle = RunLifecycle(
        session,
        run_id,
        sender="search",
        budget=config.budget,
        catalogue=catalogue,
        endpoints=config.endpoints,
        models=(config.models.base, config.models.critic, config.models.editor),
        force=force,
    )
    journal = lifecycle.journal
    retriever = ICLRetriever(examples, model_path=config.data.retriever)
    k = config.proposer.k

    async def retrieve(query: str) -> list[ICLExample]:
        return await retriever.atop_k(query, k) if k else []

    search = BeamSearch(session.bus, run_id, search_plan(config), queries, retrieve)
    if on_level is not None:

        def level_done(level: int, limit: int, best: float, mean: float) -> None:
            spent = (journal.calls_spent, journal.cost_spent_usd)
            on_level(LevelProgress(run_id, level, limit, best, mean, *spent))

        search.on_level = level_done
    bound = log.bind(run_id=run_id, agent="search")

    async def job() -> JobResult[SearchResult]:
        bound.info("search started", queries=len(queries), resumed=record.status != "created")
        result = await search.run()
        artifact = build_artifact(run_id, config, result, examples)
        path = Path(
            artifact_path
            or record.config.get("artifact")
            or run_artifacts_dir(run_id, session.store.path) / "aligned_prompt.json"
        )
        artifact.save(path)
        bound.info("search finished", score=round(result.best_score, 3), levels=result.levels)
        return JobResult(
            result,
            summary={
                "best_prompt": result.best.system_prompt,
                "best_score": result.best_score,
                "best_node_id": result.best.node_id,
                "levels": result.levels,
                "artifact": str(path),
                "artifact_json": artifact.model_dump(mode="json"),
            },
            best_node_id=result.best.node_id,
            best_prompt=result.best.system_prompt,
            best_score=result.best_score,
        )

    return await lifecycle.run(
        job, RunStarted(config=record.config["settings"], queries=tuple(queries))
    )


def search_plan(config: RunSettings) -> SearchPlan:
    """What the search needs of a run's settings, made concrete for its models."""
    config = config.settled()
    proposer, critic, editor = config.proposer, config.critic, config.editor
    return SearchPlan(
        search=config.search,
        proposer=ProposerCalls(
            model=config.models.base,
            framing=config.proposer_framing(),
            max_tokens=proposer.max_tokens,
            temperature=proposer.temperature,
            top_p=proposer.top_p,
            icl_headers=proposer.icl_headers,
            cut_runaway=proposer.cut_runaway,
        ),
        critic=CriticCalls(
            model=config.models.critic,
            mode=critic.mode,
            max_tokens=critic.max_tokens,
            policy=critic.policy,
        ),
        editor=EditorCalls(
            model=config.models.editor,
            max_tokens=editor.max_tokens,
            format=editor.format,
            retry_unreadable=editor.retry_unreadable,
        ),
    )


def build_artifact(
    run_id: str, config: RunSettings, result: SearchResult, examples: list[ICLExample]
) -> AlignedPrompt:
    return AlignedPrompt(
        system_prompt=result.best.system_prompt,
        icl_examples=tuple(examples),
        base_model=config.models.base,
        run_id=run_id,
        settings=config.model_dump(mode="json"),
        score=result.best_score,
        trace=tuple(
            LevelTrace(level=level, best_score=best, mean_score=mean)
            for level, (best, mean) in enumerate(result.trace, start=1)
        ),
        held_out=tuple(
            {"node_id": node.node_id, "system_prompt": node.system_prompt, "held_out_score": s}
            for node, s in result.held_out
        ),
    )


#: This job's entry in :data:`drpo.jobs.registry.JOB_MODULES`' table.
JOB = Job(
    kind=RUN_KIND,
    description="search for the system prompt that aligns the base model",
    create=create_search_run,
    run=run_search,
    result="SearchResult: the best node, its score and the levels searched",
)
