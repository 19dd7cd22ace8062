"""A sweep's searches in several worker processes, one event loop each (``--workers N``).

Why: one drpo process runs one event loop on one core, and at full load that core is the limit
(README, "Scaling out"): 50 searches at once on an ordinary 2-core CPU keep it saturated with the
call path's work (prompts, verdicts, the journal, the recorder), and the searches wait on the
CPU instead of on the endpoints. Several processes use several cores.

What the workers share, and how:

* **The run store**: every worker opens its own :class:`~drpo.runs.store.RunStore` (its own
  writer connection) on the same WAL database; SQLite takes their transactions one at a time
  (``busy_timeout``), the runs stay one-owner each (the lease names the worker's pid), and a
  reader (``drpo runs ...``) sees every worker's runs. The runs are created here, in the parent,
  before any worker starts, so their ids, order and records are those ``workers=1`` makes. (A
  single writer fed by every worker would move every journal write, and the wait for its
  commit, across a pipe to another process; what two writers on one file cost instead is
  measured by ``benchmarks/bus.py --processes 2``, see README.)
* **The endpoints' limits**: a static split. Each worker gets its searches' share of every API
  endpoint's ``rpm``, ``tpm`` and ``max_in_flight`` (a worker running 25 of 50 searches gets half
  of each), so together they never exceed the limit; what a worker whose searches ended early
  leaves unused is not lent to the others.
* **Results**: each worker runs :func:`drpo.jobs.optimize.run_searches` on its searches (the same
  code as ``workers=1``: journal keys, replay and results do not change) and returns their
  outcomes; progress comes back over a queue.

The pool is the standard library's :class:`concurrent.futures.ProcessPoolExecutor` with the
``spawn`` start method (a fresh interpreter per worker: no forked event loop, aiosqlite thread or
open connection; the same on Linux, macOS and Windows). It was chosen over ``anyio.to_process``
because a cancelled ``to_process`` call kills its worker (SIGKILL), which leaves the worker's runs
recorded ``running`` instead of ``interrupted``; here a cancelled sweep asks each worker to stop
(SIGTERM, as Ctrl-C does), and the worker records its runs interrupted before it returns. The
pool's initializer also hands each worker the progress queue, which ``to_process`` has no way
to do. A worker whose parent died (``kill -9``) stops its searches the same way within a second,
so no worker keeps paying for calls nobody will read.

Local models are refused only when more than one worker would start (``workers > 1`` and more
than one search): each worker would load its own copy. With one search, or ``workers = 1``,
:func:`run_sweep` runs in this process, local models included, as before. A script
that calls :func:`run_sweep` with ``workers > 1`` needs the usual ``if __name__ == "__main__":``
guard: the spawn start method imports the script's main module in every worker.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from drpo.backends.kinds import endpoint_settings, parse_model_spec
from drpo.backends.settings import EndpointSettings, KindSettings
from drpo.jobs.config import ConfigError
from drpo.jobs.optimize import LevelProgress, RunPlan, create_search_run, run_searches
from drpo.runs.logs import configure_logging, logging_settings
from drpo.runs.store import RunStore

if TYPE_CHECKING:
    from drpo.agents.search import SearchResult
    from drpo.backends.registry import BackendRegistry
    from drpo.jobs.config import RunSettings
    from drpo.jobs.lifecycle import RunOutcome

log = structlog.get_logger("drpo.jobs.workers")

#: How often a worker checks that its parent is alive, and the parent drains progress (s).
POLL_S = 0.2
#: How long a cancelled sweep waits for its workers to record their runs interrupted (s).
STOP_GRACE_S = 30.0


@dataclass
class WorkerReport:
    """What one worker sends back: its searches' outcomes and what it cost."""

    pid: int
    outcomes: list[RunOutcome[SearchResult]]
    #: CPU seconds the worker process used, from its start (imports included) to its return.
    cpu_s: float
    #: The event loop's lag while the searches ran (a 10 ms ticker's overshoot), when asked.
    lags_s: list[float] = field(default_factory=list)


def worker_count(plans: Sequence[RunPlan], workers: int) -> int:
    """Workers actually started: no more than there are searches."""
    if workers < 1:
        raise ConfigError(f"workers must be at least 1 (got {workers})")
    return max(1, min(workers, len(plans)))


def check_workers_fit(plans: Sequence[RunPlan]) -> None:
    """Refuse local models for a sweep in worker processes: every worker would load its own
    copy of the model (:func:`run_sweep` asks only when more than one worker would start)."""
    for plan in plans:
        models = plan.config.models
        for spec in (models.base, models.critic, models.editor):
            if parse_model_spec(spec).kind == "local":
                raise ConfigError(
                    f"workers > 1 runs API models only: {spec} would be loaded once per worker "
                    "(use --workers 1 for local models)"
                )


