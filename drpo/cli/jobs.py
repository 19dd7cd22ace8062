"""``drpo optimize``, ``drpo icl``, ``drpo generate`` and ``drpo resume``: start a job as a run,
watch it, and say how it ended.

Every job takes its settings from the same presets (``--preset small|robust|paper``, a TOML file,
flags), runs as a run of the store, and ends the same way: ``finished``, or a one-line reason and
how to continue (``drpo resume RUN``, with a larger budget when the budget was reached), with a
non-zero exit code. When the output is not a terminal (a log file, CI) progress is one line per
level instead of a progress bar.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from drpo.cli.support import (
    DbOption,
    TraceContentOption,
    TraceEndpointOption,
    TraceOption,
    checked_trace,
    console,
    err_console,
    fail,
    report_outcome,
    resolve_db,
    run_async,
    trace_layer,
    trace_settings,
)
from drpo.errors import UserError
from drpo.runs.paths import logs_dir

PresetOption = Annotated[
    str | None,
    typer.Option(help="small (default: sized for the embedded model), robust or paper."),
]
ConfigOption = Annotated[Path | None, typer.Option(help="TOML settings file.")]
MaxCostOption = Annotated[float | None, typer.Option(help="Stop at this cost (USD).")]
MaxCallsOption = Annotated[int | None, typer.Option(help="Stop after this many calls.")]


# ---------------------------------------------------------------------------------- settings


def build_settings(
    preset: str | None, config: Path | None, overrides: dict[str, dict[str, Any]]
) -> Any:
    """Preset, then the TOML file, then flags (only those given); a bad value fails cleanly."""
    from drpo.jobs.config import ConfigError, build_config, load_toml

    layer: dict[str, Any] = {
        section: {key: value for key, value in values.items() if value is not None}
        for section, values in overrides.items()
    }
    layer = {section: values for section, values in layer.items() if values}
    if preset is not None:
        layer["preset"] = preset
    try:
        return build_config(load_toml(config) if config else {}, layer)
    except ConfigError as exc:
        raise fail(str(exc)) from None


# ---------------------------------------------------------------------------------- optimize


def optimize(
    config: ConfigOption = None,
    preset: PresetOption = None,
    base_model: Annotated[
        list[str] | None,
        typer.Option("--base-model", help="Model to align; repeat for a sweep."),
    ] = None,
    critic_model: Annotated[str | None, typer.Option(help="Critic (judge) model.")] = None,
    editor_model: Annotated[str | None, typer.Option(help="Editor (optimizer) model.")] = None,
    seed: Annotated[
        list[int] | None, typer.Option("--seed", help="Query-order seed; repeat for a sweep.")
    ] = None,
    beam: Annotated[int | None, typer.Option(help="Beam size.")] = None,
    actions: Annotated[int | None, typer.Option(help="Rewrites per beam node.")] = None,
    depth: Annotated[int | None, typer.Option(help="Search depth (levels).")] = None,
    depth_extension: Annotated[int | None, typer.Option(help="Max extra levels.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Editor temperature.")] = None,
    k: Annotated[int | None, typer.Option(help="ICL examples shown to the base model.")] = None,
    judge_mode: Annotated[str | None, typer.Option(help="json or logprobs.")] = None,
    framing: Annotated[
        str | None, typer.Option(help="auto (default), raw, chat or inference.")
    ] = None,
    train: Annotated[Path | None, typer.Option(help="Training queries file.")] = None,
    icl: Annotated[Path | None, typer.Option(help="ICL examples file.")] = None,
    num_queries: Annotated[int | None, typer.Option(help="Training queries to draw.")] = None,
    held_out: Annotated[int | None, typer.Option(help="Held-out check queries (0: off).")] = None,
    max_cost: MaxCostOption = None,
    max_calls: MaxCallsOption = None,
    name: Annotated[str | None, typer.Option(help="A name for the run.")] = None,
    out: Annotated[Path | None, typer.Option(help="Artifact path (a folder for a sweep).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Run a sweep's searches in this many processes (API models; each gets its "
            "share of every endpoint's limits). Default 1, or `workers` in the TOML file.",
        ),
    ] = None,
    trace: TraceOption = False,
    trace_endpoint: TraceEndpointOption = None,
    trace_content: TraceContentOption = False,
    db: DbOption = None,
) -> None:
    """Search for the system prompt that aligns the base model (the paper's main job)."""
    overrides: dict[str, dict[str, Any]] = {
        "models": {"critic": critic_model, "editor": editor_model},
        "search": {
            "beam_size": beam,
            "n_actions": actions,
            "depth": depth,
            "depth_extension": depth_extension,
            "temperature": temperature,
            "num_train_queries": num_queries,
            "held_out_queries": held_out,
        },
        "proposer": {"k": k, "framing": framing},
        "critic": {"mode": judge_mode},
        "data": {"train": str(train) if train else None, "icl": str(icl) if icl else None},
        "budget": {"max_cost_usd": max_cost, "max_calls": max_calls},
        "trace": trace_layer(trace, trace_endpoint, trace_content),
    }
    configs = []
    for model in base_model or [None]:
        for one_seed in seed or [None]:
            layer = json.loads(json.dumps(overrides))
            layer["models"]["base"] = model
            layer["search"]["seed"] = one_seed
            built = build_settings(preset, config, layer)
            update: dict[str, Any] = {"name": name} if name else {}
            if workers is not None:
                update["workers"] = workers
            configs.append(built.model_copy(update=update) if update else built)
    sweep = len(configs) > 1
    if out is not None and sweep:
        artifact: Path | None = out / "{run_id}.json"
    else:
        artifact = out
    run_plans(configs, db=resolve_db(db), artifact=artifact)


def run_plans(
    configs: list[Any],
    *,
    db: Path,
    artifact: Path | None = None,
    resume_ids: list[str] | None = None,
    force: bool = False,
) -> None:
    """Run searches (new ones, or ``resume_ids``) with progress, and report how they ended."""
    from drpo.jobs.optimize import RunPlan
    from drpo.jobs.projection import describe_projection
    from drpo.runs.logs import configure_logging

    configure_logging(log_folder=logs_dir(db))
    if configs:
        checked_trace(configs[0].trace)
    plans = []
    for index, config in enumerate(configs):
        run_id = resume_ids[index] if resume_ids else None
        plans.append(RunPlan(config=config, artifact_path=artifact, run_id=run_id))
        err_console.print(describe_projection(config), highlight=False)
    started: list[str] = []  # run ids, as soon as each run exists (for the Ctrl-C message)

    def interrupted() -> None:
        for run_id in started:
            _interrupted(run_id)

    outcomes = run_async(_optimize_main, plans, db, started, force, on_interrupt=interrupted)
    ok = True
    for config, outcome in zip(configs, outcomes, strict=True):
        if report_outcome(outcome):
            result = outcome.result
            console.print(
                f"[bold green]run {outcome.run_id} finished[/]: score "
                f"{result.best_score:.3f}, best prompt from level {result.best.level}; "
                f"artifact {outcome.summary['artifact']}"
            )
            console.print("[bold]final system prompt:[/]")
            console.print(result.best.system_prompt, highlight=False, markup=False)
            for line in embedded_judge_note(config):
                console.print(line, highlight=False, markup=False)
        else:
            ok = False
    if not ok:
        raise typer.Exit(1)


#: The search the closing note points to: the default job's, with API models in every role.
API_MODELS_COMMAND = (
    "drpo optimize --preset robust --base-model openai:gpt-4o-mini "
    "--critic-model openai:gpt-4o --editor-model openai:gpt-4o"
)


def embedded_judge_note(config: Any) -> list[str]:
    """Two closing lines when the critic or editor was the embedded model (the default job).

    Why: a first run on the embedded 135M model ends with a weak prompt, and a new user should
    read that as the size of the judge, not as what the method can do (issue 16).
    """
    from drpo.backends.kinds import parse_model_spec
    from drpo.backends.local_refs import EMBEDDED_MODELS

    judges = (config.models.critic, config.models.editor)
    embedded = [
        EMBEDDED_MODELS[name][2].split(".")[0]  # the file's name: SmolLM2-135M-Instruct
        for kind, name in (
            (spec.kind, spec.model.strip().lower()) for spec in map(parse_model_spec, judges)
        )
        if kind == "local" and name in EMBEDDED_MODELS
    ]
    if not embedded:
        return []
    return [
        f"note: the embedded {embedded[0]} can show the search's machinery, not find a good "
        "prompt: the critic and editor need a strong model.",
        f"the same search with API models (OPENAI_API_KEY set): {API_MODELS_COMMAND}",
    ]


async def _optimize_main(plans: list[Any], db: Path, started: list[str], force: bool) -> list:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from drpo.jobs.optimize import LevelProgress
    from drpo.jobs.workers import run_sweep
    from drpo.runs.store import RunStore

    live = err_console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("level {task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not live,
    )
    tasks: dict[str, Any] = {}

    def on_created(run_id: str, config: Any) -> None:
        started.append(run_id)
        tasks[run_id] = progress.add_task(
            f"{run_id[:8]} {config.models.base}", total=config.search.depth - 1
        )

    def on_level(at: LevelProgress) -> None:
        progress.update(tasks[at.run_id], completed=at.level, total=at.depth_limit - 1)
        if not live:  # a log file or CI: one line per level instead of a bar
            err_console.print(
                f"run={at.run_id} level={at.level}/{at.depth_limit - 1} "
                f"best={at.best_score:.3f} mean={at.mean_score:.3f} calls={at.calls} "
                f"cost=${at.cost_usd:.4f}",
                highlight=False,
                markup=False,
            )

    async with RunStore.open(db) as store:
        with progress:
            return await run_sweep(
                plans, store=store, on_level=on_level, on_created=on_created, force=force
            )


# ---------------------------------------------------------------------------------- resume


def resume(
    run: Annotated[str, typer.Argument(help="Run id (or a unique prefix).")],
    max_cost: Annotated[float | None, typer.Option(help="New cost budget (USD).")] = None,
    max_calls: Annotated[int | None, typer.Option(help="New call budget.")] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Take the run even if another process seems to own it, or if it was made "
            "by a drpo with other prompts."
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Artifact path (a search), instead of the recorded one.")
    ] = None,
    trace: TraceOption = False,
    trace_endpoint: TraceEndpointOption = None,
    trace_content: TraceContentOption = False,
    db: DbOption = None,
) -> None:
    """Continue a run of any kind: recorded calls are answered from the journal, for free."""
    from drpo.jobs.config import BudgetSettings
    from drpo.jobs.registry import UnknownJobError, job_for

    traced = trace_settings(trace, trace_endpoint, trace_content)
    db_path = resolve_db(db)
    record = run_async(_load_run, db_path, run)
    if record.status == "finished":
        raise fail(f"run {record.run_id} already finished")

    try:
        kind = job_for(record.kind).kind
    except UnknownJobError as exc:
        raise fail(f"run {record.run_id}: {exc}") from None
    budget = BudgetSettings(max_cost_usd=max_cost, max_calls=max_calls)
    RESUMERS[kind](db_path, record, budget=budget, force=force, trace=traced, out=out)


