"""Dynamic batching: merge concurrent calls into one batch run on a worker thread.

Why a *leader* instead of a background worker task: a background task would outlive the run that
started it (the bus keeps every task inside a task group, and tests run each test on a fresh event
loop). Here the batch is run by one of the waiting callers, the leader, inside its own task: no
task is ever left behind, and the batcher holds no event-loop state between calls, so one batcher
can serve one event loop after another.

The protocol, on one event loop:

* every call appends a ticket to the queue, with the priority of its context
  (:mod:`drpo.backends.priority`: foreground unless inside ``background()``);
* if no leader is active the call becomes the leader: it waits up to ``batch_window_s`` for more
  calls (or until the queue holds a full batch), fills a batch of at most ``max_batch_size``
  first-fit, foreground tickets first and then background ones, each in arrival order, and runs
  the batch function on a worker thread; then it hands leadership to the ticket that heads the
  queue in that order;
* every other call sleeps until its ticket is done or it is handed leadership.

Cancellation (issue 10: Ctrl-C must not wait for a batch of hundreds of tokens):

* a call cancelled while queued removes its ticket, so its work never runs;
* a call cancelled while its ticket runs sets the ticket's ``cancelled`` flag (a
  ``threading.Event`` the batch function receives, one per item) and returns at once; the batch
  function checks the flags between tokens and drops the item's rows, and when every item of a
  batch is cancelled the batch ends at the next token;
* a cancelled leader still delivers the other callers' results: it flags its own item, waits
  (shielded) for the batch, hands out the results, then re-raises. If the others were cancelled
  too, that wait is one token long.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from drpo.backends.priority import Priority, current_priority

T = TypeVar("T")
R = TypeVar("R")

#: Runs one batch on a worker thread: one result (or the exception for that item) per item. The
#: second argument holds one flag per item, set when that item's caller is gone (cancelled): the
#: function should stop working on such an item as soon as it can (its result is dropped).
BatchFunction = Callable[[Sequence[T], Sequence[threading.Event]], Sequence["R | BaseException"]]


@dataclass
class BatcherStats:
    """Counters for tests and benchmarks: how the calls were merged."""

    batches: int = 0
    items: int = 0
    weight: int = 0
    largest_batch: int = 0
    cancelled_while_queued: int = 0
    #: Items whose caller was cancelled while their batch ran (their rows were flagged to stop).
    cancelled_while_running: int = 0
    #: Items submitted with background priority.
    background_items: int = 0
    batch_sizes: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Ticket(Generic[T, R]):
    item: T
    weight: int
    priority: Priority
    arrival: int
    wake: anyio.Event = field(default_factory=anyio.Event)
    #: Set (from the event loop) when the caller is gone; read by the batch function's thread.
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    taken: bool = False
    result: R | None = None
    error: BaseException | None = None

    @property
    def order(self) -> tuple[int, int]:
        """Serving order: foreground first, then arrival."""
        return (self.priority, self.arrival)


class DynamicBatcher(Generic[T, R]):
    """Merges concurrent ``submit`` calls into batches of at most ``max_batch_size`` weight.

    ``weight(item)`` is how many batch slots an item takes (the ``n`` sequences of a request). An
    item heavier than ``max_batch_size`` runs alone; the batch function must cope (e.g. in chunks).
    Batches are filled first-fit in serving order (foreground before background, then arrival), so
    the first ticket in that order is always in the next batch, and background tickets take the
    slots that foreground ones leave free.
    """

    def __init__(
        self,
        run_batch: BatchFunction[T, R],
        *,
        max_batch_size: int = 8,
        batch_window_s: float = 0.01,
        weight: Callable[[T], int] = lambda _item: 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if batch_window_s < 0:
            raise ValueError("batch_window_s must not be negative")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self._weight = weight
        self._queue: list[_Ticket[T, R]] = []  # arrival order
        self._arrivals = itertools.count()
        self._leader_active = False
        self._full: anyio.Event | None = None
        self.stats = BatcherStats()

    @property
    def queued(self) -> int:
        """How many calls wait for a batch (not counting the ones running)."""
        return len(self._queue)

    async def submit(self, item: T, *, priority: Priority | None = None) -> R:
        """Run ``item`` in the next batch that has room and return its result (or raise its error).

        ``priority`` defaults to the caller's context (:func:`~drpo.backends.priority.background`).
        """
        chosen = current_priority() if priority is None else priority
        ticket: _Ticket[T, R] = _Ticket(
            item=item,
            weight=max(1, self._weight(item)),
            priority=chosen,
            arrival=next(self._arrivals),
        )
        if chosen is Priority.BACKGROUND:
            self.stats.background_items += 1
        self._queue.append(ticket)
        self._signal_if_full()
        try:
            while not ticket.done:
                if not self._leader_active:
                    self._leader_active = True
                    try:
                        await self._lead_one_batch(ticket)
                    finally:
                        self._leader_active = False
                        self._hand_over_leadership()
                else:
                    ticket.wake = anyio.Event()
                    await ticket.wake.wait()
            # A leader cancelled while its (shielded) batch ran learns it here, not later.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if not ticket.taken:
                self._queue.remove(ticket)
                self.stats.cancelled_while_queued += 1
                # We may have been woken to lead; pass that on so the queue never stalls.
                self._hand_over_leadership()
            elif not ticket.done:
                self._flag_cancelled(ticket)
            raise
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]

    def _flag_cancelled(self, ticket: _Ticket[T, R]) -> None:
        """Tell the running batch that nobody waits for ``ticket`` any more."""
        if not ticket.cancelled.is_set():
            ticket.cancelled.set()
            self.stats.cancelled_while_running += 1

    def _queued_weight(self) -> int:
        return sum(t.weight for t in self._queue)

    def _signal_if_full(self) -> None:
        if self._full is not None and self._queued_weight() >= self.max_batch_size:
            self._full.set()

    def _hand_over_leadership(self) -> None:
        """Wake the queue's head (in serving order) to lead next (if no leader is active)."""
        if not self._leader_active and self._queue:
            min(self._queue, key=lambda t: t.order).wake.set()

    async def _lead_one_batch(self, me: _Ticket[T, R]) -> None:
        # A cancelled caller must not start a batch.
        await anyio.lowlevel.checkpoint_if_cancelled()
        await self._wait_for_companions()
        batch = self._take_batch()
        if not batch:
            return
        self._record(batch)
        finished = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run_and_deliver, batch, finished)
            try:
                await finished.wait()
            except BaseException:
                # Cancelled while the batch runs: our own rows stop at the next token, and the
                # task group waits for the (shielded) delivery of everyone else's results.
                if me in batch and not me.done:
                    self._flag_cancelled(me)
                raise

    async def _run_and_deliver(self, batch: list[_Ticket[T, R]], finished: anyio.Event) -> None:
        # Shielded: the other callers in this batch depend on us delivering their results.
        with anyio.CancelScope(shield=True):
            try:
                results = await anyio.to_thread.run_sync(
                    self._run_batch, [t.item for t in batch], [t.cancelled for t in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(batch)} items"
                    )
            except Exception as exc:  # the whole batch failed: every caller sees why
                results = [exc] * len(batch)
            for ticket, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    ticket.error = result
                else:
                    ticket.result = result
                ticket.done = True
                ticket.wake.set()
            finished.set()

    async def _wait_for_companions(self) -> None:
        """Give concurrent callers ``batch_window_s`` to join, unless a full batch is queued."""
        if self.batch_window_s <= 0 or self._queued_weight() >= self.max_batch_size:
            return
        self._full = anyio.Event()
        try:
            with anyio.move_on_after(self.batch_window_s):
                await self._full.wait()
        finally:
            self._full = None

    def _take_batch(self) -> list[_Ticket[T, R]]:
        """First-fit in serving order; the first ticket in that order is always taken."""
        batch: list[_Ticket[T, R]] = []
        room = self.max_batch_size
        for ticket in sorted(self._queue, key=lambda t: t.order):
            if not batch or ticket.weight <= room:
                batch.append(ticket)
                room -= ticket.weight
                if room <= 0:
                    break
        for ticket in batch:
            ticket.taken = True
            self._queue.remove(ticket)
        return batch

    def _record(self, batch: list[_Ticket[T, R]]) -> None:
        weight = sum(t.weight for t in batch)
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.weight += weight
        self.stats.largest_batch = max(self.stats.largest_batch, weight)
        self.stats.batch_sizes.append(weight)
