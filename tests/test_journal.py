"""The call journal: keys, write-before-use, replay on resume, failures, budgets."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from drpo.backends.base import (
    ChatMessage,
    Choice,
    Completion,
    CompletionRequest,
    TransientBackendError,
    Usage,
)
from drpo.runs.journal import BudgetExceeded, JournaledCaller, content_key
from drpo.runs.store import RunStore

pytestmark = pytest.mark.anyio


class CountingBackend:
    """A fake backend that counts its calls and answers ``<prompt> #<call number>``."""

    name = "fake"

    def __init__(
        self, model: str = "fake-1", *, cost: float = 0.01, fail: set[str] | None = None
    ) -> None:
        self.model = model
        self.cost = cost
        self.fail = fail or set()
        self.calls = 0
        self.gate: anyio.Event | None = None  # when set, calls wait for it

    @property
    def endpoint(self) -> str:
        return "memory://fake"

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        number = self.calls
        if self.gate is not None:
            await self.gate.wait()
        if request.prompt in self.fail:
            raise TransientBackendError(f"{request.prompt} failed after 3 attempts")
        return Completion(
            choices=(Choice(text=f"{request.prompt} #{number}", finish_reason="stop"),),
            model=self.model,
            usage=Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=2),
            latency_s=0.5,
            attempts=1,
            cost_usd=self.cost,
        )

    async def aclose(self) -> None:
        pass


def _ask(prompt: str, temperature: float = 0.7) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, temperature=temperature, max_tokens=64)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RunStore]:
    async with RunStore.open(tmp_path / "drpo.db") as opened:
        yield opened


def _journal_rows(path: Path) -> list[tuple[str, str, int]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute("SELECT status, key, sample_index FROM calls ORDER BY id"))
    finally:
        conn.close()


def test_content_key_names_what_was_asked_and_the_sample() -> None:
    request = _ask("hello")
    key = content_key("openai", "https://api.example/v1", "gpt", request, 0)
    assert len(key) == 64 and key == content_key(
        "openai", "https://api.example/v1", "gpt", _ask("hello"), 0
    )
    others = {
        content_key("openai", "https://api.example/v1", "gpt", request, 1),
        content_key("local", "https://api.example/v1", "gpt", request, 0),
        content_key("openai", "http://127.0.0.1:8000/v1", "gpt", request, 0),
        content_key("openai", "https://api.example/v1", "gpt-mini", request, 0),
        content_key("openai", "https://api.example/v1", "gpt", _ask("hello", 0.0), 0),
        content_key("openai", "https://api.example/v1", "gpt", _ask("hello!"), 0),
        content_key(
            "openai",
            "https://api.example/v1",
            "gpt",
            CompletionRequest(messages=(ChatMessage(role="user", content="hello"),)),
            0,
        ),
    }
    assert key not in others and len(others) == 7
    # the same request at another place in the run (another node or role) is another call
    assert content_key("openai", "https://api.example/v1", "gpt", request, 0, "editor@n1") != key


async def test_replays_follow_the_place_not_the_arrival_order(store: RunStore) -> None:
    """Identical sampled requests at two nodes: whichever reply arrives first, a replay hands
    each node the sample it got (the index counts within a place, not across the run)."""
    run_id = await store.create_run("optimize", {})

    async def two_nodes(caller: JournaledCaller, backend: CountingBackend, first: str):
        got: dict[str, str] = {}

        async def ask(node: str) -> None:
            got[node] = (
                await caller.complete(backend, _ask("same"), role="editor", node_id=node)
            ).text

        async with anyio.create_task_group() as tg:
            for node in ("n1.0", "n1.1") if first == "n1.0" else ("n1.1", "n1.0"):
                tg.start_soon(ask, node)
                await anyio.wait_all_tasks_blocked()
        return got

    original = await two_nodes(JournaledCaller(store, run_id), CountingBackend(), "n1.0")
    assert original["n1.0"] != original["n1.1"]  # two samples
    backend = CountingBackend()
    replayed = await two_nodes(JournaledCaller(store, run_id), backend, "n1.1")  # other order
    assert replayed == original and backend.calls == 0


