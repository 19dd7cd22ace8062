"""The life of a run, the same for every job (optimize, icl, eval, generate).

A job is a coroutine that does its work and returns a :class:`JobResult`. :meth:`RunLifecycle.run`
does everything around it, in one place:

* **backends first**: the backends of every model the run names are built before the job
  starts (building one loads nothing and calls nothing: an API backend reads its key), so an
  API model with no key fails the run at once with its one-line error, before the embedded
  model takes seconds to load for the roles that come first;
* **one owner**: it takes the run's lease in the store (owner, pid, host) and renews it with a
  heartbeat while the job runs; a second process that asks for the same run is refused with a
  message naming the owner, and a lease whose owner died is taken over (see
  :meth:`~drpo.runs.store.RunStore.acquire_lease`);
* **versions**: a run records the package, prompt-template and journal-key versions it was made
  with; resuming it under a drpo whose prompts or keys differ would pay again for every call
  whose request changed, so that is refused unless forced;
* **status and events**: ``running``, then ``finished`` | ``interrupted`` | ``budget_exhausted``
  | ``failed`` with a one-line reason, with ``RunStarted``/``RunFinished`` on the bus;
* **classification**: a budget stop is told by the journal's own state (it refused a call for
  the budget), never by an exception's type or name; a cancellation is an interruption; any
  other error is a failure, summarised in one line that names the exception's type. A failure
  by one of drpo's user errors (:class:`drpo.errors.UserError`: an endpoint that refuses, a
  search that cannot learn) is returned as the run's outcome; any other exception is a bug, and
  is re-raised once recorded, so that its traceback is seen.

Everything already journaled stays: a run that ends any way but ``finished`` resumes from its
journal with ``drpo resume RUN``.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import structlog

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.client import AgentClient
from drpo.agents.prompts import PROMPTS_VERSION
from drpo.agents.runtime import RunContext
from drpo.backends.kinds import validate_endpoints
from drpo.bus import RemoteError
from drpo.domain.events import RunFinished, RunStarted
from drpo.errors import UserError
from drpo.jobs.config import BudgetSettings
from drpo.jobs.session import Session
from drpo.runs.journal import KEY_FORMAT, JournaledCaller
from drpo.runs.store import LeaseLostError, RunStatus, StoreError

log = structlog.get_logger("drpo.jobs.lifecycle")

T = TypeVar("T")

#: A lease whose heartbeat is older than this is free (its owner is presumed dead).
LEASE_TTL_S = 30.0
#: How often a running job proves it is alive.
HEARTBEAT_S = 5.0
#: Longest an error summary stored with a run is (one line).
MAX_ERROR_CHARS = 500


class VersionMismatchError(StoreError):
    """A run made by a drpo whose prompts or journal keys differ from this one's."""


@dataclass
class JobResult(Generic[T]):
    """How a job ended when it returned: its own result for its caller, the summary stored as the
    run's result, its status (a job may end ``failed`` having done what it could, such as an
    evaluation with failed items) and the fields of its ``RunFinished`` event."""

    result: T
    summary: dict[str, Any] | None = None
    status: RunStatus = "finished"
    error: str | None = None
    best_node_id: str | None = None
    best_prompt: str | None = None
    best_score: float | None = None


@dataclass
class RunOutcome(Generic[T]):
    """How a run ended: its status, a one-line error when it did not finish, the summary stored
    with it, and the job's own result (None unless the job returned)."""

    run_id: str
    status: str
    error: str | None = None
    summary: dict[str, Any] | None = None
    result: T | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def run_versions() -> dict[str, str]:
    """What a run's requests depend on: recorded with each run, checked on resume."""
    from drpo import __version__

    return {"drpo": __version__, "prompts": PROMPTS_VERSION, "journal": KEY_FORMAT}


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; ``error`` itself otherwise.

    A task group wraps what its tasks raised; callers that report or classify errors want the
    causes, not "unhandled errors in a TaskGroup".
    """
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` (every leaf of it, for a group) is one of drpo's user errors."""
    return all(isinstance(leaf, UserError) for leaf in leaf_exceptions(error))


