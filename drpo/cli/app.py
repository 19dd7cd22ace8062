"""The ``drpo`` command: the jobs, the evaluation and the run views, each from its own module.

Each subcommand is a thin layer: parse flags, call the library, print. Errors users can fix (a
bad flag, a missing key, a malformed file, a database from another version) are printed as one
clear message with a non-zero exit code, never a traceback.
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