async def test_a_resumed_caller_replays_recorded_calls_without_the_backend(
    store: RunStore,
) -> None:
    run_id = await store.create_run("optimize", {})
    first_backend = CountingBackend()
    first = JournaledCaller(store, run_id)
    asked = [_ask("a"), _ask("b"), _ask("a"), _ask("a", temperature=0.0)]
    answers = []
    for request in asked:
        answers.append(await first.complete(first_backend, request, role="proposer", node_id="n0"))
        assert len(_journal_rows(store.path)) == len(answers)  # committed before it returned
    assert [a.text for a in answers] == ["a #1", "b #2", "a #3", "a #4"]  # a second sample of "a"
    assert first_backend.calls == 4 and not any(a.replayed for a in answers)
    assert [row[2] for row in _journal_rows(store.path)] == [0, 0, 1, 0]

    second_backend = CountingBackend()
    second = JournaledCaller(store, run_id)
    replayed = [
        await second.complete(second_backend, r, role="proposer", node_id="n0") for r in asked
    ]
    assert second_backend.calls == 0
    assert [a.text for a in replayed] == [a.text for a in answers]
    assert all(a.replayed and a.latency_s == 0.5 for a in replayed)
    assert [a.journal_key for a in replayed] == [a.journal_key for a in answers]
    assert second.counters["proposer"].replayed == 4 and second.counters["proposer"].calls == 0

    # a third sample of "a" at n0, and a first one elsewhere: both new calls
    extra = await second.complete(second_backend, _ask("a"), role="proposer", node_id="n0")
    assert (extra.text, extra.replayed, second_backend.calls) == ("a #1", False, 1)
    await store.flush()
    assert [c.replayed for c in await store.list_calls(run_id)] == [1, 1, 1, 1, 0]
    elsewhere = await second.complete(second_backend, _ask("a"), role="proposer", node_id="n1")
    assert not elsewhere.replayed and second_backend.calls == 2
    other_run = JournaledCaller(store, await store.create_run("optimize", {}))
    assert not (await other_run.complete(second_backend, _ask("a"), role="proposer")).replayed


async def test_concurrent_identical_requests_are_numbered_in_call_order(store: RunStore) -> None:
    run_id = await store.create_run("optimize", {})

    async def ask_five(caller: JournaledCaller, backend: CountingBackend) -> list[str]:
        results: list[str] = [""] * 5
        keys: list[str] = [""] * 5

        async def one(i: int) -> None:
            completion = await caller.complete(backend, _ask("same"), role="editor")
            results[i], keys[i] = completion.text, completion.journal_key

        backend.gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
            backend.gate.set()
        index = {call.key: call.sample_index for call in await store.list_calls(run_id)}
        assert [index[key] for key in keys] == [0, 1, 2, 3, 4]  # the i-th call is sample i
        return results

    first = await ask_five(JournaledCaller(store, run_id), CountingBackend())
    assert sorted(first) == [f"same #{n}" for n in range(1, 6)]
    assert sorted(row[2] for row in _journal_rows(store.path)) == [0, 1, 2, 3, 4]
    again_backend = CountingBackend()
    again = await ask_five(JournaledCaller(store, run_id), again_backend)
    assert again == first and again_backend.calls == 0  # each caller gets back its own sample


async def test_failed_calls_are_journaled_but_made_again_on_resume(store: RunStore) -> None:
    run_id = await store.create_run("optimize", {})
    flaky = CountingBackend(fail={"x"})
    first = JournaledCaller(store, run_id)
    with pytest.raises(TransientBackendError):
        await first.complete(flaky, _ask("x"), role="critic")
    (entry,) = await store.list_calls(run_id)
    assert (entry.status, entry.tries, entry.response) == ("error", 1, None)
    assert "TransientBackendError" in (entry.error or "")
    assert first.counters["critic"].errors == 1

    healthy = CountingBackend()
    second = JournaledCaller(store, run_id)
    answer = await second.complete(healthy, _ask("x"), role="critic")
    assert (answer.text, answer.replayed, healthy.calls) == ("x #1", False, 1)
    (entry,) = await store.list_calls(run_id)
    assert (entry.status, entry.tries, entry.error) == ("ok", 2, None)
    assert second.prior_calls == 1 and second.calls_spent == 2  # the failed call counted too


