"""The beam search's logic, with scripted agents on a real bus (test doubles live here only).

The scripted critic's reward is a function of (prompt, query), so every expectation below is
computed by hand from the spec's rules: path-mean ranking, stable ties, the skip rule, depth
extension, the final pick and the order in which training queries are consumed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import anyio
import pytest

from drpo.agents import client
from drpo.agents.health import SearchCannotLearnError
from drpo.agents.search import BeamSearch
from drpo.bus import Bus, Envelope
from drpo.domain.events import LevelCompleted, Note
from drpo.domain.requests import (
    Answer,
    AspectsSelected,
    EditPrompt,
    Judge,
    Judged,
    PromptCandidates,
    ProposeAnswer,
    SelectAspects,
)
from drpo.domain.values import AspectScore, AspectSelection, Critique
from drpo.jobs.config import build_config
from drpo.jobs.lifecycle import leaf_exceptions
from drpo.jobs.optimize import search_plan

QUERIES = [f"q{i}" for i in range(40)]


class ScriptedAgents:
    """Proposer, critic and editor that answer from a script and count what they were asked."""

    def __init__(
        self,
        reward: Callable[[str, str], float],
        *,
        candidates: Callable[[str, int], list[str]] | None = None,
        fail_judgement: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.reward = reward
        self.candidates = candidates or (lambda prompt, n: [f"{prompt}/{i}" for i in range(n)])
        self.fail_judgement = fail_judgement or (lambda prompt, query: False)
        self.calls: Counter[str] = Counter()
        self.edited: list[str] = []
        self.answered: list[tuple[str, str]] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.delay = 0.0

    async def _track(self, role: str) -> None:
        self.calls[role] += 1
        self.in_flight[role] += 1
        self.max_in_flight[role] = max(self.max_in_flight[role], self.in_flight[role])
        await anyio.sleep(self.delay)
        self.in_flight[role] -= 1

    async def propose(self, msg: ProposeAnswer, env: Envelope) -> Answer:
        await self._track("propose")
        self.answered.append((msg.system_prompt, msg.query))
        # the answer encodes the prompt so the judge can score (prompt, query)
        return Answer(text=f"{msg.system_prompt}|{msg.query}")

    async def select(self, msg: SelectAspects, env: Envelope) -> AspectsSelected:
        await self._track("select")
        return AspectsSelected(selection=AspectSelection(query=msg.query, aspects=("Helpfulness",)))

    async def judge(self, msg: Judge, env: Envelope) -> Judged:
        await self._track("judge")
        prompt, query = msg.answer.split("|")
        if self.fail_judgement(prompt, query):
            return Judged(critique=Critique(failed=True, error="unparsable"))
        score = self.reward(prompt, query)
        return Judged(critique=Critique.from_scores({"Helpfulness": AspectScore(score=score)}))

    async def edit(self, msg: EditPrompt, env: Envelope) -> PromptCandidates:
        await self._track("edit")
        self.edited.append(msg.system_prompt)
        prompts = tuple(self.candidates(msg.system_prompt, msg.n))
        return PromptCandidates(prompts=prompts, dropped=msg.n - len(prompts))

    async def serve(self, bus: Bus, tg: anyio.abc.TaskGroup) -> None:
        await client.serve(bus, client.PROPOSE, self.propose, tg, sender="scripted")
        await client.serve(bus, client.SELECT_ASPECTS, self.select, tg, sender="scripted")
        await client.serve(bus, client.JUDGE, self.judge, tg, sender="scripted")
        await client.serve(bus, client.EDIT_PROMPT, self.edit, tg, sender="scripted")


async def run_search(agents: ScriptedAgents, queries=QUERIES, **search):
    config = build_config(overrides={"preset": "paper", "search": search})
    bus = Bus()
    bus.declare(client.EVENTS)
    events = bus.subscribe(client.EVENTS, buffer_size=100_000)

    async def no_examples(query: str):
        return []

    async with anyio.create_task_group() as tg:
        await agents.serve(bus, tg)
        result = await BeamSearch(bus, "run-1", search_plan(config), queries, no_examples).run()
        tg.cancel_scope.cancel()
    received = []
    while True:
        try:
            received.append(events.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return result, [env.payload for env in received]


def depth_of(prompt: str) -> int:
    return prompt.count("/")


@pytest.mark.anyio
async def test_call_counts_match_the_spec_formula_without_skips():
    # rewards all below the skip threshold: 2G + O + M with D=6, A=3, B=2
    agents = ScriptedAgents(lambda prompt, query: 3.0)
    result, _ = await run_search(agents, beam_size=2, n_actions=3, depth=6, depth_extension=10)
    d, a, b = 6, 3, 2
    generations = 1 + a + (d - 2) * a * b
    assert agents.calls["propose"] == generations
    assert agents.calls["judge"] == generations
    assert agents.calls["edit"] == 1 + (d - 2) * b
    assert result.levels == d
    # aspect selection started for every reachable query (depth + extension), at once
    assert agents.calls["select"] == d + 10


@pytest.mark.anyio
async def test_queries_are_consumed_one_per_level_in_order():
    agents = ScriptedAgents(lambda prompt, query: 3.0)
    await run_search(agents, beam_size=2, n_actions=2, depth=5, depth_extension=0)
    for prompt, query in agents.answered:
        # a prompt made by k rewrites is always judged on query k
        assert query == f"q{depth_of(prompt)}"


@pytest.mark.anyio
async def test_beam_keeps_best_path_means_and_final_pick_is_last_prompt_of_best_path():
    # candidate i of every rewrite scores 1 + i on any query; so the path that always
    # takes the last candidate wins, with a path mean of 3.0 (A=3 -> scores 1, 2, 3)
    def reward(prompt: str, query: str) -> float:
        if "/" not in prompt:
            return 1.0
        return 1.0 + int(prompt.rsplit("/", 1)[1])

    agents = ScriptedAgents(reward)
    result, events = await run_search(agents, beam_size=2, n_actions=3, depth=5, depth_extension=0)
    assert result.best.system_prompt == "You are a helpful assistant./2/2/2/2"
    assert result.best_score == pytest.approx(3.0)
    assert result.best.path_rewards == (3.0, 3.0, 3.0, 3.0)
    # the runner-up keeps the best path but takes candidate 1 at the last level
    assert result.final_beam[1][0].system_prompt == "You are a helpful assistant./2/2/2/1"
    assert result.final_beam[1][1] == pytest.approx((3 + 3 + 3 + 2) / 4)
    levels = [e for e in events if e.kind == "level_completed"]
    assert [lvl.level for lvl in levels] == [1, 2, 3, 4]
    assert all(len(lvl.kept) == 2 for lvl in levels)
    # level 2: 2 parents x 3 candidates, 2 kept and 4 pruned
    assert len(levels[1].pruned) == 4


@pytest.mark.anyio
async def test_ties_keep_insertion_order():
    # every node scores the same: the stable sort keeps parent rank, then candidate order
    agents = ScriptedAgents(lambda prompt, query: 2.0)
    result, events = await run_search(agents, beam_size=2, n_actions=3, depth=4, depth_extension=0)
    levels = [e for e in events if e.kind == "level_completed"]
    assert levels[0].kept == ("n1.0.0", "n1.0.1")
    assert levels[1].kept == ("n2.0.0", "n2.0.1")
    assert result.best.node_id == "n3.0.0"
    assert result.best.system_prompt == "You are a helpful assistant./0/0/0"


@pytest.mark.anyio
async def test_beam_of_one_ranks_by_last_reward():
    # with B=1 the aggregate is the last reward, not the mean
    def reward(prompt: str, query: str) -> float:
        return 4.0 if prompt.endswith("/1") else 2.0

    agents = ScriptedAgents(reward)
    result, _ = await run_search(agents, beam_size=1, n_actions=2, depth=4, depth_extension=0)
    assert result.best_score == pytest.approx(4.0)
    assert result.best.system_prompt.endswith("/1/1/1")


@pytest.mark.anyio
async def test_skip_rule_and_depth_extension():
    # a prompt scoring above 4.5 is not rewritten: its only child is itself; each level with a
    # skip extends the depth by one, at most depth_extension times
    agents = ScriptedAgents(lambda prompt, query: 5.0)
    result, events = await run_search(agents, beam_size=2, n_actions=3, depth=4, depth_extension=3)
    assert agents.calls["edit"] == 0
    assert result.levels == 4 + 3
    assert result.best.system_prompt == "You are a helpful assistant."
    nodes = [e for e in events if e.kind == "node_created"]
    assert all(node.skipped for node in nodes if node.level > 0)
    # each level has a single child (the same prompt re-evaluated on the next query)
    assert [e.depth_limit for e in events if e.kind == "level_completed"] == [5, 6, 7, 7, 7, 7]


@pytest.mark.anyio
async def test_failed_judgement_scores_zero_and_forces_a_skip():
    # the initial prompt's verdict fails: reward 0 and no rewrite at level 1
    agents = ScriptedAgents(
        lambda prompt, query: 3.0, fail_judgement=lambda prompt, query: query == "q0"
    )
    result, events = await run_search(agents, beam_size=2, n_actions=3, depth=4, depth_extension=1)
    nodes = {e.node_id: e for e in events if e.kind == "node_created"}
    assert nodes["n0"].critique.failed and nodes["n0"].reward == 0.0
    assert nodes["n1.0.0"].skipped
    assert nodes["n1.0.0"].system_prompt == "You are a helpful assistant."
    assert result.levels == 5  # one extension for the skip at level 1


@pytest.mark.anyio
async def test_mixed_skip_only_skips_the_high_scoring_node():
    # candidate 0 scores 5 (skipped next level), candidate 1 scores 4 (rewritten)
    def reward(prompt: str, query: str) -> float:
        if "/" not in prompt:
            return 1.0
        return 5.0 if prompt.endswith("/0") else 4.0

    agents = ScriptedAgents(reward)
    await run_search(agents, beam_size=2, n_actions=2, depth=3, depth_extension=0)
    # level 1 edits the root; level 2 edits only the node that scored 4
    assert agents.edited == ["You are a helpful assistant.", "You are a helpful assistant./1"]


@pytest.mark.anyio
async def test_all_independent_calls_of_a_level_are_in_flight_at_once():
    agents = ScriptedAgents(lambda prompt, query: 3.0)
    agents.delay = 0.05
    await run_search(agents, beam_size=2, n_actions=3, depth=4, depth_extension=0)
    assert agents.max_in_flight["edit"] == 2  # both beam nodes rewritten at once
    assert agents.max_in_flight["propose"] == 6  # B*A answers at once
    assert agents.max_in_flight["judge"] == 6
    assert agents.max_in_flight["select"] == 4  # every reachable query's aspects at once


@pytest.mark.anyio
async def test_held_out_check_scores_the_final_beam_on_unseen_queries():
    def reward(prompt: str, query: str) -> float:
        return 4.0 if int(query[1:]) >= 10 and prompt.endswith("/1") else 2.0

    agents = ScriptedAgents(reward)
    config_search = dict(beam_size=2, n_actions=2, depth=3, depth_extension=0, held_out_queries=4)
    result, _ = await run_search(agents, **config_search)
    assert len(result.held_out) == 2
    held_queries = {q for _, q in agents.answered if int(q[1:]) >= 3}
    assert held_queries == {"q3", "q4", "q5", "q6"}


@pytest.mark.anyio
async def test_a_search_whose_critic_never_parses_stops_with_the_fix_named():
    """Every verdict unreadable: without the check, every node is skipped, the depth extends to
    its cap, no rewrite is ever asked for, and the initial prompt comes back as the result."""
    never = ScriptedAgents(lambda prompt, query: 3.0, fail_judgement=lambda prompt, query: True)
    with pytest.raises(BaseExceptionGroup) as raised:
        await run_search(never, beam_size=2, n_actions=3, depth=6)
    [error] = leaf_exceptions(raised.value)
    assert isinstance(error, SearchCannotLearnError)
    assert re.search(r"level 1 was unreadable.*logprobs", str(error))
    assert never.calls["judge"] == 2  # the root and level 1: it stopped there
    assert never.calls["edit"] == 0

    ignored = ScriptedAgents(lambda prompt, query: 3.0, fail_judgement=lambda prompt, query: True)
    result, events = await run_search(
        ignored, beam_size=2, n_actions=3, depth=6, stop_on_failed_level=False
    )
    assert result.best.system_prompt == "You are a helpful assistant." and result.levels == 16
    warnings = [e for e in events if isinstance(e, Note)]
    assert len(warnings) == 1 and "100% of verdicts could not be read" in warnings[0].text
    levels = [e for e in events if isinstance(e, LevelCompleted)]
    assert all(e.failed_judgements == e.judged == 1 for e in levels)


@pytest.mark.anyio
async def test_a_level_whose_rewrites_all_fail_stops_the_search():
    agents = ScriptedAgents(lambda prompt, query: 3.0, candidates=lambda prompt, n: [])
    with pytest.raises(BaseExceptionGroup) as raised:
        await run_search(agents, beam_size=2, n_actions=3, depth=6)
    [error] = leaf_exceptions(raised.value)
    assert isinstance(error, SearchCannotLearnError) and "no rewritten prompt of level 1" in str(
        error
    )
