"""Scores, breakdowns and paired comparisons of an evaluation.

The numbers, and why:

* **Aspect mean**: the mean 1-5 score of an aspect over the queries judged on it. **Overall**:
  the mean of the aspect means, the "average" column of the DRPO and URIAL tables (each aspect
  counts once, whatever its number of queries). A judgement that failed leaves its query out of
  that prompt's means; failures are counted and reported.
* **Paired differences.** Every prompt answers the same queries and one judge scores them all,
  so a prompt is compared with the baseline (the first prompt) query by query: per aspect, the
  mean of (score - baseline score) over the queries both have a score for; overall, the mean of
  those aspect differences (the difference of the two "overall" numbers on the paired queries).
* **Bootstrap 95% interval** of each difference: queries are resampled with replacement
  (``resamples`` times, seeded, so a report is reproducible) and the statistic recomputed; the
  interval is the 2.5th to 97.5th percentile. Resampling whole queries keeps the pairing and the
  correlation between a query's aspects.
* **Biggest changes**: per query, the reward (mean of its aspects) of the prompt minus the
  baseline's; the queries that gained and lost most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drpo.jobs.evaluation.protocol import ALL_ASPECTS, TAG_KINDS, EvalQuery

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
#: Characters of each answer kept in the "biggest changes" of a stored result.
EXCERPT_CHARS = 400


@dataclass(frozen=True)
class Interval:
    """A paired difference: the estimate, its bootstrap interval, and the paired queries."""

    estimate: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "diff": _r(self.estimate),
            "low": _r(self.low),
            "high": _r(self.high),
            "n": self.n,
        }


def _r(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _as_matrix(values: np.ndarray | Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    matrix = np.asarray(values, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2:
        raise ValueError("scores must be a vector (one per query) or a queries x aspects matrix")
    return matrix


def mean_of_column_means(matrix: np.ndarray) -> float | None:
    """The mean over columns (that have any value) of each column's mean, ignoring NaN."""
    matrix = _as_matrix(matrix)
    present = ~np.isnan(matrix)
    counts = present.sum(axis=0)
    if not counts.any():
        return None
    sums = np.where(present, matrix, 0.0).sum(axis=0)
    return float(np.mean(sums[counts > 0] / counts[counts > 0]))


def paired_bootstrap(
    scores: np.ndarray | Sequence,
    baseline: np.ndarray | Sequence,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """The paired difference ``scores - baseline`` with a percentile bootstrap interval.

    Both are per-query vectors or queries x aspects matrices with NaN where a score is missing.
    The statistic is the mean over aspects of the mean per-query difference, on the queries
    where both have that aspect. Seeded: the same inputs and seed give the same interval.
    """
    a, b = _as_matrix(scores), _as_matrix(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape, got {a.shape} and {b.shape}")
    diff = a - b  # NaN where either is missing
    paired_rows = ~np.isnan(diff).all(axis=1)
    diff = diff[paired_rows]
    n = int(diff.shape[0])
    estimate = mean_of_column_means(diff) if n else None
    if estimate is None:
        return Interval(None, None, None, n)
    if n == 1 or resamples <= 0:
        return Interval(estimate, None, None, n)
    present = ~np.isnan(diff)
    values = np.where(present, diff, 0.0)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(size, n))
        weights = np.zeros((size, n))
        np.add.at(weights, (np.arange(size)[:, None], picks), 1.0)
        sums = weights @ values
        counts = weights @ present
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)
            stats[start : start + size] = np.nanmean(means, axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.nanpercentile(stats, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), n)


# --------------------------------------------------------------------------------------------
# Summaries


def score_matrix(
    per_query: Sequence[Mapping[str, float] | None], aspects: Sequence[str]
) -> np.ndarray:
    """Queries x aspects, NaN where a query has no score for an aspect (or failed: None)."""
    matrix = np.full((len(per_query), len(aspects)), np.nan)
    for row, scores in enumerate(per_query):
        for col, aspect in enumerate(aspects):
            if scores and aspect in scores:
                matrix[row, col] = scores[aspect]
    return matrix


def _aspect_table(matrix: np.ndarray, aspects: Sequence[str]) -> dict[str, dict[str, Any]]:
    table = {}
    for col, aspect in enumerate(aspects):
        column = matrix[:, col]
        present = column[~np.isnan(column)]
        if present.size:
            table[aspect] = {"mean": _r(float(present.mean())), "n": int(present.size)}
    return table


def _query_rewards(matrix: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        present = ~np.isnan(matrix)
        counts = present.sum(axis=1)
        sums = np.where(present, matrix, 0.0).sum(axis=1)
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)


