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


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message alone tells the user what is wrong and how to fix it."""
    from drpo.backends.base import BackendError
    from drpo.backends.kinds import ModelSpecError
    from drpo.data.loaders import DataFormatError
    from drpo.jobs.artifact import ArtifactError
    from drpo.jobs.config import ConfigError
    from drpo.runs.store import StoreError

    return (
        ArtifactError,
        BackendError,
        ConfigError,
        DataFormatError,
        ModelSpecError,
        StoreError,
        LookupError,
    )


def run_async(main: Any, *args: Any) -> Any:
    """Run a coroutine function, turning known user errors into a clean exit."""
    from drpo.jobs.lifecycle import leaf_exceptions

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
