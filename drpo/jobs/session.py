"""An agent session: one bus, the agents serving on it, and the recorder persisting it.

Every job (prompt searches, ICL optimization, evaluation) runs inside a session, so that all of
them share the backends (one per model: shared rate limits and batches) and every message is
recorded. The session's tasks live in one task group; leaving the block drains the recorder and
cancels the agents, so no task outlives it.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from drpo.agents.runtime import AgentRuntime
from drpo.backends.registry import BackendRegistry
from drpo.bus import Bus
from drpo.runs.recorder import Recorder
from drpo.runs.store import RunStore

if TYPE_CHECKING:
    from drpo.tracing.live import LiveTracer
    from drpo.tracing.settings import TraceSettings


@dataclass
class Session:
    bus: Bus
    runtime: AgentRuntime
    registry: BackendRegistry
    store: RunStore
    #: Sends the session's runs as traces while they run (``--trace``); None: off.
    tracer: LiveTracer | None = None


@contextmanager
def quiet_collector() -> Iterator[None]:
    """Fewer, cheaper garbage collections while a session runs.

    A busy session makes many short-lived objects (messages, requests, replies) and keeps a
    large, long-lived heap (models, caches, the journal's index); with the default thresholds
    CPython's collector ran 22 full collections in the 50-search benchmark, pausing the event
    loop 6.4 s in all (up to 290 ms at once). Freezing what exists at the start and collecting
    the young generation less often cut that to 0.33 s (``benchmarks/search.py --gc tuned``).
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@asynccontextmanager
async def agent_session(
    store: RunStore, registry: BackendRegistry | None = None, trace: TraceSettings | None = None
) -> AsyncIterator[Session]:
    """A session on ``store``; with ``trace`` enabled its runs are sent as traces live."""
    registry = registry or BackendRegistry()
    bus = Bus()
    runtime = AgentRuntime(bus, registry, store)
    recorder = Recorder(bus, store)
    tracer = None
    if trace is not None and trace.enabled:
        from drpo.tracing.live import LiveTracer

        tracer = LiveTracer(store.path, trace)  # a bad URL or a missing extra fails here
    try:
        with quiet_collector():
            async with anyio.create_task_group() as services:
                await services.start(recorder.run)  # the tap exists before anyone publishes
                await runtime.start(services)
                yield Session(
                    bus=bus, runtime=runtime, registry=registry, store=store, tracer=tracer
                )
                await recorder.drain()
                services.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if tracer is not None:
                await tracer.aclose()  # after the drain: every message is committed
            await registry.aclose()