def group_rows(queries: Sequence[EvalQuery]) -> dict[str, dict[str, list[int]]]:
    """Row indices per group: by category, and by each tag kind present (a query with two task
    types is in both groups)."""
    groups: dict[str, dict[str, list[int]]] = {"category": {}}
    for row, query in enumerate(queries):
        groups["category"].setdefault(query.category, []).append(row)
        for kind in TAG_KINDS:
            for value in query.tags.get(kind, ()):
                groups.setdefault(kind, {}).setdefault(value, []).append(row)
    ordered: dict[str, dict[str, list[int]]] = {}
    for kind in ("category", *TAG_KINDS):
        if kind in groups:
            ordered[kind] = dict(sorted(groups[kind].items(), key=lambda kv: (-len(kv[1]), kv[0])))
    return ordered


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def summarize(
    prompts: Sequence[Mapping[str, Any]],
    queries: Sequence[EvalQuery],
    scores: Sequence[Sequence[Mapping[str, float] | None]],
    answers: Sequence[Sequence[str]] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    top: int = 5,
) -> dict[str, Any]:
    """Everything ``drpo eval`` reports, as JSON-able data.

    ``prompts[i]`` describes prompt i (label, model, ...); ``scores[i][j]`` is prompt i's aspect
    scores on query j (None when the judgement failed); ``answers[i][j]`` its answer.
    """
    used = {a for query in queries for a in query.aspects}
    aspects = [a for a in ALL_ASPECTS if a in used]
    matrices = [score_matrix(per_query, aspects) for per_query in scores]
    groups = group_rows(queries)
    result: dict[str, Any] = {
        "aspects": aspects,
        "n_queries": len(queries),
        "categories": {name: len(rows) for name, rows in groups["category"].items()},
        "bootstrap": {"resamples": resamples, "seed": seed, "confidence": confidence},
        "prompts": [],
        "comparisons": [],
    }
    for prompt, per_query, matrix in zip(prompts, scores, matrices, strict=True):
        rewards = _query_rewards(matrix)
        entry = dict(prompt)
        entry.update(
            {
                "n": len(per_query),
                "failed": sum(1 for s in per_query if not s),
                "aspects": _aspect_table(matrix, aspects),
                "overall": _r(mean_of_column_means(matrix)),
                "query_mean": _r(float(np.nanmean(rewards)))
                if np.isfinite(rewards).any()
                else None,
                "groups": {
                    kind: {
                        name: {
                            "n": len(rows),
                            "overall": _r(mean_of_column_means(matrix[rows])),
                            "aspects": {
                                a: v["mean"]
                                for a, v in _aspect_table(matrix[rows], aspects).items()
                            },
                        }
                        for name, rows in by_name.items()
                    }
                    for kind, by_name in groups.items()
                },
            }
        )
        result["prompts"].append(entry)
    if not matrices:
        return result
    base, base_rewards = matrices[0], _query_rewards(matrices[0])
    options = {"resamples": resamples, "seed": seed, "confidence": confidence}
    for index in range(1, len(matrices)):
        matrix = matrices[index]
        rewards = _query_rewards(matrix)
        delta = rewards - base_rewards
        finite = np.isfinite(delta)
        comparison: dict[str, Any] = {
            "label": prompts[index].get("label"),
            "baseline": prompts[0].get("label"),
            "overall": paired_bootstrap(matrix, base, **options).to_dict(),
            "aspects": {
                a: paired_bootstrap(matrix[:, col], base[:, col], **options).to_dict()
                for col, a in enumerate(aspects)
            },
            "groups": {
                kind: {
                    name: paired_bootstrap(matrix[rows], base[rows], **options).to_dict()
                    for name, rows in by_name.items()
                }
                for kind, by_name in groups.items()
            },
            "wins": int(np.sum(delta[finite] > 1e-9)),
            "ties": int(np.sum(np.abs(delta[finite]) <= 1e-9)),
            "losses": int(np.sum(delta[finite] < -1e-9)),
        }
        order = [int(i) for i in np.argsort(-np.where(finite, delta, -np.inf), kind="stable")]
        improved = [i for i in order if finite[i] and delta[i] > 1e-9][:top]
        worse = [i for i in reversed(order) if finite[i] and delta[i] < -1e-9][:top]

        def change(row: int, index: int = index, rewards: np.ndarray = rewards) -> dict[str, Any]:
            query = queries[row]
            item = {
                "id": query.id,
                "instruction": _excerpt(query.instruction, 200),
                "category": query.category,
                "baseline_score": _r(float(base_rewards[row])),
                "score": _r(float(rewards[row])),
                "diff": _r(float(rewards[row] - base_rewards[row])),
            }
            if answers is not None:
                item["baseline_answer"] = _excerpt(answers[0][row])
                item["answer"] = _excerpt(answers[index][row])
            return item

        comparison["most_improved"] = [change(row) for row in improved]
        comparison["most_worsened"] = [change(row) for row in worse]
        result["comparisons"].append(comparison)
    return result
