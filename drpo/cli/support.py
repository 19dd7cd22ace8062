"""What every ``drpo`` subcommand shares: consoles, the --db option, clean error exits, and how
a job stops on Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.text import Text

from drpo.bus import loop
from drpo.errors import UserError
from drpo.runs.paths import default_db_path

#: Width of output that is not a terminal (a file, a pipe, CI): wide enough that rich never
#: wraps or truncates a table cell, so every number is there in full.
UNBOUNDED_WIDTH = 10_000


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else UNBOUNDED_WIDTH
    return Console(stderr=stderr, width=width)


console = _console(stderr=False)
err_console = _console(stderr=True)

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Run database (default: $DRPO_DB, else the per-user data folder).",
        show_default=False,
    ),
]


TraceOption = Annotated[
    bool,
    typer.Option(
        "--trace",
        help="Send the run's spans to an OpenTelemetry collector (OTLP/HTTP) while it runs; "
        "needs drpo[otel].",
    ),
]
TraceEndpointOption = Annotated[
    str | None,
    typer.Option(
        "--trace-endpoint",
        help="OTLP/HTTP URL (implies --trace). Default: the config's trace endpoint, then "
        "OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, then http://localhost:4318.",
    ),
]
TraceContentOption = Annotated[
    bool, typer.Option("--trace-content", help="Put prompts and answers into the spans.")
]


def trace_layer(trace: bool, endpoint: str | None, content: bool) -> dict[str, Any]:
    """The ``[trace]`` overrides the trace flags make (only those given)."""
    return {
        "enabled": True if trace or endpoint or content else None,
        "endpoint": endpoint,
        "content": True if content else None,
    }


def checked_trace(trace: Any) -> Any:
    """``trace`` (TraceSettings) when tracing is on and can work, None when it is off, else a
    clean exit naming the fix: checked before anything runs, so a bad URL or a missing extra
    costs nothing."""
    from drpo.tracing.live import check
    from drpo.tracing.otel import OtelMissingError
    from drpo.tracing.settings import TraceURLError

    if not trace.enabled:
        return None
    try:
        check(trace)
    except (OtelMissingError, TraceURLError) as exc:
        raise fail(str(exc)) from None
    return trace


def trace_settings(trace: bool, endpoint: str | None, content: bool) -> Any:
    """The trace settings the flags alone make, checked (a clean exit naming the fix)."""
    from drpo.tracing.settings import TraceSettings

    layer = {key: value for key, value in trace_layer(trace, endpoint, content).items() if value}
    try:
        settings = TraceSettings.model_validate(layer)
    except ValueError as exc:
        raise fail(str(exc)) from None
    return checked_trace(settings)


def resolve_db(db: Path | None) -> Path:
    return db if db is not None else default_db_path()


def fail(message: str, code: int = 2) -> typer.Exit:
    # the message is text, not markup: "pip install 'drpo[otel]'" must print as written
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    return typer.Exit(code)


def report_outcome(outcome: Any) -> bool:
    """Print how a run ended when it did not finish; True when it finished."""
    if outcome.status == "finished":
        return True
    run_id = outcome.run_id
    if outcome.status == "budget_exhausted":
        what = "--max-cost USD" if " cost budget " in (outcome.error or "") else "--max-calls N"
        title, hint = "stopped: budget exhausted", f"`drpo resume {run_id} {what}`"
    else:
        title, hint = outcome.status, f"`drpo resume {run_id}`"
    err_console.print(
        f"[bold red]run {run_id} {title}[/]: {outcome.error}\n  continue it with {hint}",
        highlight=False,
    )
    return False


def run_async(main: Any, *args: Any, on_interrupt: Callable[[], None] | None = None) -> Any:
    """Run a job's coroutine function, turning drpo's user errors (:class:`UserError` and what
    derives from it) into one ``error:`` line and exit 2; any other exception is a bug and
    propagates with its traceback.

    Ctrl-C (or SIGTERM) stops the job: every run in flight is cancelled, recorded as
    interrupted, and its journal committed; then ``on_interrupt`` says how to go on, and the
    process exits with 130 without waiting for a worker thread still busy (a model being
    loaded). A second Ctrl-C exits at once.
    """
    from drpo.jobs.lifecycle import is_user_error, leaf_exceptions

    try:
        return loop.run(_until_signalled, main, args)
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        else:
            err_console.print("interrupted; resume with `drpo resume RUN`")
        _exit_now(130)
    except UserError as exc:
        raise fail(str(exc)) from None
    except BaseExceptionGroup as group:
        # an error raised inside a task group arrives wrapped: report the user's error plainly
        if is_user_error(group):
            raise fail(str(leaf_exceptions(group)[0])) from None
        raise


async def _until_signalled(main: Any, args: tuple[Any, ...]) -> Any:
    """``main(*args)``, cancelled by the first SIGINT/SIGTERM (then KeyboardInterrupt is raised,
    once the cancellation has been recorded); a second signal ends the process at once."""
    stopping = False
    result: Any = None
    async with anyio.create_task_group() as watcher:
        work = anyio.CancelScope()

        async def watch() -> None:
            nonlocal stopping
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    if stopping:
                        err_console.print("stopped at once; `drpo resume RUN` continues it")
                        _exit_now(130)
                    stopping = True
                    err_console.print("stopping (press Ctrl-C again to quit at once)...")
                    work.cancel()

        watcher.start_soon(watch)
        with work:
            result = await main(*args)
        watcher.cancel_scope.cancel()
    if stopping:
        raise KeyboardInterrupt
    return result


def _exit_now(code: int) -> None:
    """Leave without waiting for worker threads (a model load or a batch that is winding
    down): what must be kept is already committed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
