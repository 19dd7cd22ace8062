"""Run one or many DRPO searches in one process: one bus, one set of agents, one store.

:func:`run_searches` is what ``drpo optimize`` and ``drpo resume`` call. Every search is a run in
the store; they share the backends (so rate limits and batches are shared) and run at the same
time. A run that stops for any reason records why (interrupted, budget exhausted, failed) and
keeps everything recorded so far, so ``drpo resume RUN`` can finish it without paying twice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.client import AgentClient
from drpo.agents.retrieval import ICLRetriever
from drpo.agents.runtime import RunContext
from drpo.agents.search import BeamSearch, SearchResult
from drpo.backends.registry import BackendRegistry
from drpo.bus import Bus, Envelope
from drpo.bus.messages import ICLExample, RunFinished, RunStarted
from drpo.data.loaders import (
    default_icl_examples,
    default_train_queries,
    load_icl_examples,
    load_queries,
)
from drpo.jobs.artifact import AlignedPrompt, LevelTrace
from drpo.jobs.config import OptimizeConfig
from drpo.jobs.lifecycle import describe_error, leaf_exceptions
from drpo.jobs.session import Session, agent_session
from drpo.runs.journal import BudgetExceeded, JournaledCaller
from drpo.runs.store import RunStore, StoreError

log = structlog.get_logger("drpo.jobs.optimize")


@dataclass
class RunPlan:
    """A search to run: a new one (``run_id`` None) or one to resume."""

    config: OptimizeConfig
    artifact_path: Path | None = None
    run_id: str | None = None


@dataclass
class RunOutcome:
    run_id: str
    status: str
    artifact_path: Path | None = None
    result: SearchResult | None = None
    error: str | None = None


def draw_query_order(queries: Sequence[str], count: int, seed: int) -> list[str]:
    """The training queries in the order the search consumes them: a seeded sample, recorded
    with the run (the paper's order is unseeded and cannot be regenerated, spec §6)."""
    rng = random.Random(seed)
    return rng.sample(list(queries), min(count, len(queries)))


def prepare_inputs(config: OptimizeConfig) -> tuple[list[str], list[ICLExample]]:
    """Load training queries and ICL examples; bad files raise a clear DataFormatError."""
    queries = load_queries(config.data.train) if config.data.train else default_train_queries()
    examples = load_icl_examples(config.data.icl) if config.data.icl else default_icl_examples()
    order = draw_query_order(queries, config.search.num_train_queries, config.search.seed)
    return order, list(examples)


def run_record(config: OptimizeConfig, queries: list[str], examples: list[ICLExample]) -> dict:
    """Everything needed to redo the run exactly: settings, query order and ICL pool."""
    return {
        "settings": config.model_dump(mode="json"),
        "queries": queries,
        "icl_examples": [example.model_dump() for example in examples],
    }


async def run_searches(
    plans: Sequence[RunPlan],
    *,
    store: RunStore,
    registry: BackendRegistry | None = None,
    on_level: Callable[[str, int, int], None] | None = None,
    on_created: Callable[[str, OptimizeConfig], None] | None = None,
) -> list[RunOutcome]:
    """Run every plan concurrently on one bus; returns one outcome per plan, in order."""
    registry = registry or BackendRegistry()
    for plan in plans:
        registry.configure(plan.config.endpoints)
    outcomes: list[RunOutcome | None] = [None] * len(plans)
    async with agent_session(store, registry) as session:
        async with anyio.create_task_group() as searches:
            for index, plan in enumerate(plans):
                searches.start_soon(_run_one, index, plan, session, outcomes, on_level, on_created)
    return [outcome for outcome in outcomes if outcome is not None]


async def _run_one(
    index: int,
    plan: RunPlan,
    session: Session,
    outcomes: list[RunOutcome | None],
    on_level: Callable[[str, int, int], None] | None,
    on_created: Callable[[str, OptimizeConfig], None] | None,
) -> None:
    config = plan.config
    store, bus, runtime = session.store, session.bus, session.runtime
    if plan.run_id is None:
        queries, examples = prepare_inputs(config)
        record = run_record(config, queries, examples)
        run_id = await store.create_run("optimize", record, name=config.name)
    else:
        run_id = plan.run_id
        record = (await store.get_run(run_id)).config
        queries = list(record["queries"])
        examples = [ICLExample.model_validate(item) for item in record["icl_examples"]]
    if on_created is not None:
        on_created(run_id, config)
    bound = log.bind(run_id=run_id, agent="search")
    journal = JournaledCaller(
        store,
        run_id,
        max_calls=config.budget.max_calls,
        max_cost_usd=config.budget.max_cost_usd,
    )
    catalogue = AspectCatalogue.load_default().with_custom(list(config.critic.custom_aspects))
    runtime.attach(RunContext(run_id=run_id, journal=journal, catalogue=catalogue))
    retriever = ICLRetriever(examples, model_path=config.data.retriever)
    k = config.proposer.k

    async def retrieve(query: str) -> list[ICLExample]:
        return await retriever.atop_k(query, k) if k else []

    search = BeamSearch(bus, run_id, config, queries, retrieve)
    if on_level is not None:
        search.on_level = lambda level, limit: on_level(run_id, level, limit)
    artifact_path = plan.artifact_path
    await store.set_run_status(run_id, "running")
    await AgentClient(bus, run_id, sender="search").emit(
        RunStarted(config=record["settings"], queries=tuple(queries))
    )
    bound.info("search started", queries=len(queries), resumed=plan.run_id is not None)
    outcome = RunOutcome(run_id=run_id, status="failed")
    try:
        result = await search.run()
        artifact = build_artifact(run_id, config, result, examples)
        if artifact_path is not None:
            artifact.save(artifact_path)
        outcome = RunOutcome(run_id, "finished", artifact_path, result)
        summary = {
            "best_prompt": result.best.system_prompt,
            "best_score": result.best_score,
            "best_node_id": result.best.node_id,
            "levels": result.levels,
            "artifact": str(artifact_path) if artifact_path else None,
            "artifact_json": artifact.model_dump(mode="json"),
        }
        await _finish(store, bus, run_id, "finished", result=summary, best=result)
        bound.info("search finished", score=round(result.best_score, 3), levels=result.levels)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await _mark_interrupted(store, bus, run_id)
        raise
    except Exception as exc:
        # A budget refusal reaches the search as the agent's RemoteError, often inside
        # exception groups; the journal knows whether it refused a call for the budget.
        refused = _budget_refusal(exc) or journal.exhausted
        if refused is not None:
            outcome = RunOutcome(run_id, "budget_exhausted", error=str(refused))
            await _finish(store, bus, run_id, "budget_exhausted", error=str(refused))
            bound.warning("budget reached; resume with a larger budget", error=str(refused))
        else:
            outcome = RunOutcome(run_id, "failed", error=describe_error(exc))
            await _finish(store, bus, run_id, "failed", error=outcome.error)
            bound.error("search failed", error=outcome.error)
    finally:
        outcomes[index] = outcome
        runtime.detach(run_id)


def _budget_refusal(exc: BaseException) -> BudgetExceeded | None:
    return next((e for e in leaf_exceptions(exc) if isinstance(e, BudgetExceeded)), None)


async def _finish(
    store: RunStore,
    bus: Bus,
    run_id: str,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    best: SearchResult | None = None,
) -> None:
    await _emit_finished(bus, run_id, status, error=error, best=best)
    await store.set_run_status(run_id, status, result=result, error=error)


async def _emit_finished(
    bus: Bus, run_id: str, status: str, *, error: str | None, best: SearchResult | None = None
) -> Envelope:
    return await AgentClient(bus, run_id, sender="search").emit(
        RunFinished(
            status=status,  # type: ignore[arg-type]
            best_node_id=best.best.node_id if best else None,
            best_prompt=best.best.system_prompt if best else None,
            best_score=best.best_score if best else None,
            error=error,
        )
    )


async def _mark_interrupted(store: RunStore, bus: Bus, run_id: str) -> None:
    """Record that a cancelled run was interrupted (call shielded).

    The status comes first: it is what ``drpo resume`` and the views go by. The recorder is
    being cancelled at the same moment, so the event may miss its last batch; it is also
    written straight to the store (a message id is stored once, so it is never recorded twice),
    and both are bounded in time so that a Ctrl-C can never hang on them.
    """
    await store.set_run_status(run_id, "interrupted", error="interrupted")
    with anyio.move_on_after(5):
        envelope = await _emit_finished(bus, run_id, "interrupted", error="interrupted")
        try:
            await store.append_messages([envelope], wait=True)
        except StoreError as exc:  # the store is closing: the status is what matters
            log.warning("could not record the interruption event", run_id=run_id, error=str(exc))


def build_artifact(
    run_id: str, config: OptimizeConfig, result: SearchResult, examples: list[ICLExample]
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
