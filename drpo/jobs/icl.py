"""Offline optimization of the ICL examples' answers (spec §4), every example at once.

For each (query, answer): the critic (its "ruthless" variant, 3-6 aspects) judges the answer;
then, for up to ``rounds`` rounds, the editor rewrites the *latest* answer from its critique and
the critic judges the rewrite; a rewrite is accepted when its total score is not lower than the
best so far, and the chain stops early at a perfect score. The chains are independent, so all
run concurrently: the critical path is one chain (at most 2 + 2 x rounds calls), not the sum.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog
from pydantic import BaseModel, ConfigDict, Field

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.client import AgentClient
from drpo.agents.runtime import RunContext
from drpo.backends.kinds import DEFAULT_MODEL
from drpo.bus.messages import (
    CriticMode,
    Critique,
    EditAnswer,
    ICLExample,
    Judge,
    Note,
    RunFinished,
    SelectAspects,
)
from drpo.jobs.session import Session
from drpo.runs.journal import BudgetExceeded, JournaledCaller

log = structlog.get_logger("drpo.jobs.icl")


class ICLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    critic: str = DEFAULT_MODEL
    editor: str = DEFAULT_MODEL
    rounds: int = Field(default=5, ge=0)
    mode: CriticMode = "json"
    max_calls: int | None = None
    max_cost_usd: float | None = None


@dataclass
class ExampleTrace:
    query: str
    initial_total: float
    best_total: float
    max_total: float
    accepted: int = 0
    rounds: int = 0
    history: list[float] = field(default_factory=list)


def total_score(critique: Critique) -> float:
    """The ICL stage ranks by the *sum* of aspect scores (spec §4), not the mean."""
    return 0.0 if critique.failed else sum(s.score for s in critique.scores.values())


async def optimize_examples(
    session: Session,
    run_id: str,
    examples: Sequence[ICLExample],
    config: ICLConfig,
) -> tuple[list[ICLExample], list[ExampleTrace]]:
    """Optimize every example's answer concurrently; returns them in input order."""
    journal = JournaledCaller(
        session.store, run_id, max_calls=config.max_calls, max_cost_usd=config.max_cost_usd
    )
    session.runtime.attach(
        RunContext(run_id=run_id, journal=journal, catalogue=AspectCatalogue.load_default())
    )
    improved: list[ICLExample | None] = [None] * len(examples)
    traces: list[ExampleTrace | None] = [None] * len(examples)

    async def one(index: int, example: ICLExample) -> None:
        improved[index], traces[index] = await _optimize_one(
            session, run_id, index, example, config
        )

    try:
        async with anyio.create_task_group() as tg:
            for index, example in enumerate(examples):
                tg.start_soon(one, index, example)
    finally:
        session.runtime.detach(run_id)
    return [e for e in improved if e is not None], [t for t in traces if t is not None]


async def _optimize_one(
    session: Session, run_id: str, index: int, example: ICLExample, config: ICLConfig
) -> tuple[ICLExample, ExampleTrace]:
    agents = AgentClient(session.bus, run_id, sender="icl")
    node = f"icl{index}"
    selection = await agents.select_aspects(
        SelectAspects(query=example.query, model=config.critic, variant="icl", mode=config.mode),
        node_id=node,
    )

    async def judge(answer: str) -> Critique:
        return await agents.judge(
            Judge(
                model=config.critic,
                query=example.query,
                answer=answer,
                selection=selection,
                mode=config.mode,
                variant="icl",
            ),
            node_id=node,
        )

    current_answer = best_answer = example.answer
    current = await judge(current_answer)
    best = total_score(current)
    perfect = 5.0 * len(selection.aspects)
    trace = ExampleTrace(example.query, best, best, perfect, history=[best])
    for _ in range(config.rounds):
        if best >= perfect:
            break
        trace.rounds += 1
        rewritten = await agents.edit_answer(
            EditAnswer(
                model=config.editor, query=example.query, answer=current_answer, critique=current
            ),
            node_id=node,
        )
        if rewritten.answer is None:
            continue  # unparsable rewrite: recorded by the editor, this round is lost
        current_answer = rewritten.answer
        current = await judge(current_answer)
        total = total_score(current)
        trace.history.append(total)
        if total >= best:  # ties are accepted, as in the paper
            best, best_answer = total, current_answer
            trace.accepted += 1
    trace.best_total = best
    await agents.emit(
        Note(
            text=f"example {index} optimized: {trace.initial_total:g} -> {best:g} of {perfect:g}",
            data={"query": example.query, "history": trace.history},
        ),
        node_id=node,
    )
    return ICLExample(query=example.query, answer=best_answer), trace


async def run_icl(
    session: Session,
    examples: Sequence[ICLExample],
    config: ICLConfig,
    out: Path,
    *,
    run_id: str | None = None,
) -> tuple[str, str, list[ExampleTrace]]:
    """Create (or resume) an ICL run, optimize, write the examples JSON; returns (id, status)."""
    store = session.store
    if run_id is None:
        run_id = await store.create_run(
            "icl",
            {
                "settings": config.model_dump(),
                "icl_examples": [e.model_dump() for e in examples],
                "out": str(out),
            },
        )
    await store.set_run_status(run_id, "running")
    traces: list[ExampleTrace] = []
    try:
        improved, traces = await optimize_examples(session, run_id, examples, config)
        _write_examples(out, improved)
        result = {
            "out": str(out),
            "examples": len(improved),
            "initial_total": sum(t.initial_total for t in traces),
            "best_total": sum(t.best_total for t in traces),
        }
        status, error = "finished", None
    except BudgetExceeded as exc:
        status, error, result = "budget_exhausted", str(exc), None
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await store.set_run_status(run_id, "interrupted", error="interrupted")
        raise
    await AgentClient(session.bus, run_id, sender="icl").emit(
        RunFinished(status=status, error=error)  # type: ignore[arg-type]
    )
    await store.set_run_status(run_id, status, result=result, error=error)  # type: ignore[arg-type]
    return run_id, status, traces


def _write_examples(path: Path, examples: Sequence[ICLExample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = [e.model_dump() for e in examples]
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
