"""Settings of one model endpoint: limits, prices and the variable its API key is read from.

They are keyed by model spec under ``[endpoints]`` in a config file; the backend kinds read them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EndpointSettings(BaseModel):
    """Limits and prices of one model endpoint (keyed by model spec in ``[endpoints]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: float | None = None
    tpm: float | None = None
    max_in_flight: int = 64
    api_key_env: str = "OPENAI_API_KEY"
    #: USD per million tokens.
    input_price: float | None = None
    cached_input_price: float | None = None
    output_price: float | None = None
