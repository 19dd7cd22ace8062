"""Answer queries with an aligned prompt: the artifact's system prompt plus the top-k ICL
examples retrieved for each query (spec §1.3).

The framing defaults to the one the prompt was searched with (recorded in the artifact), which
removes the paper's train/inference mismatch of header and chat template (spec §9, item 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio

from drpo.agents.proposer import build_answer_request, clean_answer
from drpo.agents.retrieval import ICLRetriever
from drpo.backends.base import Backend
from drpo.backends.kinds import DEFAULT_MODEL
from drpo.backends.registry import BackendRegistry
from drpo.bus.messages import ICLExample
from drpo.jobs.artifact import AlignedPrompt

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class AlignedGenerator:
    def __init__(
        self,
        backend: Backend,
        system_prompt: str,
        examples: Sequence[ICLExample],
        *,
        framing: str = "raw",
        k: int = 3,
        max_tokens: int = 512,
        temperature: float = 0.0,
        registry: BackendRegistry | None = None,
    ) -> None:
        self.backend = backend
        self.system_prompt = system_prompt
        self.retriever = ICLRetriever(list(examples)) if examples and k else None
        self.framing = framing
        self.k = k
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._registry = registry

    @classmethod
    def from_artifact(
        cls,
        path: Path | None,
        *,
        model: str | None = None,
        k: int = 3,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> AlignedGenerator:
        """From an artifact file, or (no file) the unaligned default prompt with no examples."""
        registry = BackendRegistry()
        if path is None:
            backend = registry.get(model or DEFAULT_MODEL)
            return cls(
                backend,
                DEFAULT_SYSTEM_PROMPT,
                (),
                k=0,
                max_tokens=max_tokens,
                temperature=temperature,
                registry=registry,
            )
        artifact = AlignedPrompt.load(path)
        framing = str(artifact.settings.get("proposer", {}).get("framing", "raw"))
        backend = registry.get(model or artifact.base_model)
        return cls(
            backend,
            artifact.system_prompt,
            artifact.icl_examples,
            framing=framing,
            k=k,
            max_tokens=max_tokens,
            temperature=temperature,
            registry=registry,
        )

    async def answer(self, query: str) -> str:
        examples = await self.retriever.atop_k(query, self.k) if self.retriever else []
        request = build_answer_request(
            self.system_prompt,
            examples,
            query,
            framing=self.framing,  # type: ignore[arg-type]
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )
        completion = await self.backend.complete(request)
        return clean_answer(completion.text)

    async def answer_many(self, queries: Sequence[str]) -> list[str]:
        """All queries at once: the backend batches (local) or pipelines (API) them."""
        answers: list[str] = [""] * len(queries)

        async def one(index: int, query: str) -> None:
            answers[index] = await self.answer(query)

        async with anyio.create_task_group() as tg:
            for index, query in enumerate(queries):
                tg.start_soon(one, index, query)
        return answers

    async def aclose(self) -> None:
        if self._registry is not None:
            await self._registry.aclose()
