"""The LLM-backed agents as bus services: proposer, critic and editor.

Each agent is a handler on one topic. It reads the request's run id, binds a ``call`` function
to that run's journal (so every model call is recorded before it is used, and replayed on
resume), to the model named in the request, and to its role, then runs the agent's logic from
:mod:`drpo.agents.proposer`, :mod:`drpo.agents.critic` or :mod:`drpo.agents.editor`.

One runtime serves every search of the process: the searches differ only by run id, so they
share backends, rate limits and batches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import anyio
from anyio.abc import TaskGroup

from drpo.agents import critic, editor, proposer, topics
from drpo.agents.aspects import AspectCatalogue
from drpo.agents.prompts import PROMPTS_VERSION
from drpo.backends.base import Completion, CompletionRequest
from drpo.backends.registry import BackendRegistry
from drpo.bus import Bus, Envelope
from drpo.bus.messages import (
    Answer,
    AnswerRewritten,
    AspectsSelected,
    EditAnswer,
    EditPrompt,
    Judge,
    Judged,
    PromptCandidates,
    ProposeAnswer,
    SelectAspects,
)
from drpo.runs.journal import JournaledCaller
from drpo.runs.store import RunStore, query_hash

CallFn = Callable[[CompletionRequest], Awaitable[Completion]]


@dataclass
class RunContext:
    """What the agents need to know about one run."""

    run_id: str
    journal: JournaledCaller
    catalogue: AspectCatalogue


class UnknownRunError(LookupError):
    """A request for a run the runtime was not told about (a bug in the caller)."""


class AgentRuntime:
    def __init__(self, bus: Bus, registry: BackendRegistry, store: RunStore) -> None:
        self.bus = bus
        self.registry = registry
        self.store = store
        self._runs: dict[str, RunContext] = {}
        bus.declare(topics.EVENTS)

    # ------------------------------------------------------------------ runs

    def attach(self, context: RunContext) -> None:
        self._runs[context.run_id] = context

    def detach(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def _context(self, envelope: Envelope) -> RunContext:
        try:
            return self._runs[envelope.run_id or ""]
        except KeyError:
            raise UnknownRunError(f"no run {envelope.run_id!r} is attached") from None

    def _bind(self, envelope: Envelope, model: str, role: str) -> tuple[CallFn, bool]:
        """A ``call`` for the agent logic: journaled, for this run, model, role and node."""
        context = self._context(envelope)
        backend = self.registry.get(model)

        async def call(request: CompletionRequest) -> Completion:
            return await context.journal.complete(
                backend, request, role=role, node_id=envelope.node_id
            )

        return call, backend.supports_n

    # ------------------------------------------------------------------ serving

    async def start(self, task_group: TaskGroup) -> None:
        """Start every agent's server in ``task_group``; returns once all are subscribed."""
        services = {
            topics.PROPOSE: ("proposer", self._propose),
            topics.SELECT_ASPECTS: ("critic", self._select),
            topics.JUDGE: ("critic", self._judge),
            topics.EDIT_PROMPT: ("editor", self._edit_prompt),
            topics.EDIT_ANSWER: ("editor", self._edit_answer),
        }
        for topic, (sender, handler) in services.items():
            ready = anyio.Event()
            task_group.start_soon(
                partial(
                    self.bus.serve,
                    topic,
                    handler,
                    sender=sender,
                    task_group=task_group,
                    ready=ready,
                )
            )
            await ready.wait()

    async def _propose(self, envelope: Envelope) -> Answer:
        message: ProposeAnswer = envelope.payload  # type: ignore[assignment]
        call, _ = self._bind(envelope, message.model, "proposer")
        return Answer(text=await proposer.propose(call, message))

    async def _select(self, envelope: Envelope) -> AspectsSelected:
        message: SelectAspects = envelope.payload  # type: ignore[assignment]
        context = self._context(envelope)
        cache_key = (
            query_hash(f"{message.variant}/{message.mode}\x00{message.query}"),
            message.model,
            f"{context.catalogue.version}:{PROMPTS_VERSION}",
        )
        cached = await self.store.get_aspect_selection(*cache_key)
        if cached is not None:
            return AspectsSelected(selection=cached)
        call, _ = self._bind(envelope, message.model, "critic")
        if message.mode == "logprobs":
            selection = await critic.select_aspects_by_logprobs(
                call, message.query, context.catalogue, variant=message.variant
            )
        else:
            selection = await critic.select_aspects(
                call,
                message.query,
                context.catalogue,
                variant=message.variant,
                max_tokens=message.max_tokens,
            )
        await self.store.put_aspect_selection(*cache_key, selection)
        return AspectsSelected(selection=selection)

    async def _judge(self, envelope: Envelope) -> Judged:
        message: Judge = envelope.payload  # type: ignore[assignment]
        context = self._context(envelope)
        call, _ = self._bind(envelope, message.model, "critic")
        critique = await critic.judge(
            call,
            message.query,
            message.answer,
            message.selection,
            context.catalogue,
            mode=message.mode,
            variant=message.variant,
            max_tokens=message.max_tokens,
        )
        return Judged(critique=critique)

    async def _edit_prompt(self, envelope: Envelope) -> PromptCandidates:
        message: EditPrompt = envelope.payload  # type: ignore[assignment]
        call, supports_n = self._bind(envelope, message.model, "editor")
        prompts, dropped = await editor.rewrite_prompt(call, message, supports_n=supports_n)
        return PromptCandidates(prompts=tuple(prompts), dropped=dropped)

    async def _edit_answer(self, envelope: Envelope) -> AnswerRewritten:
        message: EditAnswer = envelope.payload  # type: ignore[assignment]
        call, _ = self._bind(envelope, message.model, "editor")
        answer = await editor.rewrite_answer(call, message)
        if answer is None:
            return AnswerRewritten(answer=None, error="the editor's rewrite could not be parsed")
        return AnswerRewritten(answer=answer)
