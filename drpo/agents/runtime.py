"""The LLM-backed agents as bus services: proposer, critic and editor.

Each agent serves its :mod:`~drpo.agents.client` services. A handler reads the request's run,
binds a ``call`` function to that run's journal (so every model call is recorded before it is
used, and replayed on resume), to the model named in the request, and to its role and place in
the search, then runs the agent's logic from :mod:`drpo.agents.proposer`,
:mod:`drpo.agents.critic` or :mod:`drpo.agents.editor`. The runtime only binds and caches.

One runtime serves every search of the process: the searches differ only by run id, so they
share backends, rate limits and batches, and each backend's window of background calls
(:mod:`drpo.agents.window`: a local model is given at most one scoring pass of aspect selections
asked ahead of need; a verdict that needs one of them has its calls made at once).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from drpo.agents import capabilities, client, critic, editor, proposer
from drpo.agents.aspect_cache import AspectCache, AspectKey
from drpo.agents.aspects import AspectCatalogue
from drpo.agents.critic import CriticPolicy
from drpo.agents.window import BackgroundWindow, Urgency, background_capacity
from drpo.backends.base import Call, Completion, CompletionRequest
from drpo.backends.priority import Priority, background, current_priority, foreground
from drpo.backends.registry import BackendRegistry
from drpo.bus import Bus, Envelope
from drpo.domain.requests import (
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
from drpo.domain.values import AspectSelection
from drpo.runs.journal import JournaledCaller
from drpo.runs.store import RunStore


@dataclass
class RunContext:
    """What the agents need to know about one run: its journal, its aspects, its selections."""

    run_id: str
    journal: JournaledCaller
    catalogue: AspectCatalogue
    #: This run's aspect selections, by key (the first tier of the aspect cache).
    selections: dict[AspectKey, _Selection] = field(default_factory=dict)


class UnknownRunError(LookupError):
    """A request for a run the runtime was not told about (a bug in the caller)."""


class AgentRuntime:
    def __init__(self, bus: Bus, registry: BackendRegistry, store: RunStore) -> None:
        self.bus = bus
        self.registry = registry
        self.aspect_cache = AspectCache(store)
        self._runs: dict[str, RunContext] = {}
        self._honours: dict[str, capabilities.Capabilities] = {}
        self._windows: dict[str, BackgroundWindow | None] = {}
        bus.declare(client.EVENTS)

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

    def _bind(
        self,
        context: RunContext,
        model: str,
        role: str,
        place: str | None,
        urgency: Urgency | None = None,
    ) -> Call:
        """A ``call`` for the agent logic: journaled, for this run, model, role and place, and
        adapted to what the model's endpoint honours (``n``, logprobs). With ``urgency`` (work
        asked in the background), each call first waits for a slot of the model's background
        window, unless or until a foreground caller needs the work (then it is made at once,
        in the foreground)."""
        backend = self.registry.get(model)
        honours = self._capabilities(model)
        where = f"{backend.model} at {backend.endpoint}"
        window = self.background_window(model) if urgency is not None else None

        async def once(request: CompletionRequest) -> Completion:
            if window is None or urgency is None:
                return await context.journal.complete(backend, request, role=role, node_id=place)
            admitted = await window.enter(urgency)
            try:
                with nullcontext() if admitted else foreground():
                    return await context.journal.complete(
                        backend, request, role=role, node_id=place
                    )
            finally:
                if admitted:
                    window.leave()

        async def call(request: CompletionRequest) -> Completion:
            return await capabilities.complete(once, request, honours, where)

        return call

    def _capabilities(self, model: str) -> capabilities.Capabilities:
        """What ``model``'s endpoint honours: declared in its settings, else learned (shared
        by every run of the process, like the backend itself)."""
        known = self._honours.get(model)
        if known is None:
            settings = self.registry.settings(model)
            known = self._honours[model] = capabilities.Capabilities(
                n=getattr(settings, "honours_n", None),
                logprobs=getattr(settings, "honours_logprobs", None),
            )
        return known

    def background_window(self, model: str) -> BackgroundWindow | None:
        """The window ``model``'s background calls go through (shared by every run of the
        process, like the backend), or None when its backend declares no capacity (API
        backends: every call at once)."""
        if model not in self._windows:
            capacity = background_capacity(self.registry.get(model), self.registry.settings(model))
            self._windows[model] = None if capacity is None else BackgroundWindow(capacity)
        return self._windows[model]

    # ------------------------------------------------------------------ serving

    async def start(self, task_group: TaskGroup) -> None:
        """Serve every agent service in ``task_group``; returns once all are subscribed."""
        await client.serve(self.bus, client.PROPOSE, self._propose, task_group)
        await client.serve(self.bus, client.SELECT_ASPECTS, self._select, task_group)
        await client.serve(self.bus, client.JUDGE, self._judge, task_group)
        await client.serve(self.bus, client.EDIT_PROMPT, self._edit_prompt, task_group)
        await client.serve(self.bus, client.EDIT_ANSWER, self._edit_answer, task_group)

    async def _propose(self, message: ProposeAnswer, envelope: Envelope) -> Answer:
        context = self._context(envelope)
        call = self._bind(context, message.model, "proposer", envelope.node_id)
        return Answer(text=await proposer.propose(call, message))

    async def _select(self, message: SelectAspects, envelope: Envelope) -> AspectsSelected:
        context = self._context(envelope)
        with background() if message.background else nullcontext():
            return AspectsSelected(selection=await self._selection(context, message))

    async def _judge(self, message: Judge, envelope: Envelope) -> Judged:
        context = self._context(envelope)
        selection = message.selection
        if selection is None:  # the query's own aspects: selected once per run, cached
            selection = await self._selection(
                context,
                SelectAspects(
                    query=message.query,
                    model=message.model,
                    variant=message.variant,
                    mode=message.mode,
                    max_tokens=message.max_tokens,
                    policy=message.policy,
                ),
            )
        call = self._bind(context, message.model, "critic", envelope.node_id)
        critique = await critic.judge(
            call,
            message.query,
            message.answer,
            selection,
            context.catalogue,
            mode=message.mode,
            variant=message.variant,
            max_tokens=message.max_tokens,
            policy=CriticPolicy.named(message.policy),
        )
        return Judged(critique=critique)

    async def _edit_prompt(self, message: EditPrompt, envelope: Envelope) -> PromptCandidates:
        context = self._context(envelope)
        call = self._bind(context, message.model, "editor", envelope.node_id)
        prompts, dropped = await editor.rewrite_prompt(call, message)
        return PromptCandidates(prompts=tuple(prompts), dropped=dropped)

    async def _edit_answer(self, message: EditAnswer, envelope: Envelope) -> AnswerRewritten:
        context = self._context(envelope)
        call = self._bind(context, message.model, "editor", envelope.node_id)
        answer = await editor.rewrite_answer(call, message)
        if answer is None:
            return AnswerRewritten(answer=None, error="the editor's rewrite could not be parsed")
        return AnswerRewritten(answer=answer)

    # ------------------------------------------------------------------ aspect selections

    async def _selection(self, context: RunContext, message: SelectAspects) -> AspectSelection:
        """The selection for ``message``: from this run's selections, else the database's
        aspect cache, else the critic (once per run and key, however many ask at once).

        Asked in the background, the selection's calls go through the model's background
        window; a foreground asker (a verdict) that finds it still being made raises its
        urgency, so the calls it still has waiting for a slot are made at once."""
        key = self.aspect_cache.key(
            query=message.query,
            model=message.model,
            mode=message.mode,
            variant=message.variant,
            policy=CriticPolicy.named(message.policy),
            catalogue=context.catalogue,
        )
        while True:
            pending = context.selections.get(key)
            if pending is None:
                pending = context.selections[key] = _Selection()
                urgency = pending.urgency if current_priority() is Priority.BACKGROUND else None
                try:
                    selection = await self._select_uncached(context, message, key, urgency)
                except BaseException as exc:
                    # not remembered: a later request (a resumed run, another node) asks again
                    del context.selections[key]
                    pending.abandon(exc)
                    raise
                pending.set(selection)
                return selection
            if current_priority() is Priority.FOREGROUND:
                pending.urgency.escalate()  # never wait behind background work still queued
            selection = await pending.get()
            if selection is not None:
                return selection
            # the task selecting it was cancelled (its search ended): select it here instead

    async def _select_uncached(
        self,
        context: RunContext,
        message: SelectAspects,
        key: AspectKey,
        urgency: Urgency | None,
    ) -> AspectSelection:
        cached = await self.aspect_cache.get(key)
        if cached is not None:
            return cached
        # Its place in the run is its key, whoever asked first: a replay finds it in the journal.
        call = self._bind(context, message.model, "critic", key.place, urgency)
        selection = await critic.select_aspects(
            call,
            message.query,
            context.catalogue,
            mode=message.mode,
            variant=message.variant,
            max_tokens=message.max_tokens,
            policy=CriticPolicy.named(message.policy),
        )
        await self.aspect_cache.put(key, selection)
        return selection


class _Selection:
    """A selection being made: one task makes it, any number await it.

    ``get`` returns None when the maker was cancelled (the waiter should make it itself), and
    raises the maker's error when it failed.
    """

    def __init__(self) -> None:
        self._done = anyio.Event()
        #: Raised when a foreground caller waits for it (see :mod:`drpo.agents.window`).
        self.urgency = Urgency()
        self._value: AspectSelection | None = None
        self._error: BaseException | None = None

    def set(self, value: AspectSelection) -> None:
        self._value = value
        self._done.set()

    def abandon(self, error: BaseException) -> None:
        if not isinstance(error, anyio.get_cancelled_exc_class()):
            self._error = error
        self._done.set()

    async def get(self) -> AspectSelection | None:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value
