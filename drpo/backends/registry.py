"""One backend per model spec per process, shared by every agent and every search.

Sharing is what makes rate limits and batches work across searches: fifty searches that all
use ``openai:gpt-4o-mini`` go through one client and one limiter, and every search that uses
``local:smollm2`` feeds the same batcher.
"""

from __future__ import annotations

from collections.abc import Mapping

from drpo.backends.base import Backend
from drpo.backends.settings import EndpointSettings
from drpo.backends.spec import ModelSpec, parse_model_spec


class BackendRegistry:
    def __init__(self, endpoints: Mapping[str, EndpointSettings] | None = None) -> None:
        self._endpoints = dict(endpoints or {})
        self._backends: dict[str, Backend] = {}

    def configure(self, endpoints: Mapping[str, EndpointSettings]) -> None:
        """Add endpoint settings (from another search's config); first settings win."""
        for spec, settings in endpoints.items():
            self._endpoints.setdefault(spec, settings)

    def get(self, spec_text: str) -> Backend:
        spec = parse_model_spec(spec_text)
        key = str(spec)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = self._build(spec)
        return backend

    def _build(self, spec: ModelSpec) -> Backend:
        settings = self._endpoints.get(str(spec)) or self._endpoints.get(spec.model)
        settings = settings or EndpointSettings()
        if spec.kind == "local":
            from drpo.backends.local import LocalBackend

            return LocalBackend(spec.model)
        from drpo.backends.openai_api import OpenAIBackend
        from drpo.backends.pricing import PriceTable
        from drpo.backends.ratelimit import RateLimits

        prices = None
        if settings.input_price is not None or settings.output_price is not None:
            prices = PriceTable.from_dict(
                {
                    spec.model: {
                        "input": settings.input_price or 0.0,
                        "cached_input": settings.cached_input_price
                        if settings.cached_input_price is not None
                        else settings.input_price or 0.0,
                        "output": settings.output_price or 0.0,
                    }
                }
            )
        return OpenAIBackend(
            spec.model,
            base_url=spec.base_url,
            api_key_env=settings.api_key_env,
            limits=RateLimits(
                rpm=settings.rpm, tpm=settings.tpm, max_in_flight=settings.max_in_flight
            ),
            prices=prices,
        )

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        self._backends.clear()
