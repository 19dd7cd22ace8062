"""The evaluation job on the agent bus: every prompt answers every query, one judge scores all.

An evaluation is a run of kind ``eval`` in the store. Its record holds everything needed to redo
it exactly (the prompts with their examples and models, the queries with their categories and
tags, the settings), so :func:`run_eval` reads its inputs from the record alone: a new evaluation
and a resumed one take the same path. Every model call goes through the run's journal, so an
evaluation killed at any moment and run again answers every recorded call from the journal, for
free, and only makes the calls that are missing. Running a finished evaluation again recomputes
its report from the journal at no cost.

All (prompt, query) items run at once, each its own task (answer, then judge), capped at
``concurrency`` in flight; the local backend merges concurrent calls into batches and the API
backend paces them under its rate limits. An item whose call fails does not stop the others:
the run ends ``failed`` with the failures counted, and a resume makes only the missing calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from pydantic import BaseModel, ConfigDict, Field

from drpo.agents.client import AgentClient
from drpo.agents.retrieval import ICLRetriever
from drpo.backends.kinds import (
    DEFAULT_MODEL,
    is_chat_only,
    parse_model_spec,
    validate_endpoints,
)
from drpo.domain.events import Note, RunStarted
from drpo.domain.requests import CriticMode, CriticPolicyName, Framing, Judge, ProposeAnswer
from drpo.domain.values import ICLExample
from drpo.jobs.config import BudgetSettings
from drpo.jobs.evaluation.protocol import EvalPrompt, EvalQuery, selection_for
from drpo.jobs.evaluation.stats import summarize
from drpo.jobs.lifecycle import JobResult, RunLifecycle, RunOutcome, describe_error, run_versions
from drpo.jobs.registry import Job
from drpo.jobs.session import Session
from drpo.runs.store import RunStore

log = structlog.get_logger("drpo.eval")

RESULT_FORMAT = "drpo.eval/1"
RUN_KIND = "eval"
SENDER = "eval"


class EvalSettings(BaseModel):
    """How an evaluation is run; recorded with the run (``config["settings"]["eval"]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    judge: str = DEFAULT_MODEL
    judge_mode: CriticMode = "logprobs"
    judge_policy: CriticPolicyName = "robust"
    #: Token limit of a JSON verdict (the logprobs judge writes one token per aspect).
    judge_max_tokens: int = Field(default=2048, ge=16)
    #: Base model of prompts that name none (plain prompts); artifacts name their own.
    model: str = DEFAULT_MODEL
    #: When set, every prompt uses this model, artifacts included.
    model_override: str | None = None
    #: When set, every prompt uses this framing; else an artifact's own, else its model's.
    framing: Framing | None = None
    #: ICL examples retrieved per query for prompts that carry examples (artifacts).
    k: int = Field(default=3, ge=0, le=8)
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    #: Bootstrap resamples and seed (the seed also drew the --sample).
    resamples: int = Field(default=2000, ge=0)
    seed: int = 0
    #: Queries listed under "most improved" and "most worsened" per comparison.
    top: int = Field(default=5, ge=0)
    #: (prompt, query) items in flight at once.
    concurrency: int = Field(default=256, ge=1)
    max_calls: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)
    #: Where the queries came from (provenance only; the queries themselves are recorded).
    queries_path: str | None = None
    tags_path: str | None = None
    sample: int | None = None
    limit: int | None = None

    def model_post_init(self, __context: Any) -> None:
        for spec in (self.judge, self.model, self.model_override):
            if spec is not None:
                parse_model_spec(spec)


def resolve_prompts(prompts: Sequence[EvalPrompt], settings: EvalSettings) -> list[EvalPrompt]:
    """Each prompt with its model and framing settled, as recorded with the run."""
    resolved = []
    for prompt in prompts:
        model = settings.model_override or prompt.model or settings.model
        parse_model_spec(model)
        resolved.append(
            EvalPrompt(
                label=prompt.label,
                system_prompt=prompt.system_prompt,
                icl_examples=prompt.icl_examples,
                model=model,
                # a plain prompt takes the layout its model needs (the chat layout for a
                # chat-only model); an artifact keeps the one it was searched with
                framing=settings.framing
                or prompt.framing
                or ("chat" if is_chat_only(model) else "raw"),
                source=prompt.source,
            )
        )
    return resolved


async def create_eval_run(
    store: RunStore,
    prompts: Sequence[EvalPrompt],
    queries: Sequence[EvalQuery],
    settings: EvalSettings,
    *,
    name: str | None = None,
    endpoints: dict[str, Any] | None = None,
) -> str:
    """Record a new evaluation (status ``created``); :func:`run_eval` then runs it.
    ``endpoints`` are ``[endpoints]`` settings (limits, prices, capabilities) of its models."""
    if not prompts:
        raise ValueError("an evaluation needs at least one prompt")
    if not queries:
        raise ValueError("an evaluation needs at least one query")
    resolved = resolve_prompts(prompts, settings)
    models = list(dict.fromkeys(p.model for p in resolved))
    record = {
        "settings": {
            "models": {"base": ", ".join(m for m in models if m), "critic": settings.judge},
            "eval": settings.model_dump(mode="json"),
            "endpoints": {
                spec: value.model_dump(mode="json", exclude_unset=True)
                for spec, value in validate_endpoints(endpoints or {}).items()
            },
        },
        "prompts": [p.to_dict() for p in resolved],
        "queries": [q.to_dict() for q in queries],
        "versions": run_versions(),
    }
    return await store.create_run(RUN_KIND, record, name=name)


