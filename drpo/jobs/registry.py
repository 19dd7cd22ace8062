"""The jobs, in one table: what a run's ``kind`` is, and how such a run is run from its record.

Every job (optimize, icl, eval, generate) is one module that defines its :data:`JOB`: its kind
(the store's ``runs.kind``), how a run of it is created, how it is run from its record alone
(a new run and a resumed one take that same path), and what the outcome's ``result`` holds.
:data:`JOB_MODULES` names those modules; the Python API's ``resume``, ``drpo resume`` and the
tests read the jobs from here, so adding a job is one module plus one line below (then its
front doors: a function in ``drpo/api.py``, a command in ``drpo/cli``).

The modules are imported on first use, so that ``drpo --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from drpo.errors import UserError

if TYPE_CHECKING:
    from drpo.jobs.config import BudgetSettings
    from drpo.jobs.lifecycle import RunOutcome
    from drpo.jobs.session import Session

#: Run kind -> the module that defines that job's :data:`JOB`.
JOB_MODULES: dict[str, str] = {
    "optimize": "drpo.jobs.optimize",
    "icl": "drpo.jobs.icl",
    "eval": "drpo.jobs.evaluation.runner",
    "generate": "drpo.jobs.generate",
}


@dataclass(frozen=True)
class Job:
    """One job's entry in the table."""

    #: The store's ``runs.kind`` of its runs.
    kind: str
    #: One line for listings and error messages.
    description: str
    #: Records a new run (status ``created``) and returns its id; its arguments are the job's
    #: own inputs (a search's settings, a generation's queries and plan...).
    create: Callable[..., Awaitable[str]]
    #: Runs or resumes a recorded run: ``run(session, run_id, *, budget=None, force=False)``.
    run: Callable[..., Awaitable[RunOutcome[Any]]]
    #: What ``RunOutcome.result`` holds when the run returns.
    result: str


class UnknownJobError(UserError, LookupError):
    """A run whose kind no job of this drpo runs (a newer drpo's, or a damaged record)."""


def job_for(kind: str) -> Job:
    """The job that runs runs of ``kind``; :class:`UnknownJobError` names the kinds there are."""
    module = JOB_MODULES.get(kind)
    if module is None:
        raise UnknownJobError(
            f"runs of kind {kind!r} cannot be run by this drpo (it runs {', '.join(JOB_MODULES)})"
        )
    job: Job = import_module(module).JOB
    return job


def all_jobs() -> list[Job]:
    """Every job, in :data:`JOB_MODULES`' order."""
    return [job_for(kind) for kind in JOB_MODULES]


async def run_recorded(
    session: Session,
    kind: str,
    run_id: str,
    *,
    budget: BudgetSettings | None = None,
    force: bool = False,
) -> RunOutcome[Any]:
    """Run (or resume) ``run_id``, a run of ``kind``, with the job the table names for it."""
    return await job_for(kind).run(session, run_id, budget=budget, force=force)
