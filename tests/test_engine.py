"""The continuous engine (issue 16, item 2): rows join and leave a running batch step by step.

Against the real embedded model in float32 (the session's model where float32 is the default,
as on AVX2 CPUs; a second copy elsewhere), with ``DRPO_LOCAL_ENGINE=engine``. Waits are on
structural states (the engine's step counter, its running batch), never on times, and no
timings are asserted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import anyio
import pytest

from drpo.backends.base import ChatMessage, Completion, CompletionRequest
from drpo.backends.engine import EngineStats, engine_for
from drpo.backends.local import LocalBackend
from drpo.backends.priority import background

pytest_plugins = ("model_fixtures",)
pytestmark = [pytest.mark.model, pytest.mark.anyio]

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "How do I bake bread?",
    "Tell me a joke about cats.",
)
#: A prompt whose greedy answer runs for hundreds of tokens.
LONG = "Count from 1 to 1000, separated by commas."
VERDICT = CompletionRequest(
    messages=(
        ChatMessage(role="system", content="Rate the answer from 1 to 9. Reply with one digit."),
        ChatMessage(role="user", content="Q: What is 2+2? A: 4"),
    ),
    max_tokens=1,
    top_logprobs=5,
)


def chat(question: str, **settings: object) -> CompletionRequest:
    return CompletionRequest(messages=(ChatMessage(role="user", content=question),), **settings)


@pytest.fixture
def engine_backend(local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> LocalBackend:
    """A float32 backend (the session's model where that is the default) on the engine."""
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "engine")
    backend = LocalBackend("smollm2", max_batch_size=8, dtype="float32")
    backend.load()
    return backend


