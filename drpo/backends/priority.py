"""Call priority: foreground (the default) or background, carried by a context variable.

Why: at the start of a run the critic selects aspects for every reachable query (about 70 calls),
and on one local model those calls would queue ahead of the level-1 answers that the search is
actually waiting for. Work that is useful but not urgent runs inside :func:`background`; the
:class:`~drpo.backends.batching.DynamicBatcher` reads the priority when a call is submitted and
fills each batch with foreground calls first, then background calls (each in arrival order), so
background work still uses every slot the foreground leaves free.

A context variable, not a parameter, so the priority reaches the backend through the agents and
the bus without every signature in between carrying it. Tasks copy the context when they are
started, so a task started inside ``with background():`` (e.g. ``tg.start_soon(...)`` there) keeps
background priority for its whole life, and code in that task can step back to the foreground
with :func:`foreground`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from enum import IntEnum


class Priority(IntEnum):
    """Lower values are served first."""

    FOREGROUND = 0
    BACKGROUND = 1


_PRIORITY: ContextVar[Priority] = ContextVar("drpo_call_priority", default=Priority.FOREGROUND)


def current_priority() -> Priority:
    """The priority of calls made from the current context (foreground unless set)."""
    return _PRIORITY.get()


@contextmanager
def with_priority(priority: Priority) -> Iterator[None]:
    """Calls made (and tasks started) inside the block get ``priority``; restored afterwards."""
    token = _PRIORITY.set(priority)
    try:
        yield
    finally:
        _PRIORITY.reset(token)


def background() -> AbstractContextManager[None]:
    """Mark calls made (and tasks started) inside the block as background work."""
    return with_priority(Priority.BACKGROUND)


def foreground() -> AbstractContextManager[None]:
    """Mark calls inside the block as foreground again (e.g. inside a background task)."""
    return with_priority(Priority.FOREGROUND)
