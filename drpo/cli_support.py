"""What every ``drpo`` subcommand shares: consoles, the --db option, and clean error exits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console

from drpo.runs.paths import default_db_path

console = Console()
err_console = Console(stderr=True)

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Run database (default: $DRPO_DB, else the per-user data folder).",
        show_default=False,
    ),
]


def resolve_db(db: Path | None) -> Path:
    return db if db is not None else default_db_path()


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def run_async(main: Any, *args: Any) -> Any:
    """Run a coroutine function, turning known user errors into a clean exit."""
    from drpo.errors import leaf_exceptions, user_error_types

    try:
        return anyio.run(main, *args)
    except KeyboardInterrupt:
        err_console.print("interrupted; resume with `drpo resume RUN`")
        raise typer.Exit(130) from None
    except (*user_error_types(), UserError) as exc:
        raise fail(str(exc)) from None
    except BaseExceptionGroup as group:
        # an error raised inside a task group arrives wrapped: report the user's error plainly
        known = (*user_error_types(), UserError)
        leaves = leaf_exceptions(group)
        user_errors = [leaf for leaf in leaves if isinstance(leaf, known)]
        if user_errors and len(user_errors) == len(leaves):
            raise fail(str(user_errors[0])) from None
        raise
