"""Answer queries with an aligned prompt: the artifact's system prompt plus the top-k ICL examples
retrieved for each query (spec §1.3).

A generation is a run like any other: its record holds the prompt, the examples, the model, the
layout and the sampling settings, every answer goes through the run's journal, and an
interrupted generation resumes for free. The sampling defaults are the paper's at inference
(T 0.7, top_p 0.95, 512 new tokens): greedy decoding makes small models repeat themselves until
their token limit. The layout is the one the prompt was searched with (no train/inference
mismatch, spec §9 item 9) unless the settings ask for the paper's inference layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from pydantic import ValidationError

from drpo.agents.client import AgentClient
from drpo.agents.retrieval import ICLRetriever
from drpo.backends.kinds import DEFAULT_MODEL, is_chat_only, validate_endpoints
from drpo.domain.events import RunStarted
from drpo.domain.requests import Framing, ProposeAnswer
from drpo.domain.values import ICLExample
from drpo.jobs.artifact import AlignedPrompt, ArtifactError
from drpo.jobs.config import BudgetSettings, GenerateSettings, RunSettings
from drpo.jobs.lifecycle import JobResult, RunLifecycle, RunOutcome, run_versions
from drpo.jobs.registry import Job
from drpo.jobs.session import Session
from drpo.runs.store import RunStore

log = structlog.get_logger("drpo.jobs.generate")

RUN_KIND = "generate"
SENDER = "generate"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: Answers generated at once (the local backend batches them, the API backend pipelines them).
CONCURRENCY = 64


def generation_plan(
    artifact_path: Path | None,
    *,
    model: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    endpoints: dict[str, Any] | None = None,
) -> dict:
    """What a generation needs, from an artifact (or, with none, the unaligned default prompt
    with no examples): prompt, examples, model, layout, sampling and endpoint settings (the
    artifact's search's, then ``endpoints``), ready to record. ``sampling`` overrides the
    generate settings field by field (k, max_tokens, temperature, top_p, framing; None keeps)."""
    if artifact_path is None:
        chosen = _overridden(GenerateSettings(), sampling)
        base = model or DEFAULT_MODEL
        return {
            "system_prompt": DEFAULT_SYSTEM_PROMPT,
            "icl_examples": [],
            "model": base,
            "framing": "chat" if is_chat_only(base) else "raw",
            "artifact": None,
            "settings": chosen.model_dump(mode="json"),
            "endpoints": _endpoints_json(endpoints or {}),
        }
    artifact = AlignedPrompt.load(artifact_path)
    searched = _searched_config(artifact)
    chosen = _overridden(searched.generate, sampling)
    framing: Framing = "inference" if chosen.framing == "inference" else searched.proposer_framing()
    base = model or artifact.base_model
    return {
        "system_prompt": artifact.system_prompt,
        "icl_examples": [e.model_dump() for e in artifact.icl_examples],
        "model": base,
        "framing": framing,
        "artifact": str(artifact_path),
        "settings": chosen.model_dump(mode="json"),
        "endpoints": _endpoints_json({**searched.endpoints, **(endpoints or {})}),
    }


def _overridden(settings: GenerateSettings, sampling: Mapping[str, Any] | None) -> GenerateSettings:
    given = {name: value for name, value in (sampling or {}).items() if value is not None}
    return GenerateSettings(**{**settings.model_dump(), **given}) if given else settings


def _endpoints_json(endpoints: dict[str, Any]) -> dict[str, Any]:
    return {
        spec: settings.model_dump(mode="json", exclude_unset=True)
        for spec, settings in validate_endpoints(endpoints).items()
    }


def _searched_config(artifact: AlignedPrompt) -> RunSettings:
    """The settings the artifact's prompt was searched with (defaults where it recorded none,
    as artifacts written before a setting existed did not)."""
    known = {k: v for k, v in artifact.settings.items() if k in RunSettings.model_fields}
    try:
        return RunSettings.model_validate(known)
    except ValidationError as exc:
        raise ArtifactError(f"the artifact's settings cannot be read: {exc}") from None


async def create_generate_run(
    store: RunStore, queries: Sequence[str], plan: dict, *, name: str | None = None
) -> str:
    """Record a new generation (status ``created``): the plan, the queries, the versions."""
    if not queries:
        raise ValueError("a generation needs at least one query")
    record = {**plan, "queries": list(queries), "versions": run_versions()}
    return await store.create_run(RUN_KIND, record, name=name)


async def run_generate(
    session: Session,
    run_id: str,
    *,
    budget: BudgetSettings | None = None,
    force: bool = False,
) -> RunOutcome[list[str]]:
    """Run (or resume) the generation recorded as ``run_id``; its result is the answers, in
    query order."""
    record = await session.store.get_run(run_id)
    run_id = record.run_id
    if record.kind != RUN_KIND:
        raise ValueError(f"run {run_id} is a {record.kind} run, not a generation")
    plan = record.config
    settings = GenerateSettings.model_validate(plan["settings"])
    queries: list[str] = list(plan["queries"])
    examples = [ICLExample.model_validate(e) for e in plan["icl_examples"]]
    agents = AgentClient(session.bus, run_id, sender=SENDER)

    async def job() -> JobResult[list[str]]:
        retriever = ICLRetriever(examples) if examples and settings.k else None
        chosen = await retriever.atop_k_many(queries, settings.k) if retriever else None
        answers: list[str] = [""] * len(queries)
        limiter = anyio.CapacityLimiter(CONCURRENCY)

        async def one(index: int) -> None:
            async with limiter:
                answers[index] = await agents.propose(
                    ProposeAnswer(
                        model=plan["model"],
                        system_prompt=plan["system_prompt"],
                        icl_examples=tuple(chosen[index]) if chosen else (),
                        query=queries[index],
                        framing=plan["framing"],
                        max_tokens=settings.max_tokens,
                        temperature=settings.temperature,
                        top_p=settings.top_p,
                    ),
                    node_id=f"g{index}",
                )

        async with anyio.create_task_group() as tg:
            for index in range(len(queries)):
                tg.start_soon(one, index)
        pairs = zip(queries, answers, strict=True)
        summary = {"answers": [{"query": q, "answer": a} for q, a in pairs]}
        return JobResult(answers, summary=summary)

    lifecycle = RunLifecycle(
        session,
        run_id,
        sender=SENDER,
        budget=budget,
        endpoints=plan.get("endpoints"),
        models=(plan["model"],),
        force=force,
    )
    started = RunStarted(config={"generate": plan["settings"]}, queries=tuple(queries))
    return await lifecycle.run(job, started)


#: This job's entry in :data:`drpo.jobs.registry.JOB_MODULES`' table.
JOB = Job(
    kind=RUN_KIND,
    description="answer queries with an aligned prompt",
    create=create_generate_run,
    run=run_generate,
    result="list[str]: the answers, in query order",
)
