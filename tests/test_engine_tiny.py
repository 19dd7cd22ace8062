"""The continuous engine's cache bookkeeping on a tiny random Llama (fast: no model file).

A three-layer Llama with random weights (float32, built in memory) and a tokenizer that reads a
prompt as space-separated token ids: the engine's joins (prefill, then caches merged with left
padding), leaves (rows dropped, padding trimmed) and OOM splitting are checked token for token
against ``model.generate`` on each prompt alone. The real model's behaviour (chat template,
stop strings, logprobs, scoring, cancellation through the backend) is in tests/test_engine.py.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from transformers import DynamicLayer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from drpo.backends.base import CompletionRequest, PermanentBackendError
from drpo.backends.engine import Engine, EngineJob, SpareLayer, engine_for
from drpo.backends.local_model import (
    GenerationResult,
    LoadedModel,
    ScoringJob,
    generate_batch,
    model_thread,
    score_waiting,
)
from drpo.backends.priority import Priority

EOS = 119


class IdsTokenizer:
    """Token ids written out as text: "5 17 3" is the three tokens 5, 17 and 3."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return " ".join(str(i) for i in ids if i != EOS)

    def batch_decode(self, rows: Sequence[Sequence[int]], **kwargs: Any) -> list[str]:
        return [self.decode(row) for row in rows]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[EOS], pad_token_id=0)
    return LoadedModel(
        key=("tiny-llama", "cpu", "torch.float32"),
        model=model,
        tokenizer=IdsTokenizer(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        eos_ids=frozenset({EOS}),
        pad_id=0,
        bos_id=1,
        max_positions=512,
    )


def prompts_and_lengths() -> list[tuple[list[int], int]]:
    rng = random.Random(1)
    lengths = [5, 30, 12, 20, 3, 25, 9]
    return [([rng.randrange(2, 118) for _ in range(rng.randrange(3, 40))], n) for n in lengths]


def alone(loaded: LoadedModel, prompt: list[int], max_tokens: int) -> str:
    """Greedy ``model.generate`` on the prompt by itself, as the engine's text."""
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    return loaded.tokenizer.decode(out[0, len(prompt) :].tolist())


def run(
    engine: Engine,
    requests: Sequence[CompletionRequest],
    steps_between: int,
    max_batch_size: int = 8,
) -> list[EngineJob]:
    """Submit the requests ``steps_between`` steps apart, then step until all are done."""
    jobs = []
    with engine.loaded.lock:
        for request in requests:
            jobs.append(engine.submit(request, 0, threading.Event(), max_batch_size))
            for _ in range(steps_between):
                engine.step()
        while engine.step():
            pass
    return jobs


def text(job: EngineJob) -> str:
    assert isinstance(job.result, GenerationResult), job.result
    return job.result.choices[0].text


def test_rows_joining_and_leaving_get_their_tokens_alone(tiny: LoadedModel) -> None:
    cases = prompts_and_lengths()
    engine = Engine(tiny)
    requests = [CompletionRequest(prompt=" ".join(map(str, p)), max_tokens=n) for p, n in cases]
    jobs = run(engine, requests, steps_between=2, max_batch_size=4)
    assert [text(job) for job in jobs] == [alone(tiny, p, n) for p, n in cases]
    assert engine.stats.joined == len(cases)
    assert engine.stats.joined_while_running >= len(cases) - 2
    assert engine.stats.left_while_running >= 1
    assert engine.stats.largest_batch == 4  # max_batch_size held: the rest waited for a slot
    assert engine.running == 0 and engine.queued == 0


def test_seeded_samples_do_not_depend_on_what_shares_the_batch(tiny: LoadedModel) -> None:
    seeded = CompletionRequest(prompt="5 6 7 8", max_tokens=15, temperature=1.0, seed=3, n=2)
    (by_itself,) = run(Engine(tiny), [seeded], steps_between=0)
    others = [
        CompletionRequest(prompt="9 9 9", max_tokens=30),
        CompletionRequest(prompt="3 4", max_tokens=20, temperature=0.7, seed=1),
    ]
    *_, shared = run(Engine(tiny), [*others, seeded], steps_between=2)
    assert isinstance(by_itself.result, GenerationResult)
    assert isinstance(shared.result, GenerationResult)
    samples = [c.text for c in by_itself.result.choices]
    assert [c.text for c in shared.result.choices] == samples
    assert samples[0] != samples[1]


class OutOfMemoryAbove:
    """The tiny model's forward, out of memory beyond ``rows`` rows or ``width`` tokens."""

    def __init__(self, forward: Any, rows: int, width: int) -> None:
        self._forward = forward
        self._rows = rows
        self._width = width

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        shape = kwargs["input_ids"].shape
        if shape[0] > self._rows or shape[1] > self._width:
            raise torch.OutOfMemoryError("simulated")
        return self._forward(*args, **kwargs)


def test_out_of_memory_splits_the_batch_and_a_row_that_never_fits_fails_alone(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = prompts_and_lengths()
    expected = [alone(tiny, p, n) for p, n in cases]
    monkeypatch.setattr(tiny.model, "forward", OutOfMemoryAbove(tiny.model.forward, 2, 35))
    requests = [CompletionRequest(prompt=" ".join(map(str, p)), max_tokens=n) for p, n in cases]
    jobs = run(Engine(tiny), requests, steps_between=0)
    for job, (prompt, _), want in zip(jobs, cases, expected, strict=True):
        if len(prompt) > 35:  # its prefill alone does not fit: it fails, with today's message
            assert isinstance(job.result, PermanentBackendError)
            assert "ran out of memory on cpu for one sequence" in str(job.result)
        else:  # decode steps of up to 8 rows ran in halves of at most 2
            assert text(job) == want
    assert any(len(prompt) > 35 for prompt, _ in cases)


def test_rows_sharing_a_prompt_prefix_reuse_it_and_get_their_tokens_alone(
    tiny: LoadedModel,
) -> None:
    """A level's answers share the system prompt and the examples: computed once, then reused.

    Three prompts share a 24-token opening: the first pass computes it once and stores it (the
    model's prefix cache), a request that joins later finds it stored, and every row still gets
    the tokens it gets alone (positions continue the prefix; the mask has a hole of padding
    between a row's prefix and its suffix, which decode steps carry on).
    """
    rng = random.Random(2)
    opening = [rng.randrange(2, 118) for _ in range(24)]
    cases = [(opening + [rng.randrange(2, 118) for _ in range(n)], 12) for n in (3, 9, 5, 7)]
    tiny.prefix_cache.clear()
    stats = tiny.prefix_cache.stats
    saved, stored = stats.tokens_saved, stats.stored
    engine = Engine(tiny)
    requests = [CompletionRequest(prompt=" ".join(map(str, p)), max_tokens=n) for p, n in cases]
    with engine.loaded.lock:
        first = [engine.submit(r, 0, threading.Event(), 8) for r in requests[:3]]
        for _ in range(4):
            engine.step()
        later = engine.submit(requests[3], 0, threading.Event(), 8)
        while engine.step():
            pass
    assert [text(job) for job in [*first, later]] == [alone(tiny, p, n) for p, n in cases]
    assert stats.stored > stored  # the shared opening, stored once
    # The opening is reused by the three first rows and by the later one.
    assert stats.tokens_saved >= saved + 24 * 4
    assert engine.stats.joined_while_running == 1


def test_a_foreground_row_preempts_a_background_row_of_a_full_batch(tiny: LoadedModel) -> None:
    """One slot: a background row gives it up to a foreground row, then finishes its own answer.

    The background row leaves with the tokens it made, waits, and joins again with a prefill of
    its prompt and those tokens: its answer is the one it gets alone, token for token.
    """
    (slow, n_slow), (quick, n_quick) = prompts_and_lengths()[1], prompts_and_lengths()[2]
    engine = Engine(tiny)
    order: list[str] = []
    with engine.loaded.lock:
        back = engine.submit(
            CompletionRequest(prompt=" ".join(map(str, slow)), max_tokens=n_slow),
            Priority.BACKGROUND,
            threading.Event(),
            1,
        )
        for _ in range(5):
            engine.step()
        assert engine.running == 1 and not back.done.is_set()
        front = engine.submit(
            CompletionRequest(prompt=" ".join(map(str, quick)), max_tokens=n_quick),
            Priority.FOREGROUND,
            threading.Event(),
            1,
        )
        working = True
        while working:
            working = engine.step()
            for name, job in (("front", front), ("back", back)):
                if job.done.is_set() and name not in order:
                    order.append(name)
    assert order == ["front", "back"]
    assert engine.stats.preempted == 1
    assert text(back) == alone(tiny, slow, n_slow)
    assert text(front) == alone(tiny, quick, n_quick)


def test_a_backlog_of_scoring_jobs_shares_the_model_with_the_generations(
    tiny: LoadedModel,
) -> None:
    """A backlog of scoring jobs (the background aspect selections at the start of a run) shares
    the model with the generations step by step: the model's thread serves one pass of them,
    then a decode step, so a generation submitted before them is done by the time the last
    scoring job is.
    """
    engine = engine_for(tiny)  # the model's own engine, stepped by the model's thread
    (prompt, _), *_ = prompts_and_lengths()
    generation = engine.submit(
        CompletionRequest(prompt=" ".join(map(str, prompt)), max_tokens=3),
        Priority.FOREGROUND,
        threading.Event(),
        8,
    )
    scoring = CompletionRequest(prompt="5 6 7 8", max_tokens=1, top_logprobs=2)
    jobs = [tiny.scoring.add(scoring, Priority.BACKGROUND, threading.Event()) for _ in range(24)]
    score_waiting(tiny, jobs[-1], max_batch_size=8)  # the last of three passes of eight
    assert all(isinstance(job.result, GenerationResult) for job in jobs)
    assert generation.done.is_set() and text(generation) == alone(tiny, prompt, 3)


class Recorded:
    """The tiny model's forward, noting which thread runs each call."""

    def __init__(self, forward: Any) -> None:
        self._forward = forward
        self.threads: set[int] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.add(threading.get_ident())
        return self._forward(*args, **kwargs)


def test_all_torch_work_runs_on_the_model_thread(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generations, scoring passes and a static batch asked from several threads all run on the
    model's one thread (drpo/backends/model_thread.py: one OpenMP team per model), and every
    greedy answer is still the one it gets alone."""
    cases = prompts_and_lengths()[:4]
    expected = [alone(tiny, p, n) for p, n in cases]
    recorded = Recorded(tiny.model.forward)
    monkeypatch.setattr(tiny.model, "forward", recorded)
    engine = engine_for(tiny)
    thread = model_thread(tiny)
    jobs: list[EngineJob] = []
    scored: list[ScoringJob] = []
    static: list[list[GenerationResult | BaseException]] = []

    def generate(prompt: list[int], n: int) -> None:
        request = CompletionRequest(prompt=" ".join(map(str, prompt)), max_tokens=n)
        job = engine.submit(request, Priority.FOREGROUND, threading.Event(), 8)
        jobs.append(job)
        engine.run_until_done(job)

    def score() -> None:
        request = CompletionRequest(prompt="5 6 7 8", max_tokens=1, top_logprobs=2)
        job = tiny.scoring.add(request, Priority.BACKGROUND, threading.Event())
        scored.append(job)
        score_waiting(tiny, job, max_batch_size=8)

    def batch() -> None:
        (prompt, n) = cases[0]
        request = CompletionRequest(prompt=" ".join(map(str, prompt)), max_tokens=n)
        static.append(thread.call(generate_batch, tiny, [request], 8, [threading.Event()]))

    callers = [threading.Thread(target=generate, args=case) for case in cases]
    callers += [threading.Thread(target=score) for _ in range(3)]
    callers.append(threading.Thread(target=batch))
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    assert not any(caller.is_alive() for caller in callers)
    assert recorded.threads == {thread.ident}
    by_prompt = {job.request.prompt: text(job) for job in jobs}
    for (prompt, _), want in zip(cases, expected, strict=True):
        assert by_prompt[" ".join(map(str, prompt))] == want
    assert all(isinstance(job.result, GenerationResult) for job in scored)
    ((result,),) = static
    assert isinstance(result, GenerationResult) and result.choices[0].text == expected[0]


def test_an_unexpected_error_fails_the_engines_jobs_and_it_starts_again_empty(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a step must not leave callers waiting forever: every job the engine held gets
    the error, and the engine serves the next request."""
    engine = Engine(tiny)
    requests = [CompletionRequest(prompt=" ".join(map(str, p)), max_tokens=n) for p, n in
                prompts_and_lengths()[:2]]  # fmt: skip
    jobs = [engine.submit(r, 0, threading.Event(), 8) for r in requests]

    def broken(group: Any) -> None:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(engine, "_decode", broken)
        assert engine.work() is False
    assert all(isinstance(job.result, RuntimeError) for job in jobs)
    assert engine.running == 0 and engine.queued == 0
    (after,) = run(engine, requests[:1], steps_between=0)
    assert text(after) == alone(tiny, prompts_and_lengths()[0][0], prompts_and_lengths()[0][1])


def test_spare_layer_holds_what_a_dynamic_layer_holds() -> None:
    """Updates that fit in the spare columns and ones that grow the buffer, then rows dropped:
    the same keys and values as ``DynamicLayer`` (which concatenates)."""
    torch.manual_seed(3)
    spare, plain = SpareLayer(), DynamicLayer()
    for new in (5, 1, 1, SpareLayer.SPARE, 1, 3):
        keys, values = torch.randn(4, 2, new, 8), torch.randn(4, 2, new, 8)
        got = spare.update(keys, values)
        want = plain.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    rows = torch.tensor([0, 2])
    spare.batch_select_indices(rows)
    plain.batch_select_indices(rows)
    assert torch.equal(spare.keys, plain.keys) and torch.equal(spare.values, plain.values)
    keys, values = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    assert torch.equal(spare.update(keys, values)[0], plain.update(keys, values)[0])
    assert spare.get_seq_length() == plain.get_seq_length() == 5 + 1 + 1 + SpareLayer.SPARE + 5


def test_rows_get_their_tokens_alone_when_the_cache_buffer_grows_every_step(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No spare columns: every decode step grows the buffers (copies), rows join and leave."""
    monkeypatch.setattr(SpareLayer, "SPARE", 0)
    cases = prompts_and_lengths()
    requests = [CompletionRequest(prompt=" ".join(map(str, p)), max_tokens=n) for p, n in cases]
    jobs = run(Engine(tiny), requests, steps_between=2, max_batch_size=4)
    assert [text(job) for job in jobs] == [alone(tiny, p, n) for p, n in cases]