async def test_max_calls_stops_new_calls_and_a_larger_budget_continues(store: RunStore) -> None:
    run_id = await store.create_run("optimize", {})
    backend = CountingBackend()
    prompts = ["p0", "p1", "p2", "p3", "p4"]

    capped = JournaledCaller(store, run_id, max_calls=2)
    for prompt in prompts[:2]:
        await capped.complete(backend, _ask(prompt), role="proposer")
    with pytest.raises(BudgetExceeded, match=f"run {run_id} reached its calls budget"):
        await capped.complete(backend, _ask("p2"), role="proposer")
    assert backend.calls == 2

    same_budget = JournaledCaller(store, run_id, max_calls=2)
    for prompt in prompts[:2]:  # replays are free...
        assert (await same_budget.complete(backend, _ask(prompt), role="proposer")).replayed
    with pytest.raises(BudgetExceeded):  # ...but the run has spent its budget
        await same_budget.complete(backend, _ask("p2"), role="proposer")
    assert backend.calls == 2

    larger = JournaledCaller(store, run_id, max_calls=4)
    texts = []
    for prompt in prompts[:4]:
        texts.append((await larger.complete(backend, _ask(prompt), role="proposer")).text)
    assert texts == ["p0 #1", "p1 #2", "p2 #3", "p3 #4"] and backend.calls == 4
    with pytest.raises(BudgetExceeded) as raised:
        await larger.complete(backend, _ask("p4"), role="proposer")
    assert (raised.value.what, raised.value.limit, raised.value.spent) == ("calls", 4, 4)


async def test_max_calls_holds_for_concurrent_calls(store: RunStore) -> None:
    caller = JournaledCaller(store, await store.create_run("optimize", {}), max_calls=3)
    backend = CountingBackend()
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await caller.complete(backend, _ask(f"q{i}"), role="critic")
            outcomes.append("ok")
        except BudgetExceeded:
            outcomes.append("budget")

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(one, i)
    assert backend.calls == 3 and sorted(outcomes) == ["budget"] * 7 + ["ok"] * 3


async def test_max_cost_stops_new_calls_and_counts_what_the_run_spent_before(
    store: RunStore,
) -> None:
    run_id = await store.create_run("optimize", {})
    backend = CountingBackend(cost=0.01)
    caller = JournaledCaller(store, run_id, max_cost_usd=0.025)
    for i in range(3):  # spent 0, 0.01, 0.02 before each: all under 0.025
        await caller.complete(backend, _ask(f"q{i}"), role="editor")
    with pytest.raises(BudgetExceeded, match="cost budget"):
        await caller.complete(backend, _ask("q3"), role="editor")
    assert backend.calls == 3 and caller.counters["editor"].cost_usd == pytest.approx(0.03)

    resumed = JournaledCaller(store, run_id, max_cost_usd=0.05)
    for i in range(4):
        await resumed.complete(backend, _ask(f"q{i}"), role="editor")
    assert resumed.prior_cost_usd == pytest.approx(0.03) and backend.calls == 4
    assert resumed.counters["editor"].replayed == 3 and resumed.counters["editor"].calls == 1
    totals = (await store.run_totals(run_id)).by_role["editor"]
    assert (totals.calls, totals.prompt_tokens, totals.cached_tokens) == (4, 40, 8)
    assert totals.cost_usd == pytest.approx(0.04)


async def test_a_call_cancelled_in_flight_is_neither_charged_nor_journaled(store: RunStore) -> None:
    run_id = await store.create_run("optimize", {})
    backend = CountingBackend()
    backend.gate = anyio.Event()  # never set: the call hangs until cancelled
    caller = JournaledCaller(store, run_id, max_calls=1)
    with anyio.move_on_after(0.05):
        await caller.complete(backend, _ask("slow"), role="proposer")
    assert caller.calls_spent == 0 and await store.list_calls(run_id) == []
    backend.gate = None
    assert not (await caller.complete(backend, _ask("slow"), role="proposer")).replayed
