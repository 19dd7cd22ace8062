"""Console views of runs (``drpo runs ...``): rich tables for people, ``--json`` for scripts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from drpo.inspect.summary import RunSummary, summarize_run
from drpo.runs.store import RunStore, StoreError


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _require_db(db: Path) -> None:
    if not db.exists():
        raise StoreError(f"no run database at {db} (run `drpo optimize` first, or pass --db)")


async def list_runs_view(db: Path, as_json: bool, console: Console) -> None:
    _require_db(db)
    async with RunStore.open(db, readonly=True) as store:
        summaries = [await summarize_run(store, record) for record in await store.list_runs()]
    if as_json:
        console.print_json(json.dumps([s.to_json() for s in summaries], default=str))
        return
    table = Table(title=f"runs in {db}")
    for column in (
        "run",
        "kind",
        "status",
        "base model",
        "progress",
        "best",
        "cost $",
        "started",
        "finished",
    ):
        table.add_column(column)
    for s in summaries:
        progress = f"{s.levels_done}/{(s.depth_limit or 1) - 1}" if s.kind == "optimize" else "-"
        table.add_row(
            s.run_id[:12],
            s.kind,
            s.status,
            s.base_model or "-",
            progress,
            _score(s.best_score),
            f"{s.cost_usd:.4f}",
            _when(s.started_at),
            _when(s.finished_at),
        )
    console.print(table)


async def show_run_view(db: Path, run: str, as_json: bool, console: Console) -> None:
    _require_db(db)
    async with RunStore.open(db, readonly=True) as store:
        summary = await summarize_run(store, await store.get_run(run))
    if as_json:
        console.print_json(json.dumps(summary.to_json(), default=str))
        return
    render_summary(summary, console)


def render_summary(s: RunSummary, console: Console) -> None:
    console.print(
        f"[bold]run {s.run_id}[/] ({s.kind}) status [bold]{s.status}[/]"
        + (f", error: {s.error}" if s.error else ""),
        highlight=False,
    )
    console.print(
        f"models: base {s.base_model}, critic {s.critic_model}, editor {s.editor_model}; "
        f"started {_when(s.started_at)}, finished {_when(s.finished_at)}",
        highlight=False,
    )
    search = s.settings.get("search", {})
    console.print(
        "settings: " + ", ".join(f"{k}={v}" for k, v in search.items() if k != "initial_prompt"),
        highlight=False,
    )
    if s.best_prompt:
        console.print(Panel(s.best_prompt, title=f"best prompt (score {_score(s.best_score)})"))
    if s.levels:
        levels = Table(title="reward per level")
        for column in ("level", "best (path mean)", "beam mean", "depth limit"):
            levels.add_column(column, justify="right")
        for p in s.levels:
            levels.add_row(
                str(p.level), _score(p.best_score), _score(p.mean_score), str(p.depth_limit)
            )
        console.print(levels)
    roles = Table(title="calls per role")
    for column in (
        "role",
        "calls",
        "replayed",
        "errors",
        "prompt tok",
        "completion tok",
        "cached tok",
        "cost $",
    ):
        roles.add_column(column, justify="right")
    for role, t in sorted(s.by_role.items()):
        roles.add_row(
            role,
            str(t.calls),
            str(t.replayed),
            str(t.errors),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            str(t.cached_tokens),
            f"{t.cost_usd:.4f}",
        )
    console.print(roles)