def limit_share(settings: KindSettings, fraction: float) -> KindSettings:
    """``fraction`` of an API endpoint's limits (requests, tokens, calls in flight)."""
    if not isinstance(settings, EndpointSettings) or fraction >= 1.0:
        return settings
    return settings.model_copy(
        update={
            "rpm": settings.rpm * fraction if settings.rpm is not None else None,
            "tpm": settings.tpm * fraction if settings.tpm is not None else None,
            "max_in_flight": max(1, math.floor(settings.max_in_flight * fraction)),
        }
    )


def endpoint_shares(
    plans: Sequence[RunPlan], endpoints: Mapping[str, KindSettings], fraction: float
) -> dict[str, KindSettings]:
    """Every endpoint the plans' models use, with ``fraction`` of its limits (first settings
    win, as in :class:`~drpo.backends.registry.BackendRegistry`; none: the kind's defaults)."""
    shares: dict[str, KindSettings] = {}
    for plan in plans:
        models = plan.config.models
        for spec in (models.base, models.critic, models.editor):
            key = str(parse_model_spec(spec))
            if key not in shares:
                shares[key] = limit_share(endpoint_settings(key, endpoints.get(key)), fraction)
    return shares


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Round robin: search i goes to worker i mod parts (neighbouring seeds apart)."""
    return [list(items[start::parts]) for start in range(parts)]


async def run_sweep(
    plans: Sequence[RunPlan],
    *,
    store: RunStore,
    workers: int | None = None,
    registry: BackendRegistry | None = None,
    on_level: Callable[[LevelProgress], None] | None = None,
    on_created: Callable[[str, RunSettings], None] | None = None,
    force: bool = False,
) -> list[RunOutcome[SearchResult]]:
    """Run ``plans`` as :func:`~drpo.jobs.optimize.run_searches` does, in ``workers`` processes
    (None: the first plan's ``workers`` setting, 1 by default). With one worker, or one plan,
    this is ``run_searches`` in this process (``registry`` is only usable then)."""
    if workers is None:
        workers = plans[0].config.workers if plans else 1
    if worker_count(plans, workers) == 1:
        return await run_searches(
            plans,
            store=store,
            registry=registry,
            on_level=on_level,
            on_created=on_created,
            force=force,
        )
    if registry is not None:
        raise ValueError("a registry lives in one process: workers > 1 build their own")
    endpoints: dict[str, KindSettings] = {}
    for plan in plans:
        for spec, settings in plan.config.endpoints.items():
            endpoints.setdefault(spec, settings)  # first settings win, as in one process
    return await run_in_workers(
        plans,
        store=store,
        workers=workers,
        endpoints=endpoints,
        on_level=on_level,
        on_created=on_created,
        force=force,
    )


async def run_in_workers(
    plans: Sequence[RunPlan],
    *,
    store: RunStore,
    workers: int,
    endpoints: Mapping[str, KindSettings],
    on_level: Callable[[LevelProgress], None] | None = None,
    on_created: Callable[[str, RunSettings], None] | None = None,
    force: bool = False,
    measure_lag: bool = False,
    reports: list[WorkerReport] | None = None,
) -> list[RunOutcome[SearchResult]]:
    """Run ``plans`` in ``workers`` processes; one outcome per plan, in order (see the module).

    ``endpoints``: every plan's ``[endpoints]`` settings merged (first wins); ``reports``, when
    given, receives each worker's :class:`WorkerReport` (the benchmark's CPU and lag figures).
    """
    check_workers_fit(plans)
    count = worker_count(plans, workers)
    # Created here, in order, as workers=1 creates them: same records, ids known up front.
    placed: list[RunPlan] = []
    for plan in plans:
        if plan.run_id is None:
            run_id = await create_search_run(store, plan.config, artifact_path=plan.artifact_path)
            placed.append(RunPlan(config=plan.config, artifact_path=None, run_id=run_id))
        else:
            placed.append(plan)
        if on_created is not None:
            on_created(placed[-1].run_id or "", plan.config)
    indexed = list(enumerate(placed))
    groups = [group for group in split(indexed, count) if group]
    context = multiprocessing.get_context("spawn")
    progress: Any = context.Queue()
    outcomes: list[RunOutcome[SearchResult] | None] = [None] * len(plans)
    pids: set[int] = set()
    executor = ProcessPoolExecutor(
        max_workers=len(groups),
        mp_context=context,
        initializer=_init_worker,
        initargs=(progress, logging_settings()),
    )
    try:
        futures: list[Future[WorkerReport]] = []
        for group in groups:
            shares = endpoint_shares(placed, endpoints, len(group) / len(placed))
            futures.append(
                executor.submit(
                    _worker_main,
                    str(store.path),
                    [plan for _, plan in group],
                    shares,
                    force,
                    on_level is not None,
                    measure_lag,
                )
            )

        def drain() -> None:
            while True:
                try:
                    kind, value = progress.get_nowait()
                except queue.Empty:
                    return
                if kind == "pid":
                    pids.add(value)
                elif kind == "level" and on_level is not None:
                    on_level(value)

        stopped: set[int] = set()

        async def wait_all(stopping: bool = False) -> None:
            """Until every worker returned, passing on progress as it comes (polled: a queue
            of another process has no awaitable side); ``stopping``: asking each worker to
            stop as soon as it says it can be asked (its pid comes once it handles SIGTERM)."""
            while True:
                drain()
                if stopping:
                    _stop(pids - stopped)
                    stopped.update(pids)
                if all(future.done() for future in futures):
                    return
                await anyio.sleep(POLL_S)

        try:
            await wait_all()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GRACE_S):
                await wait_all(stopping=True)
            executor.shutdown(wait=False, cancel_futures=True)  # a stuck worker: orphaned
            raise
        drain()  # the last levels' progress may come after the result
        for group, future in zip(groups, futures, strict=True):
            report = future.result()  # a worker's exception is raised here, as workers=1 would
            if reports is not None:
                reports.append(report)
            by_run = {outcome.run_id: outcome for outcome in report.outcomes}
            for index, plan in group:
                outcomes[index] = by_run.get(plan.run_id or "")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return [outcome for outcome in outcomes if outcome is not None]


def _stop(pids: set[int]) -> None:
    """Ask every worker to stop as Ctrl-C does: it records its runs interrupted and returns."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------ in the worker