@dataclass
class ItemResult:
    """One prompt's answer to one query and its verdict."""

    answer: str | None = None
    scores: dict[str, float] | None = None
    reward: float | None = None
    error: str | None = None
    judge_error: str | None = None


@dataclass
class EvalOutcome:
    run_id: str
    status: str
    result: dict[str, Any] | None = None
    error: str | None = None
    #: ``items[p][q]``: prompt p on query q (full answers; the stored result has excerpts).
    items: list[list[ItemResult]] = field(default_factory=list)
    prompts: list[EvalPrompt] = field(default_factory=list)
    queries: list[EvalQuery] = field(default_factory=list)

    def export(self) -> dict[str, Any]:
        """The result plus every answer and score, for ``--json-out``."""
        data = dict(self.result or {})
        data["status"] = self.status
        data["error"] = self.error
        data["items"] = [
            {
                "query_id": query.id,
                "category": query.category,
                "instruction": query.instruction,
                "results": {
                    prompt.label: {
                        "answer": item.answer,
                        "scores": item.scores,
                        "reward": item.reward,
                        "error": item.error or item.judge_error,
                    }
                    for prompt, item in zip(
                        self.prompts, (row[j] for row in self.items), strict=True
                    )
                },
            }
            for j, query in enumerate(self.queries)
        ]
        return data


async def _retrieve_all(
    prompts: Sequence[EvalPrompt], queries: Sequence[EvalQuery], k: int
) -> list[list[tuple[ICLExample, ...]]]:
    """The examples each prompt shows with each query (top k by similarity; none for prompts
    without examples). One retriever per distinct example pool, all queries in one batch."""
    texts = [q.instruction for q in queries]
    by_pool: dict[tuple[ICLExample, ...], list[tuple[ICLExample, ...]]] = {}
    out = []
    for prompt in prompts:
        pool = prompt.icl_examples
        if not pool or k <= 0:
            out.append([()] * len(queries))
            continue
        if pool not in by_pool:
            ranked = await ICLRetriever(list(pool)).atop_k_many(texts, k)
            by_pool[pool] = [tuple(examples) for examples in ranked]
        out.append(by_pool[pool])
    return out


async def run_eval(
    session: Session,
    run_id: str,
    *,
    concurrency: int | None = None,
    on_item: Callable[[int, int], None] | None = None,
    budget: BudgetSettings | None = None,
    force: bool = False,
) -> EvalOutcome:
    """Run (or resume, or recompute) the evaluation recorded as ``run_id``.

    ``concurrency`` overrides the recorded cap on items in flight (it changes no result);
    ``on_item(done, total)`` is called as items complete (for progress bars).
    """
    store = session.store
    record = await store.get_run(run_id)
    run_id = record.run_id
    if record.kind != RUN_KIND:
        raise ValueError(f"run {run_id} is a {record.kind} run, not an evaluation")
    settings = EvalSettings.model_validate(record.config["settings"]["eval"])
    if concurrency is not None:
        settings = settings.model_copy(update={"concurrency": max(1, concurrency)})
    recorded = BudgetSettings(max_calls=settings.max_calls, max_cost_usd=settings.max_cost_usd)
    limits = recorded.overridden_by(budget)
    prompts = [EvalPrompt.from_dict(p) for p in record.config["prompts"]]
    queries = [EvalQuery.from_dict(q) for q in record.config["queries"]]
    lifecycle = RunLifecycle(
        session,
        run_id,
        sender=SENDER,
        budget=limits,
        endpoints=record.config["settings"].get("endpoints"),
        models=[prompt.model or settings.model for prompt in prompts] + [settings.judge],
        force=force,
    )
    journal = lifecycle.journal
    bound = log.bind(run_id=run_id, agent=SENDER)
    items = [[ItemResult() for _ in queries] for _ in prompts]
    outcome = EvalOutcome(run_id, "failed", items=items, prompts=prompts, queries=queries)

    async def job() -> JobResult[EvalOutcome]:
        bound.info("evaluation started", prompts=len(prompts), queries=len(queries))
        examples = await _retrieve_all(prompts, queries, settings.k)
        await _evaluate_all(session, run_id, settings, prompts, queries, examples, items, on_item)
        failures = [item.error for row in items for item in row if item.error]
        result = summarize(
            [_prompt_info(p, settings) for p in prompts],
            queries,
            [[item.scores for item in row] for row in items],
            [[item.answer or "" for item in row] for row in items],
            resamples=settings.resamples,
            seed=settings.seed,
            top=settings.top,
        )
        totals = journal.totals()
        result = {
            "format": RESULT_FORMAT,
            "run_id": run_id,
            "judge": settings.judge,
            "judge_mode": settings.judge_mode,
            **result,
            "failed_items": len(failures),
            "judge_failures": sum(1 for row in items for i in row if i.judge_error),
            "calls": {
                "new": totals.calls,
                "replayed": totals.replayed,
                "errors": totals.errors,
                "cost_usd": round(totals.cost_usd, 6),
            },
        }
        bound.info("evaluation ended", failed=len(failures))
        if not failures:
            return JobResult(outcome, summary=result)
        error = (
            f"{len(failures)} of {len(prompts) * len(queries)} items failed "
            f"(first: {failures[0]}); continue with `drpo resume {run_id}` "
            "(recorded calls are replayed for free)"
        )
        return JobResult(outcome, summary=result, status="failed", error=error)

    started = RunStarted(
        config=record.config["settings"], queries=tuple(q.instruction for q in queries)
    )
    ended = await lifecycle.run(job, started)
    outcome.status, outcome.error, outcome.result = ended.status, ended.error, ended.summary
    return outcome