def _resume_search(
    db: Path, record: Any, *, budget: Any, force: bool, trace: Any, out: Path | None
) -> None:
    from drpo.jobs.optimize import resumed_settings
    from drpo.tracing.settings import TraceSettings

    config = resumed_settings(record, budget)  # the projection printed shows the new limits
    config = config.model_copy(update={"trace": trace or TraceSettings()})
    run_plans([config], db=db, artifact=out, resume_ids=[record.run_id], force=force)


def _resume_icl(db: Path, record: Any, *, budget: Any, force: bool, trace: Any, **_: Any) -> None:
    _run_icl(db, record.run_id, budget=budget, force=force, trace=trace)


def _resume_eval(db: Path, record: Any, *, budget: Any, force: bool, trace: Any, **_: Any) -> None:
    from drpo.cli.evaluate import resume_evaluation

    resume_evaluation(db, record.run_id, budget=budget, force=force, trace=trace)


def _resume_generate(
    db: Path, record: Any, *, budget: Any, force: bool, trace: Any, **_: Any
) -> None:
    _run_generate(db, record.run_id, output=None, force=force, budget=budget, trace=trace)


#: How ``drpo resume`` continues and reports a run, by job (the kinds of
#: :data:`drpo.jobs.registry.JOB_MODULES`; a test holds the two to the same kinds).
RESUMERS: dict[str, Callable[..., None]] = {
    "optimize": _resume_search,
    "icl": _resume_icl,
    "eval": _resume_eval,
    "generate": _resume_generate,
}