def describe_error(exc: BaseException, limit: int = 3) -> str:
    """``Type: message`` of what went wrong on one line, with exception groups unwrapped (a task
    group's "unhandled errors in a TaskGroup (2 sub-exceptions)" says nothing about the cause)."""
    seen: list[str] = []
    for leaf in leaf_exceptions(exc):
        text = str(leaf) if isinstance(leaf, RemoteError) else f"{type(leaf).__name__}: {leaf}"
        text = " ".join(text.split())
        if text not in seen:
            seen.append(text)
    more = len(seen) - limit
    text = "; ".join(seen[:limit]) + (f" (and {more} more)" if more > 0 else "")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class RunLifecycle:
    """Runs one job as one run of ``session``'s store; see the module docstring."""

    def __init__(
        self,
        session: Session,
        run_id: str,
        *,
        sender: str,
        budget: BudgetSettings | None = None,
        catalogue: AspectCatalogue | None = None,
        endpoints: Mapping[str, Any] | None = None,
        models: Iterable[str] = (),
        force: bool = False,
    ) -> None:
        """``models``: every model spec the job will call (its backends are built first)."""
        budget = budget or BudgetSettings()
        # the run's [endpoints] settings (limits, prices, capabilities) for the backends it uses
        session.registry.configure(validate_endpoints(endpoints or {}))
        self.session = session
        self.run_id = run_id
        #: The run's call journal: every agent call of the run goes through it (and its budget).
        self.journal = JournaledCaller(
            session.store, run_id, max_calls=budget.max_calls, max_cost_usd=budget.max_cost_usd
        )
        self.catalogue = catalogue or AspectCatalogue.load_default()
        self.force = force
        self.models = tuple(dict.fromkeys(models))
        self.events = AgentClient(session.bus, run_id, sender=sender)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.log = log.bind(run_id=run_id, agent=sender)

    async def run(
        self, job: Callable[[], Awaitable[JobResult[T]]], started: RunStarted
    ) -> RunOutcome[T]:
        """Take the run, run ``job``, record how it ended; returns that (a cancellation is
        recorded as an interruption and re-raised)."""
        store = self.session.store
        await self._check_versions()
        await store.acquire_lease(
            self.run_id,
            self.owner,
            pid=os.getpid(),
            host=socket.gethostname(),
            ttl_s=LEASE_TTL_S,
            force=self.force,
        )
        if self.session.tracer is not None:
            await self.session.tracer.follow(self.run_id)
        runtime = self.session.runtime
        runtime.attach(RunContext(self.run_id, self.journal, self.catalogue))
        try:
            await store.set_run_status(self.run_id, "running")
            await self.events.emit(started)
            return await self._run_classified(job)
        finally:
            runtime.detach(self.run_id)
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await store.release_lease(self.run_id, self.owner)

    async def _run_classified(self, job: Callable[[], Awaitable[JobResult[T]]]) -> RunOutcome[T]:
        try:
            for model in self.models:  # an API key missing fails here, before any model loads
                self.session.registry.get(model)
            result = await self._with_heartbeat(job)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._end("interrupted", error="interrupted")
            raise
        except Exception as exc:
            if await _being_cancelled():
                # the job turned its cancellation into an error (a worker that stops with one,
                # a task group that wraps it): the run was interrupted, not failed
                with anyio.CancelScope(shield=True):
                    await self._end("interrupted", error="interrupted")
                await anyio.lowlevel.checkpoint()  # raises the cancellation, as a cancelled job
                raise
            refused = self.journal.exhausted
            if refused is not None:
                status, error = "budget_exhausted", str(refused)
                self.log.warning("budget reached; resume with a larger budget", error=error)
            else:
                status, error = "failed", describe_error(exc)
                self.log.error("run failed", error=error)
            with anyio.CancelScope(shield=True):
                await self._end(status, error=error)
            if refused is None and not is_user_error(exc):
                raise  # a bug: recorded as the run's failure, and shown with its traceback
            return RunOutcome(self.run_id, status, error=error)
        status = result.status
        if status != "finished" and self.journal.exhausted is not None:
            status = "budget_exhausted"
        await self._end(
            status,
            error=result.error,
            summary=result.summary,
            finished=RunFinished(
                status=status,
                best_node_id=result.best_node_id,
                best_prompt=result.best_prompt,
                best_score=result.best_score,
                error=result.error,
            ),
        )
        return RunOutcome(self.run_id, status, result.error, result.summary, result.result)

    async def _with_heartbeat(self, job: Callable[[], Awaitable[JobResult[T]]]) -> JobResult[T]:
        """Run ``job`` while renewing the lease; losing the lease (taken with --force) stops it."""
        outcome: list[JobResult[T]] = []

        async def beat() -> None:
            while True:
                await anyio.sleep(HEARTBEAT_S)
                await self.session.store.renew_lease(self.run_id, self.owner)

        async def work() -> None:
            outcome.append(await job())
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(beat)
                tg.start_soon(work)
        except BaseExceptionGroup as group:
            leaves = leaf_exceptions(group)
            lost = next((e for e in leaves if isinstance(e, LeaseLostError)), None)
            raise lost or (leaves[0] if len(leaves) == 1 else group) from None
        return outcome[0]

    async def _end(
        self,
        status: RunStatus,
        *,
        error: str | None,
        summary: dict[str, Any] | None = None,
        finished: RunFinished | None = None,
    ) -> None:
        """Record the end: the status first (what ``drpo resume`` and the views go by), then the
        event, written straight to the store too (the recorder may be stopping) and bounded in
        time, so that a Ctrl-C can never hang on it."""
        store = self.session.store
        await store.set_run_status(self.run_id, status, result=summary, error=error)
        event = finished or RunFinished(status=status, error=error)
        with anyio.move_on_after(5):
            envelope = await self.events.emit(event)
            try:
                await store.append_messages([envelope], wait=True)
            except StoreError as exc:  # the store is closing: the status is what matters
                self.log.warning("could not record the end event", error=str(exc))

    async def _check_versions(self) -> None:
        record = await self.session.store.get_run(self.run_id)
        recorded = record.config.get("versions") or {}
        current = run_versions()
        changed = [
            name
            for name in ("prompts", "journal")
            if recorded.get(name, current[name]) != current[name]
        ]
        if changed and not self.force:
            made_by = recorded.get("drpo", "an earlier drpo")
            raise VersionMismatchError(
                f"run {self.run_id} was made by drpo {made_by} whose "
                f"{' and '.join(changed)} differ from this drpo {current['drpo']}: resuming would "
                "send again (and pay for) every call whose request changed; resume it with the "
                "drpo that made it, or add --force to resume anyway"
            )


async def _being_cancelled() -> bool:
    """Whether the enclosing cancel scope has been cancelled (anyio's public checkpoint)."""
    try:
        await anyio.lowlevel.checkpoint_if_cancelled()
    except anyio.get_cancelled_exc_class():
        return True
    return False
