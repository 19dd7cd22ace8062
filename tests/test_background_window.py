"""The background window (issue 16): aspect selections asked ahead of need are given to a backend
that batches locally at most ``capacity`` calls at a time; a selection a verdict needs is made at
once, in the foreground; each query is still selected once per run. A strict double stands in for
the model: it records each call's priority and holds calls until the test lets them go, so no
timing is asserted."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from drpo.agents import client
from drpo.agents.aspects import AspectCatalogue
from drpo.agents.runtime import RunContext
from drpo.agents.window import BackgroundWindow, Urgency, background_capacity
from drpo.backends.base import Choice, Completion, CompletionRequest, TokenLogprob, TopLogprob
from drpo.backends.kinds import build_backend
from drpo.backends.priority import Priority, current_priority
from drpo.backends.registry import BackendRegistry
from drpo.backends.settings import EndpointSettings, LocalSettings
from drpo.domain.requests import Judge, SelectAspects
from drpo.jobs.session import agent_session
from drpo.runs.journal import JournaledCaller
from drpo.runs.store import RunStore

pytestmark = pytest.mark.anyio

MODEL = "local:smollm2"  # only its name: the registry below hands out the double
QUERIES = tuple(f"How do I fix problem number {index}?" for index in range(5))
ASPECTS = len(AspectCatalogue.load_default())


class StrictDouble:
    """A critic that answers every one-token call with "Yes" (and digit alternatives), records
    each call's prompt and priority, and holds calls while ``hold`` is set."""

    name = "double"
    model = "double-1"

    def __init__(self, capacity: int | None) -> None:
        if capacity is not None:
            self.capacity = capacity
        self.calls: list[tuple[str, Priority]] = []
        self.in_flight = Counter[Priority]()
        self.peak = Counter[Priority]()
        self.hold: anyio.Event | None = None

    @property
    def endpoint(self) -> str:
        return "memory://double"

    async def complete(self, request: CompletionRequest) -> Completion:
        assert request.messages is not None and request.max_tokens == 1
        priority = current_priority()
        self.calls.append((request.messages[-1].content, priority))
        self.in_flight[priority] += 1
        self.peak[priority] = max(self.peak[priority], self.in_flight[priority])
        try:
            if self.hold is not None:
                await self.hold.wait()
            for _ in range(3):  # calls overlap, as on a model that batches them
                await anyio.lowlevel.checkpoint()
        finally:
            self.in_flight[priority] -= 1
        top = (TopLogprob(token="Yes", logprob=-0.2), TopLogprob(token="No", logprob=-1.8))
        digits = tuple(TopLogprob(token=str(d), logprob=-1.0 - d / 10) for d in (4, 5, 3))
        return Completion(
            choices=(
                Choice(
                    text="Yes",
                    finish_reason="length",
                    logprobs=(TokenLogprob(token="Yes", logprob=-0.2, top=top + digits),),
                ),
            ),
            model=self.model,
        )

    async def aclose(self) -> None:
        pass

    def relevance_calls(self, query: str) -> list[Priority]:
        return [p for text, p in self.calls if query in text and "Answer yes or no." in text]

    def verdict_calls(self, query: str) -> list[Priority]:
        return [p for text, p in self.calls if query in text and "Answer yes or no." not in text]


class OneBackend(BackendRegistry):
    def __init__(self, backend: StrictDouble, settings: LocalSettings | None = None) -> None:
        super().__init__({MODEL: settings} if settings is not None else None)
        self.backend = backend

    def get(self, spec_text: str) -> StrictDouble:  # type: ignore[override]
        return self.backend


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RunStore]:
    async with RunStore.open(tmp_path / "drpo.db") as opened:
        yield opened


def _select(query: str) -> SelectAspects:
    return SelectAspects(query=query, model=MODEL, mode="logprobs", background=True)


def _judge(query: str) -> Judge:
    return Judge(model=MODEL, query=query, answer="Restart it.", mode="logprobs")


async def _until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds (the double and the window's state; the journal's
    database works on a thread, so there is no one event to wait for)."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.001)


