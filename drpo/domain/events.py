"""What the search publishes as it goes: the run's start, every node, every level, the outcome.

The recorder persists them and the views (tree, report, log) read them back; a resumed run
publishes them again, so the last one of a node wins.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import Field

from drpo.domain.values import Critique, Value

#: How a run ended: it does no more work (until it is resumed).
EndStatus = Literal["finished", "interrupted", "failed", "budget_exhausted"]
#: Every status a run can be in (the store's ``runs.status``), in the order of a run's life.
RunStatus = Literal["created", "running", "finished", "interrupted", "failed", "budget_exhausted"]


class RunStarted(Value):
    kind: Literal["run_started"] = "run_started"
    config: dict = Field(default_factory=dict)
    queries: tuple[str, ...] = ()


class SearchNode(Protocol):
    """What the search knows of a node (:class:`drpo.agents.search.Node` has it)."""

    node_id: str
    parent_id: str | None
    level: int
    system_prompt: str
    query: str
    answer: str
    critique: Critique
    path_rewards: tuple[float, ...]
    skipped: bool


class NodeCreated(Value):
    """A search node: a prompt, the query it was judged on, its answer, critique and reward.

    The one shape of a node outside the running search: the bus carries it, the store keeps it,
    and the views (tree, report) read it back.
    """

    kind: Literal["node_created"] = "node_created"
    node_id: str
    parent_id: str | None
    level: int
    system_prompt: str
    query: str
    answer: str
    critique: Critique
    reward: float
    path_rewards: tuple[float, ...] = ()
    score: float = 0.0
    skipped: bool = False

    @classmethod
    def from_node(cls, node: SearchNode, score: float) -> NodeCreated:
        """The event of a search node; ``score`` is its path's aggregated reward."""
        return cls(
            node_id=node.node_id,
            parent_id=node.parent_id,
            level=node.level,
            system_prompt=node.system_prompt,
            query=node.query,
            answer=node.answer,
            critique=node.critique,
            reward=node.critique.effective_reward,
            path_rewards=node.path_rewards,
            score=score,
            skipped=node.skipped,
        )


class LevelCompleted(Value):
    kind: Literal["level_completed"] = "level_completed"
    level: int
    kept: tuple[str, ...]
    pruned: tuple[str, ...] = ()
    best_score: float = 0.0
    mean_score: float = 0.0
    depth_limit: int = 0
    #: Nodes judged at this level and those whose verdict could not be read.
    judged: int = 0
    failed_judgements: int = 0
    #: Candidate prompts asked of the editor at this level, and those it could not deliver.
    edits: int = 0
    failed_edits: int = 0


class RunFinished(Value):
    kind: Literal["run_finished"] = "run_finished"
    status: EndStatus
    best_node_id: str | None = None
    best_prompt: str | None = None
    best_score: float | None = None
    error: str | None = None


class Note(Value):
    """Free-form event, for anything a viewer should show that has no typed message yet."""

    kind: Literal["note"] = "note"
    text: str
    data: dict = Field(default_factory=dict)
