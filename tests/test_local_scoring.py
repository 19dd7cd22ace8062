"""The local model's scoring lane (issue 16): one-token verdicts never wait behind answers.

Against the real embedded model (one load per session, the shared ``local_backend``); no
timings are asserted, only orders of completion and numbers.
"""

from __future__ import annotations

import threading

import anyio
import pytest

from drpo.backends.base import ChatMessage, CompletionRequest
from drpo.backends.local import LocalBackend

pytest_plugins = ("model_fixtures",)
pytestmark = [pytest.mark.model, pytest.mark.anyio]

VERDICT = CompletionRequest(
    messages=(
        ChatMessage(role="system", content="Rate the answer from 1 to 9. Reply with one digit."),
        ChatMessage(role="user", content="Q: What is 2+2? A: 4"),
    ),
    max_tokens=1,
    top_logprobs=5,
)
LONG = CompletionRequest(
    messages=(ChatMessage(role="user", content="Count from 1 to 300, one number per line."),),
    max_tokens=160,
)


async def model_busy(backend: LocalBackend) -> None:
    """Return once a generation holds the model (its lock is taken)."""
    loaded = backend.load()
    with anyio.fail_after(120):
        while True:
            if loaded.lock.locked():
                return
            await anyio.sleep(0.01)


async def test_scoring_lane_gives_a_generate_calls_numbers(local_backend: LocalBackend) -> None:
    """The lane's prefill gives what a one-token ``generate`` call gives (the path before issue
    16, when verdicts went through the static batcher): the same token, the same top-k."""
    from drpo.backends.local_model import _rows_of, encode_prompt, generate_rows

    lane = await local_backend.complete(VERDICT)
    loaded = local_backend.load()
    ids = encode_prompt(loaded, VERDICT)
    with loaded.lock:
        (old,) = generate_rows(loaded, _rows_of(0, VERDICT, ids, 1), [threading.Event()])
    assert lane.choices[0].text == old.choice.text
    assert lane.usage.prompt_tokens == len(ids)
    assert lane.usage.completion_tokens == old.completion_tokens == 1
    (lane_lp,) = lane.choices[0].logprobs or ()
    (old_lp,) = old.choice.logprobs or ()
    assert [t.token for t in lane_lp.top] == [t.token for t in old_lp.top]
    for a, b in zip(lane_lp.top, old_lp.top, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=2e-2)


async def test_verdict_during_a_long_generation_finishes_before_it(
    local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the static batcher (``DRPO_LOCAL_ENGINE=lane``: what models the continuous engine does
    not support take), a verdict is served between the steps of a running ``generate`` call.

    Once the verdict is in, the generation is cancelled: the rest of its 160 tokens would prove
    nothing more (tests/test_engine.py checks the same on the continuous engine).
    """
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "lane")
    order: list[str] = []
    loaded = local_backend.load()
    passes_before = loaded.scoring.passes

    async def generate() -> None:
        await local_backend.complete(LONG)
        order.append("generation")

    async with anyio.create_task_group() as tg:
        tg.start_soon(generate)
        await model_busy(local_backend)
        await local_backend.complete(VERDICT)
        order.append("verdict")
        tg.cancel_scope.cancel()
    assert order == ["verdict"]  # the generation had not ended when the verdict was in
    assert loaded.scoring.passes > passes_before


async def test_a_cancelled_verdict_leaves_the_lane(local_backend: LocalBackend) -> None:
    """A verdict cancelled while a generation holds the model is dropped at the next step."""
    loaded = local_backend.load()
    async with anyio.create_task_group() as tg:
        tg.start_soon(local_backend.complete, LONG)
        await model_busy(local_backend)
        with anyio.move_on_after(0) as scope:
            await local_backend.complete(VERDICT)
        assert scope.cancelled_caught
        with anyio.fail_after(120):
            while loaded.scoring.pending:  # noqa: ASYNC110  (changed by the worker thread)
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()  # the rest of the generation proves nothing more
    assert loaded.scoring.pending == 0
