"""``drpo runs ...``: inspect recorded runs, also while another process is still writing them."""

from __future__ import annotations

from typing import Annotated

import typer

from drpo.cli_support import DbOption, console, resolve_db, run_async

runs_app = typer.Typer(help="Inspect recorded runs.", no_args_is_help=True)


@runs_app.command("list")
def runs_list(
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The recorded runs, newest first."""
    from drpo.inspect.views import list_runs_view

    run_async(list_runs_view, resolve_db(db), as_json, console)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="Run id (or a unique prefix).")],
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Settings, best prompt, reward per level, and calls, tokens and cost per role."""
    from drpo.inspect.views import show_run_view

    run_async(show_run_view, resolve_db(db), run, as_json, console)
