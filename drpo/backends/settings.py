"""Settings of one model endpoint, keyed by model spec under ``[endpoints]`` in a config file.

Each backend kind has its own settings model (see :mod:`drpo.backends.kinds`): an API endpoint
has rate limits, prices and the variable its key is read from; a local model has a device and
a dtype. A config names the kind in the key (``[endpoints."openai:gpt-4o"]``), so each entry is
checked against its own kind's settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from drpo.backends.ratelimit import DEFAULT_MAX_IN_FLIGHT

#: The HTTP clients an API endpoint's calls can go through (``drpo.backends.openai_http``):
#: drpo's own POST on aiohttp (the default: the least CPU per call), or the official SDK's.
HttpClientKind = Literal["aiohttp", "openai-sdk"]
DEFAULT_HTTP_CLIENT: HttpClientKind = "aiohttp"


class KindSettings(BaseModel):
    """What every kind's settings share: frozen, and unknown keys are errors (typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointSettings(KindSettings):
    """An OpenAI-compatible endpoint: limits, prices, the key's variable, what it honours."""

    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    #: Upper guard on calls in flight; the limiter derives the working cap from the rate
    #: limit and the observed latency (Little's law), see ``drpo.backends.ratelimit``.
    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1)
    #: The environment variable the API key is read from (never the key itself).
    api_key_env: str = "OPENAI_API_KEY"
    #: USD per million tokens.
    input_price: float | None = Field(default=None, ge=0)
    cached_input_price: float | None = Field(default=None, ge=0)
    output_price: float | None = Field(default=None, ge=0)
    #: Whether the server returns ``n`` choices per request / token logprobs; None: learned
    #: from its first replies (``transformers serve`` honours neither).
    honours_n: bool | None = None
    honours_logprobs: bool | None = None
    #: Who makes the HTTP calls: "aiohttp" (drpo's own POST) or "openai-sdk" (the SDK's client,
    #: end to end); drpo classifies the replies of both alike (``drpo.backends.openai_errors``).
    http_client: HttpClientKind = DEFAULT_HTTP_CLIENT


class LocalSettings(KindSettings):
    """A local transformers model: where it runs and in which precision."""

    #: "cpu", "cuda", "cuda:1", ...; None: the GPU when there is one, else the CPU.
    device: str | None = None
    #: "float32", "bfloat16", ...; None: the measured default for the device.
    dtype: str | None = None
    #: Sequences generated together in one batch (and scoring calls in one pass).
    max_batch_size: int = Field(default=8, ge=1)
    #: Background calls (aspect selections asked ahead of need) given to this model at once;
    #: the rest wait, not yet made, until one ends or a verdict needs them. None: max_batch_size
    #: (one scoring pass). API endpoints have no such window: every call is made at once.
    background_window: int | None = Field(default=None, ge=1)