async def test_background_selections_in_flight_never_exceed_the_window(store: RunStore) -> None:
    backend = StrictDouble(capacity=3)
    run_id = await store.create_run("optimize", {})
    async with agent_session(store, OneBackend(backend)) as session:
        session.runtime.attach(
            RunContext(run_id, JournaledCaller(store, run_id), AspectCatalogue.load_default())
        )
        agents = client.AgentClient(session.bus, run_id, "search")
        async with anyio.create_task_group() as tg:
            for query in QUERIES:
                tg.start_soon(agents.select_aspects, _select(query))
        window = session.runtime.background_window(MODEL)
    assert window is not None and window.capacity == 3
    assert backend.peak[Priority.BACKGROUND] == 3 == window.peak  # full, never over
    assert backend.peak[Priority.FOREGROUND] == 0 and window.promoted == 0
    # each query selected once: every aspect asked once, in the background
    for query in QUERIES:
        assert backend.relevance_calls(query) == [Priority.BACKGROUND] * ASPECTS
    assert len(backend.calls) == len(QUERIES) * ASPECTS


async def test_a_needed_selection_is_asked_in_the_foreground_at_once(store: RunStore) -> None:
    """Five selections asked in the background fill the window (2 slots, the backend holding
    every call); a verdict on the last query cannot wait for a slot: its selection's calls are
    made at once, at foreground priority, and the query is still selected once."""
    backend = StrictDouble(capacity=2)
    backend.hold = anyio.Event()
    run_id = await store.create_run("optimize", {})
    last = QUERIES[-1]
    async with agent_session(store, OneBackend(backend)) as session:
        session.runtime.attach(
            RunContext(run_id, JournaledCaller(store, run_id), AspectCatalogue.load_default())
        )
        agents = client.AgentClient(session.bus, run_id, "search")
        verdicts = []

        async def judge() -> None:
            verdicts.append(await agents.judge(_judge(last)))

        async with anyio.create_task_group() as tg:
            for query in QUERIES:
                tg.start_soon(agents.select_aspects, _select(query))
            window = session.runtime.background_window(MODEL)
            assert window is not None
            held = len(QUERIES) * ASPECTS - 2
            await _until(lambda: window.waiting == held and len(backend.calls) == 2)
            assert backend.in_flight[Priority.BACKGROUND] == 2  # the window is full, held
            assert backend.relevance_calls(last) == []  # still waiting for a slot
            tg.start_soon(judge)
            await _until(lambda: len(backend.relevance_calls(last)) == ASPECTS)
            assert backend.relevance_calls(last) == [Priority.FOREGROUND] * ASPECTS
            assert backend.in_flight[Priority.BACKGROUND] == 2  # nothing else let through
            assert window.promoted == ASPECTS
            backend.hold.set()
    assert len(verdicts) == 1 and not verdicts[0].failed
    for query in QUERIES:  # each query selected once
        assert len(backend.relevance_calls(query)) == ASPECTS
    assert backend.relevance_calls(last) == [Priority.FOREGROUND] * ASPECTS
    assert backend.verdict_calls(last) == [Priority.FOREGROUND] * len(verdicts[0].scores)
    assert backend.peak[Priority.BACKGROUND] == 2


async def test_a_verdict_never_waits_behind_its_selection_still_queued(store: RunStore) -> None:
    """A selection whose first calls have slots and the rest wait: a verdict on that query has
    the waiting ones made at once in the foreground (those already made stay as they are)."""
    backend = StrictDouble(capacity=4)
    backend.hold = anyio.Event()
    run_id = await store.create_run("optimize", {})
    first = QUERIES[0]
    async with agent_session(store, OneBackend(backend)) as session:
        session.runtime.attach(
            RunContext(run_id, JournaledCaller(store, run_id), AspectCatalogue.load_default())
        )
        agents = client.AgentClient(session.bus, run_id, "search")
        async with anyio.create_task_group() as tg:
            tg.start_soon(agents.select_aspects, _select(first))
            await _until(lambda: len(backend.calls) == 4)
            tg.start_soon(agents.judge, _judge(first))
            await _until(lambda: len(backend.relevance_calls(first)) == ASPECTS)
            assert Counter(backend.relevance_calls(first)) == {
                Priority.BACKGROUND: 4,
                Priority.FOREGROUND: ASPECTS - 4,
            }
            backend.hold.set()
    assert len(backend.relevance_calls(first)) == ASPECTS  # selected once


