"""The life of a run: how its status moves and how its end is classified."""

from __future__ import annotations

from drpo.bus import RemoteError


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; ``error`` itself otherwise.

    A task group wraps what its tasks raised; callers that report or classify errors want the
    causes, not "unhandled errors in a TaskGroup".
    """
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]


def describe_error(exc: BaseException, limit: int = 3) -> str:
    """``Type: message`` of what went wrong, with exception groups unwrapped (a task group's
    "unhandled errors in a TaskGroup (2 sub-exceptions)" says nothing about the cause)."""
    seen: list[str] = []
    for leaf in leaf_exceptions(exc):
        text = str(leaf) if isinstance(leaf, RemoteError) else f"{type(leaf).__name__}: {leaf}"
        if text not in seen:
            seen.append(text)
    more = len(seen) - limit
    return "; ".join(seen[:limit]) + (f" (and {more} more)" if more > 0 else "")
