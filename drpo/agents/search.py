"""The DRPO beam search over system prompts, as a coordinator agent on the bus (spec §3).

It holds no model. It asks the proposer for answers, the critic for aspects and verdicts, and
the editor for rewrites, and it decides which prompts survive. The algorithm is the paper's:

* level 0: answer the first query under the initial prompt and judge it (the root; its reward
  is not counted);
* each level: every beam node whose last reward is <= the skip threshold (and whose judgement
  parsed) is rewritten by the editor into ``n_actions`` candidates; a skipped node's only child
  is its own prompt. Each child is answered and judged on the *next* training query;
* a level with any skip extends the depth by one (at most ``depth_extension`` times);
* the children are ranked by the mean reward of their path (the last reward when the beam is 1),
  with a stable sort, and the best ``beam_size`` survive;
* the result is the last prompt on the best terminal path.

What differs from the paper's code is only *when* calls are made: everything at a level that
does not wait on another reply is in flight at once (all rewrites, then each candidate's answer
as soon as its rewrite is back, then its verdict as soon as its answer is back), and the aspect
selection for every training query is asked for when the run starts (a local model is handed
those asked ahead of need a scoring pass at a time: :mod:`drpo.agents.window`). The order of
results never depends on which reply comes first, so a run is reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio
import structlog
from pydantic import BaseModel, ConfigDict, Field

from drpo.agents.client import AgentClient
from drpo.agents.health import LevelHealth, SearchHealth, check_level
from drpo.bus import Bus
from drpo.domain.events import LevelCompleted, NodeCreated, Note
from drpo.domain.requests import (
    CriticMode,
    CriticPolicyName,
    EditPrompt,
    Framing,
    ICLHeaders,
    Judge,
    ProposeAnswer,
    SelectAspects,
)
from drpo.domain.values import Critique, ICLExample

log = structlog.get_logger("drpo.search")

#: Aspect selections the search needs at once (the root's query and level 1's); later levels'
#: are asked for in the background.
URGENT_SELECTIONS = 2

#: Finds the ICL examples to show with a query (k nearest by embedding); injected so the
#: search does not depend on sentence-transformers.
Retrieve = Callable[[str], Awaitable[Sequence[ICLExample]]]


class SearchSettings(BaseModel):
    """The beam search (spec §3): defaults are the paper's CLI defaults. The ``[search]`` section
    of a run's settings; the search reads all of it but the training queries' count and seed,
    which choose the queries it is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    beam_size: int = Field(default=2, ge=1)
    n_actions: int = Field(default=3, ge=1)
    depth: int = Field(default=20, ge=2)
    depth_extension: int = Field(default=10, ge=0)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    #: Skip the rewrite when a node's reward is above this (the paper hard-codes 4.5).
    skip_threshold: float = 4.5
    #: How many past prompts the editor sees (the paper hard-codes 5).
    history: int = Field(default=5, ge=1)
    num_train_queries: int = Field(default=180, ge=2)
    initial_prompt: str = "You are a helpful assistant."
    #: Seed of the training-query order (recorded with the run; the paper's order is unseeded).
    seed: int = 0
    #: Off by default (0): re-score the final beam's prompts on this many unseen queries.
    held_out_queries: int = Field(default=0, ge=0)
    #: Warn once this share of verdicts (or of rewrites) could not be read.
    warn_failure_share: float = Field(default=0.5, gt=0.0, le=1.0)
    #: End the run (failed, with the fix named) when every verdict or every rewrite of a level
    #: failed, instead of paying for the rest of a search that cannot learn.
    stop_on_failed_level: bool = True


@dataclass(frozen=True)
class ProposerCalls:
    """How the search asks for answers: the model being aligned, its layout and sampling."""

    model: str
    framing: Framing
    max_tokens: int
    temperature: float
    top_p: float
    icl_headers: ICLHeaders
    cut_runaway: bool


@dataclass(frozen=True)
class CriticCalls:
    """How the search asks for aspect selections and verdicts."""

    model: str
    mode: CriticMode
    max_tokens: int
    policy: CriticPolicyName


