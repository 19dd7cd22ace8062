"""Calls adapt to what an endpoint honours: ``n`` fanned out, missing logprobs stop the run."""

from __future__ import annotations

import pytest

from drpo.agents.capabilities import Capabilities, LogprobsUnsupportedError, complete
from drpo.backends.base import (
    ChatMessage,
    Choice,
    Completion,
    CompletionRequest,
    TokenLogprob,
    Usage,
)

pytestmark = pytest.mark.anyio


class Server:
    """A stand-in endpoint that honours ``n`` and logprobs or not, like the real servers."""

    def __init__(self, *, honours_n: bool, honours_logprobs: bool = True) -> None:
        self.honours_n = honours_n
        self.honours_logprobs = honours_logprobs
        self.requests: list[CompletionRequest] = []

    async def __call__(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        count = request.n if self.honours_n else 1
        logprobs = None
        if request.top_logprobs is not None and self.honours_logprobs:
            logprobs = (TokenLogprob(token="4", logprob=-0.1),)
        choices = tuple(
            Choice(text=f"seed {request.seed} sample {i}", logprobs=logprobs) for i in range(count)
        )
        return Completion(
            choices=choices, model="m", usage=Usage(prompt_tokens=10, completion_tokens=count)
        )


def _ask(**settings: object) -> CompletionRequest:
    return CompletionRequest(messages=(ChatMessage(role="user", content="hi"),), **settings)


async def test_n_is_one_request_where_the_server_honours_it() -> None:
    server, honours = Server(honours_n=True), Capabilities()
    result = await complete(server, _ask(n=3, seed=0, temperature=0.7), honours, "m at x")
    assert len(server.requests) == 1 and len(result.choices) == 3
    assert honours.n is True


async def test_missing_choices_are_completed_with_single_requests_and_learned() -> None:
    server, honours = Server(honours_n=False), Capabilities()
    result = await complete(server, _ask(n=3, seed=0, temperature=0.7), honours, "m at x")
    assert [c.text for c in result.choices] == [
        "seed 0 sample 0",
        "seed 1 sample 0",
        "seed 2 sample 0",
    ]
    assert [(r.n, r.seed) for r in server.requests] == [(3, 0), (1, 1), (1, 2)]
    assert result.usage.prompt_tokens == 30 and result.usage.completion_tokens == 3
    assert honours.n is False
    # once known (or declared in the settings), the n samples are asked for one by one
    server.requests.clear()
    again = await complete(server, _ask(n=3, seed=0, temperature=0.7), honours, "m at x")
    assert [(r.n, r.seed) for r in server.requests] == [(1, 0), (1, 1), (1, 2)]
    assert len(again.choices) == 3


async def test_missing_logprobs_stop_with_the_fix_named() -> None:
    server, honours = Server(honours_n=True, honours_logprobs=False), Capabilities()
    request = _ask(max_tokens=1, top_logprobs=20)
    with pytest.raises(LogprobsUnsupportedError, match=r'critic.mode = "json"'):
        await complete(server, request, honours, "m at http://127.0.0.1:8000/v1")
    assert honours.logprobs is False and len(server.requests) == 1
    # known now: the next such call is refused before it is sent (and paid for)
    with pytest.raises(LogprobsUnsupportedError):
        await complete(server, request, honours, "m at x")
    assert len(server.requests) == 1
    plain = await complete(server, _ask(), honours, "m at x")  # other calls are unaffected
    assert plain.text == "seed None sample 0"


async def test_logprobs_returned_are_noted() -> None:
    server, honours = Server(honours_n=True), Capabilities()
    result = await complete(server, _ask(max_tokens=1, top_logprobs=5), honours, "m at x")
    assert result.choices[0].logprobs and honours.logprobs is True


async def test_greedy_samples_are_one_request_repeated() -> None:
    server, honours = Server(honours_n=True), Capabilities()
    result = await complete(server, _ask(n=3, temperature=0.0), honours, "m at x")
    assert [r.n for r in server.requests] == [1]  # vLLM refuses n > 1 at temperature 0
    assert [c.text for c in result.choices] == ["seed None sample 0"] * 3
