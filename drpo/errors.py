"""The errors a user can fix, gathered so the CLI can print them cleanly.

Each module defines its own error next to the code that raises it; this module only lists them,
importing lazily so that ``drpo --help`` stays fast.
"""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message alone tells the user what is wrong and how to fix it."""
    from drpo.artifact import ArtifactError
    from drpo.backends.base import BackendError
    from drpo.backends.spec import ModelSpecError
    from drpo.config import ConfigError
    from drpo.data.loaders import DataFormatError
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


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; ``error`` itself otherwise.

    A task group wraps what its tasks raised; callers that report or classify errors want the
    causes, not "unhandled errors in a TaskGroup".
    """
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]
