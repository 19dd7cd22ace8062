"""``drpo eval``: evaluate aligned prompts on a query set, paired against the first one.

Registered in :mod:`drpo.cli` as ``app.command("eval")(eval_command)``. Heavy imports happen
inside the command, so ``drpo --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from drpo.cli.support import (
    DbOption,
    TraceContentOption,
    TraceEndpointOption,
    TraceOption,
    console,
    err_console,
    fail,
    report_outcome,
    resolve_db,
    run_async,
    trace_settings,
)
from drpo.data.files import write_atomically
from drpo.errors import UserError
from drpo.inspect.evaluation import format_difference, format_number

#: Options that define a new evaluation; ``--resume`` takes them from the run instead.
_DEFINING = (
    "prompts",
    "prompt",
    "label",
    "queries",
    "tags",
    "model",
    "judge",
    "judge_mode",
    "preset",
    "config",
    "limit",
    "sample",
    "seed",
    "k",
    "max_tokens",
    "judge_max_tokens",
    "temperature",
    "framing",
    "resamples",
    "top",
    "max_calls",
    "max_cost",
)


def eval_command(
    prompts: Annotated[
        list[str] | None,
        typer.Argument(
            help="Prompts to evaluate, the first is the baseline: artifact JSON files from "
            "`drpo optimize`, text files holding a system prompt, 'none' (no system prompt) or "
            "'default' ('You are a helpful assistant.'). Default: 'default'.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            help="A system prompt given as text (or a file, 'none', 'default'); repeatable; "
            "comes after the positional prompts.",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="Names for the prompts, in order; repeatable."),
    ] = None,
    queries: Annotated[
        Path | None,
        typer.Option(
            "--queries",
            "-q",
            help="Query set: JSONL or a JSON list (instruction|query, optional id, category, "
            "tags), or one query per line. E.g. just_eval_instruct.jsonl.",
        ),
    ] = None,
    tags: Annotated[
        Path | None,
        typer.Option(help="Tags file (task_types, topics, difficulty by id) for breakdowns."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model for every prompt (default: each artifact's own; plain prompts use "
            "the first artifact's, else local:smollm2)."
        ),
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="Critic (judge) model spec. (default: local:smollm2)")
    ] = None,
    judge_mode: Annotated[
        str | None,
        typer.Option(
            help="json or logprobs. (default: the --preset's; without one, logprobs for a local "
            "judge, else json)"
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="small (default), robust or paper: the judge's mode and policy."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="TOML settings: the preset, [critic] and [endpoints] apply."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N queries (after --sample).")
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(help="A seeded random sample of N queries, stratified by category."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of --sample and of the bootstrap. (default: 0)")
    ] = None,
    k: Annotated[
        int | None, typer.Option(help="ICL examples retrieved per query (artifacts). (default: 3)")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Max new tokens per answer. (default: 512)")
    ] = None,
    judge_max_tokens: Annotated[
        int | None,
        typer.Option(help="Max tokens of a JSON verdict. (default: the --preset's critic's)"),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Answer temperature. (default: 0)")
    ] = None,
    framing: Annotated[
        str | None,
        typer.Option(
            help="raw, chat or inference for every prompt (default: the artifact's, else raw)."
        ),
    ] = None,
    resamples: Annotated[
        int | None, typer.Option(help="Bootstrap resamples. (default: 2000)")
    ] = None,
    top: Annotated[
        int | None, typer.Option(help="Queries listed as most changed. (default: 5)")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Items in flight at once. (default: 256)")
    ] = None,
    max_calls: Annotated[int | None, typer.Option(help="Stop after this many calls.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop at this cost (USD).")] = None,
    name: Annotated[str | None, typer.Option(help="A name for the run.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue an evaluation run (id or prefix): recorded calls are answered from "
            "the journal for free. On a finished run, recomputes its report at no cost."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option(help="Write the results, with every answer and score, as JSON.")
    ] = None,
    trace: TraceOption = False,
    trace_endpoint: TraceEndpointOption = None,
    trace_content: TraceContentOption = False,
    db: DbOption = None,
) -> None:
    """Evaluate prompts on a query set (just-eval-instruct protocol), paired against the first."""
    given = [key for key, value in locals().items() if key in _DEFINING and value not in (None, [])]
    db_path = resolve_db(db)
    if resume is not None:
        if given:
            names = ", ".join(
                "PROMPTS" if key == "prompts" else "--" + key.replace("_", "-") for key in given
            )
            raise fail(f"--resume uses the settings recorded with the run; drop {names}")
        plan = None
    else:
        if queries is None:
            raise fail("give the queries to evaluate on with --queries FILE (JSONL, JSON or text)")
        plan = _plan(
            prompts or [],
            prompt or [],
            label or [],
            queries=queries,
            tags=tags,
            model=model,
            judge=judge,
            judge_mode=judge_mode,
            preset=preset,
            config=config,
            limit=limit,
            sample=sample,
            seed=seed,
            k=k,
            max_tokens=max_tokens,
            judge_max_tokens=judge_max_tokens,
            temperature=temperature,
            framing=framing,
            resamples=resamples,
            top=top,
            concurrency=concurrency,
            max_calls=max_calls,
            max_cost=max_cost,
        )
    traced = trace_settings(trace, trace_endpoint, trace_content)
    _evaluate(
        db_path,
        plan,
        resume,
        name=name,
        concurrency=concurrency,
        json_out=json_out,
        trace=traced,
    )


def resume_evaluation(
    db: Path, run_id: str, *, budget: Any, force: bool, trace: Any = None
) -> None:
    """``drpo resume`` of an evaluation: the missing calls, then the report."""
    _evaluate(db, None, run_id, budget=budget, force=force, trace=trace)


def _evaluate(
    db: Path,
    plan: Any,
    resume: str | None,
    *,
    name: str | None = None,
    concurrency: int | None = None,
    json_out: Path | None = None,
    budget: Any = None,
    force: bool = False,
    trace: Any = None,
) -> None:
    outcome = run_async(_eval_main, db, plan, resume, name, concurrency, budget, force, trace)
    if outcome.result is not None:
        print_report(outcome.result)
    if json_out is not None:
        _write_json(json_out, outcome.export())
        console.print(f"wrote {json_out}")
    if not report_outcome(outcome):
        raise typer.Exit(1)
    console.print(f"[bold green]eval run {outcome.run_id} finished[/]")


# ------------------------------------------------------------------------------------ planning


def _plan(positional: list[str], texts: list[str], labels: list[str], **options: Any) -> Any:
    """The evaluation the options describe (:func:`~drpo.jobs.evaluation.plan.plan_evaluation`);
    a mistake in them is a clean exit."""
    from drpo.jobs.evaluation.plan import plan_evaluation

    try:
        plan = plan_evaluation(positional, texts, labels, **options)
    except UserError as exc:
        raise fail(str(exc)) from None
    if options["tags"] is not None and plan.tagged == 0:
        err_console.print(f"[yellow]warning:[/] no query matched a record of {options['tags']}")
    return plan


async def _eval_main(
    db: Path,
    plan: Any,
    resume: str | None,
    name: str | None,
    concurrency: Any,
    budget: Any = None,
    force: bool = False,
    trace: Any = None,
) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from drpo.jobs.evaluation.runner import RUN_KIND, create_eval_run, run_eval
    from drpo.jobs.session import agent_session
    from drpo.runs.logs import configure_logging
    from drpo.runs.paths import logs_dir
    from drpo.runs.store import RunStore

    configure_logging(log_folder=logs_dir(db))
    async with RunStore.open(db) as store:
        if plan is None:
            record = await store.get_run(resume or "")
            if record.kind != RUN_KIND:
                raise UserError(f"run {record.run_id} is a {record.kind} run, not an evaluation")
            run_id = record.run_id
            total = len(record.config["prompts"]) * len(record.config["queries"])
            verb = "resuming" if record.status != "finished" else "recomputing (from the journal)"
        else:
            run_id = await create_eval_run(
                store, plan.prompts, plan.queries, plan.settings, name=name,
                endpoints=plan.endpoints,
            )  # fmt: skip
            total = len(plan.prompts) * len(plan.queries)
            verb = "evaluating"
        err_console.print(
            f"eval run {run_id}: {verb} {total} answers (resume with `drpo resume {run_id[:12]}`)",
            highlight=False,
        )
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
            disable=not err_console.is_terminal,
        )
        task = progress.add_task(f"eval {run_id[:8]}", total=total)
        async with agent_session(store, trace=trace) as session:
            with progress:
                return await run_eval(
                    session,
                    run_id,
                    concurrency=concurrency,
                    on_item=lambda done, _: progress.update(task, completed=done),
                    budget=budget,
                    force=force,
                )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------------------ printing


def _style(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("low") is None:
        return ""
    if entry["low"] > 0:
        return "green"
    if entry["high"] < 0:
        return "red"
    return ""


def print_report(result: dict[str, Any]) -> None:
    """The evaluation's tables: scores, paired differences, breakdowns, biggest changes."""
    aspects = result["aspects"]
    prompts = result["prompts"]
    comparisons = {c["label"]: c for c in result["comparisons"]}
    cats = ", ".join(f"{n} {name}" for name, n in result["categories"].items())
    calls = result.get("calls") or {}
    confidence = round(result["bootstrap"]["confidence"] * 100)
    console.print(
        f"[bold]Evaluation[/] on {result['n_queries']} queries ({cats}); judge "
        f"{result['judge']} ({result['judge_mode']}); calls: {calls.get('new', 0)} new, "
        f"{calls.get('replayed', 0)} replayed",
        highlight=False,
    )
    table = Table(title="Mean score (1-5) per aspect", title_justify="left")
    table.add_column("prompt")
    table.add_column("model", overflow="fold")
    for aspect in aspects:
        table.add_column(aspect[:5], justify="right")
    table.add_column("overall", justify="right")
    table.add_column(f"Δ overall [{confidence}% CI]", justify="right")
    table.add_column("W/T/L", justify="right")
    table.add_column("failed", justify="right")
    for entry in prompts:
        comparison = comparisons.get(entry["label"])
        table.add_row(
            entry["label"],
            entry.get("model") or "-",
            *(format_number((entry["aspects"].get(a) or {}).get("mean")) for a in aspects),
            format_number(entry["overall"]),
            "baseline" if comparison is None else format_difference(comparison["overall"]),
            "-"
            if comparison is None
            else f"{comparison['wins']}/{comparison['ties']}/{comparison['losses']}",
            str(entry["failed"]),
            style=_style(comparison["overall"]) if comparison else "",
        )
    console.print(table)
    if comparisons:
        diff = Table(
            title=f"Paired difference vs {prompts[0]['label']} per aspect [{confidence}% bootstrap CI]",
            title_justify="left",
        )
        diff.add_column("prompt")
        for aspect in aspects:
            diff.add_column(aspect, justify="right")
        for label, comparison in comparisons.items():
            diff.add_row(label, *(format_difference(comparison["aspects"].get(a)) for a in aspects))
        console.print(diff)
    for kind in prompts[0]["groups"] if prompts else {}:
        _print_groups(kind, prompts, comparisons)
    for label, comparison in comparisons.items():
        for title, key in (("most improved", "most_improved"), ("most worsened", "most_worsened")):
            rows = comparison.get(key) or []
            if not rows:
                continue
            changes = Table(
                title=f"{label} vs {comparison['baseline']}: {title}", title_justify="left"
            )
            changes.add_column("id")
            changes.add_column("category")
            changes.add_column("score", justify="right")
            changes.add_column("query", overflow="fold")
            for row in rows:
                changes.add_row(
                    str(row["id"]),
                    row["category"],
                    f"{format_number(row['baseline_score'])} → {format_number(row['score'])} ({row['diff']:+.2f})",
                    " ".join(row["instruction"].split())[:100],
                )
            console.print(changes)


_GROUP_TITLES = {
    "category": "category",
    "task_types": "task type",
    "topics": "topic",
    "difficulty": "difficulty",
}


def _print_groups(kind: str, prompts: list[dict[str, Any]], comparisons: dict[str, Any]) -> None:
    groups = prompts[0]["groups"][kind]
    if kind == "category" and len(groups) < 2 and not comparisons:
        return
    table = Table(title=f"Overall score by {_GROUP_TITLES.get(kind, kind)}", title_justify="left")
    table.add_column(_GROUP_TITLES.get(kind, kind))
    table.add_column("n", justify="right")
    for entry in prompts:
        table.add_column(entry["label"], justify="right")
    for label in comparisons:
        table.add_column(f"Δ {label}", justify="right")
    for name, info in groups.items():
        table.add_row(
            name,
            str(info["n"]),
            *(format_number(entry["groups"][kind][name]["overall"]) for entry in prompts),
            *(format_difference(c["groups"][kind].get(name)) for c in comparisons.values()),
        )
    console.print(table)
