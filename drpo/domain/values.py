"""The values DRPO reasons with, and the reward rule (spec §2.3).

Every value is an immutable pydantic model, so it is hashable, JSON-round-trippable and safe to
share between the concurrent branches of a search.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Value(BaseModel):
    """An immutable value: frozen, and unknown fields refused (a typo is an error, not data)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ICLExample(Value):
    query: str
    answer: str


class AspectSelection(Value):
    """The aspects the critic chose for one query (the "dynamic" in dynamic rewarding)."""

    query: str
    aspects: tuple[str, ...]
    reasoning: str = ""
    analysis: dict[str, str] = Field(default_factory=dict)


class AspectScore(Value):
    score: float
    rationale: str = ""


class Critique(Value):
    """The judge's verdict on one answer. ``failed`` marks a judgement that could not be parsed:
    as in the paper its reward is 0 and it forces a skip."""

    scores: dict[str, AspectScore] = Field(default_factory=dict)
    reward: float = 0.0
    failed: bool = False
    error: str | None = None

    @classmethod
    def from_scores(cls, scores: dict[str, AspectScore]) -> Critique:
        """The reward rule: the mean of the aspect scores; no score at all is a failed verdict."""
        if not scores:
            return cls(failed=True, error="no aspect scores")
        return cls(scores=scores, reward=sum(s.score for s in scores.values()) / len(scores))

    @property
    def effective_reward(self) -> float:
        """What the search ranks by: the reward, or 0 for a verdict that could not be read."""
        return 0.0 if self.failed else self.reward
