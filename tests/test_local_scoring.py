"""The local model's scoring lane (issue 16): one-token verdicts never wait behind answers.

Against the real embedded model (one load per session, the shared ``local_backend``); no
timings are asserted, only orders of completion and numbers.
"""

from __future__ import annotations

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


async def test_scoring_lane_gives_the_batchers_numbers(
    local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = await local_backend.complete(VERDICT)
    monkeypatch.setenv("DRPO_LOCAL_ENGINE", "batcher")
    old = await local_backend.complete(VERDICT)
    assert lane.choices[0].text == old.choices[0].text
    assert lane.usage == old.usage
    (lane_lp,) = lane.choices[0].logprobs or ()
    (old_lp,) = old.choices[0].logprobs or ()
    assert [t.token for t in lane_lp.top] == [t.token for t in old_lp.top]
    for a, b in zip(lane_lp.top, old_lp.top, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=2e-2)


async def test_verdict_during_a_long_generation_finishes_before_it(
    local_backend: LocalBackend,
) -> None:
    order: list[str] = []
    loaded = local_backend.load()
    passes_before = loaded.scoring.passes

    async def generate() -> None:
        await local_backend.complete(LONG)
        order.append("generation")

    async def verdict() -> None:
        await model_busy(local_backend)
        await local_backend.complete(VERDICT)
        order.append("verdict")

    async with anyio.create_task_group() as tg:
        tg.start_soon(generate)
        tg.start_soon(verdict)
    assert order == ["verdict", "generation"]
    assert loaded.scoring.passes > passes_before


async def test_a_cancelled_verdict_leaves_the_lane(local_backend: LocalBackend) -> None:
    loaded = local_backend.load()
    async with anyio.create_task_group() as tg:
        tg.start_soon(local_backend.complete, LONG)
        await model_busy(local_backend)
        with anyio.move_on_after(0) as scope:
            await local_backend.complete(VERDICT)
        assert scope.cancelled_caught
    assert loaded.scoring.pending == 0
