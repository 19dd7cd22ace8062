"""Every message the agents exchange: immutable, typed values inside an envelope.

Each payload class has a literal ``kind`` so that a message read back from JSON (the run store,
a transcript) comes back as the same class. ``Envelope.model_validate_json(env.model_dump_json())``
equals ``env``: the round trip is lossless, which is what makes transcripts and resume trustworthy.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

#: How the critic selects aspects and scores answers: "json" (the paper's JSON replies) or
#: "logprobs" (token probabilities: yes/no per aspect, the expected 1-5 digit per score).
CriticMode = Literal["json", "logprobs"]
#: Which of drpo's repairs of the paper's critic are on (see ``drpo.agents.critic.CriticPolicy``).
CriticPolicyName = Literal["robust", "paper"]


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------------
# Domain values carried by messages


class ICLExample(_Value):
    query: str
    answer: str


class AspectSelection(_Value):
    """The aspects the critic chose for one query (the "dynamic" in dynamic rewarding)."""

    query: str
    aspects: tuple[str, ...]
    reasoning: str = ""
    analysis: dict[str, str] = Field(default_factory=dict)


class AspectScore(_Value):
    score: float
    rationale: str = ""


class Critique(_Value):
    """The judge's verdict on one answer. ``failed`` marks a judgement that could not be parsed:
    as in the paper its reward is 0 and it forces a skip."""

    scores: dict[str, AspectScore] = Field(default_factory=dict)
    reward: float = 0.0
    failed: bool = False
    error: str | None = None

    @classmethod
    def from_scores(cls, scores: dict[str, AspectScore]) -> Critique:
        if not scores:
            return cls(failed=True, error="no aspect scores")
        return cls(scores=scores, reward=sum(s.score for s in scores.values()) / len(scores))

    @property
    def effective_reward(self) -> float:
        """What the search ranks by: the reward, or 0 for a verdict that could not be read."""
        return 0.0 if self.failed else self.reward


# --------------------------------------------------------------------------------------------
# Requests (to an agent) and replies (from an agent)


class SelectAspects(_Value):
    kind: Literal["select_aspects"] = "select_aspects"
    query: str
    model: str
    variant: Literal["search", "icl"] = "search"
    max_tokens: int = 2048
    #: "json": the paper's selection reply; "logprobs": yes/no probabilities per aspect.
    mode: CriticMode = "json"
    policy: CriticPolicyName = "robust"
    #: A selection asked for ahead of need (no verdict waits for it yet): its model calls yield
    #: to the ones the search is waiting on, where a backend can order its work (local batches).
    background: bool = False


class AspectsSelected(_Value):
    kind: Literal["aspects_selected"] = "aspects_selected"
    selection: AspectSelection


#: How the aligned model is prompted: "raw" (one completion prompt: the paper's search layout
#: for models it served itself), "chat" (the paper's layout for chat-only API models: the
#: instructions and examples as the system message, the framed query as the user message), or
#: "inference" (the paper's inference layout: no "# instructions" header).
Framing = Literal["raw", "chat", "inference"]
#: How the ICL examples are headed: "paper" ("# Query:" first, then "#Query:"/"#Answer:", as the
#: paper's code writes them) or "uniform" ("# Query:"/"# Answer:" everywhere, like the query).
ICLHeaders = Literal["paper", "uniform"]


class ProposeAnswer(_Value):
    kind: Literal["propose_answer"] = "propose_answer"
    model: str
    system_prompt: str
    icl_examples: tuple[ICLExample, ...] = ()
    query: str
    framing: Framing = "raw"
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    icl_headers: ICLHeaders = "uniform"
    #: Cut a runaway continuation (a "# Query:" block the model invents after its answer).
    cut_runaway: bool = True


class Answer(_Value):
    kind: Literal["answer"] = "answer"
    text: str


class Judge(_Value):
    kind: Literal["judge"] = "judge"
    model: str
    query: str
    answer: str
    #: The aspects to judge on; None: the query's own, selected (once per run) by the critic.
    selection: AspectSelection | None = None
    mode: CriticMode = "json"
    variant: Literal["search", "icl"] = "search"
    max_tokens: int = 2048
    policy: CriticPolicyName = "robust"


class Judged(_Value):
    kind: Literal["judged"] = "judged"
    critique: Critique


class EditPrompt(_Value):
    kind: Literal["edit_prompt"] = "edit_prompt"
    model: str
    system_prompt: str
    query: str
    answer: str
    critique: Critique
    #: The last prompts of the path, the current one included (the editor shows at most 5).
    history: tuple[str, ...] = ()
    n: int = Field(default=1, ge=1)
    temperature: float = 0.2
    max_tokens: int = 2048
    #: "json": the paper's reply format; "text": a plain continuation, for small models.
    format: Literal["json", "text"] = "json"
    #: Most prompts of the path the editor is shown, the current one included (paper: 5).
    history_limit: int = Field(default=5, ge=1)
    #: Ask once more, with a format reminder, for a candidate that cannot be read (paper: no).
    retry_unreadable: bool = True


class PromptCandidates(_Value):
    kind: Literal["prompt_candidates"] = "prompt_candidates"
    prompts: tuple[str, ...]
    dropped: int = 0


class EditAnswer(_Value):
    kind: Literal["edit_answer"] = "edit_answer"
    model: str
    query: str
    answer: str
    critique: Critique
    max_tokens: int = 2048
    #: "json": the paper's {analysis, thought, new_response}; "text": a plain continuation.
    format: Literal["json", "text"] = "json"
    #: Ask once more, with a format reminder, when the rewrite cannot be read (paper: once too,
    #: through a bare retry of the same call).
    retry_unreadable: bool = True


class AnswerRewritten(_Value):
    kind: Literal["answer_rewritten"] = "answer_rewritten"
    answer: str | None
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Search events (published by the coordinator; the recorder and viewers read them)


class RunStarted(_Value):
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


class NodeCreated(_Value):
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


class LevelCompleted(_Value):
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


class RunFinished(_Value):
    kind: Literal["run_finished"] = "run_finished"
    status: Literal["finished", "interrupted", "failed", "budget_exhausted"]
    best_node_id: str | None = None
    best_prompt: str | None = None
    best_score: float | None = None
    error: str | None = None


class Failure(_Value):
    """An agent could not handle a request (its handler raised). Requesters see it as an error."""

    kind: Literal["failure"] = "failure"
    error_type: str
    message: str


class Note(_Value):
    """Free-form event, for anything a viewer should show that has no typed message yet."""

    kind: Literal["note"] = "note"
    text: str
    data: dict = Field(default_factory=dict)


Payload = Annotated[
    SelectAspects
    | AspectsSelected
    | ProposeAnswer
    | Answer
    | Judge
    | Judged
    | EditPrompt
    | PromptCandidates
    | EditAnswer
    | AnswerRewritten
    | RunStarted
    | NodeCreated
    | LevelCompleted
    | RunFinished
    | Failure
    | Note,
    Field(discriminator="kind"),
]

PAYLOAD_TYPES: tuple[type[BaseModel], ...] = Payload.__origin__.__args__  # type: ignore[attr-defined]


def new_id() -> str:
    """128 random bits as hex, like uuid4().hex but about twice as fast (it is on every message)."""
    return os.urandom(16).hex()


class Envelope(_Value):
    """Who sent what, in reply to what, because of what, for which run and search node."""

    payload: Payload
    topic: str
    sender: str
    run_id: str | None = None
    message_id: str = Field(default_factory=new_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    node_id: str | None = None
    timestamp: float = Field(default_factory=time.time)
