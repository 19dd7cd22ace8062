"""Continuous batching for the local model (issue 16, item 2): no row waits for the longest one.

A static ``generate`` batch runs until its longest row, so a 4-token answer that shares a batch
with a 180-token rewrite waits for all 180 steps, and a request that arrives one step after a
batch started waits for the whole batch. Here one running batch is stepped token by token:

* a waiting row **joins** at the next step: its prompt is prefilled on its own (with the other
  joiners of that step, left-padded among themselves, reusing the prompt prefixes the model's
  :class:`~drpo.backends.prefix_cache.PrefixCache` holds and storing those the joiners share:
  a level's answers share the system prompt and the examples; in float32 only, see
  :meth:`Engine._prefill_pass`), then its KV cache is merged into the running batch's, both left-padded to a common length (:func:`merge_groups`);
* a full batch makes room for waiting **foreground** rows by taking out its newest
  **background** rows (:meth:`Engine._preempt`): they wait with the tokens they made and join
  again later, prefilling their prompt and those tokens;
* a row **leaves** as soon as it stops (EOS, a stop string, its own ``max_tokens``, its caller
  cancelled, or it ran out of memory): the batch keeps the others (``batch_select_indices``), and
  columns that only padding still uses are cut off the left (:func:`trim_left`);
* waiting **scoring** jobs (one token with logprobs) are served between steps from the model's
  :class:`~drpo.backends.local_model.ScoringLane`, at most ``max_batch_size`` of them per step, so
  a verdict waits about one step but a stream of verdicts cannot starve the generations.

Positions stay right for left-padded rows: every row counts its own real tokens, and its next
token's ``position_ids`` entry is that count; the attention mask holds 0 over each row's padding.
So in float32 a row's tokens are the ones it gets alone (tests/test_engine.py checks this).

What transformers provides and what it lacks (checked in the installed 5.25 source,
``transformers/generation/continuous_batching``): ``ContinuousBatchingManager`` samples with one
``torch.multinomial`` over the batch on the global RNG, seeded once per manager
(``set_tp_seed``: ``torch.manual_seed``), and ``do_sample`` is one setting per manager, so a
seeded request is not reproducible whatever shares the batch and greedy and sampled requests
cannot share it; it returns only the chosen token's logprob (no top-k alternatives, which the
logprobs critic reads); a request stops only at EOS or ``max_new_tokens`` (no stop strings, no
cancellation of one request from another thread within a step); its input queue is first in,
first out (no foreground before background). So we use transformers' public cache classes
(``Cache`` built from a list of layers, ``update`` to fill it, a layer's ``keys`` / ``values``,
``batch_select_indices`` to drop rows; our layers are ``DynamicLayer`` s that keep spare
columns, :class:`SpareLayer`, so a decode step does not copy the whole cache) and the model's
own forward pass, and write the
scheduling, sampling and stopping here, reusing the static batcher's per-row pieces from
:mod:`drpo.backends.local_model` (the seeded ``_sample``, ``_finish_row``, the OOM message), so
both paths give the same numbers. A model whose cache is not all plain ``DynamicLayer`` s
(sliding-window or linear-attention layers) is not supported here and keeps the static batcher.

Threads: one engine per loaded model (:func:`engine_for`), stepped only by the model's own
thread (:mod:`drpo.backends.model_thread`: why one thread, measured), which does all its torch
work: joins, decode steps and the scoring lane's passes. Callers hand a request in
(:meth:`Engine.submit`, or the lane's ``add``), wake the thread and wait for their job's event
(:meth:`Engine.run_until_done`). Before, whichever caller found the model free stepped it until
its own request was done: every such thread got its own OpenMP team, and a decode step on a
thread other than the first that ran torch cost 1.4x as much (84 tokens/s through the backend
against 121 stepped on one thread). The thread holds the model's lock for each step, so an
engine can still be stepped by hand (tests do, under that lock), and the engine holds no
event-loop state: one engine serves one event loop after another.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache, DynamicCache, DynamicLayer

from drpo.backends.base import CompletionRequest, PermanentBackendError
from drpo.backends.local_model import (
    _DECODE_KWARGS,
    GenerationCancelled,
    GenerationResult,
    LoadedModel,
    _finish_row,
    _LogprobRecords,
    _room_for,
    _Row,
    _row_seed,
    _RowOutput,
    _rows_of,
    _sample,
    encode_prompt,
    generate_rows,
    model_thread,
)
from drpo.backends.local_refs import sequences_for
from drpo.backends.prefix_cache import PrefixCache, prefill
from drpo.backends.priority import Priority


@dataclass
class EngineStats:
    """Counters for tests and benchmarks: how rows joined and left the running batch."""

    #: Decode steps run (one token for every running row).
    steps: int = 0
    #: Prefill passes for joining rows.
    prefills: int = 0
    #: Rows that joined the running batch, and those that joined while other rows were running.
    joined: int = 0
    joined_while_running: int = 0
    #: Rows that stopped while other rows went on running.
    left_while_running: int = 0
    #: Rows dropped because their caller was cancelled.
    cancelled_rows: int = 0
    #: Background rows taken out of a full batch to make room for foreground rows (they wait,
    #: with the tokens they made, and join again when a slot is free).
    preempted: int = 0
    #: Scoring jobs served between steps (capped per step), and the largest running batch.
    scoring_between_steps: int = 0
    largest_batch: int = 0


@dataclass(eq=False)
class EngineJob:
    """One generation request submitted to the engine, done when all its rows are."""

    request: CompletionRequest
    order: tuple[int, int]  # (priority, arrival): foreground first, then arrival
    max_batch_size: int
    cancelled: threading.Event
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | BaseException | None = None
    prompt_tokens: int = 0
    outputs: dict[int, _RowOutput] = field(default_factory=dict)
    rows_left: int = 0

    def finish(self, result: GenerationResult | BaseException) -> None:
        """Give the job its result (the first one given counts); ``done`` is set apart."""
        if self.result is None:
            self.result = result

    @property
    def ended(self) -> bool:
        """It has its result (its rows are no longer worked on), maybe not ``done`` yet."""
        return self.result is not None


@dataclass(eq=False)
class _Live:
    """A row being generated: its tokens so far, its generator and its logprob records."""

    job: EngineJob
    row: _Row
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    chosen_lp: list[float] = field(default_factory=list)
    top_lp: list[list[float]] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)

    @property
    def position(self) -> int:
        """The position of the row's last chosen token (the one the next step feeds)."""
        return len(self.row.prompt_ids) + len(self.generated) - 1

    @property
    def context(self) -> list[int]:
        """What a prefill of this row runs: its prompt, and the tokens it made before it was
        pre-empted (then the prefill's last logits choose its next token)."""
        return [*self.row.prompt_ids, *self.generated]


