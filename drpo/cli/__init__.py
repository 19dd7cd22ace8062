"""The ``drpo`` command (typer + rich): :mod:`~drpo.cli.app` assembles the subcommands, which live
in :mod:`~drpo.cli.jobs` (optimize, resume, icl, generate), :mod:`~drpo.cli.evaluate` (eval) and
:mod:`~drpo.cli.runs` (the run views)."""