@dataclass(frozen=True)
class EditorCalls:
    """How the search asks for rewrites (their number and temperature are the search's own)."""

    model: str
    max_tokens: int
    format: Literal["json", "text"]
    retry_unreadable: bool


@dataclass(frozen=True)
class SearchPlan:
    """Everything one search needs, built by the job from a run's settings
    (:func:`drpo.jobs.optimize.search_plan`): the search never reads a job's configuration."""

    search: SearchSettings
    proposer: ProposerCalls
    critic: CriticCalls
    editor: EditorCalls


@dataclass(frozen=True)
class Node:
    """A prompt judged on one query. ``path_rewards`` excludes the root, as in the paper."""

    node_id: str
    parent_id: str | None
    level: int
    system_prompt: str
    query: str
    answer: str
    critique: Critique
    path_prompts: tuple[str, ...]
    path_rewards: tuple[float, ...]
    skipped: bool = False

    @property
    def reward(self) -> float:
        return self.critique.effective_reward


@dataclass
class SearchResult:
    best: Node
    best_score: float
    levels: int
    #: The final beam, best first, with its aggregated scores.
    final_beam: list[tuple[Node, float]]
    #: Per level: (best score, mean score) of the beam kept.
    trace: list[tuple[float, float]] = field(default_factory=list)
    #: Held-out check (a setting): mean reward of each final-beam prompt on unseen queries.
    held_out: list[tuple[Node, float]] = field(default_factory=list)


