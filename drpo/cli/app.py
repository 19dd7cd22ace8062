"""The ``drpo`` command: the jobs, the evaluation and the run views, each from its own module.

Each subcommand is a thin layer: parse flags, call the library, print. Errors users can fix (a
bad flag, a missing key, a malformed file, a database from another version) derive from
:class:`drpo.errors.UserError` and are printed as one clear message with exit code 2, never a
traceback; any other exception is a bug and prints its traceback (the run it stopped is still
recorded ``failed``, naming the exception).

What Ctrl-C (or SIGTERM) does, file by file:

1. ``cli/support.py`` :func:`~drpo.cli.support.run_async`: every job command runs through it; the
   first signal cancels the job (``_until_signalled``), a second one exits at once;
2. ``jobs/lifecycle.py`` ``RunLifecycle._run_classified``: the cancellation is recorded as the
   run's ``interrupted`` status (shielded), then re-raised;
3. ``runs/journal.py`` ``JournaledCaller``: a call already paid for is still written (shielded),
   so ``drpo resume RUN`` never buys it again;
4. ``backends/batching.py``: a queued local call drops out of its batch, a running one flags its
   rows to stop;
5. ``backends/local_model.py``: the generation loop reads those flags and ends at the next token.
"""

from __future__ import annotations

import sys

import typer

from drpo.cli import jobs
from drpo.cli.evaluate import eval_command
from drpo.cli.runs import runs_app

app = typer.Typer(
    name="drpo",
    help="Tuning-free self-alignment: DRPO prompt search as an async agent system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

app.command()(jobs.optimize)
app.command()(jobs.resume)
app.command()(jobs.icl)
app.command()(jobs.generate)
app.command("eval")(eval_command)
app.add_typer(runs_app, name="runs")


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
