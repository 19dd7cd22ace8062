"""Offline optimization of the ICL examples' answers (spec §4), every example at once.

For each (query, answer): the critic (its "ruthless" variant, 3-6 aspects) judges the answer;
then, for up to ``icl.rounds`` rounds, the editor rewrites the *latest* answer from its critique
and the critic judges the rewrite; a rewrite is accepted when its total score is not lower than
the best so far, and the chain stops early at a perfect score. The chains are independent, so
all run concurrently: the critical path is one chain (at most 2 + 2 x rounds calls), not the sum.

An ICL run is a run like a search: its record holds the settings (from the same presets as
``drpo optimize``), the examples and the output path, every call goes through its journal, and
``drpo resume RUN`` finishes an interrupted one for free. The examples file is rewritten
(atomically) each time an example improves, so it always holds the best answers so far.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import structlog

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.client import AgentClient
from drpo.data.files import write_atomically
from drpo.domain.events import Note, RunStarted
from drpo.domain.requests import EditAnswer, Judge, SelectAspects
from drpo.domain.values import Critique, ICLExample
from drpo.jobs.config import BudgetSettings, RunSettings
from drpo.jobs.lifecycle import JobResult, RunLifecycle, RunOutcome, run_versions
from drpo.jobs.registry import Job
from drpo.jobs.session import Session
from drpo.runs.store import RunStore

log = structlog.get_logger("drpo.jobs.icl")

RUN_KIND = "icl"
SENDER = "icl"


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


async def create_icl_run(
    store: RunStore,
    examples: Sequence[ICLExample],
    config: RunSettings,
    out: Path,
    *,
    limit: int | None = None,
) -> str:
    """Record a new ICL run (status ``created``): settings, examples, output file, versions."""
    chosen = list(examples)[:limit] if limit else list(examples)
    if not chosen:
        raise ValueError("an ICL run needs at least one example")
    record = {
        "settings": config.settled().model_dump(mode="json"),
        "icl_examples": [example.model_dump() for example in chosen],
        "out": str(out),
        "versions": run_versions(),
    }
    return await store.create_run(RUN_KIND, record, name=config.name)


async def run_icl(
    session: Session,
    run_id: str,
    *,
    budget: BudgetSettings | None = None,
    force: bool = False,
) -> RunOutcome[list[ExampleTrace]]:
    """Run (or resume) the ICL run recorded as ``run_id``, from its record alone."""
    record = await session.store.get_run(run_id)
    run_id = record.run_id
    if record.kind != RUN_KIND:
        raise ValueError(f"run {run_id} is a {record.kind} run, not an ICL run")
    config = RunSettings.model_validate(record.config["settings"]).settled().with_budget(budget)
    examples = [ICLExample.model_validate(item) for item in record.config["icl_examples"]]
    out = Path(record.config["out"])
    catalogue = AspectCatalogue.load_default().with_custom(list(config.critic.custom_aspects))
    agents = AgentClient(session.bus, run_id, sender=SENDER)
    best = list(examples)
    writing = anyio.Lock()

    async def improved(index: int, answer: str) -> None:
        best[index] = ICLExample(query=examples[index].query, answer=answer)
        async with writing:
            await anyio.to_thread.run_sync(write_examples, out, list(best))

    async def job() -> JobResult[list[ExampleTrace]]:
        traces: list[ExampleTrace | None] = [None] * len(examples)

        async def one(index: int) -> None:
            traces[index] = await _optimize_one(agents, config, index, examples[index], improved)

        async with anyio.create_task_group() as tg:
            for index in range(len(examples)):
                tg.start_soon(one, index)
        async with writing:
            await anyio.to_thread.run_sync(write_examples, out, list(best))
        done = [trace for trace in traces if trace is not None]
        summary = {
            "out": str(out),
            "examples": len(best),
            "initial_total": sum(t.initial_total for t in done),
            "best_total": sum(t.best_total for t in done),
        }
        return JobResult(done, summary=summary)

    lifecycle = RunLifecycle(
        session,
        run_id,
        sender=SENDER,
        budget=config.budget,
        catalogue=catalogue,
        endpoints=config.endpoints,
        models=(config.models.critic, config.models.editor),
        force=force,
    )
    started = RunStarted(config=record.config["settings"], queries=tuple(e.query for e in examples))
    return await lifecycle.run(job, started)


async def _optimize_one(
    agents: AgentClient,
    config: RunSettings,
    index: int,
    example: ICLExample,
    improved: Callable[[int, str], Awaitable[None]],
) -> ExampleTrace:
    """One example's chain: judge, then rewrite the latest answer and judge it, round by round."""
    node = f"icl{index}"
    critic = config.critic
    selection = await agents.select_aspects(
        SelectAspects(
            query=example.query,
            model=config.models.critic,
            variant="icl",
            mode=critic.mode,
            max_tokens=critic.max_tokens,
            policy=critic.policy,
        ),
        node_id=node,
    )

    async def judge(answer: str) -> Critique:
        return await agents.judge(
            Judge(
                model=config.models.critic,
                query=example.query,
                answer=answer,
                selection=selection,
                mode=critic.mode,
                variant="icl",
                max_tokens=critic.max_tokens,
                policy=critic.policy,
            ),
            node_id=node,
        )

    current_answer = example.answer
    current = await judge(current_answer)
    best = total_score(current)
    perfect = 5.0 * len(selection.aspects)
    trace = ExampleTrace(example.query, best, best, perfect, history=[best])
    for _ in range(config.icl.rounds):
        if best >= perfect:
            break
        trace.rounds += 1
        rewritten = await agents.edit_answer(
            EditAnswer(
                model=config.models.editor,
                query=example.query,
                answer=current_answer,
                critique=current,
                max_tokens=config.icl.max_tokens,
                format=config.editor.format,
                retry_unreadable=config.editor.retry_unreadable,
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
            best = total
            trace.accepted += 1
            await improved(index, current_answer)
    trace.best_total = best
    await agents.emit(
        Note(
            text=f"example {index} optimized: {trace.initial_total:g} -> {best:g} of {perfect:g}",
            data={"query": example.query, "history": trace.history},
        ),
        node_id=node,
    )
    return trace


def write_examples(path: Path, examples: Sequence[ICLExample]) -> None:
    """Write the examples as a JSON list, atomically (a temp file renamed into place), so a
    reader or a crash never sees half a file."""
    payload = json.dumps([e.model_dump() for e in examples], indent=2, ensure_ascii=False)
    write_atomically(path, payload)


#: This job's entry in :data:`drpo.jobs.registry.JOB_MODULES`' table.
JOB = Job(
    kind=RUN_KIND,
    description="optimize the answers of the ICL examples (the paper's offline stage)",
    create=create_icl_run,
    run=run_icl,
    result="list[ExampleTrace]: each example's rounds, from its first to its best answer",
)