@dataclass(eq=False)
class _Group:
    """Rows that share one KV cache: ``mask`` is [rows, cache length], 0 over left padding."""

    cache: Cache
    mask: torch.Tensor
    lives: list[_Live]


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer with spare columns.

    ``DynamicLayer.update`` grows the cache with ``torch.cat``: every decode step copies every
    layer's whole keys and values, O(length) per token. Here a step writes its column into the
    buffer and the layer's ``keys`` / ``values`` are views of the columns used; the buffer is
    copied only when it is full (``SPARE`` more columns each time) or rows leave. Measured on the
    2-core Xeon, float32, SmolLM2-135M (issue 16): a decode step of 8 rows of 150-token prompts
    65.5 -> 61.9 ms, of 4 rows of 500 tokens 62 -> 54.5 ms, of 8 rows of 500 tokens 86 -> 71 ms.
    Only ``DynamicLayer``'s public interface is relied on (``keys`` / ``values`` are what the
    cache and the mask sizes read), and the engine builds these caches itself (:func:`_cache_of`);
    what attention computes is unchanged: the same keys and values, in a strided view.
    """

    #: Columns added beyond what an update needs when the buffer must grow.
    SPARE = 128

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._used = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        keys, values = self._key_buffer, self._value_buffer
        if keys is None or values is None or self._used + new > keys.shape[-2]:
            room = self._used + new + self.SPARE
            grown_keys = key_states.new_empty((*key_states.shape[:2], room, key_states.shape[-1]))
            grown_values = value_states.new_empty(
                (*value_states.shape[:2], room, value_states.shape[-1])
            )
            if keys is not None and values is not None and self._used:
                grown_keys[..., : self._used, :] = keys[..., : self._used, :]
                grown_values[..., : self._used, :] = values[..., : self._used, :]
            keys, values = self._key_buffer, self._value_buffer = grown_keys, grown_values
        keys[..., self._used : self._used + new, :] = key_states
        values[..., self._used : self._used + new, :] = value_states
        self._used += new
        self.keys = keys[..., : self._used, :]
        self.values = values[..., : self._used, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (with their spare columns)."""
        if self._key_buffer is None or self._value_buffer is None:
            return
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self.keys = self._key_buffer[..., : self._used, :]
        self.values = self._value_buffer[..., : self._used, :]


