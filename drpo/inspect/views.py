"""Console views of runs (``drpo runs list`` and ``drpo runs show``): rich tables for people,
``--json`` for scripts. The other views live beside this module: :mod:`drpo.inspect.tree`,
:mod:`drpo.inspect.transcript`, :mod:`drpo.inspect.calls` and :mod:`drpo.inspect.report`.

Model and user text is printed as :class:`rich.text.Text`, never parsed as rich markup.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from drpo.inspect.common import (
    JSON_FORMAT,
    duration,
    open_readonly,
    print_json,
    score,
    when,
)
from drpo.inspect.summary import RunSummary, summarize_run


def progress(s: RunSummary) -> str:
    """Levels done out of the levels the search will run (its depth limit minus the root)."""
    if s.kind != "optimize":
        return "-"
    total = max(0, (s.depth_limit or 1) - 1)
    queries = s.settings.get("search", {}).get("num_train_queries")
    if isinstance(queries, int) and queries > 0:
        total = min(total, queries - 1)
    return f"{s.levels_done}/{total}" if total else str(s.levels_done)


def models_text(s: RunSummary, *, short: bool = False) -> str:
    """``base / critic`` (``/ editor`` when it differs); ``short`` drops the backend kinds."""

    def name(spec: str | None) -> str:
        if spec is None:
            return "-"
        return spec.partition(":")[2].partition("@")[0] or spec if short else spec

    base, critic, editor = name(s.base_model), name(s.critic_model), name(s.editor_model)
    if base == critic == editor:
        return base
    return f"{base} / {critic}" + (f" / {editor}" if editor != critic else "")


def short_when(timestamp: float | None) -> str:
    """``MM-DD HH:MM`` (UTC) for tables; the JSON output has the exact timestamps."""
    return when(timestamp)[5:16] if timestamp else "-"


async def list_runs_view(
    db: Path,
    as_json: bool,
    console: Console,
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int | None = None,
) -> None:
    async with open_readonly(db) as store:
        records = await store.list_runs(kind=kind, status=status, limit=limit)
        summaries = [await summarize_run(store, record) for record in records]
    if as_json:
        print_json(console, [s.to_json() | {"progress": progress(s)} for s in summaries])
        return
    if not summaries:
        console.print(Text(f"no runs in {db}"))
        return
    kinds = {s.kind for s in summaries}
    table = Table(title=f"runs in {db}", title_justify="left", box=box.SIMPLE_HEAD)
    columns = [
        ("run", "left", True),
        ("name", "left", False),
        ("kind", "left", True),
        ("status", "left", True),
        ("models", "left", False),
        ("progress", "right", True),
        ("best", "right", True),
        ("calls", "right", True),
        ("cost $", "right", True),
        ("started", "left", False),
        ("finished", "left", False),
    ]
    if kinds == {"optimize"}:
        columns = [column for column in columns if column[0] != "kind"]
    # On a narrow terminal, leave out what matters least rather than squeeze everything.
    for column, needs in (("finished", 125), ("name", 110), ("models", 100)):
        if console.width < needs:
            columns = [c for c in columns if c[0] != column]
    for column, justify, no_wrap in columns:
        table.add_column(
            column,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=no_wrap,
            min_width=12 if column == "run" else None,
        )
    for s in summaries:
        cells = {
            "run": s.run_id[:12],
            "name": Text(s.name or "-"),
            "kind": s.kind,
            "status": Text(s.status, style=_status_style(s.status)),
            "models": Text(models_text(s, short=True)),
            "progress": progress(s),
            "best": score(s.best_score),
            "calls": str(s.calls),
            "cost $": f"{s.cost_usd:.4f}",
            "started": short_when(s.started_at),
            "finished": short_when(s.finished_at),
        }
        table.add_row(*(cells[column[0]] for column in columns))
    console.print(table)


def _status_style(status: str) -> str:
    return {
        "finished": "green",
        "running": "yellow",
        "created": "dim",
        "failed": "bold red",
        "interrupted": "red",
        "budget_exhausted": "red",
    }.get(status, "")


async def show_run_view(db: Path, run: str, as_json: bool, console: Console) -> None:
    async with open_readonly(db) as store:
        summary = await summarize_run(store, await store.get_run(run))
    if as_json:
        print_json(
            console, summary.to_json() | {"format": JSON_FORMAT, "progress": progress(summary)}
        )
        return
    render_summary(summary, console)


def _health_line(s: RunSummary) -> Text | None:
    """The shares of unreadable verdicts and unusable rewrites, flagged when they are high."""
    parts = []
    for label, share in (
        ("unreadable verdicts", s.failed_judgement_share),
        ("unusable rewrites", s.failed_edit_share),
    ):
        if share is not None:
            parts.append((f"{label} {share:.0%}", "bold red" if share >= 0.5 else ""))
    if not parts:
        return None
    line = Text("health: ")
    for index, (text, style) in enumerate(parts):
        if index:
            line.append(", ")
        line.append(text, style=style)
    return line


def render_summary(s: RunSummary, console: Console) -> None:
    head = Text()
    head.append(f"run {s.run_id}", style="bold")
    if s.name:
        head.append(" · ")
        head.append(s.name)
    head.append(f" ({s.kind}) status ")
    head.append(s.status, style=_status_style(s.status) or "bold")
    if s.error:
        head.append(f", error: {s.error}", style="red")
    console.print(head)
    console.print(
        Text(
            f"models: base {s.base_model}, critic {s.critic_model}, editor {s.editor_model}\n"
            f"created {when(s.created_at)}, started {when(s.started_at)}, finished "
            f"{when(s.finished_at)} (UTC; took {duration(s.started_at, s.finished_at)}); "
            f"progress {progress(s)} levels"
        )
    )
    search = s.settings.get("search", {})
    if search:
        console.print(
            Text(
                "settings: "
                + ", ".join(f"{k}={v}" for k, v in search.items() if k != "initial_prompt")
            )
        )
    health = _health_line(s)
    if health:
        console.print(health)
    if s.best_prompt:
        console.print(
            Panel(
                Text(s.best_prompt),
                title=f"best prompt (score {score(s.best_score)})",
                expand=console.is_terminal,
            )
        )
    if s.levels:
        levels = Table(title="reward per level")
        for column in (
            "level",
            "best (path mean)",
            "beam mean",
            "depth limit",
            "unreadable verdicts",
            "unusable rewrites",
        ):
            levels.add_column(column, justify="right")
        for p in s.levels:
            levels.add_row(
                str(p.level),
                score(p.best_score),
                score(p.mean_score),
                str(p.depth_limit),
                f"{p.failed_judgements}/{p.judged}",
                f"{p.failed_edits}/{p.edits}",
            )
        console.print(levels)
    roles = Table(title="calls per role", show_footer=True)
    total = s.total
    for column, footer in (
        ("role", "total"),
        ("calls", str(total.calls)),
        ("replayed", str(total.replayed)),
        ("errors", str(total.errors)),
        ("prompt tok", str(total.prompt_tokens)),
        ("completion tok", str(total.completion_tokens)),
        ("cached tok", str(total.cached_tokens)),
        ("cost $", f"{total.cost_usd:.4f}"),
    ):
        roles.add_column(column, justify="right", footer=footer)
    for role, t in sorted(s.by_role.items()):
        roles.add_row(
            Text(role),
            str(t.calls),
            str(t.replayed),
            str(t.errors),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            str(t.cached_tokens),
            f"{t.cost_usd:.4f}",
        )
    console.print(Group(roles) if s.by_role else Text("no model calls recorded yet", style="dim"))
