"""One backend per model spec per process, shared by every agent and every search.

Sharing is what makes rate limits and batches work across searches: fifty searches that all
use ``openai:gpt-4o-mini`` go through one client and one limiter, and every search that uses
``local:smollm2`` feeds the same batcher. How each kind is built lives in
:mod:`drpo.backends.kinds`.
"""

from __future__ import annotations

from collections.abc import Mapping

from drpo.backends.base import Backend
from drpo.backends.kinds import build_backend, parse_model_spec
from drpo.backends.settings import KindSettings


class BackendRegistry:
    def __init__(self, endpoints: Mapping[str, KindSettings] | None = None) -> None:
        self._endpoints: dict[str, KindSettings] = {}
        self._backends: dict[str, Backend] = {}
        #: Backends by the spec text asked for: every agent call looks its model up, and parsing
        #: the spec each time was ~1% of a busy search's CPU.
        self._by_text: dict[str, Backend] = {}
        self.configure(endpoints or {})

    def configure(self, endpoints: Mapping[str, KindSettings]) -> None:
        """Add endpoint settings (from another search's config); first settings win."""
        for spec, settings in endpoints.items():
            self._endpoints.setdefault(str(parse_model_spec(spec)), settings)

    def settings(self, spec_text: str) -> KindSettings | None:
        """The ``[endpoints]`` settings configured for ``spec_text`` (None: the defaults)."""
        return self._endpoints.get(str(parse_model_spec(spec_text)))

    def get(self, spec_text: str) -> Backend:
        backend = self._by_text.get(spec_text)
        if backend is not None:
            return backend
        key = str(parse_model_spec(spec_text))
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = build_backend(key, self._endpoints.get(key))
        self._by_text[spec_text] = backend
        return backend

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        self._backends.clear()
        self._by_text.clear()
