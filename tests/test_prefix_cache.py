"""Shared prompt prefixes computed once (issue 16): reuse gives a cold prefill's numbers.

Against the real embedded model in float32 (the session's copy on a CPU without native bf16;
elsewhere a float32 copy, loaded once per session). Each check compares the top-k logprobs of
the last position with those of a cold, unbatched forward pass of the whole prompt.
"""

from __future__ import annotations

import threading

import pytest
import torch

from drpo.backends.base import ChatMessage, CompletionRequest
from drpo.backends.local import LocalBackend
from drpo.backends.local_model import (
    GenerationResult,
    LoadedModel,
    encode_prompt,
    score_waiting,
)
from drpo.backends.prefix_cache import PrefixCache, last_logits

pytest_plugins = ("model_fixtures",)
pytestmark = pytest.mark.model

TOP_K = 5
#: float32 logprobs of one prompt computed in different batch shapes differ by float noise only.
TOLERANCE = 1e-3

QUESTION = (
    "Here is a question and an answer.\n\nQuestion: How do I keep basil fresh for a week?\n"
    "Answer: Trim the stems, stand them in a glass of water at room temperature and cover the "
    "leaves loosely with a bag.\n\nScale for "
)
ASPECTS = (
    "clarity (the answer should be easy to follow):\n1 confusing\n5 clear\n\nScore:",
    "accuracy (the answer should be correct):\n1 wrong\n2 mostly wrong\n3 mixed\n4 mostly "
    "right\n5 right, with nothing missing that a cook would need\n\nScore:",
    "brevity:\n1 long\n5 short\n\nScore:",
)
OTHER_QUESTION = (
    "Here is a question and an answer.\n\nQuestion: Why do cats purr when they are content?\n"
    "Answer: Purring comes from the muscles of the larynx and is a sign of comfort, though "
    "cats also purr when stressed.\n\nScale for "
)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LocalBackend("smollm2", dtype="float32").load()


def prompt(loaded: LoadedModel, text: str) -> list[int]:
    request = CompletionRequest(
        messages=(ChatMessage(role="user", content=text),), max_tokens=1, top_logprobs=TOP_K
    )
    return encode_prompt(loaded, request)


def cold(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The last position's logprobs of one prompt alone, with no cache at all."""
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1)


def assert_same_top(loaded: LoadedModel, prompts: list[list[int]], logits: torch.Tensor) -> None:
    for ids, row in zip(prompts, logits, strict=True):
        expected = cold(loaded, ids).topk(TOP_K)
        got = torch.log_softmax(row, dim=-1).topk(TOP_K)
        assert got.indices.tolist() == expected.indices.tolist()
        assert torch.allclose(got.values, expected.values, atol=TOLERANCE, rtol=0)


def test_shared_prefix_is_computed_once_and_gives_cold_logprobs(loaded: LoadedModel) -> None:
    prompts = [prompt(loaded, QUESTION + aspect) for aspect in ASPECTS]
    prompts.append(prompt(loaded, "Is the sky green? Answer yes or no.\nAnswer:"))
    assert len({len(ids) for ids in prompts}) == len(prompts)  # different suffix lengths
    cache = PrefixCache(budget_bytes=64 * 2**20)

    first = last_logits(loaded.model, loaded.pad_id, prompts, cache)
    assert_same_top(loaded, prompts, first)
    assert len(cache) == 1  # the question and answer the three verdicts share, stored once
    # The unrelated prompt shares only the chat template's opening with them: a hit if that
    # opening is long enough to be worth reusing.
    opening = next(
        i for i, (a, b) in enumerate(zip(prompts[0], prompts[-1], strict=False)) if a != b
    )
    assert cache.stats.hits == 3 + (opening >= cache.min_tokens)
    assert cache.stats.tokens_saved > 0

    saved = cache.stats.tokens_saved
    again = last_logits(loaded.model, loaded.pad_id, prompts[:2], cache)
    assert_same_top(loaded, prompts[:2], again)
    assert cache.stats.stored == 1  # nothing new to store: the prefix was found
    assert cache.stats.tokens_saved > saved


def test_reuse_stays_exact_across_an_eviction(loaded: LoadedModel) -> None:
    basil = [prompt(loaded, QUESTION + aspect) for aspect in ASPECTS[:2]]
    cats = [prompt(loaded, OTHER_QUESTION + aspect) for aspect in ASPECTS[:2]]
    probe = PrefixCache(budget_bytes=1 << 40)
    last_logits(loaded.model, loaded.pad_id, basil, probe)
    one_entry = probe.nbytes
    cache = PrefixCache(budget_bytes=int(one_entry * 1.5))  # room for one shared prefix

    last_logits(loaded.model, loaded.pad_id, basil, cache)
    assert len(cache) == 1 and cache.nbytes <= cache.budget_bytes
    assert_same_top(loaded, cats, last_logits(loaded.model, loaded.pad_id, cats, cache))
    assert cache.stats.evictions == 1 and len(cache) == 1  # the basil prefix made room
    hits = cache.stats.hits
    # Only the chat template and the judge's opening survive in the cats entry: basil rows
    # reuse that part, recompute their own question, and still get the cold numbers.
    assert_same_top(loaded, basil, last_logits(loaded.model, loaded.pad_id, basil, cache))
    assert cache.stats.hits > hits
    assert cache.nbytes <= cache.budget_bytes


def test_the_scoring_lane_reuses_prefixes_with_the_same_numbers(loaded: LoadedModel) -> None:
    requests = [
        CompletionRequest(
            messages=(ChatMessage(role="user", content=QUESTION + aspect),),
            max_tokens=1,
            top_logprobs=TOP_K,
        )
        for aspect in ASPECTS
    ]
    expected = [
        cold(loaded, encode_prompt(loaded, r)).topk(TOP_K).values.tolist() for r in requests
    ]
    stats = loaded.prefix_cache.stats

    def score_all() -> None:
        """All three waiting in the lane at once, so one pass serves them together."""
        jobs = [loaded.scoring.add(r, 0, threading.Event()) for r in requests]
        for job in jobs:
            score_waiting(loaded, job, max_batch_size=8)
        for job, values in zip(jobs, expected, strict=True):
            assert isinstance(job.result, GenerationResult)
            (first,) = job.result.choices[0].logprobs or ()
            assert [t.logprob for t in first.top] == pytest.approx(values, abs=TOLERANCE)

    lookups, hits = stats.lookups, stats.hits
    score_all()
    assert stats.lookups == lookups + len(requests)
    hits = stats.hits
    score_all()  # the same verdicts again: their shared prefix is stored now
    assert stats.hits == hits + len(requests)
