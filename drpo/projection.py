"""How many calls a search will make, before it starts (spec §8), and what they may cost.

The count assumes no skips (a skip only saves calls) and a cold aspect cache, so it is an upper
bound at the configured depth; the depth extension can add up to ``depth_extension`` levels, each
of which needs a skip at the level before, so the bound at the extended depth is also shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from drpo.config import OptimizeConfig


@dataclass(frozen=True)
class CallProjection:
    depth: int
    proposer: int
    critic_select: int
    critic_judge: int
    editor: int

    @property
    def total(self) -> int:
        return self.proposer + self.critic_select + self.critic_judge + self.editor


def project_calls(config: OptimizeConfig, depth: int | None = None) -> CallProjection:
    """Calls per role for a search of ``depth`` levels (spec §8: total = 2G + O + M).

    In ``logprobs`` judge mode each aspect is one short call; we count 4 aspects per verdict,
    the middle of the critic's 2-5.
    """
    search = config.search
    d = min(depth or search.depth, search.num_train_queries)
    a, b = search.n_actions, search.beam_size
    generations = 1 + a + max(d - 2, 0) * a * min(a, b) if d >= 2 else 1
    editor_requests = 1 + max(d - 2, 0) * min(a, b) if d >= 2 else 0
    judge_calls = generations * (4 if config.critic.mode == "logprobs" else 1)
    return CallProjection(
        depth=d,
        proposer=generations,
        critic_select=d,
        critic_judge=judge_calls,
        editor=editor_requests,
    )


def describe_projection(config: OptimizeConfig) -> str:
    low = project_calls(config)
    high = project_calls(config, config.search.depth + config.search.depth_extension)
    return (
        f"projected calls for {config.models.base} (depth {low.depth}, up to {high.depth} with "
        f"extensions): proposer {low.proposer}, critic {low.critic_select} selections + "
        f"{low.critic_judge} judgements, editor {low.editor} requests "
        f"(n={config.search.n_actions}); total {low.total} (at most {high.total})"
    )
