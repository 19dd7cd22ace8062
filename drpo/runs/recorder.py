"""The recorder: persists every envelope published on the bus, in order, nothing lost.

It reads the bus's tap (which sees every envelope in publish order) and hands the store whatever
has piled up as one batch, so the store's single writer commits thousands of messages per
transaction. Why it is shaped like this:

* **The tap is taken in the constructor**, not when :meth:`Recorder.run` starts, so a message
  published between building the recorder and its task's first step is not missed.
* **Handing a batch to the store is shielded from cancellation**: a batch is either queued in
  full or not taken from the tap, never half-lost. On cancellation the recorder also takes what
  is already waiting on the tap, queues it and flushes (shielded), so everything published
  before the run was cancelled is on disk when ``run`` returns.
* **Backpressure end to end**: when the disk is slow, the store's queue fills, the recorder
  waits, the tap fills, and publishers wait. Memory stays bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskStatus

from drpo.bus.bus import Bus
from drpo.bus.envelope import Envelope
from drpo.runs.store import RunStore, message_row


class RecorderStoppedError(RuntimeError):
    """:meth:`Recorder.drain` was called on a recorder that no longer runs."""


class Recorder:
    """Persists every envelope on ``bus`` into ``store``'s ``messages`` table.

    Run :meth:`run` in a task group (or use :func:`recording`); cancel it to stop. Call
    :meth:`drain` to wait until everything published so far is committed.
    """

    def __init__(
        self, bus: Bus, store: RunStore, *, batch_size: int = 2000, tap_buffer: int = 4096
    ) -> None:
        self._bus = bus
        self._store = store
        self.batch_size = batch_size
        self._tap = bus.tap(buffer_size=tap_buffer)
        # Publishes counted before the tap existed never reach it.
        self._baseline = bus.published_count
        #: Envelopes handed to the store so far (committed once a flush returns).
        self.recorded = 0
        self.batches = 0
        self._progress = anyio.Event()
        self._stopped = False

    # ---------------------------------------------------------------- running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Record until cancelled or until the bus closes the tap; flushes before returning."""
        task_status.started()
        try:
            async for first in self._tap:
                batch = [first]
                self._take_ready(batch, self.batch_size)
                await self._persist(batch)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    rest: list[Envelope] = []
                    self._take_ready(rest, None)
                    await self._persist(rest)
                    await self._store.flush()
                finally:
                    self._tap.close()
                    self._stopped = True
                    self._progress.set()

    def _take_ready(self, batch: list[Envelope], limit: int | None) -> None:
        """Append to ``batch`` what the tap holds right now (up to ``limit`` in all)."""
        receive_nowait = self._tap.receive_nowait
        while limit is None or len(batch) < limit:
            try:
                batch.append(receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return

    async def _persist(self, batch: list[Envelope]) -> None:
        """Queue a batch with the store; shielded so a cancellation cannot drop half of it."""
        if not batch:
            return
        rows = [message_row(envelope) for envelope in batch]
        with anyio.CancelScope(shield=True):
            await self._store.append_message_rows(rows)
        self.recorded += len(batch)
        self.batches += 1
        progress, self._progress = self._progress, anyio.Event()
        progress.set()

    # ---------------------------------------------------------------- waiting

    @property
    def pending(self) -> int:
        """Envelopes published since the recorder started that it has not handed over yet."""
        return self._bus.published_count - self._baseline - self.recorded

    async def drain(self) -> None:
        """Return once every envelope published so far is committed to the store.

        "Published" counts from the bus's ``published_count``: a publish cancelled while it
        waited for room on the tap is counted but never arrives, and makes this wait forever;
        bound it with ``anyio.fail_after`` where that can happen.
        """
        target = self._bus.published_count - self._baseline
        while self.recorded < target:
            if self._stopped:
                raise RecorderStoppedError(
                    f"the recorder stopped with {target - self.recorded} message(s) unrecorded"
                )
            await self._progress.wait()
        await self._store.flush()


@asynccontextmanager
async def recording(bus: Bus, store: RunStore, **options: Any) -> AsyncIterator[Recorder]:
    """Record ``bus`` into ``store`` for the duration of the block.

    Leaving the block stops the recorder after it has committed everything it received.
    """
    recorder = Recorder(bus, store, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        try:
            yield recorder
        finally:
            tg.cancel_scope.cancel()