def engine_supported(loaded: LoadedModel) -> bool:
    """True when every layer of the model's cache is a plain ``DynamicLayer`` (merge-safe)."""
    cache = DynamicCache(config=loaded.model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


#: A cache that holds nothing: a cold prefill of every prompt (non-float32 generations).
_NO_PREFIXES = PrefixCache(budget_bytes=0)

_ENGINES: weakref.WeakKeyDictionary[LoadedModel, Engine] = weakref.WeakKeyDictionary()
_ENGINES_GUARD = threading.Lock()


def engine_for(loaded: LoadedModel) -> Engine:
    """The one engine of a loaded model (created on first use)."""
    with _ENGINES_GUARD:
        engine = _ENGINES.get(loaded)
        if engine is None:
            engine = _ENGINES[loaded] = Engine(loaded)
            model_thread(loaded).work = engine.work
        return engine


class Engine:
    """The running batch of one loaded model, stepped by the model's thread (:meth:`work`).

    An engine made directly (not by :func:`engine_for`) is stepped only by hand (:meth:`step`,
    under the model's lock): tests do, to control when rows join.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.stats = EngineStats()
        self._guard = threading.Lock()
        self._submitted: list[EngineJob] = []  # not yet encoded
        self._arrivals = itertools.count()
        self._waiting: list[_Live] = []  # encoded rows not yet in the batch
        self._group: _Group | None = None  # the running batch
        self._ended: list[EngineJob] = []  # jobs given their result during this step

    # ---- submitting and waiting (any thread) ------------------------------------------------

    def submit(
        self,
        request: CompletionRequest,
        priority: int,
        cancelled: threading.Event,
        max_batch_size: int,
    ) -> EngineJob:
        job = EngineJob(request, (int(priority), next(self._arrivals)), max_batch_size, cancelled)
        with self._guard:
            self._submitted.append(job)
        return job

    @property
    def running(self) -> int:
        """How many rows are in the running batch now."""
        group = self._group
        return len(group.lives) if group is not None else 0

    @property
    def queued(self) -> int:
        """How many requests wait to join (none of their rows is in the batch yet)."""
        with self._guard:
            submitted = len(self._submitted)
        waiting = list(self._waiting)
        group = self._group
        started = {id(live.job) for live in group.lives} if group is not None else set()
        return submitted + len({id(live.job) for live in waiting} - started)

    def wake(self) -> None:
        """Tell the model's thread that work was handed in (it steps :func:`engine_for`'s engine)."""
        model_thread(self.loaded).wake()

    def run_until_done(self, job: EngineJob) -> None:
        """Block until ``job`` is done (the model's thread steps the engine meanwhile)."""
        self.wake()
        job.done.wait()

    # ---- on the model's thread ---------------------------------------------------------------

    def work(self) -> bool:
        """One step under the model's lock (the model thread's work); True while work is left.

        An unexpected error (a bug: out-of-memory and a request's own errors are handled where
        they happen) fails every job the engine holds with it, so no caller waits forever, and
        the engine starts again empty.
        """
        with self.loaded.lock:
            try:
                return self.step()
            except Exception as exc:
                self._fail_all(exc)
                return False

    def _fail_all(self, exc: Exception) -> None:
        with self._guard:
            submitted, self._submitted = self._submitted, []
        lives = [*(self._group.lives if self._group is not None else []), *self._waiting]
        self._group, self._waiting = None, []
        for job in [*submitted, *(live.job for live in lives)]:
            self._end(job, exc)
        self._release()

    def _release(self) -> None:
        """Wake the callers of the jobs that ended, once the batch no longer holds their rows
        (so a caller that returns sees the engine without them)."""
        ended, self._ended = self._ended, []
        for job in ended:
            job.done.set()

    # ---- one step (the caller holds the model lock) -----------------------------------------

    def step(self) -> bool:
        """Serve some scoring, let rows join, run one decode step; False when there is no work."""
        try:
            self._serve_scoring()
            self._encode_submitted()
            self._drop_cancelled()
            self._admit()
            group = self._group
            if group is not None and group.lives:
                self._group = self._decode(group)
                self._drop_cancelled()
            else:
                self._group = None
        finally:
            self._release()
        return (
            self._group is not None
            or bool(self._waiting or self._submitted)
            or self.loaded.scoring.pending > 0
        )

    def _serve_scoring(self) -> None:
        lane = self.loaded.scoring
        if lane.pending:
            cap = max((j.max_batch_size for j in self._jobs()), default=lane.batch_size)
            before = lane.jobs_run
            lane.serve(self.loaded, cap, limit=cap)
            if self._group is not None:
                self.stats.scoring_between_steps += lane.jobs_run - before

    def _jobs(self) -> list[EngineJob]:
        lives = (self._group.lives if self._group is not None else []) + self._waiting
        return [live.job for live in lives]

    def _encode_submitted(self) -> None:
        with self._guard:
            jobs, self._submitted = self._submitted, []
        for job in jobs:
            if job.cancelled.is_set():
                self._end(job, GenerationCancelled("generation request was cancelled"))
                continue
            try:
                prompt_ids = encode_prompt(self.loaded, job.request)
                max_tokens = _room_for(self.loaded, job.request, len(prompt_ids))
            except PermanentBackendError as exc:
                self._end(job, exc)
                continue
            job.prompt_tokens = len(prompt_ids)
            rows = _rows_of(0, job.request, prompt_ids, max_tokens)
            if max_tokens < 1:  # nothing to generate: the static path's empty answers
                for row, output in zip(rows, generate_rows(self.loaded, rows, []), strict=True):
                    job.outputs[row.sample_index] = output
                self._complete(job)
                continue
            job.rows_left = len(rows)
            self._waiting.extend(_Live(job, row, _generator(row, self.loaded)) for row in rows)

    def _drop_cancelled(self) -> None:
        gone = [live for live in self._waiting if live.job.cancelled.is_set()]
        group = self._group
        if group is not None:
            gone += [live for live in group.lives if live.job.cancelled.is_set()]
        if not gone:
            return
        self.stats.cancelled_rows += len(gone)
        for live in gone:
            self._end(live.job, GenerationCancelled("generation request was cancelled"))
        self._waiting = [live for live in self._waiting if not live.job.ended]
        if group is not None:
            self._group = _keep(group, [not live.job.ended for live in group.lives])

    def _admit(self) -> None:
        """Prefill waiting rows (serving order) into the free slots and merge them in."""
        if not self._waiting:
            return
        # A new list, not an in-place sort: other threads read it (``queued``) meanwhile.
        self._waiting = sorted(self._waiting, key=lambda live: live.job.order)
        self._preempt()
        running = self.running
        joiners: list[_Live] = []
        for live in self._waiting:
            if running + len(joiners) < live.job.max_batch_size:
                joiners.append(live)
        if not joiners:
            return
        self._waiting = [live for live in self._waiting if live not in joiners]
        self.stats.joined += len(joiners)
        if running:
            self.stats.joined_while_running += len(joiners)
        groups = [g for g in self._prefill(joiners) if g is not None and g.lives]
        if self._group is not None and self._group.lives:
            groups.insert(0, self._group)
        self._group = merge_groups(groups) if groups else None
        if self._group is not None:
            self.stats.largest_batch = max(self.stats.largest_batch, len(self._group.lives))

    def _preempt(self) -> None:
        """Take background rows out of a full batch when foreground rows wait (issue 16, item 4).

        Foreground work (the level's answer -> verdict -> rewrite chain) is what the search waits
        for; a background row (asked ahead of need) that holds a slot would delay it by up to its
        whole length. The newest background rows leave first, back to the waiting list with the
        tokens they made: when a slot is free again they join with a prefill of their prompt and
        those tokens, and go on with their own generator, so their answer is the one they get
        uninterrupted (up to float noise of the prefill). The caller holds the model lock.
        """
        group = self._group
        if group is None:
            return
        waiting = [x for x in self._waiting if x.job.order[0] == Priority.FOREGROUND]
        if not waiting:
            return
        over = len(group.lives) + len(waiting) - waiting[0].job.max_batch_size
        candidates = [i for i, x in enumerate(group.lives) if x.job.order[0] != Priority.FOREGROUND]
        if over <= 0 or not candidates:
            return
        candidates.sort(key=lambda i: group.lives[i].job.order, reverse=True)
        out = set(candidates[:over])
        self.stats.preempted += len(out)
        left = [group.lives[i] for i in sorted(out)]
        self._group = _keep(group, [i not in out for i in range(len(group.lives))])
        self._waiting = sorted([*self._waiting, *left], key=lambda live: live.job.order)

    def _prefill(self, lives: list[_Live]) -> list[_Group | None]:
        """Prefill ``lives`` in one pass (halves on OOM); rows that stop at once are finished."""
        try:
            return [self._prefill_pass(lives)]
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(lives) == 1:
                self._fail_out_of_memory(lives[0])
                return []
            middle = len(lives) // 2
            return [*self._prefill(lives[:middle]), *self._prefill(lives[middle:])]

    def _prefill_pass(self, lives: list[_Live]) -> _Group | None:
        """One prefill of the joiners, reusing stored prompt prefixes (:func:`prefill`).

        A level's answers share the system prompt and the in-context examples: the first pass
        that holds two of them computes that prefix once and stores it, and answers that join
        later find it stored. Positions continue each prefix, so the keys and values are a cold
        prefill's up to float noise.
        """
        loaded = self.loaded
        # float32 only: there a reused prefix differs from a cold one by float noise, so greedy
        # answers do not depend on what the cache holds; in bf16 that noise is a rounding step
        # and a near-tie can flip (measured: a 16-token answer whose last token changed once
        # the system prompt's prefix was stored), which would make the same request's answer
        # depend on the calls made before it.
        cache = loaded.prefix_cache if loaded.dtype == torch.float32 else _NO_PREFIXES
        done = prefill(loaded.model, loaded.pad_id, [live.context for live in lives], cache)
        self.stats.prefills += 1
        # Into a cache whose decode steps write in place (one copy here, none per step).
        kv = _cache_of(_layers(done.kv))
        return self._after_forward(_Group(kv, done.mask, lives), done.logits)

    def _decode(self, group: _Group) -> _Group | None:
        """One token for every running row (halves on OOM; a row that alone does not fit fails)."""
        # A forward pass that runs out of memory may have grown some layers' caches already
        # (``DynamicLayer.update`` concatenates new tensors): retry from the tensors held before.
        before = _layers(group.cache)
        try:
            return self._decode_pass(group)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(group.lives) == 1:
                self._fail_out_of_memory(group.lives[0])
                return None
            middle = len(group.lives) // 2
            rows = range(len(group.lives))
            halves = [
                _subgroup(before, group, [i for i in rows if i < middle]),
                _subgroup(before, group, [i for i in rows if i >= middle]),
            ]
            stepped = [self._decode(half) for half in halves]
            kept = [g for g in stepped if g is not None and g.lives]
            return merge_groups(kept) if kept else None

    def _decode_pass(self, group: _Group) -> _Group | None:
        loaded = self.loaded
        lives = group.lives
        input_ids = torch.tensor(
            [[live.generated[-1]] for live in lives], dtype=torch.long, device=loaded.device
        )
        positions = torch.tensor(
            [[live.position] for live in lives], dtype=torch.long, device=loaded.device
        )
        mask = torch.cat([group.mask, torch.ones_like(group.mask[:, :1])], dim=1)
        with torch.inference_mode():
            out = loaded.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=group.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.stats.steps += 1
        return self._after_forward(_Group(out.cache, mask, lives), out.logits[:, -1, :])

    def _after_forward(self, group: _Group, logits: torch.Tensor) -> _Group | None:
        """Choose each row's next token, finish rows that stopped, keep the rest."""
        scores = logits.float()
        chosen = scores.argmax(dim=-1)
        for i, live in enumerate(group.lives):
            if live.generator is not None:
                chosen[i] = _sample(scores[i], live.row.temperature, live.row.top_p, live.generator)
        wanted = [i for i, live in enumerate(group.lives) if live.row.top_logprobs is not None]
        if wanted:
            logprobs = torch.log_softmax(scores[wanted], dim=-1)
            picked = logprobs.gather(1, chosen[wanted][:, None])[:, 0].tolist()
            k = max(group.lives[i].row.top_logprobs or 0 for i in wanted)
            top = logprobs.topk(k, dim=-1) if k else None
            top_lp = top.values.tolist() if top is not None else [[] for _ in wanted]
            top_ids = top.indices.tolist() if top is not None else [[] for _ in wanted]
            for slot, i in enumerate(wanted):
                live = group.lives[i]
                live.chosen_lp.append(picked[slot])
                live.top_lp.append(top_lp[slot])
                live.top_ids.append(top_ids[slot])
        tokens = chosen.tolist()
        keep: list[bool] = []
        for live, token in zip(group.lives, tokens, strict=True):
            live.generated.append(token)
            stopped = self._stopped(live)
            if stopped:
                self._finish(live)
            keep.append(not stopped)
        if not all(keep) and any(keep):
            self.stats.left_while_running += keep.count(False)
        return _keep(group, keep)

    def _stopped(self, live: _Live) -> bool:
        row = live.row
        if live.generated[-1] in self.loaded.eos_ids or len(live.generated) >= row.max_tokens:
            return True
        if not row.stop:
            return False
        tail = live.generated[-(max(len(s) for s in row.stop) + 4) :]
        text = self.loaded.tokenizer.decode(tail, **_DECODE_KWARGS)
        return any(stop in text for stop in row.stop)

    def _finish(self, live: _Live) -> None:
        records = None
        if live.row.top_logprobs is not None:
            records = _LogprobRecords(
                chosen=[[lp] for lp in live.chosen_lp],
                top_lp=[[lps] for lps in live.top_lp],
                top_ids=[[ids] for ids in live.top_ids],
            )
        job = live.job
        job.outputs[live.row.sample_index] = _finish_row(
            self.loaded, live.row, live.generated, records, 0 if records is not None else None
        )
        job.rows_left -= 1
        if job.rows_left == 0:
            self._complete(job)

    def _complete(self, job: EngineJob) -> None:
        request = job.request
        samples = [job.outputs[i % sequences_for(request)] for i in range(request.n)]
        self._end(
            job,
            GenerationResult(
                choices=tuple(output.choice for output in samples),
                prompt_tokens=job.prompt_tokens,
                completion_tokens=sum(output.completion_tokens for output in samples),
            ),
        )

    def _end(self, job: EngineJob, result: GenerationResult | BaseException) -> None:
        """Finish ``job``: its caller is woken at the end of the step (:meth:`_release`)."""
        if not job.ended:
            self._ended.append(job)
        job.finish(result)

    def _fail_out_of_memory(self, live: _Live) -> None:
        """The static path's message; the job's other rows leave at the next step."""
        loaded = self.loaded
        self._end(
            live.job,
            PermanentBackendError(
                f"local model {loaded.key[0]} ran out of memory on {loaded.device} for one "
                "sequence: lower max_tokens, shorten the prompt or use a smaller dtype"
            ),
        )
        # Its sibling rows are dropped like cancelled ones: nobody reads them any more.
        live.job.cancelled.set()


def _generator(row: _Row, loaded: LoadedModel) -> torch.Generator | None:
    """The row's own generator (seeded as the static path seeds it); None for greedy rows."""
    if not row.sampled:
        return None
    generator = torch.Generator(device=loaded.device)
    generator.manual_seed(_row_seed(row))
    return generator


def _layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    """A cache of :class:`SpareLayer` s holding ``layers``' keys and values (copied)."""
    cache = Cache(layers=[SpareLayer() for _ in layers])
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def _keep(group: _Group, keep: Sequence[bool]) -> _Group | None:
    """The group without the rows not kept (None when none is), trimmed on the left."""
    if all(keep):
        return group
    if not any(keep):
        return None
    indices = torch.tensor([i for i, k in enumerate(keep) if k], device=group.mask.device)
    group.cache.batch_select_indices(indices)
    lives = [live for live, k in zip(group.lives, keep, strict=True) if k]
    return trim_left(_Group(group.cache, group.mask[indices], lives))


def _subgroup(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], group: _Group, rows: Sequence[int]
) -> _Group:
    """A new group of some rows of ``group`` (copies: ``group`` itself is left as it is)."""
    index = torch.tensor(rows, device=group.mask.device)
    cache = _cache_of([(keys[index], values[index]) for keys, values in layers])
    return _Group(cache, group.mask[index], [group.lives[i] for i in rows])


