"""What each endpoint honours, and how a call adapts when it does not.

Servers differ: OpenAI returns ``n`` choices and token logprobs; ``transformers serve`` ignores
both and answers one choice without logprobs; a local model does everything. An endpoint's
:class:`Capabilities` come from its ``[endpoints]`` settings when declared there, else they are
learned from its first replies. :func:`complete` is the call every agent makes through:

* a request for ``n`` samples that comes back with fewer is completed with extra ``n=1``
  requests, with seeds after the request's own, all at the same place in the run's journal, so a
  resumed run replays exactly the same requests;
* when the endpoint is declared not to honour ``n``, the ``n`` samples are asked for as ``n``
  single requests from the start (the same requests, so the same journal entries);
* a greedy request (temperature 0) for ``n`` samples is sent with ``n=1`` and its one choice
  repeated: greedy samples are identical, and vLLM refuses ``n > 1`` at temperature 0;
* a request for token probabilities (the critic's ``logprobs`` mode) that comes back without any
  stops the run with an error that names the fix (``critic.mode = "json"``) instead of scoring
  every answer as unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from drpo.backends.base import (
    Call,
    Completion,
    CompletionRequest,
    PermanentBackendError,
    Usage,
)


class LogprobsUnsupportedError(PermanentBackendError):
    """The endpoint returns no token probabilities, which the request needs."""


@dataclass
class Capabilities:
    """Whether an endpoint honours ``n`` and logprobs: True, False, or None (not known yet)."""

    n: bool | None = None
    logprobs: bool | None = None


async def complete(
    call: Call, request: CompletionRequest, capabilities: Capabilities, where: str
) -> Completion:
    """``call(request)``, adapted to what the endpoint ``where`` honours (module docstring)."""
    if request.top_logprobs is not None and capabilities.logprobs is False:
        raise LogprobsUnsupportedError(_no_logprobs(where))
    if request.n > 1 and request.temperature == 0:
        single = await complete(call, request.model_copy(update={"n": 1}), capabilities, where)
        return single.model_copy(update={"choices": single.choices[:1] * request.n})
    if request.n > 1 and capabilities.n is False:
        return await _fan_out(call, request, ())
    completion = await call(request)
    if request.top_logprobs is not None and completion.choices:
        returned = any(choice.logprobs for choice in completion.choices)
        if not returned:
            capabilities.logprobs = False
            raise LogprobsUnsupportedError(_no_logprobs(where))
        capabilities.logprobs = True
    if request.n > 1:
        honoured = len(completion.choices) >= request.n
        capabilities.n = honoured if capabilities.n is None else capabilities.n and honoured
        if not honoured:
            return await _fan_out(call, request, (completion,))
    return completion


async def _fan_out(
    call: Call, request: CompletionRequest, first: tuple[Completion, ...]
) -> Completion:
    """The ``n`` samples of ``request``: the choices already in ``first``, then one ``n=1``
    request per missing sample, sample i seeded ``seed + i`` (distinct requests, so distinct
    journal entries, asked concurrently and merged in sample order)."""
    have = [choice for completion in first for choice in completion.choices][: request.n]
    missing = range(len(have), request.n)
    base_seed = request.seed or 0
    extra: list[Completion | None] = [None] * len(missing)

    async def sample(slot: int, index: int) -> None:
        single = request.model_copy(update={"n": 1, "seed": base_seed + index})
        extra[slot] = await call(single)

    async with anyio.create_task_group() as tg:
        for slot, index in enumerate(missing):
            tg.start_soon(sample, slot, index)
    parts = [*first, *(c for c in extra if c is not None)]
    choices = have + [c.choices[0] for c in extra if c is not None and c.choices]
    return Completion(
        choices=tuple(choices),
        model=parts[0].model,
        usage=Usage(
            prompt_tokens=sum(p.usage.prompt_tokens for p in parts),
            completion_tokens=sum(p.usage.completion_tokens for p in parts),
            cached_tokens=sum(p.usage.cached_tokens for p in parts),
        ),
        latency_s=max(p.latency_s for p in parts),
        attempts=sum(p.attempts for p in parts),
        cost_usd=sum(p.cost_usd for p in parts),
    )


def _no_logprobs(where: str) -> str:
    return (
        f"{where} returns no token probabilities, which the critic's logprobs mode needs: "
        'set critic.mode = "json" (--judge-mode json), or use a server that returns logprobs '
        "(OpenAI, vLLM, the local backend)"
    )