async def wait_until(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Poll ``condition()`` (a structural state, not a time) until it holds."""
    with anyio.fail_after(timeout_s):
        # Polling on purpose: the states we wait for change on worker threads.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)


def since(backend: LocalBackend, before: EngineStats) -> dict[str, int]:
    """What each counter of the engine gained since ``before``."""
    now = backend.engine_stats
    return {f.name: getattr(now, f.name) - getattr(before, f.name) for f in dataclasses.fields(now)}


def snapshot(backend: LocalBackend) -> EngineStats:
    return dataclasses.replace(backend.engine_stats)


async def test_greedy_rows_joining_mid_generation_equal_one_by_one(
    engine_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that join a running batch at different steps get their one-by-one tokens exactly.

    Each request starts two engine steps after the previous one, so every row but the first
    joins a batch mid-generation (its cache merged with left padding) and rows of different
    lengths leave at different steps: a position or padding bug would change the tokens.
    """
    requests = [chat(q, max_tokens=6 + 4 * i, top_logprobs=2) for i, q in enumerate(QUESTIONS)]
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "lane")  # one by one through a plain generate call
    alone = [await engine_backend.complete(r) for r in requests]
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "engine")
    before = snapshot(engine_backend)
    together: list[Completion | None] = [None] * len(requests)

    async def call(i: int) -> None:
        together[i] = await engine_backend.complete(requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            steps = engine_backend.engine_stats.steps
            tg.start_soon(call, i)
            if i + 1 < len(requests):
                await wait_until(lambda s=steps: engine_backend.engine_stats.steps >= s + 2)
    gained = since(engine_backend, before)
    assert gained["joined"] == len(requests)
    assert gained["joined_while_running"] >= 1 and gained["left_while_running"] >= 1
    for one, other in zip(alone, together, strict=True):
        assert other is not None
        assert other.text == one.text
        assert other.usage == one.usage
        assert other.choices[0].finish_reason == one.choices[0].finish_reason
        for a, b in zip(
            one.choices[0].logprobs or (), other.choices[0].logprobs or (), strict=True
        ):
            assert a.token == b.token and [t.token for t in a.top] == [t.token for t in b.top]
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    assert len({c.text for c in together if c is not None}) == len(QUESTIONS)


async def test_answers_sharing_a_system_prompt_reuse_its_prefix_and_equal_one_by_one(
    engine_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A level's answers share the candidate system prompt: on the real model (float32, where
    the engine reuses prefixes for generation), two answers that join in one pass store it, a
    third that joins later finds it stored, and each still gets its one-by-one text."""
    system = (
        "You are a careful assistant. Answer briefly and plainly, in one or two sentences, "
        "and never make anything up."
    )
    requests = [
        CompletionRequest(
            messages=(
                ChatMessage(role="system", content=system),
                ChatMessage(role="user", content=q),
            ),
            max_tokens=8,
        )
        for q in QUESTIONS[:3]
    ]
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "lane")  # one by one through a plain generate call
    alone = [await engine_backend.complete(r) for r in requests]
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "engine")
    loaded = engine_backend.load()
    loaded.prefix_cache.clear()
    stats = loaded.prefix_cache.stats
    together: list[Completion | None] = [None] * len(requests)

    async def call(i: int) -> None:
        together[i] = await engine_backend.complete(requests[i])

    async with anyio.create_task_group() as tg:
        loaded.lock.acquire()  # held until both first requests wait: they join in one pass
        try:
            for i in range(2):
                tg.start_soon(call, i)
            await wait_until(lambda: engine_for(loaded).queued == 2)
        finally:
            loaded.lock.release()
        await wait_until(lambda: together[0] is not None and together[1] is not None)
        stored, saved, hits = stats.stored, stats.tokens_saved, stats.hits
        tg.start_soon(call, 2)
    assert stored >= 1 and saved > 0  # the shared opening, computed once for both
    assert stats.hits > hits and stats.tokens_saved > saved  # and found by the later answer
    for one, other in zip(alone, together, strict=True):
        assert other is not None
        assert other.text == one.text
        assert other.choices[0].finish_reason == one.choices[0].finish_reason


async def test_a_row_that_finishes_leaves_and_a_new_request_takes_its_place(
    local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots: a short answer leaves early, a later request joins while the long one runs."""
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "engine")
    backend = LocalBackend("smollm2", max_batch_size=2, dtype="float32")
    backend.load()
    before = snapshot(backend)
    order: list[str] = []

    async def call(name: str, request: CompletionRequest) -> None:
        await backend.complete(request)
        order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "long", chat(LONG, max_tokens=48))
        tg.start_soon(call, "short", chat("What is 2+2?", max_tokens=4))
        await wait_until(lambda: order == ["short"])
        tg.start_soon(call, "later", chat("Name a color.", max_tokens=4))
    assert order == ["short", "later", "long"]
    gained = since(backend, before)
    assert gained["joined"] == 3
    assert gained["joined_while_running"] >= 1  # "later" joined the long row's batch
    assert gained["left_while_running"] == 2  # "short" and "later" left it
    assert backend.engine.running == 0


async def test_a_verdict_during_a_long_generation_finishes_before_it(
    engine_backend: LocalBackend,
) -> None:
    before = snapshot(engine_backend)
    order: list[str] = []

    async def generate() -> None:
        await engine_backend.complete(chat(LONG, max_tokens=120))
        order.append("generation")

    async with anyio.create_task_group() as tg:
        tg.start_soon(generate)
        await wait_until(lambda: engine_backend.engine.running == 1)
        await engine_backend.complete(VERDICT)
        order.append("verdict")
        # The rest of the generation would prove nothing more: it leaves at the next step.
        tg.cancel_scope.cancel()
    assert order == ["verdict"]  # the generation had not ended when the verdict was in
    assert since(engine_backend, before)["scoring_between_steps"] >= 1


