"""How many background calls one backend is given at once (issue 16: backpressure).

Why: at the start of a run the search asks for the aspects of every query it may reach (a
selection by logprobs is one call per aspect: 98 calls for the default job's 7 queries), most of
them as background work (:func:`drpo.backends.priority.background`). A local model serves scoring
calls in passes of ``max_batch_size`` rows, so asking all of them at t=0 only queues them: on a
2-core CPU the last of them waited 9.4 s, its queue time the run's critic-wait p95 (9.1 s), though
no verdict needed them yet. A :class:`BackgroundWindow` hands out ``capacity`` slots (what the
backend serves at once, see :func:`background_capacity`): a background call waits here, not made
yet, until a slot is free, so the backend's queue holds at most one pass of background work and
a foreground call (a verdict) never has more than that ahead of it.

A background call waits for its slot only while no foreground caller needs it: when a verdict
comes to wait for a selection that is still being made in the background, the selection's
:class:`Urgency` is raised, and its calls still held here are made at once, at foreground
priority, without a slot (those already made, at most ``capacity``, are one pass away). So the
window never makes a verdict wait behind background work still queued (no priority inversion),
and a selection is still made once, by whoever asked first (the runtime's cache of selections,
unchanged).

API backends declare no capacity (rate-limited and massively concurrent, they are better served
with everything in flight at once): no window, today's all-at-once behaviour.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio

from drpo.backends.base import Backend
from drpo.backends.settings import KindSettings


def background_capacity(backend: Backend, settings: KindSettings | None) -> int | None:
    """How many background calls ``backend`` is given at once: its settings'
    ``background_window`` when set, else what the backend declares it serves at once (its
    ``capacity``: a local model's ``max_batch_size``), else None (no window: API backends)."""
    configured = getattr(settings, "background_window", None)
    if configured is not None:
        return int(configured)
    declared = getattr(backend, "capacity", None)
    return None if declared is None else int(declared)


class Urgency:
    """Raised once a foreground caller waits for the background work it belongs to (a
    selection): that work's calls still held by a window are then made at once."""

    def __init__(self) -> None:
        self.raised = False
        self._wakes: set[anyio.Event] = set()

    def escalate(self) -> None:
        self.raised = True
        for wake in self._wakes:
            wake.set()
        self._wakes.clear()

    def _watch(self, wake: anyio.Event) -> None:
        self._wakes.add(wake)

    def _unwatch(self, wake: anyio.Event) -> None:
        self._wakes.discard(wake)


@dataclass(eq=False)
class _Waiter:
    wake: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False


class BackgroundWindow:
    """At most ``capacity`` background calls in flight on one backend, handed out in arrival
    order; a call whose :class:`Urgency` is raised goes without a slot (see the module)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a background window needs at least one slot, not {capacity}")
        self.capacity = capacity
        self.in_flight = 0
        #: The most background calls in flight at once, how many calls waited for a slot, and
        #: how many of those were made without one because a foreground caller needed them.
        self.peak = 0
        self.held = 0
        self.promoted = 0
        self._queue: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def enter(self, urgency: Urgency) -> bool:
        """Wait for a slot; True: the call holds one (call :meth:`leave` when it ends) and is
        made as background work; False: it is needed in the foreground, made at once, no slot."""
        if urgency.raised:
            return False
        if self.in_flight < self.capacity and not self._queue:
            self._take()
            return True
        waiter = _Waiter()
        self._queue.append(waiter)
        self.held += 1
        urgency._watch(waiter.wake)
        try:
            await waiter.wake.wait()
        except BaseException:
            if waiter.granted:
                self.leave()  # cancelled as its slot came: the slot goes to the next one
            else:
                self._queue.remove(waiter)
            raise
        finally:
            urgency._unwatch(waiter.wake)
        if not waiter.granted:
            self._queue.remove(waiter)
        elif urgency.raised:
            self.leave()  # granted and needed at once in the same turn: foreground wins
        else:
            return True
        self.promoted += 1
        return False

    def leave(self) -> None:
        """A call that held a slot ended: the slot goes to the longest-waiting call."""
        self.in_flight -= 1
        while self._queue and self.in_flight < self.capacity:
            waiter = self._queue.popleft()
            waiter.granted = True
            self._take()
            waiter.wake.set()

    def _take(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