async def _load_run(db: Path, run: str) -> Any:
    import anyio

    from drpo.runs.store import RunStore

    if not await anyio.Path(db).exists():
        raise UserError(f"no run database at {db}")
    async with RunStore.open(db, readonly=True) as store:
        return await store.get_run(run)


# ---------------------------------------------------------------------------------- icl


def icl(
    examples: Annotated[
        Path | None, typer.Option("--icl", help="ICL examples file (default: the shipped seeds).")
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    critic_model: Annotated[str | None, typer.Option(help="Critic (judge) model.")] = None,
    editor_model: Annotated[str | None, typer.Option(help="Editor model.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rewrite rounds per example.")] = None,
    judge_mode: Annotated[str | None, typer.Option(help="json or logprobs.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples.", min=1)] = None,
    max_calls: MaxCallsOption = None,
    max_cost: MaxCostOption = None,
    out: Annotated[Path, typer.Option(help="Where to write the optimized examples.")] = Path(
        "icl_examples.optimized.json"
    ),
    trace: TraceOption = False,
    trace_endpoint: TraceEndpointOption = None,
    trace_content: TraceContentOption = False,
    db: DbOption = None,
) -> None:
    """Optimize the answers of the ICL examples (the paper's offline ICL stage)."""
    from drpo.data.loaders import default_icl_examples, load_icl_examples

    settings = build_settings(
        preset,
        config,
        {
            "models": {"critic": critic_model, "editor": editor_model},
            "icl": {"rounds": rounds},
            "critic": {"mode": judge_mode},
            "budget": {"max_calls": max_calls, "max_cost_usd": max_cost},
            "trace": trace_layer(trace, trace_endpoint, trace_content),
        },
    )
    traced = checked_trace(settings.trace)
    pool = load_or_fail(examples, load_icl_examples) if examples else default_icl_examples()
    db_path = resolve_db(db)
    run_id = run_async(_create_icl, db_path, list(pool), settings, out, limit)
    _run_icl(db_path, run_id, budget=settings.budget, force=False, trace=traced)


async def _create_icl(db: Path, pool: list, settings: Any, out: Path, limit: int | None) -> str:
    from drpo.jobs.icl import create_icl_run
    from drpo.runs.store import RunStore

    async with RunStore.open(db) as store:
        return await create_icl_run(store, pool, settings, out, limit=limit)


def _run_icl(db: Path, run_id: str, *, budget: Any, force: bool, trace: Any = None) -> None:
    outcome = run_async(
        _icl_main, db, run_id, budget, force, trace, on_interrupt=lambda: _interrupted(run_id)
    )
    for trace in outcome.result or ():
        console.print(
            f"{trace.initial_total:5.1f} -> {trace.best_total:5.1f} / {trace.max_total:4.0f}  "
            f"({trace.accepted} accepted of {trace.rounds})  {trace.query[:60]}",
            highlight=False,
        )
    if not report_outcome(outcome):
        raise typer.Exit(1)
    summary = outcome.summary
    console.print(
        f"[bold green]run {run_id} finished[/]: wrote {summary['examples']} examples to "
        f"{summary['out']}"
    )


async def _icl_main(db: Path, run_id: str, budget: Any, force: bool, trace: Any) -> Any:
    from drpo.jobs.icl import run_icl
    from drpo.jobs.session import agent_session
    from drpo.runs.logs import configure_logging
    from drpo.runs.store import RunStore

    configure_logging(log_folder=logs_dir(db))
    async with RunStore.open(db) as store, agent_session(store, trace=trace) as session:
        return await run_icl(session, run_id, budget=budget, force=force)


# ---------------------------------------------------------------------------------- generate


def generate(
    query: Annotated[str | None, typer.Argument(help="The query to answer.")] = None,
    artifact: Annotated[
        Path | None, typer.Option(help="Aligned-prompt artifact (JSON) from `drpo optimize`.")
    ] = None,
    file: Annotated[Path | None, typer.Option(help="Queries file (JSONL, JSON, text).")] = None,
    model: Annotated[str | None, typer.Option(help="Model (default: the artifact's).")] = None,
    k: Annotated[int | None, typer.Option(help="ICL examples to retrieve.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    framing: Annotated[
        str | None, typer.Option(help="searched (the layout searched with) or inference.")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write answers as JSONL here.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML settings: its [endpoints] and [trace] apply.")
    ] = None,
    trace: TraceOption = False,
    trace_endpoint: TraceEndpointOption = None,
    trace_content: TraceContentOption = False,
    db: DbOption = None,
) -> None:
    """Answer queries with an aligned prompt (system prompt + retrieved ICL examples)."""
    from drpo.data.loaders import load_queries
    from drpo.jobs.artifact import ArtifactError
    from drpo.jobs.generate import generation_plan

    if (query is None) == (file is None):
        raise fail('give a query ("...") or --file QUERIES, not both')
    queries = [query] if query is not None else load_or_fail(file, load_queries)
    settings = build_settings(
        None, config, {"trace": trace_layer(trace, trace_endpoint, trace_content)}
    )
    endpoints = settings.endpoints if config else {}
    traced = checked_trace(settings.trace)
    try:
        sampling = {
            "k": k,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "framing": framing,
        }
        plan = generation_plan(artifact, model=model, sampling=sampling, endpoints=endpoints)
    except (ArtifactError, ValueError) as exc:
        raise fail(str(exc)) from None
    db_path = resolve_db(db)
    run_id = run_async(_create_generate, db_path, queries, plan)
    _run_generate(db_path, run_id, output=output, force=False, trace=traced)


async def _create_generate(db: Path, queries: list[str], plan: dict) -> str:
    from drpo.jobs.generate import create_generate_run
    from drpo.runs.store import RunStore

    async with RunStore.open(db) as store:
        return await create_generate_run(store, queries, plan)


def _run_generate(
    db: Path,
    run_id: str,
    *,
    output: Path | None,
    force: bool,
    budget: Any = None,
    trace: Any = None,
) -> None:
    outcome = run_async(
        _generate_main,
        db,
        run_id,
        force,
        budget,
        trace,
        on_interrupt=lambda: _interrupted(run_id),
    )
    if not report_outcome(outcome):
        raise typer.Exit(1)
    pairs = [(item["query"], item["answer"]) for item in outcome.summary["answers"]]
    if output is not None:
        with output.open("w", encoding="utf-8") as handle:
            for q, a in pairs:
                handle.write(json.dumps({"query": q, "answer": a}, ensure_ascii=False) + "\n")
        console.print(f"wrote {len(pairs)} answers to {output}")
        return
    for q, a in pairs:
        if len(pairs) > 1:
            console.print(f"[bold]# {q}[/]", highlight=False)
        console.print(a, highlight=False, markup=False)


async def _generate_main(db: Path, run_id: str, force: bool, budget: Any, trace: Any) -> Any:
    from drpo.jobs.generate import run_generate
    from drpo.jobs.session import agent_session
    from drpo.runs.logs import configure_logging
    from drpo.runs.store import RunStore

    configure_logging(log_folder=logs_dir(db))
    async with RunStore.open(db) as store, agent_session(store, trace=trace) as session:
        return await run_generate(session, run_id, budget=budget, force=force)


def _interrupted(run_id: str) -> None:
    err_console.print(
        f"[bold red]run {run_id} interrupted[/]; continue it with `drpo resume {run_id}`",
        highlight=False,
    )


def load_or_fail(path: Path | None, loader: Any) -> list[Any]:
    from drpo.data.loaders import DataFormatError

    try:
        return list(loader(path))
    except DataFormatError as exc:
        raise fail(str(exc)) from None