async def test_seeded_samples_are_the_same_whatever_shares_their_batch(
    engine_backend: LocalBackend,
) -> None:
    seeded = chat("Write a haiku about rain.", max_tokens=16, temperature=1.0, seed=7, n=2)
    alone = await engine_backend.complete(seeded)
    results: dict[str, Completion] = {}

    async def call(name: str, request: CompletionRequest) -> None:
        results[name] = await engine_backend.complete(request)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "long", chat(LONG, max_tokens=40))
        await wait_until(lambda: engine_backend.engine.running == 1)
        other = chat("Describe the sea.", max_tokens=24, temperature=0.8, top_p=0.9, seed=3)
        tg.start_soon(call, "other", other)
        steps = engine_backend.engine_stats.steps
        await wait_until(lambda: engine_backend.engine_stats.steps >= steps + 3)
        tg.start_soon(call, "seeded", seeded)
    assert [c.text for c in results["seeded"].choices] == [c.text for c in alone.choices]
    assert alone.choices[0].text != alone.choices[1].text  # two samples, really sampled


async def test_foreground_rows_take_a_free_slot_before_older_background_rows(
    local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "engine")
    backend = LocalBackend("smollm2", max_batch_size=1, dtype="float32")
    backend.load()
    order: list[str] = []

    async def call(name: str, request: CompletionRequest) -> None:
        await backend.complete(request)
        order.append(name)

    async def later() -> None:
        with background():
            await call("background", chat("Name a fruit.", max_tokens=3))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "first", chat(LONG, max_tokens=40))
        await wait_until(lambda: backend.engine.running == 1)
        tg.start_soon(later)
        await wait_until(lambda: backend.engine.queued == 1)
        tg.start_soon(call, "foreground", chat("Name a tree.", max_tokens=3))
        await wait_until(lambda: backend.engine.queued == 2)
    assert order == ["first", "foreground", "background"]


async def test_a_cancelled_row_leaves_within_a_step_and_the_other_gets_its_whole_answer(
    engine_backend: LocalBackend,
) -> None:
    """Cancel a 400-token row mid-generation: it leaves at the next step, the model is free once
    the other (48 tokens) is done, and that one's answer is complete."""
    loaded = engine_backend.load()
    before = snapshot(engine_backend)
    doomed = anyio.CancelScope()
    returned = anyio.Event()
    results: dict[str, Completion] = {}

    async def cancelled() -> None:
        with doomed:
            results["cancelled"] = await engine_backend.complete(chat(LONG, max_tokens=400))
        returned.set()

    async def kept() -> None:
        results["kept"] = await engine_backend.complete(chat(LONG, max_tokens=48))

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled)
        tg.start_soon(kept)
        await wait_until(lambda: engine_backend.engine.running == 2)
        steps = engine_backend.engine_stats.steps
        await wait_until(lambda: engine_backend.engine_stats.steps >= steps + 4)
        doomed.cancel()
        with anyio.fail_after(60):
            await returned.wait()
        at_cancel = engine_backend.engine_stats.steps
        await wait_until(lambda: engine_backend.engine.running <= 1)
        assert engine_backend.engine_stats.steps <= at_cancel + 1  # left within one step
    assert set(results) == {"kept"}
    answer = results["kept"]
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 48
    assert since(engine_backend, before)["cancelled_rows"] == 1
    await wait_until(lambda: not loaded.lock.locked())
    assert engine_backend.engine.running == 0
    after = await engine_backend.complete(chat("What is 2+2?", max_tokens=4))
    assert after.text


async def test_cancelling_the_only_row_frees_the_model(engine_backend: LocalBackend) -> None:
    loaded = engine_backend.load()
    scope = anyio.CancelScope()
    returned = anyio.Event()

    async def long_call() -> None:
        with scope:
            await engine_backend.complete(chat(LONG, max_tokens=400))
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(long_call)
        await wait_until(lambda: engine_backend.engine.running == 1)
        steps = engine_backend.engine_stats.steps
        await wait_until(lambda: engine_backend.engine_stats.steps >= steps + 3)
        scope.cancel()
        with anyio.fail_after(60):
            await returned.wait()
    await wait_until(lambda: not loaded.lock.locked() and engine_backend.engine.running == 0)
