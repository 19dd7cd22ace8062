"""``drpo runs ...``: inspect recorded runs, also while another process is still writing them.

Every view opens the database read-only (WAL readers never block the writer), and every view
has ``--json`` for scripts: stable keys, and a ``format`` number that changes only when they do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from drpo.bus import loop
from drpo.cli.support import DbOption, console, fail, resolve_db, run_async
from drpo.errors import UserError

runs_app = typer.Typer(help="Inspect recorded runs.", no_args_is_help=True)

RunArgument = Annotated[str, typer.Argument(help="Run id (or a unique prefix).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _run_until_interrupted(main: Any, *args: Any) -> None:
    """Like :func:`run_async`, but Ctrl-C just ends the view (it stops nothing else)."""
    try:
        loop.run(main, *args)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except UserError as exc:
        raise fail(str(exc)) from None


@runs_app.command("list")
def runs_list(
    db: DbOption = None,
    as_json: JsonOption = False,
    kind: Annotated[
        str | None, typer.Option(help="Only runs of this kind (optimize, icl).")
    ] = None,
    status: Annotated[str | None, typer.Option(help="Only runs in this status.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many runs.", min=1)] = None,
) -> None:
    """The recorded runs, newest first: status, models, progress, best reward, cost, times."""
    from drpo.inspect.views import list_runs_view

    async def main() -> None:
        await list_runs_view(
            resolve_db(db), as_json, console, kind=kind, status=status, limit=limit
        )

    run_async(main)


@runs_app.command("show")
def runs_show(run: RunArgument, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Settings, best prompt, reward per level, and calls, tokens and cost per role."""
    from drpo.inspect.views import show_run_view

    run_async(show_run_view, resolve_db(db), run, as_json, console)


@runs_app.command("tree")
def runs_tree(
    run: RunArgument,
    db: DbOption = None,
    as_json: JsonOption = False,
    chars: Annotated[int, typer.Option(help="Characters of each prompt summary.", min=10)] = 60,
    pruned: Annotated[
        bool, typer.Option("--pruned/--no-pruned", help="Show the nodes the beam pruned.")
    ] = True,
) -> None:
    """The search tree: rewards, aspect scores, kept or pruned, prompt changes; best path starred."""
    from drpo.inspect.tree import tree_view

    async def main() -> None:
        await tree_view(resolve_db(db), run, as_json, console, chars=chars, show_pruned=pruned)

    run_async(main)


@runs_app.command("log")
def runs_log(
    run: RunArgument,
    db: DbOption = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node's messages.")] = None,
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent",
            help="Only what this agent sent or was asked (search, proposer, critic, editor).",
        ),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", help="Only messages of this kind (repeatable), e.g. judged."),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing new messages until the run ends (or Ctrl-C)."
        ),
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="Print prompts, answers and rationales in full.")
    ] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between polls with --follow.", min=0.05)
    ] = 0.5,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per message per line (JSON Lines).")
    ] = False,
) -> None:
    """The run's messages in order: time, sender -> topic, kind, node and the gist."""
    from drpo.inspect.transcript import log_view

    async def main() -> None:
        await log_view(
            resolve_db(db),
            run,
            console,
            node_id=node,
            agent=agent,
            kinds=kind,
            follow=follow,
            as_json=as_json,
            full=full,
            interval=interval,
        )

    if follow:
        _run_until_interrupted(main)
    else:
        run_async(main)


@runs_app.command("calls")
def runs_calls(
    run: RunArgument,
    db: DbOption = None,
    as_json: JsonOption = False,
    role: Annotated[
        str | None, typer.Option(help="Only this role (proposer, critic, editor).")
    ] = None,
    status: Annotated[str | None, typer.Option(help="Only ok or error calls.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node's calls.")] = None,
    full: Annotated[
        bool, typer.Option("--full", help="With --json: include each request and response.")
    ] = False,
) -> None:
    """Every model call: role, model, tokens, latency, attempts, cost, status, replays."""
    from drpo.inspect.calls import calls_view

    if status is not None and status not in ("ok", "error"):
        raise fail(f"--status must be ok or error, not {status!r}")

    async def main() -> None:
        await calls_view(
            resolve_db(db),
            run,
            as_json,
            console,
            role=role,
            status=status,
            node_id=node,
            full=full,
        )

    run_async(main)


@runs_app.command("export")
def runs_export(
    run: RunArgument,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="Where to write the report (default: drpo-report-RUN.html here, unless "
            "--otlp or --otlp-file is given).",
            dir_okay=False,
        ),
    ] = None,
    otlp: Annotated[
        str | None,
        typer.Option(
            "--otlp",
            help="Send the run as an OpenTelemetry trace to this OTLP/HTTP URL (Phoenix: "
            "http://127.0.0.1:6006); needs drpo[otel].",
        ),
    ] = None,
    otlp_file: Annotated[
        Path | None,
        typer.Option(
            "--otlp-file",
            help="Write the run's trace to this file (OTLP JSON lines); needs drpo[otel].",
            dir_okay=False,
        ),
    ] = None,
    content: Annotated[
        bool,
        typer.Option(
            "--content",
            help="Put prompts and answers into the trace (also: "
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true).",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One self-contained HTML report (tree, reward plot, prompt diffs, critiques, calls), or
    the run as an OpenTelemetry trace (GenAI conventions) for Phoenix, Langfuse, MLflow...

    The report opens offline in any browser: everything is inline, nothing is fetched. The trace
    has the same ids however often it is sent, so a collector keeps one copy.
    """
    if otlp is None and otlp_file is None:
        from drpo.inspect.report import export_view

        run_async(export_view, resolve_db(db), run, html, as_json, console)
        return
    from drpo.tracing.settings import TraceURLError, content_from_env, traces_url

    try:
        url = traces_url(otlp) if otlp is not None else None
    except TraceURLError as exc:
        raise fail(str(exc)) from None
    capture = content or content_from_env()

    async def main() -> None:
        from drpo.inspect.common import open_readonly
        from drpo.tracing.export import export_run

        async with open_readonly(resolve_db(db)) as store:
            done = await export_run(store, run, url=url, path=otlp_file, content=capture)
        for summary in done:
            console.print(
                f"run {summary.run_id}: {summary.spans} spans, trace {summary.trace_id} "
                f"-> {summary.where}",
                highlight=False,
            )
        if html is not None:
            from drpo.inspect.report import export_view

            await export_view(resolve_db(db), run, html, as_json, console)

    run_async(main)
