"""The ``drpo`` command. Each subcommand is a thin layer: parse flags, call the library, print.

Errors users can fix (a bad flag, a missing key, a malformed file, a database from another
version) are printed as one clear message with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from drpo.cli.evaluate import eval_command
from drpo.cli.runs import runs_app
from drpo.cli.support import (
    DbOption,
    UserError,
    console,
    err_console,
    fail,
    resolve_db,
    run_async,
)
from drpo.runs.paths import logs_dir, run_artifacts_dir

app = typer.Typer(
    name="drpo",
    help="Tuning-free self-alignment: DRPO prompt search as an async agent system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

app.add_typer(runs_app, name="runs")
app.command("eval")(eval_command)


# ---------------------------------------------------------------------------------- optimize


@app.command()
def optimize(
    config: Annotated[Path | None, typer.Option(help="TOML settings file.")] = None,
    preset: Annotated[str | None, typer.Option(help="small (default) or paper.")] = None,
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
    framing: Annotated[str | None, typer.Option(help="raw or chat.")] = None,
    train: Annotated[Path | None, typer.Option(help="Training queries file.")] = None,
    icl: Annotated[Path | None, typer.Option(help="ICL examples file.")] = None,
    num_queries: Annotated[int | None, typer.Option(help="Training queries to draw.")] = None,
    held_out: Annotated[int | None, typer.Option(help="Held-out check queries (0: off).")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop at this cost (USD).")] = None,
    max_calls: Annotated[int | None, typer.Option(help="Stop after this many calls.")] = None,
    name: Annotated[str | None, typer.Option(help="A name for the run.")] = None,
    out: Annotated[Path | None, typer.Option(help="Artifact path (a folder for a sweep).")] = None,
    db: DbOption = None,
) -> None:
    """Search for the system prompt that aligns the base model (the paper's main job)."""
    from drpo.jobs.config import build_config, load_toml

    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    if preset is not None:
        overrides["preset"] = preset
    if name is not None:
        overrides["name"] = name
    put("models", "critic", critic_model)
    put("models", "editor", editor_model)
    put("search", "beam_size", beam)
    put("search", "n_actions", actions)
    put("search", "depth", depth)
    put("search", "depth_extension", depth_extension)
    put("search", "temperature", temperature)
    put("search", "num_train_queries", num_queries)
    put("search", "held_out_queries", held_out)
    put("proposer", "k", k)
    put("proposer", "framing", framing)
    put("critic", "mode", judge_mode)
    put("data", "train", str(train) if train else None)
    put("data", "icl", str(icl) if icl else None)
    put("budget", "max_cost_usd", max_cost)
    put("budget", "max_calls", max_calls)

    from drpo.jobs.config import ConfigError

    try:
        file_settings = load_toml(config) if config else {}
        configs = []
        for model in base_model or [None]:
            for one_seed in seed or [None]:
                layer = json.loads(json.dumps(overrides))
                if model is not None:
                    layer.setdefault("models", {})["base"] = model
                if one_seed is not None:
                    layer.setdefault("search", {})["seed"] = one_seed
                configs.append(build_config(file_settings, layer))
    except ConfigError as exc:
        raise fail(str(exc)) from None
    _run_plans(configs, out=out, db=resolve_db(db))


def _run_plans(configs: list, *, out: Path | None, db: Path, resume_ids: list[str] | None = None):
    from drpo.jobs.optimize import RunPlan
    from drpo.jobs.projection import describe_projection
    from drpo.runs.logs import configure_logging

    configure_logging(log_folder=logs_dir(db))
    sweep = len(configs) > 1
    plans = []
    for index, config in enumerate(configs):
        run_id = resume_ids[index] if resume_ids else None
        plans.append(RunPlan(config=config, artifact_path=None, run_id=run_id))
        err_console.print(describe_projection(config), highlight=False)
    started: list[str] = []  # run ids, as soon as each run exists (for the Ctrl-C message)
    try:
        outcomes = run_async(_optimize_main, plans, db, out, sweep, started)
    except typer.Exit as stop:
        if stop.exit_code == 130:  # Ctrl-C: every run in flight was marked interrupted
            for run_id in started:
                err_console.print(
                    f"[bold red]run {run_id} interrupted[/]; continue it with "
                    f"`drpo resume {run_id}`",
                    highlight=False,
                )
        raise
    failed = False
    for outcome in outcomes:
        if outcome.status == "finished":
            result = outcome.result
            console.print(
                f"[bold green]run {outcome.run_id} finished[/]: score "
                f"{result.best_score:.3f} after {result.levels} levels; "
                f"artifact {outcome.artifact_path}"
            )
            console.print("[bold]final system prompt:[/]")
            console.print(result.best.system_prompt, highlight=False, markup=False)
        else:
            failed = True
            if outcome.status == "budget_exhausted":
                what = (
                    "--max-cost USD"
                    if " cost budget " in (outcome.error or "")
                    else "--max-calls N"
                )
                hint = f"with a larger budget: `drpo resume {outcome.run_id} {what}`"
                title = "stopped: budget exhausted"
            else:
                hint = f"with `drpo resume {outcome.run_id}`"
                title = outcome.status
            err_console.print(
                f"[bold red]run {outcome.run_id} {title}[/]: {outcome.error}\n  continue it {hint}",
                highlight=False,
            )
    if failed:
        raise typer.Exit(1)


async def _optimize_main(
    plans: list, db: Path, out: Path | None, sweep: bool, started: list[str] | None = None
) -> list:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from drpo.jobs.optimize import run_searches
    from drpo.runs.store import RunStore

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("level {task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def on_created(run_id: str, config: Any) -> None:
        if started is not None:
            started.append(run_id)
        tasks[run_id] = progress.add_task(
            f"{run_id[:8]} {config.models.base}", total=config.search.depth - 1
        )
        plan = next(p for p in plans if p.config is config)
        if plan.artifact_path is None:
            if out is not None and not sweep:
                plan.artifact_path = out
            elif out is not None:
                plan.artifact_path = out / f"{run_id}.json"
            else:
                plan.artifact_path = run_artifacts_dir(run_id, db) / "aligned_prompt.json"

    def on_level(run_id: str, level: int, limit: int) -> None:
        progress.update(tasks[run_id], completed=level, total=limit - 1)

    async with RunStore.open(db) as store:
        with progress:
            return await run_searches(plans, store=store, on_level=on_level, on_created=on_created)


@app.command()
def resume(
    run: Annotated[str, typer.Argument(help="Run id (or a unique prefix).")],
    max_cost: Annotated[float | None, typer.Option(help="New cost budget (USD).")] = None,
    max_calls: Annotated[int | None, typer.Option(help="New call budget.")] = None,
    out: Annotated[Path | None, typer.Option(help="Artifact path.")] = None,
    db: DbOption = None,
) -> None:
    """Continue an interrupted run: recorded calls are answered from the journal, for free."""
    from drpo.jobs.config import OptimizeConfig

    db_path = resolve_db(db)
    record = run_async(_load_run, db_path, run)
    if record.kind != "optimize":
        raise fail(f"run {record.run_id} is a {record.kind} run; only optimize runs resume here")
    if record.status == "finished":
        raise fail(f"run {record.run_id} already finished")
    if record.status in ("running", "created"):
        err_console.print(
            f"note: run {record.run_id} is marked {record.status}: it was killed, or another "
            "process is still running it (then stop that one first)",
            highlight=False,
        )
    settings = dict(record.config["settings"])
    budget = dict(settings.get("budget") or {})
    if max_cost is not None:
        budget["max_cost_usd"] = max_cost
    if max_calls is not None:
        budget["max_calls"] = max_calls
    settings["budget"] = budget
    config = OptimizeConfig.model_validate(settings)
    _run_plans([config], out=out, db=db_path, resume_ids=[record.run_id])


async def _load_run(db: Path, run: str) -> Any:
    from drpo.runs.store import RunStore

    if not await anyio.Path(db).exists():
        raise UserError(f"no run database at {db}")
    async with RunStore.open(db, readonly=True) as store:
        record = await store.get_run(run)
    return record


# ---------------------------------------------------------------------------------- icl


@app.command()
def icl(
    examples: Annotated[
        Path | None, typer.Option("--icl", help="ICL examples file (default: the shipped seeds).")
    ] = None,
    critic_model: Annotated[str, typer.Option(help="Critic (judge) model.")] = "local:smollm2",
    editor_model: Annotated[str, typer.Option(help="Editor model.")] = "local:smollm2",
    rounds: Annotated[int, typer.Option(help="Rewrite rounds per example.")] = 5,
    judge_mode: Annotated[str, typer.Option(help="json or logprobs.")] = "json",
    limit: Annotated[int | None, typer.Option(help="Only the first N examples.")] = None,
    max_calls: Annotated[int | None, typer.Option(help="Stop after this many calls.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop at this cost (USD).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the optimized examples.")] = Path(
        "icl_examples.optimized.json"
    ),
    db: DbOption = None,
) -> None:
    """Optimize the answers of the ICL examples (the paper's offline ICL stage)."""
    from drpo.data.loaders import default_icl_examples, load_icl_examples
    from drpo.jobs.icl import ICLConfig

    try:
        config = ICLConfig(
            critic=critic_model,
            editor=editor_model,
            rounds=rounds,
            mode=judge_mode,
            max_calls=max_calls,
            max_cost_usd=max_cost,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    pool = load_queries_or_fail(examples, load_icl_examples) if examples else default_icl_examples()
    pool = list(pool)[:limit] if limit else list(pool)
    db_path = resolve_db(db)
    run_id, status, traces = run_async(_icl_main, pool, config, out, db_path)
    for trace in traces:
        console.print(
            f"{trace.initial_total:5.1f} -> {trace.best_total:5.1f} / {trace.max_total:4.0f}  "
            f"({trace.accepted} accepted of {trace.rounds})  {trace.query[:60]}",
            highlight=False,
        )
    if status != "finished":
        raise fail(f"run {run_id} {status}", code=1)
    console.print(f"[bold green]run {run_id} finished[/]: wrote {len(pool)} examples to {out}")


async def _icl_main(pool: list, config: Any, out: Path, db: Path) -> tuple:
    from drpo.jobs.icl import run_icl
    from drpo.jobs.session import agent_session
    from drpo.runs.logs import configure_logging
    from drpo.runs.store import RunStore

    configure_logging(log_folder=logs_dir(db))
    async with RunStore.open(db) as store, agent_session(store) as session:
        return await run_icl(session, pool, config, out)


# ---------------------------------------------------------------------------------- generate


@app.command()
def generate(
    query: Annotated[str | None, typer.Argument(help="The query to answer.")] = None,
    artifact: Annotated[
        Path | None, typer.Option(help="Aligned-prompt artifact (JSON) from `drpo optimize`.")
    ] = None,
    file: Annotated[Path | None, typer.Option(help="Queries file (JSONL, JSON, text).")] = None,
    model: Annotated[str | None, typer.Option(help="Model (default: the artifact's).")] = None,
    k: Annotated[int, typer.Option(help="ICL examples to retrieve.")] = 3,
    max_tokens: Annotated[int, typer.Option(help="Max new tokens.")] = 512,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.0,
    output: Annotated[Path | None, typer.Option(help="Write answers as JSONL here.")] = None,
) -> None:
    """Answer queries with an aligned prompt (system prompt + retrieved ICL examples)."""
    from drpo.data.loaders import load_queries

    if (query is None) == (file is None):
        raise fail('give a query ("...") or --file QUERIES, not both')
    queries = [query] if query is not None else load_queries_or_fail(file, load_queries)
    answers = run_async(_generate_main, queries, artifact, model, k, max_tokens, temperature)
    if output is not None:
        with output.open("w", encoding="utf-8") as handle:
            for q, a in zip(queries, answers, strict=True):
                handle.write(json.dumps({"query": q, "answer": a}, ensure_ascii=False) + "\n")
        console.print(f"wrote {len(answers)} answers to {output}")
    else:
        for q, a in zip(queries, answers, strict=True):
            if len(queries) > 1:
                console.print(f"[bold]# {q}[/]", highlight=False)
            console.print(a, highlight=False, markup=False)


def load_queries_or_fail(path: Path | None, loader: Any) -> list[str]:
    from drpo.data.loaders import DataFormatError

    try:
        return loader(path)
    except DataFormatError as exc:
        raise fail(str(exc)) from None


async def _generate_main(
    queries: list[str],
    artifact_path: Path | None,
    model: str | None,
    k: int,
    max_tokens: int,
    temperature: float,
) -> list[str]:
    from drpo.jobs.generate import AlignedGenerator

    generator = AlignedGenerator.from_artifact(
        artifact_path, model=model, k=k, max_tokens=max_tokens, temperature=temperature
    )
    try:
        return await generator.answer_many(queries)
    finally:
        await generator.aclose()


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
