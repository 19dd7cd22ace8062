"""Plain data about runs, read from the store; the console views and the HTML report render it.

Everything here works on a run that another process is still writing: it reads committed
state through the store's own reader connections.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from drpo.domain.events import LevelCompleted
from drpo.runs.store import RoleTotals, RunRecord, RunStore, RunTotals


@dataclass
class LevelPoint:
    level: int
    best_score: float
    mean_score: float
    depth_limit: int
    judged: int = 0
    failed_judgements: int = 0
    edits: int = 0
    failed_edits: int = 0


@dataclass
class RunSummary:
    run_id: str
    kind: str
    name: str | None
    status: str
    base_model: str | None
    critic_model: str | None
    editor_model: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    levels_done: int
    depth_limit: int | None
    best_score: float | None
    best_prompt: str | None
    error: str | None
    settings: dict[str, Any]
    levels: list[LevelPoint] = field(default_factory=list)
    by_role: dict[str, RoleTotals] = field(default_factory=dict)

    @property
    def total(self) -> RoleTotals:
        return RunTotals(self.by_role).total

    @property
    def failed_judgement_share(self) -> float | None:
        """Share of the search's verdicts that could not be read (None: nothing judged yet)."""
        judged = sum(p.judged for p in self.levels)
        return sum(p.failed_judgements for p in self.levels) / judged if judged else None

    @property
    def failed_edit_share(self) -> float | None:
        """Share of the rewritten prompts asked for that could not be used."""
        edits = sum(p.edits for p in self.levels)
        return sum(p.failed_edits for p in self.levels) / edits if edits else None

    @property
    def cost_usd(self) -> float:
        return sum(totals.cost_usd for totals in self.by_role.values())

    @property
    def calls(self) -> int:
        return sum(totals.calls for totals in self.by_role.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_usd"] = self.cost_usd
        data["calls"] = self.calls
        data["totals"] = asdict(self.total)
        data["failed_judgement_share"] = self.failed_judgement_share
        data["failed_edit_share"] = self.failed_edit_share
        return data


async def summarize_run(store: RunStore, record: RunRecord) -> RunSummary:
    settings = dict(record.config.get("settings") or record.config)
    models = settings.get("models") or {}
    levels = [
        LevelPoint(
            level=event.level,
            best_score=event.best_score,
            mean_score=event.mean_score,
            depth_limit=event.depth_limit,
            judged=event.judged,
            failed_judgements=event.failed_judgements,
            edits=event.edits,
            failed_edits=event.failed_edits,
        )
        async for message in store.iter_messages(record.run_id, kinds=["level_completed"])
        if isinstance(event := message.envelope.payload, LevelCompleted)
    ]
    # a resumed run replays its levels: keep the last report of each level
    by_level = {point.level: point for point in levels}
    levels = [by_level[level] for level in sorted(by_level)]
    result = record.result if isinstance(record.result, dict) else {}
    best_score = result.get("best_score")
    if best_score is None and levels:
        best_score = max(point.best_score for point in levels)
    totals = await store.run_totals(record.run_id)
    search = settings.get("search") or {}
    return RunSummary(
        run_id=record.run_id,
        kind=record.kind,
        name=record.name,
        status=record.status,
        base_model=models.get("base"),
        critic_model=models.get("critic"),
        editor_model=models.get("editor"),
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        levels_done=len(levels),
        depth_limit=levels[-1].depth_limit if levels else search.get("depth"),
        best_score=best_score,
        best_prompt=result.get("best_prompt"),
        error=record.error,
        settings=settings,
        levels=levels,
        by_role=dict(totals.by_role),
    )
