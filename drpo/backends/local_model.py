"""The torch half of the local backend: load a model once per process, generate one batch.

This module imports torch and transformers, so ``drpo.backends.local`` imports it only when a
model is actually needed: ``drpo`` stays importable without the ``local`` extra. It never imports
``drpo.backends.local`` (what both need lives in ``drpo.backends.local_refs``), so the two do not
import each other in a cycle.

Everything here is synchronous. A loaded model's torch work runs on its own thread
(:class:`~drpo.backends.model_thread.ModelThread`, which loads it too: see that module for why
one thread), and two locks keep the rest safe:

* loading: a process-wide cache keyed by (resolved path, device, dtype), with one lock per key,
  so concurrent first calls from any thread or event loop load a model exactly once;
* generating: one lock per loaded model, held by whoever runs it (its thread, for each engine
  step or call; a test stepping an engine by hand), so one batch at a time runs on it (a second
  batch would only compete for the same cores or GPU and both would finish later).

Sampling is done row by row by our own logits processor, with one ``torch.Generator`` per row:
greedy and sampled requests with different temperatures, top_p and seeds share one ``generate``
call, and a seeded request draws the same tokens whatever else is in its batch (up to the float
noise of batching itself). The same processor records the log-probabilities of the chosen tokens
as they are chosen, so we never keep a (steps x batch x vocab) logits tensor around.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from drpo.backends.base import (
    Choice,
    CompletionRequest,
    PermanentBackendError,
    TokenLogprob,
    TopLogprob,
)
from drpo.backends.local_refs import ResolvedModel, sequences_for
from drpo.backends.model_thread import ModelThread
from drpo.backends.prefix_cache import PrefixCache, last_logits

#: How completions are decoded: special tokens (EOS, padding) dropped, spaces left as they are.
_DECODE_KWARGS: dict[str, Any] = {
    "skip_special_tokens": True,
    "clean_up_tokenization_spaces": False,
}
#: How single tokens are named in logprobs: special tokens shown (an EOS alternative is useful).
_TOKEN_NAME_KWARGS: dict[str, Any] = {
    "skip_special_tokens": False,
    "clean_up_tokenization_spaces": False,
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedModel:
    """A model and tokenizer in memory, with what generation needs to know about them."""

    key: tuple[str, str, str]
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    eos_ids: frozenset[int]
    pad_id: int
    bos_id: int | None
    max_positions: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Scoring requests waiting for the next free moment of the model (between decode steps).
    scoring: ScoringLane = field(default_factory=lambda: ScoringLane())
    #: KV states of prompt prefixes the scoring lane and the engine computed, reused by later
    #: scoring passes and generation prefills.
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)
    #: The thread that runs the model's torch work (:func:`model_thread`; the one that loaded
    #: it, for a model from :func:`load_model`).
    thread: ModelThread | None = None


_THREADS_GUARD = threading.Lock()


def model_thread(loaded: LoadedModel) -> ModelThread:
    """The thread that runs ``loaded``'s torch work (started here for a model built in memory)."""
    with _THREADS_GUARD:
        if loaded.thread is None:
            loaded.thread = ModelThread(f"drpo-model {loaded.key[0]}")
            loaded.thread.work = functools.partial(_serve_lane, loaded)
        return loaded.thread


def _serve_lane(loaded: LoadedModel) -> bool:
    """The model thread's work until the model's continuous engine exists (which then serves the
    lane between its steps, :meth:`drpo.backends.engine.Engine.work`): one scoring pass."""
    with loaded.lock:
        lane = loaded.scoring
        lane.serve(loaded, lane.batch_size, limit=lane.batch_size)
        return lane.pending > 0


_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_KEY_LOCKS: dict[tuple[str, str, str], threading.Lock] = {}
_GUARD = threading.Lock()
#: How many times a model was actually read from disk in this process (tests check "once").
load_count = 0


