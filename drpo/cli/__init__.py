"""The ``drpo`` command (typer + rich): :mod:`~drpo.cli.app` assembles the subcommands."""

from drpo.cli.app import app, main

__all__ = ["app", "main"]