async def test_backends_without_a_capacity_get_every_call_at_once(store: RunStore) -> None:
    """An API backend declares no capacity: no window, today's all-at-once behaviour."""
    backend = StrictDouble(capacity=None)
    backend.hold = anyio.Event()
    run_id = await store.create_run("optimize", {})
    async with agent_session(store, OneBackend(backend)) as session:
        session.runtime.attach(
            RunContext(run_id, JournaledCaller(store, run_id), AspectCatalogue.load_default())
        )
        agents = client.AgentClient(session.bus, run_id, "search")
        assert session.runtime.background_window(MODEL) is None
        async with anyio.create_task_group() as tg:
            for query in QUERIES:
                tg.start_soon(agents.select_aspects, _select(query))
            everything = len(QUERIES) * ASPECTS
            await _until(lambda: len(backend.calls) == everything)
            assert backend.in_flight[Priority.BACKGROUND] == everything
            backend.hold.set()


async def test_the_window_setting_overrides_the_declared_capacity(store: RunStore) -> None:
    backend = StrictDouble(capacity=8)
    assert background_capacity(backend, None) == 8
    assert background_capacity(backend, LocalSettings()) == 8
    assert background_capacity(backend, LocalSettings(background_window=2)) == 2
    assert background_capacity(StrictDouble(capacity=None), EndpointSettings()) is None
    local = build_backend(MODEL, LocalSettings(max_batch_size=5))  # built, not loaded
    assert background_capacity(local, LocalSettings(max_batch_size=5)) == 5
    run_id = await store.create_run("optimize", {})
    settings = LocalSettings(background_window=2)
    async with agent_session(store, OneBackend(backend, settings)) as session:
        session.runtime.attach(
            RunContext(run_id, JournaledCaller(store, run_id), AspectCatalogue.load_default())
        )
        agents = client.AgentClient(session.bus, run_id, "search")
        async with anyio.create_task_group() as tg:
            for query in QUERIES[:2]:
                tg.start_soon(agents.select_aspects, _select(query))
    assert backend.peak[Priority.BACKGROUND] == 2


async def test_the_window_hands_slots_out_in_order_and_passes_on_a_cancelled_one() -> None:
    window = BackgroundWindow(1)
    order: list[str] = []
    first, urgent = Urgency(), Urgency()
    assert await window.enter(first)  # holds the one slot

    async def call(name: str, urgency: Urgency) -> None:
        admitted = await window.enter(urgency)
        order.append(f"{name}:{'slot' if admitted else 'at once'}")
        if admitted:
            window.leave()

    cancelled = anyio.CancelScope()

    async def gone() -> None:
        with cancelled:
            await call("gone", first)

    async with anyio.create_task_group() as tg:
        tg.start_soon(gone)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(call, "a", first)
        tg.start_soon(call, "b", first)
        tg.start_soon(call, "c", urgent)
        await anyio.wait_all_tasks_blocked()
        assert window.waiting == 4 and order == []
        cancelled.cancel()
        await anyio.wait_all_tasks_blocked()
        assert window.waiting == 3
        urgent.escalate()  # c needs its call now: made at once, no slot
        await anyio.wait_all_tasks_blocked()
        assert order == ["c:at once"]
        window.leave()  # the first call ends: a, then b, in the order they came
    assert order == ["c:at once", "a:slot", "b:slot"]
    assert window.in_flight == 0 and window.peak == 1 and window.promoted == 1
    with pytest.raises(ValueError, match="at least one slot"):
        BackgroundWindow(0)