def trim_left(group: _Group) -> _Group:
    """Drop the leading cache columns that every row masks out (padding of rows that left)."""
    used = group.mask.any(dim=0)
    lead = int(used.int().argmax()) if bool(used.any()) else 0
    if lead == 0:
        return group
    layers = [(k[..., lead:, :], v[..., lead:, :]) for k, v in _layers(group.cache)]
    return _Group(_cache_of(layers), group.mask[:, lead:], group.lives)


def merge_groups(groups: Sequence[_Group]) -> _Group:
    """One group from several: caches and masks left-padded to the longest, rows concatenated."""
    if len(groups) == 1:
        return groups[0]
    width = max(g.mask.shape[1] for g in groups)

    def pad(tensor: Any, by: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, 0, by, 0)) if by else tensor

    per_group = [(width - g.mask.shape[1], _layers(g.cache)) for g in groups]
    layers = []
    for index in range(len(per_group[0][1])):
        keys = [pad(layers_[index][0], by) for by, layers_ in per_group]
        values = [pad(layers_[index][1], by) for by, layers_ in per_group]
        layers.append((torch.cat(keys), torch.cat(values)))
    mask = torch.cat(
        [torch.nn.functional.pad(g.mask, (width - g.mask.shape[1], 0)) for g in groups]
    )
    return _Group(_cache_of(layers), mask, [live for g in groups for live in g.lives])
