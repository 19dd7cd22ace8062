"""The bus: lossless messages, ordering, backpressure, request/reply and structured shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked
from anyio.abc import TaskGroup
from pydantic import BaseModel

from drpo.bus import Bus, Envelope, NoServerError, RemoteError, UnknownTopicError
from drpo.bus.bus import Handler
from drpo.bus.envelope import Failure
from drpo.domain.events import LevelCompleted, NodeCreated, Note, RunFinished, RunStarted
from drpo.domain.messages import MESSAGE_TYPES
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
from drpo.domain.values import AspectScore, AspectSelection, Critique, ICLExample
from drpo.runs.store import StoredEnvelope

pytestmark = pytest.mark.anyio

QUERY = "How do I politely decline a wedding invitation from a close friend?"
ANSWER = "Thank them warmly, say you can't attend, and offer to celebrate another time. 💐"
SELECTION = AspectSelection(
    query=QUERY,
    aspects=("helpfulness", "clarity", "empathy"),
    reasoning="A personal etiquette question: the tone matters as much as the facts.",
    analysis={"helpfulness": "gives concrete wording", "empathy": "a friend's feelings"},
)
CRITIQUE = Critique.from_scores(
    {
        "helpfulness": AspectScore(score=4.0, rationale="concrete, but no example message"),
        "clarity": AspectScore(score=5.0, rationale="short and direct"),
        "empathy": AspectScore(score=3.5, rationale="could acknowledge the friend's feelings"),
    }
)

#: One realistic value of every payload type (a new payload type must add one here).
SAMPLES: dict[type[BaseModel], BaseModel] = {
    SelectAspects: SelectAspects(query=QUERY, model="openai:gpt-4o-mini", variant="icl"),
    AspectsSelected: AspectsSelected(selection=SELECTION),
    ProposeAnswer: ProposeAnswer(
        model="local:smollm2",
        system_prompt="You are a helpful, honest and harmless assistant.",
        icl_examples=(ICLExample(query="What is 2+2?", answer="2 + 2 = 4."),),
        query=QUERY,
        framing="chat",
        max_tokens=256,
        temperature=0.7,
    ),
    Answer: Answer(text=ANSWER),
    Judge: Judge(
        model="openai:gpt-4o-mini",
        query=QUERY,
        answer=ANSWER,
        selection=SELECTION,
        mode="logprobs",
    ),
    Judged: Judged(critique=CRITIQUE),
    EditPrompt: EditPrompt(
        model="openai:gpt-4o-mini",
        system_prompt="You are a helpful assistant.",
        query=QUERY,
        answer=ANSWER,
        critique=CRITIQUE,
        history=("You are an assistant.", "You are a helpful assistant."),
        n=3,
        temperature=0.9,
    ),
    PromptCandidates: PromptCandidates(
        prompts=("Be warm and concrete.", "Offer example wording when asked for etiquette."),
        dropped=1,
    ),
    EditAnswer: EditAnswer(
        model="openai:gpt-4o-mini", query=QUERY, answer=ANSWER, critique=CRITIQUE
    ),
    AnswerRewritten: AnswerRewritten(answer=None, error="the editor returned no <answer> tag"),
    RunStarted: RunStarted(
        config={"beam_width": 2, "depth": 3, "models": {"base": "local:smollm2"}, "seed": 7},
        queries=(QUERY, "Explain photosynthesis to a ten-year-old."),
    ),
    NodeCreated: NodeCreated(
        node_id="n-1-0",
        parent_id="n-0-0",
        level=1,
        system_prompt="Be warm and concrete.",
        query=QUERY,
        answer=ANSWER,
        critique=CRITIQUE,
        reward=CRITIQUE.reward,
        path_rewards=(3.5, CRITIQUE.reward),
        score=(3.5 + CRITIQUE.reward) / 2,
        skipped=False,
    ),
    LevelCompleted: LevelCompleted(
        level=1,
        kept=("n-1-0", "n-1-2"),
        pruned=("n-1-1",),
        best_score=4.25,
        mean_score=3.9,
        depth_limit=3,
    ),
    RunFinished: RunFinished(
        status="budget_exhausted",
        best_node_id="n-1-0",
        best_prompt="Be warm and concrete.",
        best_score=4.25,
        error="max_calls=200 reached",
    ),
    Failure: Failure(error_type="PermanentBackendError", message="unknown model 'gpt-5-nano'"),
    Note: Note(text="aspect cache hit", data={"query_hash": "ab12", "hits": 3, "ratio": 0.5}),
}


def _texts(envelopes: Iterable[Envelope]) -> list[str]:
    return [envelope.payload.text for envelope in envelopes]  # type: ignore[union-attr]


PAYLOAD_TYPES = (*MESSAGE_TYPES, Failure)


def test_samples_cover_every_payload_type() -> None:
    assert set(SAMPLES) == set(PAYLOAD_TYPES)


@pytest.mark.parametrize("payload_type", PAYLOAD_TYPES, ids=lambda t: t.__name__)
def test_envelope_json_round_trip_is_lossless(payload_type: type[BaseModel]) -> None:
    payload = SAMPLES[payload_type]
    envelope = Envelope(
        payload=payload,  # type: ignore[arg-type]
        topic="critic.judge",
        sender="search",
        run_id="run-1",
        correlation_id="c0ffee",
        causation_id="cafe",
        node_id="n-1-0",
    )
    again = StoredEnvelope.model_validate_json(envelope.model_dump_json())
    assert again == envelope
    assert type(again.payload) is payload_type


async def test_each_subscriber_gets_each_publishers_messages_in_order() -> None:
    bus = Bus(buffer_size=4)  # small buffers: publishers interleave and wait on each other
    subscribers = [bus.subscribe("events") for _ in range(2)]
    per_publisher = 300
    received: list[list[Envelope]] = [[] for _ in subscribers]

    async def publish(name: str) -> None:
        for i in range(per_publisher):
            await bus.emit("events", Note(text=str(i)), sender=name)
            if i % 50 == 0:
                await anyio.lowlevel.checkpoint()

    async def consume(index: int) -> None:
        async for envelope in subscribers[index]:
            received[index].append(envelope)
            if len(received[index]) == 3 * per_publisher:
                return

    async with anyio.create_task_group() as tg:
        for index in range(len(subscribers)):
            tg.start_soon(consume, index)
        for name in ("p1", "p2", "p3"):
            tg.start_soon(publish, name)

    for envelopes in received:
        for name in ("p1", "p2", "p3"):
            texts = _texts(e for e in envelopes if e.sender == name)
            assert texts == [str(i) for i in range(per_publisher)]
    senders = [e.sender for e in received[0]]
    assert senders != sorted(senders)  # the publishers really interleaved


async def test_a_stalled_subscriber_blocks_its_publisher_and_memory_stays_bounded() -> None:
    bus = Bus()
    subscription = bus.subscribe("events", buffer_size=8)
    published = 0

    async def publish_forever() -> None:
        nonlocal published
        while True:
            await bus.emit("events", Note(text=str(published)), sender="fast")
            published += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_forever)
        await wait_all_tasks_blocked()
        assert published == 8  # the 9th publish waits for room
        for _ in range(20):  # however long it waits, nothing more piles up
            await anyio.sleep(0.001)
        assert published == 8
        first = [await subscription.receive() for _ in range(12)]
        await wait_all_tasks_blocked()
        assert 8 <= published - 12 <= 9  # it moved on only as far as room was made
        assert _texts(first) == [str(i) for i in range(12)]
        tg.cancel_scope.cancel()


async def _echo(envelope: Envelope) -> Answer:
    return Answer(text="echo")


async def _serve(bus: Bus, tg: TaskGroup, topic: str, handler: Handler) -> None:
    ready = anyio.Event()
    tg.start_soon(
        lambda: bus.serve(topic, handler, sender=f"{topic}-server", task_group=tg, ready=ready)
    )
    await ready.wait()


async def test_request_gets_the_reply_to_it() -> None:
    bus = Bus()

    async def answer(envelope: Envelope) -> Answer:
        return Answer(text=f"answer to {envelope.payload.query}")  # type: ignore[union-attr]

    async with anyio.create_task_group() as tg:
        await _serve(bus, tg, "proposer", answer)
        replies = await asyncio.gather(
            *(
                bus.request(
                    "proposer",
                    ProposeAnswer(model="m", system_prompt="s", query=f"q{i}"),
                    sender="search",
                    run_id="r",
                    node_id=f"n{i}",
                    timeout=5,
                )
                for i in range(20)
            )
        )
        tg.cancel_scope.cancel()
    for i, reply in enumerate(replies):
        assert reply.payload == Answer(text=f"answer to q{i}")
        assert reply.node_id == f"n{i}" and reply.run_id == "r"
        assert reply.correlation_id is not None and reply.correlation_id == reply.causation_id
    assert len({reply.correlation_id for reply in replies}) == 20


async def test_request_timeout_and_the_late_reply_becomes_an_orphan_seen_by_the_tap() -> None:
    bus = Bus()
    tap = bus.tap()
    release = anyio.Event()

    async def slow(envelope: Envelope) -> Answer:
        await release.wait()
        return Answer(text="too late")

    async with anyio.create_task_group() as tg:
        await _serve(bus, tg, "slow", slow)
        with pytest.raises(TimeoutError):
            await bus.request("slow", Note(text="hurry"), sender="search", timeout=0.05)
        assert bus.orphan_reply_count == 0
        release.set()
        with anyio.fail_after(5):
            request = await tap.receive()
            reply = await tap.receive()
        tg.cancel_scope.cancel()
    assert reply.payload == Answer(text="too late")
    assert reply.correlation_id == request.message_id
    assert bus.orphan_reply_count == 1
    assert list(bus.orphan_replies) == [reply]


async def test_request_to_a_topic_nobody_serves_fails_at_once() -> None:
    bus = Bus()
    bus.declare("critic")
    with anyio.fail_after(1), pytest.raises(NoServerError, match="critic"):
        await bus.request("critic", Note(text="anyone?"), sender="search")


async def test_publishing_to_an_undeclared_topic_is_an_error() -> None:
    bus = Bus()
    bus.declare("critic")
    with pytest.raises(UnknownTopicError, match="critc"):
        await bus.emit("critc", Note(text="typo"), sender="search")
    assert bus.published_count == 0


async def test_a_failing_handler_answers_remote_error_and_the_server_keeps_serving() -> None:
    bus = Bus()

    async def picky(envelope: Envelope) -> Answer:
        if envelope.payload.text == "bad":  # type: ignore[union-attr]
            raise ValueError("cannot handle 'bad'")
        return Answer(text="fine")

    async with anyio.create_task_group() as tg:
        await _serve(bus, tg, "picky", picky)
        with pytest.raises(RemoteError, match="ValueError: cannot handle 'bad'") as raised:
            await bus.request("picky", Note(text="bad"), sender="search", timeout=5)
        assert raised.value.failure.error_type == "ValueError"
        reply = await bus.request("picky", Note(text="good"), sender="search", timeout=5)
        tg.cancel_scope.cancel()
    assert reply.payload == Answer(text="fine")


async def test_cancelling_the_task_group_leaves_no_task_behind() -> None:
    bus = Bus()
    before = asyncio.all_tasks()
    blocked = anyio.Event()

    async def stuck(envelope: Envelope) -> Answer:
        blocked.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def listen() -> None:
        async for _ in bus.subscribe("events"):
            pass

    async def ask() -> None:
        await bus.request("stuck", Note(text="?"), sender="search")

    async with anyio.create_task_group() as tg:
        await _serve(bus, tg, "stuck", stuck)
        await _serve(bus, tg, "echo", _echo)
        for _ in range(3):
            tg.start_soon(listen)
        tg.start_soon(ask)
        await blocked.wait()
        assert len(asyncio.all_tasks()) > len(before) + 5
        tg.cancel_scope.cancel()
    assert asyncio.all_tasks() == before


async def test_request_to_a_server_that_stopped_fails_instead_of_hanging() -> None:
    bus = Bus()
    async with anyio.create_task_group() as server:
        await _serve(bus, server, "proposer", _echo)
        server.cancel_scope.cancel()
    with anyio.fail_after(0.2), pytest.raises(NoServerError):
        await bus.request("proposer", Note(text="hello?"), sender="search")


async def test_iterating_a_closed_subscription_just_ends() -> None:
    bus = Bus()
    subscription = bus.subscribe("events")
    subscription.close()
    assert [envelope async for envelope in subscription] == []
