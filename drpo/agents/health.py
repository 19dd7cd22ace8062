"""Whether a search can learn: the share of verdicts that could not be read and of rewrites that
could not be used, and when to give up.

A search whose critic never produces a readable verdict still "runs": every reward is 0, every
node is skipped, the depth extends to its cap, no rewrite is ever asked for, and the result is
the initial prompt. A user pays for the whole run to learn nothing. :class:`SearchHealth` counts,
per level and in all, the judgements that failed and the candidate prompts the editor could not
deliver; the search warns once a share passes a threshold and stops (the run ends ``failed``
with a one-line reason that names the fix) when a whole level failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drpo.errors import UserError


class SearchCannotLearnError(UserError, RuntimeError):
    """Every judgement (or every rewrite) of a level failed: going on would only spend."""


@dataclass
class LevelHealth:
    judged: int = 0
    failed_judgements: int = 0
    #: Candidate prompts asked of the editor, and those it could not deliver (unreadable).
    edits: int = 0
    failed_edits: int = 0


@dataclass
class SearchHealth:
    """Counts failures as levels complete; ``warn_share`` is the share that triggers a warning."""

    warn_share: float = 0.5
    total: LevelHealth = field(default_factory=LevelHealth)
    warned: set[str] = field(default_factory=set)

    def add_level(self, level: LevelHealth) -> None:
        self.total.judged += level.judged
        self.total.failed_judgements += level.failed_judgements
        self.total.edits += level.edits
        self.total.failed_edits += level.failed_edits

    @property
    def failed_judgement_share(self) -> float:
        return self.total.failed_judgements / self.total.judged if self.total.judged else 0.0

    @property
    def failed_edit_share(self) -> float:
        return self.total.failed_edits / self.total.edits if self.total.edits else 0.0

    def new_warnings(self) -> list[str]:
        """Warnings for shares that passed the threshold since the last call (each said once)."""
        found = []
        if "judge" not in self.warned and self.failed_judgement_share >= self.warn_share:
            self.warned.add("judge")
            found.append(
                f"{self.failed_judgement_share:.0%} of verdicts could not be read "
                f"({self.total.failed_judgements} of {self.total.judged}); an unreadable verdict "
                f"scores 0 and forces a skip: {JUDGE_FIX}"
            )
        if "edit" not in self.warned and self.failed_edit_share >= self.warn_share:
            self.warned.add("edit")
            found.append(
                f"{self.failed_edit_share:.0%} of rewritten prompts could not be used "
                f"({self.total.failed_edits} of {self.total.edits}): {EDIT_FIX}"
            )
        return found


JUDGE_FIX = (
    'Use a stronger critic model, critic.mode = "logprobs" (--judge-mode logprobs) for a '
    "small local critic, or a larger critic.max_tokens if replies are cut off"
)
EDIT_FIX = (
    'Use a stronger editor model, editor.format = "text" for a small local editor, or a '
    "larger editor.max_tokens if rewrites are cut off"
)


def check_level(level: int, health: LevelHealth) -> None:
    """Raise :class:`SearchCannotLearnError` when every judgement, or every rewrite, of
    ``level`` failed."""
    if health.judged and health.failed_judgements == health.judged:
        raise SearchCannotLearnError(
            f"every verdict of level {level} was unreadable ({health.judged} of {health.judged}), "
            f"so the search cannot learn; {JUDGE_FIX}"
        )
    if health.edits and health.failed_edits == health.edits:
        raise SearchCannotLearnError(
            f"no rewritten prompt of level {level} could be used ({health.edits} asked for), "
            f"so the search cannot learn; {EDIT_FIX}"
        )
