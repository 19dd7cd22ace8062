"""One thread per loaded model that runs all of its torch work (issue 16: engine throughput).

Why one thread, and not whichever caller finds the model free (the design before): torch on a
CPU parallelises its operators with OpenMP, and GNU OpenMP (libgomp, which torch's CPU wheels
use) gives every thread that starts a parallel region its own team of worker threads, kept for
that thread's life. While more such threads live than there are cores, libgomp stops letting
idle team workers spin ("throttled" spin count): every parallel region of the running team then
pays a futex wake-up of its workers. A decode step of a 135M model is ~200 small operators, so
that wake-up is most of its cost. Measured on a 2-core Xeon, float32 (issue 16): a 576x1536
linear on 8 rows took 92 us on the only thread that ever ran torch and 222 us on a thread
started after the main thread had run torch; 8 greedy requests of 128 tokens made 121 tokens/s
stepped on the first and 82-85 on the second (through the backend, whose worker threads each
stepped the engine in turn: 84). ``OMP_WAIT_POLICY=PASSIVE`` makes both slow; spinning teams on
a machine with more teams than cores would steal the cores from the running one.

So each loaded model has one :class:`ModelThread` (vLLM's ``EngineCore`` is the same idea): it
loads the model (:func:`drpo.backends.local_model.load_model`), then steps the model's
continuous engine (:mod:`drpo.backends.engine`: generation steps, joins, scoring passes) and runs
whatever else must touch the model (:meth:`ModelThread.call`: a static ``generate`` batch of
``DRPO_LOCAL_ENGINE=lane``, a benchmark's reference ``generate``). Callers never run torch: they
hand a request in (the engine's or scoring lane's queue), wake the thread, and wait on their
job's event on a worker thread that holds no OpenMP team; a cancelled caller returns at once and
its flag makes the engine drop its rows at the next step.

The thread is a daemon: it sleeps on a condition while there is no work and needs no shutdown
(loaded models live for the process, like the thread). Its work function catches its own errors
(the engine fails the jobs it held): an exception that escapes it is handed to every waiting
:meth:`call` and the thread goes on.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
_log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    """A function to run on the model thread, and its outcome."""

    run: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ModelThread:
    """The one thread that runs a loaded model's torch work; started on creation.

    ``work`` (set by the model's engine) is run again and again while it returns True (there is
    more to do) and after every :meth:`wake`; :meth:`call` runs a function between two runs of
    ``work`` and returns its result to the calling thread.
    """

    def __init__(self, name: str) -> None:
        self._changed = threading.Condition()
        self._calls: collections.deque[_Call] = collections.deque()
        self._woken = False
        self._stopped = False
        self.work: Callable[[], bool] | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The thread's identifier (what ``threading.get_ident()`` returns on it)."""
        return self._thread.ident

    def on_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def wake(self) -> None:
        """Run ``work`` soon (new work was handed in)."""
        with self._changed:
            self._woken = True
            self._changed.notify()

    def stop(self) -> None:
        """End the thread once it has run the calls handed in (a model that failed to load)."""
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def call(self, run: Callable[..., T], *args: Any) -> T:
        """Run ``run(*args)`` on the model thread and return its result (or raise its error).

        Called on the model thread itself (from inside ``work`` or another call), it runs at once.
        """
        if self.on_thread():
            return run(*args)
        call = _Call(lambda: run(*args))
        with self._changed:
            if self._stopped:
                raise RuntimeError(f"{self._thread.name} was stopped")
            self._calls.append(call)
            self._changed.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    def _serve(self) -> None:
        busy = False
        while True:
            with self._changed:
                while not (busy or self._woken or self._calls or self._stopped):
                    self._changed.wait()
                if self._stopped and not self._calls:
                    return
                self._woken = False
                calls = list(self._calls)
                self._calls.clear()
            for call in calls:
                try:
                    call.result = call.run()
                except BaseException as exc:  # handed to the caller, who re-raises it
                    call.error = exc
                call.done.set()
            work = self.work
            busy = False
            if work is not None:
                try:
                    busy = work()
                except Exception:  # work catches its own errors; never let the thread die
                    _log.exception("%s: unexpected error", self._thread.name)
                    busy = False