def _prompt_info(prompt: EvalPrompt, settings: EvalSettings) -> dict[str, Any]:
    return {
        "label": prompt.label,
        "model": prompt.model,
        "framing": prompt.framing,
        "source": prompt.source,
        "k": settings.k if prompt.icl_examples else 0,
        "system_prompt": prompt.system_prompt,
    }


async def _evaluate_all(
    session: Session,
    run_id: str,
    settings: EvalSettings,
    prompts: Sequence[EvalPrompt],
    queries: Sequence[EvalQuery],
    examples: list[list[tuple[ICLExample, ...]]],
    items: list[list[ItemResult]],
    on_item: Callable[[int, int], None] | None,
) -> None:
    agents = AgentClient(session.bus, run_id, sender=SENDER)
    limiter = anyio.CapacityLimiter(settings.concurrency)
    total = len(prompts) * len(queries)
    done = 0

    async def one(p: int, q: int) -> None:
        nonlocal done
        prompt, query, item = prompts[p], queries[q], items[p][q]
        node_id = f"e{p}.{q}"
        async with limiter:
            try:
                item.answer = await agents.propose(
                    ProposeAnswer(
                        model=prompt.model or settings.model,
                        system_prompt=prompt.system_prompt,
                        icl_examples=examples[p][q],
                        query=query.instruction,
                        framing=prompt.framing or "raw",  # type: ignore[arg-type]
                        max_tokens=settings.max_tokens,
                        temperature=settings.temperature,
                    ),
                    node_id=node_id,
                )
                critique = await agents.judge(
                    Judge(
                        model=settings.judge,
                        query=query.instruction,
                        answer=item.answer,
                        selection=selection_for(query),
                        mode=settings.judge_mode,
                        policy=settings.judge_policy,
                        max_tokens=settings.judge_max_tokens,
                    ),
                    node_id=node_id,
                )
            except Exception as exc:  # one item's failure does not stop the others
                item.error = describe_error(exc)
            else:
                if critique.failed:
                    item.judge_error = critique.error or "the verdict could not be read"
                else:
                    item.scores = {name: s.score for name, s in critique.scores.items()}
                    item.reward = critique.reward
                    item.judge_error = critique.error
            await agents.emit(
                Note(
                    text=f"eval {prompt.label} on query {query.id}",
                    data={
                        "prompt": prompt.label,
                        "query_id": query.id,
                        "category": query.category,
                        "scores": item.scores,
                        "reward": item.reward,
                        "error": item.error or item.judge_error,
                    },
                ),
                node_id=node_id,
            )
        done += 1
        if on_item is not None:
            on_item(done, total)

    async with anyio.create_task_group() as tg:
        for q in range(len(queries)):  # query-major: every prompt's answer to a query together
            for p in range(len(prompts)):
                tg.start_soon(one, p, q)


async def run_evaluation(
    session: Session,
    run_id: str,
    *,
    budget: BudgetSettings | None = None,
    force: bool = False,
) -> RunOutcome[EvalOutcome]:
    """:func:`run_eval` as every job runs: its outcome a :class:`RunOutcome` whose ``summary``
    is the stored result and whose ``result`` is the :class:`EvalOutcome` (every answer)."""
    evaluated = await run_eval(session, run_id, budget=budget, force=force)
    return RunOutcome(
        evaluated.run_id, evaluated.status, evaluated.error, evaluated.result, evaluated
    )


#: This job's entry in :data:`drpo.jobs.registry.JOB_MODULES`' table.
JOB = Job(
    kind=RUN_KIND,
    description="evaluate prompts on a query set, paired against the first",
    create=create_eval_run,
    run=run_evaluation,
    result="EvalOutcome: the report (also the summary) and every answer and score",
)