def pick_device(device: str | None) -> str:
    """The requested device, else the GPU when there is one, else the CPU."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


#: CPU features that give native bf16 matmuls (oneDNN uses them for bf16 GEMMs); without them
#: torch emulates bf16 on the CPU, slower than float32.
_NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16).

    Read from torch's own CPU probe (``torch.cpu.get_capabilities``, torch >= 2.9), else from
    the ``flags`` line of ``/proc/cpuinfo``. ``torch.backends.cpu.get_cpu_capability()`` is not
    enough: it says "AVX512" on CPUs with and without the bf16 extension alike.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        try:
            capabilities = get_capabilities()
        except Exception:  # a probe failure means "unknown": fall back to the flags
            capabilities = None
        if capabilities is not None:
            return any(bool(capabilities.get(name)) for name in _NATIVE_BF16_CPU_FEATURES)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return any(name in flags for name in _NATIVE_BF16_CPU_FEATURES)
    except OSError:
        pass
    return False


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU and on a CPU with native bf16 matmuls, float32 on other CPUs.

    Measured with ``benchmarks/backends.py`` on a 2-core AMD EPYC with AVX512-BF16 (issue 12,
    a busy shared machine): SmolLM2 in bf16 made 1.26-1.37x the tokens/s of float32 alone and
    2.0-2.6x in batches of 8, with half the weight memory (257 vs 513 MB; 745 vs 1004 MB RSS
    after a batch). On CPUs without native bf16, torch emulates it and float32 stays the
    default (the previous default: not measured here, as no such CPU was at hand). bf16 is also what these models
    are trained in and what GPUs run fastest. The price of bf16: greedy answers can depend on
    what else is in the batch, at near-ties (see tests/test_local_backend.py); pass
    ``dtype="float32"`` where answers must not depend on batching.
    """
    if device.startswith("cuda"):
        return torch.bfloat16
    if device == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def pick_dtype(dtype: str | None, device: str) -> torch.dtype:
    """The requested dtype (e.g. "float32", "bfloat16"), or the device's default for None/"auto"."""
    if dtype and dtype.strip().lower() != "auto":
        value = getattr(torch, dtype.strip().removeprefix("torch."), None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise PermanentBackendError(
                f"unknown dtype {dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'"
            )
        return value
    return default_dtype(device)


def load_model(
    resolved: ResolvedModel, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """Return the process-wide loaded model for ``resolved``, loading it on first use only."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    key = (str(resolved.path), dev, str(dt))
    with _GUARD:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        cached = _CACHE.get(key)
        if cached is None:
            # Loaded on the thread that will run it: one OpenMP team for this model (see
            # drpo.backends.model_thread), not one more on whichever thread asked first.
            thread = ModelThread(f"drpo-model {resolved.ref}")
            try:
                cached = thread.call(_load_uncached, resolved, key, dev, dt)
            except BaseException:
                thread.stop()
                raise
            cached.thread = thread
            thread.work = functools.partial(_serve_lane, cached)
            with _GUARD:
                _CACHE[key] = cached
        return cached


def _load_uncached(
    resolved: ResolvedModel, key: tuple[str, str, str], device: str, dtype: torch.dtype
) -> LoadedModel:
    global load_count
    load_count += 1
    kwargs: dict[str, Any] = {}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    else:
        kwargs["local_files_only"] = True  # this backend never downloads
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.folder), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(resolved.folder), dtype=dtype, **kwargs)
        model.to(device).eval()
    except Exception as exc:
        raise PermanentBackendError(
            f"could not load local model {resolved.ref!r} from {resolved.path}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = min(eos_ids) if eos_ids else 0
    bos_id = tokenizer.bos_token_id
    # The model's own generation defaults (do_sample, temperature, repetition_penalty...) would
    # silently fill in every setting we leave unset; the request alone decides how we decode.
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=sorted(eos_ids), pad_token_id=pad_id
    )
    return LoadedModel(
        key=key,
        model=model,
        tokenizer=tokenizer,
        device=torch.device(device),
        dtype=dtype,
        eos_ids=frozenset(eos_ids),
        pad_id=pad_id,
        bos_id=bos_id,
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends a turn: the generation config's (int or list) and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# --------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationResult:
    """What one request of a batch produced: its choices and its real token counts."""

    choices: tuple[Choice, ...]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class _Row:
    """One sequence to generate: sample ``sample_index`` of request ``request_index``."""

    request_index: int
    sample_index: int
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int | None
    top_logprobs: int | None

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


class GenerationCancelled(Exception):
    """The result of a request whose caller was cancelled: nobody reads it."""


#: Flags that say "this caller is gone": set from the event loop, read here between tokens.
CancelFlags = Sequence[threading.Event]


def generate_batch(
    loaded: LoadedModel,
    requests: Sequence[CompletionRequest],
    max_batch_size: int,
    cancelled: CancelFlags,
) -> list[GenerationResult | BaseException]:
    """Generate every request (all n samples of each) in as few ``generate`` calls as fit.

    A request that cannot run (no chat template, prompt too long) gets its own error; the others
    still run. Rows go through ``generate`` in chunks of ``max_batch_size`` (one chunk unless a
    single request asks for more samples than that). Everything, tokenizing included, runs
    under the model's lock: a fast tokenizer used from two threads at once can fail.

    ``cancelled[i]`` is set when the caller of ``requests[i]`` is gone: its rows are marked done
    at the next token (a chunk whose rows are all cancelled ends there, a chunk not yet started
    is skipped) and it gets :class:`GenerationCancelled`.
    """
    with loaded.lock:
        loaded.scoring.serve(loaded, max_batch_size)

        def run_chunk(chunk: Sequence[_Row], flags: CancelFlags) -> list[Any]:
            return _generate_splitting_on_oom(
                loaded, chunk, flags, lambda: loaded.scoring.serve(loaded, max_batch_size)
            )

        return _run_requests(loaded, requests, max_batch_size, cancelled, run_chunk)


def _run_requests(
    loaded: LoadedModel,
    requests: Sequence[CompletionRequest],
    max_batch_size: int,
    cancelled: CancelFlags,
    run_chunk: Callable[[Sequence[_Row], CancelFlags], list[Any]],
) -> list[GenerationResult | BaseException]:
    """Encode ``requests`` into rows, run them in chunks, and gather each request's result.

    The caller holds the model's lock. Shared by generation and the scoring lane, so both
    report errors, cancellations and token counts the same way.
    """
    results: list[GenerationResult | BaseException | None] = [None] * len(requests)
    rows: list[_Row] = []
    prompt_lengths: dict[int, int] = {}
    for index, request in enumerate(requests):
        if cancelled[index].is_set():
            continue
        try:
            prompt_ids = encode_prompt(loaded, request)
            max_tokens = _room_for(loaded, request, len(prompt_ids))
        except PermanentBackendError as exc:
            results[index] = exc
            continue
        prompt_lengths[index] = len(prompt_ids)
        rows.extend(_rows_of(index, request, prompt_ids, max_tokens))
    outputs: dict[tuple[int, int], _RowOutput | BaseException] = {}
    for start in range(0, len(rows), max_batch_size):
        chunk = rows[start : start + max_batch_size]
        chunk_flags = [cancelled[row.request_index] for row in chunk]
        if all(flag.is_set() for flag in chunk_flags):
            continue
        generated = run_chunk(chunk, chunk_flags)
        for row, output in zip(chunk, generated, strict=True):
            outputs[row.request_index, row.sample_index] = output
    for index, request in enumerate(requests):
        if results[index] is not None:
            continue
        if cancelled[index].is_set():
            results[index] = GenerationCancelled(f"request {index} of the batch was cancelled")
            continue
        samples = [outputs[index, i % sequences_for(request)] for i in range(request.n)]
        failed = next((s for s in samples if isinstance(s, BaseException)), None)
        if failed is not None:
            results[index] = failed
            continue
        samples = [s for s in samples if isinstance(s, _RowOutput)]
        results[index] = GenerationResult(
            choices=tuple(output.choice for output in samples),
            prompt_tokens=prompt_lengths[index],
            completion_tokens=sum(output.completion_tokens for output in samples),
        )
    return [r if r is not None else RuntimeError("request produced no output") for r in results]


def _rows_of(
    index: int, request: CompletionRequest, prompt_ids: list[int], max_tokens: int
) -> list[_Row]:
    return [
        _Row(
            request_index=index,
            sample_index=sample,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            stop=tuple(s for s in request.stop if s),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            top_logprobs=request.top_logprobs,
        )
        for sample in range(sequences_for(request))
    ]


def _generate_splitting_on_oom(
    loaded: LoadedModel,
    rows: Sequence[_Row],
    cancelled: CancelFlags,
    between_steps: Callable[[], None] | None = None,
    run_rows: Callable[..., list[_RowOutput]] | None = None,
) -> list[_RowOutput | PermanentBackendError]:
    """Generate ``rows``; if the device runs out of memory, retry in two halves.

    Rows are independent (own seed, own limits), so halves give the same answers. A single row
    that does not fit gets an error that says what to change; its request fails, the others
    in the batch do not.
    """
    try:
        if run_rows is not None:
            return list(run_rows(loaded, rows))
        return list(generate_rows(loaded, rows, cancelled, between_steps))
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(rows) == 1:
            return [
                PermanentBackendError(
                    f"local model {loaded.key[0]} ran out of memory on {loaded.device} for one "
                    "sequence: lower max_tokens, shorten the prompt or use a smaller dtype"
                )
            ]
        middle = len(rows) // 2
        return [
            *_generate_splitting_on_oom(
                loaded, rows[:middle], cancelled[:middle], between_steps, run_rows
            ),
            *_generate_splitting_on_oom(
                loaded, rows[middle:], cancelled[middle:], between_steps, run_rows
            ),
        ]


def encode_prompt(loaded: LoadedModel, request: CompletionRequest) -> list[int]:
    """Chat messages through the tokenizer's chat template; a raw prompt as it is."""
    tokenizer = loaded.tokenizer
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise PermanentBackendError(
                f"local model {loaded.key[0]} has no chat template: send a raw `prompt` instead"
            )
        messages = [message.model_dump() for message in request.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # e.g. a template that rejects a system message
            raise PermanentBackendError(
                f"the chat template of {loaded.key[0]} rejected these messages: {exc}"
            ) from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(request.prompt)["input_ids"]
    if not ids:
        if loaded.bos_id is None:
            raise PermanentBackendError("an empty prompt needs a model with a BOS token")
        ids = [loaded.bos_id]
    return list(ids)


def _room_for(loaded: LoadedModel, request: CompletionRequest, prompt_length: int) -> int:
    """``max_tokens``, shortened so prompt + completion fit the model's context window."""
    if loaded.max_positions is None:
        return request.max_tokens
    room = loaded.max_positions - prompt_length
    if room < 1:
        raise PermanentBackendError(
            f"prompt of {prompt_length} tokens does not fit the model's context of "
            f"{loaded.max_positions} tokens: shorten it"
        )
    return min(request.max_tokens, room)


@dataclass(frozen=True)
class _RowOutput:
    choice: Choice
    completion_tokens: int


def generate_rows(
    loaded: LoadedModel,
    rows: Sequence[_Row],
    cancelled: CancelFlags,
    between_steps: Callable[[], None] | None = None,
) -> list[_RowOutput]:
    """One left-padded ``generate`` call for ``rows``; each row is then cut to its own limits.

    All rows run until the longest ``max_tokens`` of the batch unless they finish earlier: a
    row stops at EOS, at one of its stop strings or at its own ``max_tokens`` (our stopping
    criterion marks it done), and the call ends when every row is done. Grouping requests by
    ``max_tokens`` instead would split batches for no gain, since short rows stop anyway.

    A row whose flag in ``cancelled`` is set is marked done at the next token, like a row that
    reached its stop, so a batch whose callers are all gone ends there. Its output is whatever it
    had so far (the caller drops it).

    ``between_steps`` runs on this thread before each token is chosen (the model lock is held):
    the scoring lane uses it so one-token verdicts never wait for the batch's longest row.
    """
    if all(row.max_tokens < 1 for row in rows):  # nothing to generate (max_tokens=0)
        return [
            _RowOutput(
                choice=Choice(
                    text="",
                    finish_reason="length",
                    logprobs=() if row.top_logprobs is not None else None,
                ),
                completion_tokens=0,
            )
            for row in rows
        ]
    width = max(len(row.prompt_ids) for row in rows)
    input_ids = torch.tensor(
        [[loaded.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows],
        dtype=torch.long,
        device=loaded.device,
    )
    attention_mask = torch.tensor(
        [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
        dtype=torch.long,
        device=loaded.device,
    )
    decoder = _RowDecoder(rows, loaded.device, between_steps)
    stoppers = [_RowStopper(loaded.tokenizer, width, rows), _CancelStopper(cancelled)]
    config = GenerationConfig(
        max_new_tokens=max(row.max_tokens for row in rows),
        do_sample=False,  # our processor picks every token; generate's argmax just obeys it
        num_beams=1,
        eos_token_id=sorted(loaded.eos_ids),
        pad_token_id=loaded.pad_id,
    )
    with torch.inference_mode():
        sequences = loaded.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([decoder]),
            stopping_criteria=StoppingCriteriaList(stoppers),
        )
    generated = sequences[:, width:].tolist()
    records = decoder.records()
    return [
        _finish_row(loaded, row, generated[i], records, decoder.logprob_slot.get(i))
        for i, row in enumerate(rows)
    ]


def _row_seed(row: _Row) -> int:
    """A distinct, reproducible seed per sample of a seeded request; random otherwise."""
    if row.seed is None:
        return secrets.randbits(63)
    return (row.seed * 0x9E3779B97F4A7C15 + row.sample_index * 0xBF58476D1CE4E5B9) % (2**63)


class _RowDecoder(LogitsProcessor):
    """Chooses each row's next token (argmax, or a seeded sample) and records its logprobs.

    It returns scores that are -inf everywhere except at the chosen token, so generate's own
    greedy argmax picks exactly our choice. ``scores`` arrive as raw float32 logits: logprobs
    are those of the model's distribution, before temperature and top_p (as OpenAI reports).
    """

    def __init__(
        self,
        rows: Sequence[_Row],
        device: torch.device,
        between_steps: Callable[[], None] | None = None,
    ) -> None:
        self._rows = rows
        self._between_steps = between_steps
        self._generators: dict[int, torch.Generator] = {}
        for i, row in enumerate(rows):
            if row.sampled:
                generator = torch.Generator(device=device)
                generator.manual_seed(_row_seed(row))
                self._generators[i] = generator
        wanted = [i for i, row in enumerate(rows) if row.top_logprobs is not None]
        self.logprob_slot = {row_index: slot for slot, row_index in enumerate(wanted)}
        self._wanted = torch.tensor(wanted, dtype=torch.long, device=device)
        self._k = max((rows[i].top_logprobs or 0 for i in wanted), default=0)
        self._chosen_lp: list[torch.Tensor] = []
        self._top_lp: list[torch.Tensor] = []
        self._top_ids: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._between_steps is not None:
            self._between_steps()
        chosen = scores.argmax(dim=-1)
        for i, generator in self._generators.items():
            row = self._rows[i]
            chosen[i] = _sample(scores[i], row.temperature, row.top_p, generator)
        if self.logprob_slot:
            logprobs = torch.log_softmax(scores[self._wanted].float(), dim=-1)
            self._chosen_lp.append(logprobs.gather(1, chosen[self._wanted][:, None])[:, 0])
            if self._k:
                top = logprobs.topk(self._k, dim=-1)
                self._top_lp.append(top.values)
                self._top_ids.append(top.indices)
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, chosen[:, None], 0.0)
        return forced

    def records(self) -> _LogprobRecords | None:
        """Per step and per logprob row: the chosen token's logprob and the top-k, on the CPU."""
        if not self.logprob_slot or not self._chosen_lp:
            return None
        chosen = torch.stack(self._chosen_lp).cpu().tolist()
        if self._k:
            top_lp = torch.stack(self._top_lp).cpu().tolist()
            top_ids = torch.stack(self._top_ids).cpu().tolist()
        else:
            top_lp = top_ids = [[[] for _ in self.logprob_slot] for _ in chosen]
        return _LogprobRecords(chosen=chosen, top_lp=top_lp, top_ids=top_ids)


@dataclass(frozen=True)
class _LogprobRecords:
    chosen: list[list[float]]  # [step][slot]
    top_lp: list[list[list[float]]]  # [step][slot][k]
    top_ids: list[list[list[int]]]  # [step][slot][k]


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token from softmax(logits / temperature), restricted to the top_p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps at least the top token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[pick][0]
    return torch.multinomial(probs, 1, generator=generator)[0]


class _RowStopper(StoppingCriteria):
    """Marks a row done at its own ``max_tokens`` or when its text contains one of its stops.

    Only the last few tokens are decoded each step (enough to hold the longest stop string), so
    the check stays cheap however long the completion grows. EOS is handled by generate itself.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, rows: Sequence[_Row]) -> None:
        self._tokenizer = tokenizer
        self._prompt_width = prompt_width
        self._rows = rows
        longest = max((len(s) for row in rows for s in row.stop), default=0)
        self._tail_tokens = longest + 4

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self._prompt_width
        done = [produced >= row.max_tokens for row in self._rows]
        check = [i for i, row in enumerate(self._rows) if row.stop and not done[i]]
        if check:
            tail = min(produced, self._tail_tokens)
            tails = input_ids[check, input_ids.shape[1] - tail :].tolist()
            texts = self._tokenizer.batch_decode(tails, **_DECODE_KWARGS)
            for i, text in zip(check, texts, strict=True):
                done[i] = any(stop in text for stop in self._rows[i].stop)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _CancelStopper(StoppingCriteria):
    """Marks a row done once its caller is gone (its flag is set), checked after every token.

    transformers ends ``generate`` when every row is done, so cancelling every caller of a batch
    frees the worker thread after one more token instead of after the whole batch (issue 10).
    """

    def __init__(self, cancelled: CancelFlags) -> None:
        self._cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [flag.is_set() for flag in self._cancelled]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text`` (None if none occurs)."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found) if found else None


def _smallest_prefix(ids: Sequence[int], holds: Callable[[int], bool]) -> int:
    """The smallest k in [0, len(ids)] with ``holds(k)`` (binary search; ``holds`` is monotone)."""
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _finish_row(
    loaded: LoadedModel,
    row: _Row,
    generated: list[int],
    records: _LogprobRecords | None,
    slot: int | None,
) -> _RowOutput:
    """Cut one row at EOS, its first stop string (excluded) or its ``max_tokens``.

    ``completion_tokens`` counts the tokens the row really generated: up to and including the
    EOS token, or the token that completed the stop string. Logprobs cover the tokens of the
    returned text (a token that straddles the cut is kept, as its start is in the text).
    """
    tokenizer = loaded.tokenizer

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), **_DECODE_KWARGS)

    ids = generated[: row.max_tokens]
    finish_reason = "length" if len(ids) >= row.max_tokens else "stop"
    used = len(ids)
    eos_at = next((i for i, token in enumerate(ids) if token in loaded.eos_ids), None)
    if eos_at is not None:
        ids, used, finish_reason = ids[:eos_at], eos_at + 1, "stop"
    text = decode(ids)
    kept = len(ids)
    cut = _first_stop(text, row.stop)
    if cut is not None:
        used = _smallest_prefix(ids, lambda k: _first_stop(decode(ids[:k]), row.stop) is not None)
        kept = _smallest_prefix(ids, lambda k: len(decode(ids[:k])) >= cut)
        text, finish_reason = text[:cut], "stop"
    logprobs = None
    if row.top_logprobs is not None and slot is not None:
        logprobs = _token_logprobs(tokenizer, ids[:kept], row.top_logprobs, records, slot)
    return _RowOutput(
        choice=Choice(text=text, finish_reason=finish_reason, logprobs=logprobs),
        completion_tokens=used,
    )


def _token_logprobs(
    tokenizer: Any, ids: Sequence[int], k: int, records: _LogprobRecords | None, slot: int
) -> tuple[TokenLogprob, ...]:
    if records is None:
        return ()
    steps = min(len(ids), len(records.chosen))
    top_ids = [records.top_ids[t][slot][:k] for t in range(steps)]
    vocab = sorted({*ids[:steps], *(i for step in top_ids for i in step)})
    names = dict(
        zip(vocab, tokenizer.batch_decode([[i] for i in vocab], **_TOKEN_NAME_KWARGS), strict=True)
    )
    return tuple(
        TokenLogprob(
            token=names[ids[t]],
            logprob=records.chosen[t][slot],
            top=tuple(
                TopLogprob(token=names[token], logprob=lp)
                for token, lp in zip(top_ids[t], records.top_lp[t][slot][:k], strict=True)
            ),
        )
        for t in range(steps)
    )


# --------------------------------------------------------------------------------------------
# The scoring lane (issue 16): one-token requests with logprobs never wait for a generation
# --------------------------------------------------------------------------------------------


def is_scoring(request: CompletionRequest) -> bool:
    """A request that needs only the first position's distribution: one token, with logprobs.

    The logprobs critic's aspect selections and verdicts are such requests: a single forward
    pass over the prompt (a prefill) answers them, so they need no place in a decode batch.
    """
    return request.max_tokens == 1 and request.top_logprobs is not None


@dataclass(eq=False)
class ScoringJob:
    """One scoring request waiting in (or taken from) a model's lane."""

    request: CompletionRequest
    order: tuple[int, int]  # (priority, arrival): foreground first, then arrival
    cancelled: threading.Event
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | BaseException | None = None
    #: The caller's backend's ``max_batch_size``: how many rows a pass takes while no
    #: generation runs (a running generation's own setting caps it otherwise).
    max_batch_size: int = 8

    def finish(self, result: GenerationResult | BaseException) -> None:
        self.result = result
        self.done.set()


class ScoringLane:
    """Scoring requests of one model, served on the model's thread between decode steps.

    Why a lane and not a batch of the batcher: a verdict put in a ``generate`` batch waits for
    that batch's longest row (issue 16: 105 s on average, 281 s at worst, for one token). Here the
    model's thread serves the lane before each decode step: the continuous engine's
    (:meth:`drpo.backends.engine.Engine.step`) or a static batch's (``between_steps`` of
    :func:`generate_rows`), and pass after pass while the model is otherwise idle
    (:func:`score_waiting` wakes it), so a verdict waits at most one decode step plus its own
    prefill.
    Waiting jobs run as left-padded prefills of ``max_batch_size`` rows, foreground before
    background, the next pass taken from what waits when the previous one ends.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pending: list[ScoringJob] = []
        self._arrivals = itertools.count()
        #: How many scoring jobs ran and in how many forward passes (for tests and benchmarks).
        self.jobs_run = 0
        self.passes = 0

    def add(
        self,
        request: CompletionRequest,
        priority: int,
        cancelled: threading.Event,
        max_batch_size: int = 8,
    ) -> ScoringJob:
        job = ScoringJob(
            request, (int(priority), next(self._arrivals)), cancelled, max_batch_size=max_batch_size
        )
        with self._guard:
            self._pending.append(job)
        return job

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        """The ``max_batch_size`` of the job served next (8 when none waits)."""
        with self._guard:
            head = min(self._pending, key=lambda j: j.order, default=None)
        return head.max_batch_size if head is not None else 8

    def _take_all(self, limit: int | None = None) -> list[ScoringJob]:
        with self._guard:
            ordered = sorted(self._pending, key=lambda j: j.order)
            cut = len(ordered) if limit is None else limit
            jobs, self._pending = ordered[:cut], ordered[cut:]
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                job.finish(GenerationCancelled("scoring request was cancelled"))
            else:
                live.append(job)
        return live

    def serve(self, loaded: LoadedModel, max_batch_size: int, limit: int | None = None) -> None:
        """Run every waiting job, or the first ``limit`` in serving order (the caller holds
        ``loaded.lock``). The continuous engine (:mod:`drpo.backends.engine`) passes a limit so a
        stream of scorers cannot starve its running generations.

        One pass of ``max_batch_size`` jobs at a time, each taken when the previous one ends: a
        foreground verdict that arrives while a long backlog of background selections is being
        served goes into the next pass, not behind the whole backlog.
        """
        served = 0
        while self._pending and (limit is None or served < limit):
            take = max_batch_size if limit is None else min(max_batch_size, limit - served)
            group = self._take_all(take)
            served += take
            if not group:
                continue
            try:
                results = _run_requests(
                    loaded,
                    [job.request for job in group],
                    max_batch_size,
                    [job.cancelled for job in group],
                    lambda chunk, flags: _generate_splitting_on_oom(
                        loaded, chunk, flags, run_rows=prefill_rows
                    ),
                )
            except Exception as exc:  # the whole pass failed: every job of it sees why
                results = [exc] * len(group)
            self.passes += 1
            self.jobs_run += len(group)
            for job, result in zip(group, results, strict=True):
                job.finish(result)


def score_waiting(loaded: LoadedModel, job: ScoringJob, max_batch_size: int) -> None:
    """Block until ``job`` (in ``loaded.scoring``) is done, served on the model's thread.

    The thread runs the model's continuous engine once there is one (before: scoring passes
    alone): each step serves one pass of waiting scoring jobs and then a decode step of the
    running batch, so a backlog of scoring jobs (the
    background aspect selections at the start of a run) shares the model with the generations
    step by step instead of holding them all up until it is served. ``max_batch_size`` is the
    caller's: the rows of a pass while no generation runs.
    """
    job.max_batch_size = max_batch_size
    model_thread(loaded).wake()
    job.done.wait()


def prefill_rows(loaded: LoadedModel, rows: Sequence[_Row]) -> list[_RowOutput]:
    """One forward pass (no KV cache kept for the rows): each row's first token and logprobs.

    Prompt prefixes the model's :class:`~drpo.backends.prefix_cache.PrefixCache` holds are not
    recomputed, and prefixes several rows share are computed once and kept for later passes
    (:func:`~drpo.backends.prefix_cache.last_logits`); position ids continue each prefix, so the
    logits are a cold prefill's up to float noise. The token is picked from the raw
    last-position logits by the same :class:`_RowDecoder` as a generation, so the numbers are
    today's: top-k logprobs of the raw distribution, argmax or a sample from the row's own
    seeded generator.
    """
    if all(row.max_tokens < 1 for row in rows):
        return generate_rows(loaded, rows, [threading.Event() for _ in rows])
    scores = last_logits(
        loaded.model, loaded.pad_id, [row.prompt_ids for row in rows], loaded.prefix_cache
    )
    decoder = _RowDecoder(rows, loaded.device)
    with torch.inference_mode():
        forced = decoder(torch.empty(len(rows), 0, dtype=torch.long), scores)
    chosen = forced.argmax(dim=-1).tolist()
    records = decoder.records()
    return [
        _finish_row(loaded, row, [chosen[i]], records, decoder.logprob_slot.get(i))
        for i, row in enumerate(rows)
    ]
