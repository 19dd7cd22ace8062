"""An agent session: one bus, the agents serving on it, and the recorder persisting it.

Every job (prompt searches, ICL optimization, evaluation) runs inside a session, so that all of
them share the backends (one per model: shared rate limits and batches) and every message is
recorded. The session's tasks live in one task group; leaving the block drains the recorder and
cancels the agents, so no task outlives it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from drpo.agents.runtime import AgentRuntime
from drpo.backends.registry import BackendRegistry
from drpo.bus import Bus
from drpo.runs.recorder import Recorder
from drpo.runs.store import RunStore


@dataclass
class Session:
    bus: Bus
    runtime: AgentRuntime
    registry: BackendRegistry
    store: RunStore


@asynccontextmanager
async def agent_session(
    store: RunStore, registry: BackendRegistry | None = None
) -> AsyncIterator[Session]:
    registry = registry or BackendRegistry()
    bus = Bus()
    runtime = AgentRuntime(bus, registry, store)
    recorder = Recorder(bus, store)
    try:
        async with anyio.create_task_group() as services:
            await services.start(recorder.run)  # the tap exists before anyone publishes
            await runtime.start(services)
            yield Session(bus=bus, runtime=runtime, registry=registry, store=store)
            await recorder.drain()
            services.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await registry.aclose()
