"""Calling an agent, typed: one method per service, a typed request in, a typed reply out.

Every agent service is a :class:`Service`: the bus topic it is served on, the agent that serves
it, and its request and reply classes. :class:`AgentClient` is how the search, the ICL stage and
the evaluation talk to the agents, and :func:`serve` is how the runtime (or a test's scripted
agents) serves them; nothing else in drpo names a topic. A handler's exception reaches the caller
as itself (a ``BudgetExceeded`` stays a ``BudgetExceeded``), never as a type name in a string.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from drpo.bus import Bus, Envelope, RemoteError
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
from drpo.domain.values import AspectSelection, Critique, Value

Request = TypeVar("Request", bound=Value)
Reply = TypeVar("Reply", bound=Value)

#: Search events (nodes, levels, run start and end): read by the recorder and the viewers.
EVENTS = "search.events"


class ProtocolError(RuntimeError):
    """An agent answered with a message of the wrong kind: a bug in that agent, not bad input."""


@dataclass(frozen=True)
class Service(Generic[Request, Reply]):
    """One thing an agent does: the topic it is served on, the agent, its message classes."""

    topic: str
    agent: str
    request: type[Request]
    reply: type[Reply]


PROPOSE = Service("agent.proposer", "proposer", ProposeAnswer, Answer)
SELECT_ASPECTS = Service("agent.critic.select", "critic", SelectAspects, AspectsSelected)
JUDGE = Service("agent.critic.judge", "critic", Judge, Judged)
EDIT_PROMPT = Service("agent.editor.prompt", "editor", EditPrompt, PromptCandidates)
EDIT_ANSWER = Service("agent.editor.answer", "editor", EditAnswer, AnswerRewritten)
SERVICES: tuple[Service, ...] = (PROPOSE, SELECT_ASPECTS, JUDGE, EDIT_PROMPT, EDIT_ANSWER)
#: Which agent serves each topic (for views that group a transcript by agent).
SERVICE_AGENTS: dict[str, str] = {service.topic: service.agent for service in SERVICES}

#: A handler gets the typed request and its envelope (run, node, ids) and returns the reply.
Handler = Callable[[Request, Envelope], Awaitable[Reply]]


class AgentClient:
    """The agents, as one run's coordinator (``sender``) sees them on ``bus``."""

    def __init__(self, bus: Bus, run_id: str, sender: str) -> None:
        self.bus = bus
        self.run_id = run_id
        self.sender = sender
        bus.declare(EVENTS)

    async def propose(self, request: ProposeAnswer, *, node_id: str | None = None) -> str:
        """The aligned model's answer to ``request.query`` under ``request.system_prompt``."""
        return (await self._call(PROPOSE, request, node_id)).text

    async def select_aspects(
        self, request: SelectAspects, *, node_id: str | None = None
    ) -> AspectSelection:
        """The aspects an answer to ``request.query`` is judged on."""
        return (await self._call(SELECT_ASPECTS, request, node_id)).selection

    async def judge(self, request: Judge, *, node_id: str | None = None) -> Critique:
        """The critic's verdict on ``request.answer`` (its reward, or a failed critique)."""
        return (await self._call(JUDGE, request, node_id)).critique

    async def edit_prompt(
        self, request: EditPrompt, *, node_id: str | None = None
    ) -> PromptCandidates:
        """The editor's rewrites of ``request.system_prompt``, and how many were unusable."""
        return await self._call(EDIT_PROMPT, request, node_id)

    async def edit_answer(
        self, request: EditAnswer, *, node_id: str | None = None
    ) -> AnswerRewritten:
        """The ICL stage's rewrite of an example answer (``answer`` None when unusable)."""
        return await self._call(EDIT_ANSWER, request, node_id)

    async def emit(self, event: Value, *, node_id: str | None = None) -> Envelope:
        """Publish a run event (node created, level completed, run started or finished...)."""
        return await self.bus.emit(
            EVENTS, event, sender=self.sender, run_id=self.run_id, node_id=node_id
        )

    async def _call(
        self, service: Service[Request, Reply], request: Request, node_id: str | None
    ) -> Reply:
        try:
            envelope = await self.bus.request(
                service.topic, request, sender=self.sender, run_id=self.run_id, node_id=node_id
            )
        except RemoteError as exc:
            if exc.error is not None:  # the handler's own exception, in this process
                raise exc.error from None
            raise
        reply = envelope.payload
        if not isinstance(reply, service.reply):
            raise ProtocolError(
                f"the {service.agent} answered {service.topic} with {reply.kind!r}, "
                f"expected {service.reply.__name__}"
            )
        return reply


async def serve(
    bus: Bus,
    service: Service[Request, Reply],
    handler: Handler[Request, Reply],
    task_group: TaskGroup,
    *,
    sender: str | None = None,
) -> None:
    """Serve ``service`` on ``bus`` with ``handler`` in ``task_group``; returns once subscribed.

    Each request runs in its own task of ``task_group`` (see :meth:`Bus.serve`); a request of
    the wrong class is refused with a ``ProtocolError`` reply instead of reaching the handler.
    """

    async def typed(envelope: Envelope) -> Reply:
        message = envelope.payload
        if not isinstance(message, service.request):
            raise ProtocolError(
                f"{service.topic} serves {service.request.__name__}, got {message.kind!r}"
            )
        return await handler(message, envelope)

    ready = anyio.Event()
    task_group.start_soon(
        partial(
            bus.serve,
            service.topic,
            typed,
            sender=sender or service.agent,
            task_group=task_group,
            ready=ready,
        )
    )
    await ready.wait()
