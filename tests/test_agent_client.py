"""The typed agent client: typed replies, the handler's own errors, refused wrong messages."""

from __future__ import annotations

import anyio
import pytest

from drpo.agents import client
from drpo.bus import Bus, Envelope, RemoteError
from drpo.domain.requests import Answer, Judge, Judged, ProposeAnswer
from drpo.domain.values import AspectScore, Critique
from drpo.runs.journal import BudgetExceeded

pytestmark = pytest.mark.anyio


def _propose(query: str = "q") -> ProposeAnswer:
    return ProposeAnswer(model="local:smollm2", system_prompt="p", query=query)


async def test_a_call_returns_the_typed_reply_and_carries_run_and_node() -> None:
    bus = Bus()
    seen: list[Envelope] = []

    async def propose(message: ProposeAnswer, envelope: Envelope) -> Answer:
        seen.append(envelope)
        return Answer(text=f"answer to {message.query}")

    async with anyio.create_task_group() as tg:
        await client.serve(bus, client.PROPOSE, propose, tg)
        agents = client.AgentClient(bus, "run-1", sender="search")
        text = await agents.propose(_propose("why?"), node_id="n1.0.0")
        tg.cancel_scope.cancel()
    assert text == "answer to why?"
    assert (seen[0].run_id, seen[0].node_id, seen[0].sender) == ("run-1", "n1.0.0", "search")
    assert seen[0].topic == client.PROPOSE.topic


async def test_the_handlers_own_exception_reaches_the_caller() -> None:
    bus = Bus()
    refusal = BudgetExceeded("calls", 3, 3, "run-1")

    async def judge(message: Judge, envelope: Envelope) -> Judged:
        raise refusal

    async with anyio.create_task_group() as tg:
        await client.serve(bus, client.JUDGE, judge, tg)
        agents = client.AgentClient(bus, "run-1", sender="search")
        with pytest.raises(BudgetExceeded) as raised:
            await agents.judge(Judge(model="local:smollm2", query="q", answer="a"))
        tg.cancel_scope.cancel()
    assert raised.value is refusal


async def test_a_reply_of_the_wrong_kind_is_a_protocol_error() -> None:
    bus = Bus()

    async def confused(message: ProposeAnswer, envelope: Envelope) -> Judged:
        return Judged(critique=Critique.from_scores({"Clarity": AspectScore(score=3)}))

    async with anyio.create_task_group() as tg:
        await client.serve(bus, client.PROPOSE, confused, tg)  # type: ignore[arg-type]
        agents = client.AgentClient(bus, "run-1", sender="search")
        with pytest.raises(client.ProtocolError, match="expected Answer"):
            await agents.propose(_propose())
        tg.cancel_scope.cancel()


async def test_a_request_of_the_wrong_kind_never_reaches_the_handler() -> None:
    bus = Bus()
    handled: list[object] = []

    async def propose(message: ProposeAnswer, envelope: Envelope) -> Answer:
        handled.append(message)
        return Answer(text="x")

    async with anyio.create_task_group() as tg:
        await client.serve(bus, client.PROPOSE, propose, tg)
        with pytest.raises(RemoteError) as raised:
            # a hand-made request that bypasses the client
            await bus.request(
                client.PROPOSE.topic, Judge(model="m", query="q", answer="a"), sender="someone"
            )
        tg.cancel_scope.cancel()
    assert isinstance(raised.value.error, client.ProtocolError)
    assert "serves ProposeAnswer" in str(raised.value)
    assert handled == []


def test_every_service_has_its_own_topic_and_the_agents_are_known() -> None:
    topics = [service.topic for service in client.SERVICES]
    assert len(set(topics)) == len(topics)
    assert client.SERVICE_AGENTS[client.JUDGE.topic] == "critic"
    assert client.EVENTS not in client.SERVICE_AGENTS