class BeamSearch:
    """One DRPO search. Many of them can run on one bus at the same time."""

    def __init__(
        self,
        bus: Bus,
        run_id: str,
        plan: SearchPlan,
        queries: Sequence[str],
        retrieve: Retrieve,
    ) -> None:
        self.agents = AgentClient(bus, run_id, sender="search")
        self.run_id = run_id
        self.plan = plan
        self.search = plan.search
        self.queries = list(queries)
        self.retrieve = retrieve
        self.health = SearchHealth(warn_share=self.search.warn_failure_share)
        #: Called after each level with (level, depth limit, best score, mean score of the beam).
        self.on_level: Callable[[int, int, float, float], None] | None = None

    # ------------------------------------------------------------------ the algorithm

    def aggregate(self, rewards: Sequence[float]) -> float:
        """Path mean when the beam is wider than one, else the last reward (spec §3.2)."""
        if not rewards:
            return 0.0
        return sum(rewards) / len(rewards) if self.search.beam_size > 1 else rewards[-1]

    def should_skip(self, node: Node) -> bool:
        """No rewrite when the verdict failed to parse or the reward is above the threshold."""
        return node.critique.failed or node.critique.reward > self.search.skip_threshold

    async def run(self) -> SearchResult:
        async with anyio.create_task_group() as tg:
            reachable = self.search.depth + self.search.depth_extension
            self._start_aspect_selection(tg, self.queries[:reachable])
            result = await self._beam_search()
            tg.cancel_scope.cancel()  # selections for queries the search never reached
        if self.search.held_out_queries:
            result.held_out = await self._held_out_check(result, result.levels)
        return result

    async def _beam_search(self) -> SearchResult:
        root = await self._evaluate(
            node_id="n0",
            parent=None,
            prompt=self.search.initial_prompt,
            level=0,
            skipped=False,
        )
        max_depth = original_depth = self.search.depth
        beam: list[tuple[Node, float]] = [(root, 0.0)]
        terminal: list[tuple[Node, float]] = []
        trace: list[tuple[float, float]] = []
        depth = 0
        while depth < max_depth + 1 and beam:
            level_len = beam[0][0].level + 1  # every node of a beam has the same state length
            if level_len >= max_depth or level_len >= len(self.queries):
                terminal.extend(beam)
                break
            skips = [self.should_skip(node) for node, _ in beam]
            if any(skips) and max_depth < original_depth + self.search.depth_extension:
                max_depth += 1
            level = LevelHealth()
            children = await self._expand_level(beam, skips, depth + 1, level)
            level.judged = len(children)
            level.failed_judgements = sum(1 for node, _ in children if node.critique.failed)
            ranked = sorted(children, key=lambda item: item[1], reverse=True)  # stable
            beam, pruned = ranked[: self.search.beam_size], ranked[self.search.beam_size :]
            scores = [score for _, score in beam]
            trace.append((scores[0], sum(scores) / len(scores)))
            await self._emit(
                LevelCompleted(
                    level=depth + 1,
                    kept=tuple(node.node_id for node, _ in beam),
                    pruned=tuple(node.node_id for node, _ in pruned),
                    best_score=scores[0],
                    mean_score=sum(scores) / len(scores),
                    depth_limit=max_depth,
                    judged=level.judged,
                    failed_judgements=level.failed_judgements,
                    edits=level.edits,
                    failed_edits=level.failed_edits,
                )
            )
            await self._check_health(depth + 1, level)
            if self.on_level is not None:
                self.on_level(depth + 1, max_depth, scores[0], sum(scores) / len(scores))
            depth += 1
        best, best_score = max(terminal, key=lambda item: item[1])  # first wins ties
        final_beam = sorted(terminal, key=lambda item: item[1], reverse=True)
        return SearchResult(
            best=best,
            best_score=best_score,
            levels=best.level + 1,
            final_beam=final_beam,
            trace=trace,
        )

    async def _check_health(self, level: int, health: LevelHealth) -> None:
        """Warn when failures pass the threshold; stop when a whole level failed."""
        self.health.add_level(health)
        for warning in self.health.new_warnings():
            log.warning("the search may not learn", run_id=self.run_id, problem=warning)
            await self.agents.emit(Note(text=warning, data={"level": level}))
        if self.search.stop_on_failed_level:
            check_level(level, health)

    async def _expand_level(
        self, beam: list[tuple[Node, float]], skips: list[bool], level: int, health: LevelHealth
    ) -> list[tuple[Node, float]]:
        """Rewrite every beam node and evaluate every child, all at once; results keep the
        insertion order (beam rank, then the editor's order) whatever finishes first."""
        results: list[list[tuple[Node, float]]] = [[] for _ in beam]

        async def expand(rank: int, parent: Node, skip: bool) -> None:
            prompts = [parent.system_prompt] if skip else await self._rewrite(parent, health)
            children: list[tuple[Node, float] | None] = [None] * len(prompts)

            async def evaluate(index: int, prompt: str) -> None:
                child = await self._evaluate(
                    node_id=f"n{level}.{rank}.{index}",
                    parent=parent,
                    prompt=prompt,
                    level=level,
                    skipped=skip,
                )
                children[index] = (child, self.aggregate(child.path_rewards))

            async with anyio.create_task_group() as tg:
                for index, prompt in enumerate(prompts):
                    tg.start_soon(evaluate, index, prompt)
            results[rank] = [child for child in children if child is not None]

        async with anyio.create_task_group() as tg:
            for rank, ((parent, _), skip) in enumerate(zip(beam, skips, strict=True)):
                tg.start_soon(expand, rank, parent, skip)
        return [child for per_parent in results for child in per_parent]

    async def _rewrite(self, parent: Node, health: LevelHealth) -> list[str]:
        """The editor's candidates; when none can be parsed the parent's prompt carries on
        (the paper's code would crash here)."""
        reply = await self.agents.edit_prompt(
            EditPrompt(
                model=self.plan.editor.model,
                system_prompt=parent.system_prompt,
                query=parent.query,
                answer=parent.answer,
                critique=parent.critique,
                history=parent.path_prompts[-self.search.history :],
                n=self.search.n_actions,
                temperature=self.search.temperature,
                max_tokens=self.plan.editor.max_tokens,
                format=self.plan.editor.format,
                history_limit=self.search.history,
                retry_unreadable=self.plan.editor.retry_unreadable,
            ),
            node_id=parent.node_id,
        )
        health.edits += self.search.n_actions
        health.failed_edits += reply.dropped
        return list(reply.prompts) or [parent.system_prompt]

    async def _evaluate(
        self, *, node_id: str, parent: Node | None, prompt: str, level: int, skipped: bool
    ) -> Node:
        """Answer the query of ``level`` under ``prompt`` and judge the answer: one node."""
        query = self.queries[level]
        answer, critique = await self._answer_and_judge(prompt, query, node_id)
        reward = critique.effective_reward
        path_rewards = (*parent.path_rewards, reward) if parent is not None else ()
        node = Node(
            node_id=node_id,
            parent_id=parent.node_id if parent else None,
            level=level,
            system_prompt=prompt,
            query=query,
            answer=answer,
            critique=critique,
            path_prompts=(*(parent.path_prompts if parent else ()), prompt),
            path_rewards=path_rewards,
            skipped=skipped,
        )
        await self.agents.emit(
            NodeCreated.from_node(node, self.aggregate(path_rewards)), node_id=node_id
        )
        return node

    async def _answer_and_judge(
        self, prompt: str, query: str, node_id: str
    ) -> tuple[str, Critique]:
        """The proposer's answer to ``query`` under ``prompt``, and the critic's verdict on it."""
        proposer = self.plan.proposer
        answer = await self.agents.propose(
            ProposeAnswer(
                model=proposer.model,
                system_prompt=prompt,
                icl_examples=tuple(await self.retrieve(query)),
                query=query,
                framing=proposer.framing,
                max_tokens=proposer.max_tokens,
                temperature=proposer.temperature,
                top_p=proposer.top_p,
                icl_headers=proposer.icl_headers,
                cut_runaway=proposer.cut_runaway,
            ),
            node_id=node_id,
        )
        return answer, await self.judge(query, answer, node_id=node_id)

    async def judge(self, query: str, answer: str, *, node_id: str | None = None) -> Critique:
        """The critic's verdict on ``answer``, on the aspects it selected for ``query``."""
        return await self.agents.judge(
            Judge(
                model=self.plan.critic.model,
                query=query,
                answer=answer,
                mode=self.plan.critic.mode,
                max_tokens=self.plan.critic.max_tokens,
                policy=self.plan.critic.policy,
            ),
            node_id=node_id,
        )

    # ------------------------------------------------------------------ held-out check

    async def _held_out_check(self, result: SearchResult, used: int) -> list[tuple[Node, float]]:
        """Re-score the final beam's prompts on queries the search never saw (off by default:
        the paper returns the last prompt of the best path, judged on a single query)."""
        unseen = self.queries[used : used + self.search.held_out_queries]
        if not unseen:
            return []
        scores: list[tuple[Node, float]] = []
        for rank, (node, _) in enumerate(result.final_beam):
            rewards: list[float] = [0.0] * len(unseen)

            async def score(
                index: int,
                query: str,
                node: Node = node,
                rank: int = rank,
                rewards: list[float] = rewards,
            ) -> None:
                node_id = f"heldout.{rank}.{index}"
                _, critique = await self._answer_and_judge(node.system_prompt, query, node_id)
                rewards[index] = critique.effective_reward

            async with anyio.create_task_group() as tg:
                for index, query in enumerate(unseen):
                    tg.start_soon(score, index, query)
            scores.append((node, sum(rewards) / len(rewards)))
        return scores

    # ------------------------------------------------------------------ plumbing

    def _start_aspect_selection(self, tg: anyio.abc.TaskGroup, queries: Sequence[str]) -> None:
        """Ask for the aspects of every query the search may reach, all at once, so that no
        verdict waits for its query's selection (the critic makes each one once per run). The
        first two (the root's and level 1's) are needed at once; the rest are background work
        that yields to the search's own calls on a backend that orders its work, and that a
        backend which batches locally is given one pass at a time (the agents' background
        window, :mod:`drpo.agents.window`: asked all at once, they would only queue there, and
        a verdict that needs one before its turn has it made at once)."""
        for index, query in enumerate(dict.fromkeys(queries)):
            tg.start_soon(self._select, query, index >= URGENT_SELECTIONS)

    async def _select(self, query: str, ahead_of_need: bool) -> None:
        await self.agents.select_aspects(
            SelectAspects(
                query=query,
                model=self.plan.critic.model,
                max_tokens=self.plan.critic.max_tokens,
                mode=self.plan.critic.mode,
                policy=self.plan.critic.policy,
                background=ahead_of_need,
            )
        )

    async def _emit(self, event: LevelCompleted) -> None:
        await self.agents.emit(event)
