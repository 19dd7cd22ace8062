"""The one interface every model backend implements: ``complete(request) -> completion``.

Requests and completions are frozen pydantic models so that they can be hashed into the call
journal's content key, stored as JSON, and replayed byte for byte on resume.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drpo.errors import UserError

#: Characters per token, the one rule by which drpo estimates a text's tokens before any model
#: has counted them: a request's tokens for the rate limits, a run's cost before it starts.
CHARS_PER_TOKEN = 4


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatMessage(_Frozen):
    role: Literal["system", "user", "assistant"]
    content: str


class CompletionRequest(_Frozen):
    """One model call: chat messages *or* a raw prompt, plus sampling settings."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    n: int = Field(default=1, ge=1)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _exactly_one_input(self) -> CompletionRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a CompletionRequest needs exactly one of `messages` or `prompt`")
        return self

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class TopLogprob(_Frozen):
    token: str
    logprob: float


class TokenLogprob(_Frozen):
    """A generated token, its log-probability, and the most likely alternatives at its position."""

    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


class Choice(_Frozen):
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


class Usage(_Frozen):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Completion(_Frozen):
    """What a backend returns. ``attempts`` counts retries; ``cost_usd`` comes from a price table."""

    choices: tuple[Choice, ...]
    model: str
    usage: Usage = Usage()
    latency_s: float = 0.0
    attempts: int = 1
    cost_usd: float = 0.0

    @property
    def text(self) -> str:
        """The first choice's text, the common case of n=1."""
        return self.choices[0].text


class BackendError(UserError):
    """Base class of every error a backend raises."""


class PermanentBackendError(BackendError):
    """A call that can never succeed (bad key, unknown model, request too large, no quota).

    Raised at once, never retried, and it carries a message that says how to fix it.
    """


class TransientBackendError(BackendError):
    """A call that failed after every allowed retry (timeouts, 429, 5xx, dropped connections)."""


@runtime_checkable
class Backend(Protocol):
    """A model you can call. ``name`` is the backend kind ("openai", "local"); ``model`` its model.

    A backend that serves a bounded number of calls at once may also declare it as an int
    ``capacity`` (a local model: its ``max_batch_size``); the agents then hand it background
    work that many calls at a time (:mod:`drpo.agents.window`). Without one, every call is
    made at once (API backends: their rate limiter does the pacing).
    """

    name: str
    model: str

    @property
    def endpoint(self) -> str:
        """Where the model lives (base URL, or a local path); part of the journal's content key."""
        ...

    async def complete(self, request: CompletionRequest) -> Completion: ...

    async def aclose(self) -> None: ...


#: One model call, ``request -> completion``: a backend's ``complete``, or (in the agents) a
#: call already bound to a model, role, run and journal. Every agent's logic asks through one.
Call = Callable[[CompletionRequest], Awaitable[Completion]]