_progress: Any = None


def _init_worker(progress: Any, logs: dict[str, Any] | None) -> None:
    """The pool's initializer: the progress queue reaches the worker at its start (a queue can
    only be handed to a process that way), its logging is set up as the parent's was, and the
    worker waits for its task, not for Ctrl-C."""
    global _progress
    _progress = progress
    if logs is not None:
        configure_logging(**logs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until its task runs: see _until_stopped


def _worker_main(
    db: str,
    plans: list[RunPlan],
    shares: dict[str, KindSettings],
    force: bool,
    report_levels: bool,
    measure_lag: bool,
) -> WorkerReport:
    """One worker's task: its searches, on drpo's event loop, with its share of the limits."""
    from drpo.bus import loop

    parent = os.getppid()
    outcomes, lags = loop.run(_run_worker, db, plans, shares, force, report_levels, measure_lag)
    if os.getppid() != parent:
        # Orphaned: nobody reads the result, and the pool's call queue never closes (every
        # worker holds its write end), so the worker would wait for a next task forever.
        logging.shutdown()
        os._exit(1)
    return WorkerReport(os.getpid(), outcomes, time.process_time(), lags)


async def _run_worker(
    db: str,
    plans: list[RunPlan],
    shares: dict[str, KindSettings],
    force: bool,
    report_levels: bool,
    measure_lag: bool,
) -> tuple[list[RunOutcome[SearchResult]], list[float]]:
    from drpo.backends.registry import BackendRegistry

    def on_level(at: LevelProgress) -> None:
        _progress.put(("level", at))

    outcomes: list[RunOutcome[SearchResult]] = []
    lags: list[float] = []
    parent = os.getppid()
    async with RunStore.open(Path(db)) as store, anyio.create_task_group() as tg:
        work = anyio.CancelScope()
        await tg.start(_until_stopped, work, parent)
        if measure_lag:
            tg.start_soon(_ticker, lags)
        with work:
            outcomes = await run_searches(
                plans,
                store=store,
                registry=BackendRegistry(shares),
                on_level=on_level if report_levels else None,
                force=force,
            )
        if work.cancelled_caught:
            outcomes = [await _recorded_outcome(store, plan.run_id or "") for plan in plans]
        tg.cancel_scope.cancel()
    return outcomes, lags


async def _until_stopped(
    work: anyio.CancelScope, parent: int, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
) -> None:
    """Cancel the worker's searches on SIGTERM or SIGINT (the parent's stop, or Ctrl-C reaching
    the whole process group), or when the parent is gone (``kill -9``): the runs are then
    recorded interrupted, as in one process."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        _progress.put(("pid", os.getpid()))  # the parent may ask it to stop from now on
        task_status.started()

        async def orphaned() -> None:
            while True:  # polled: a parent's death sends its children nothing portable
                await anyio.sleep(POLL_S)
                if os.getppid() != parent:
                    break
            log.warning("parent process gone: stopping", parent=parent)
            work.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(orphaned)
            async for _ in signals:
                work.cancel()
                tg.cancel_scope.cancel()


async def _recorded_outcome(store: RunStore, run_id: str) -> RunOutcome[SearchResult]:
    """An interrupted run's outcome, as its record says."""
    from drpo.jobs.lifecycle import RunOutcome

    record = await store.get_run(run_id)
    summary = record.result if isinstance(record.result, dict) else None
    return RunOutcome(run_id, record.status, error=record.error, summary=summary)


async def _ticker(lags: list[float]) -> None:
    period = 0.01
    while True:
        started = time.perf_counter()
        await anyio.sleep(period)
        lags.append(max(0.0, time.perf_counter() - started - period))
