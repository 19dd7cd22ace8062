"""The search tree of a run, rebuilt from its recorded search events (``drpo runs tree``).

Every node comes from a ``NodeCreated`` event; which nodes the beam kept and which it pruned comes
from each level's ``LevelCompleted``; the best node from ``RunFinished`` (or the run's result).
A resumed run replays its search and publishes the same node ids again: the last report of a
node (and of a level) wins. Nodes of a level that has not completed yet are ``open``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from drpo.bus.envelope import Envelope
from drpo.domain.events import LevelCompleted, NodeCreated, RunFinished
from drpo.inspect.common import JSON_FORMAT, excerpt, first_line, open_readonly, print_json
from drpo.inspect.diff import changed_line, diff_stats, word_diff
from drpo.runs.store import RunRecord, RunStore

TREE_KINDS = ("run_started", "node_created", "level_completed", "run_finished")
_NODE_ID = re.compile(r"^n(\d+(?:\.\d+)*)$")


def node_sort_key(node_id: str) -> tuple[Any, ...]:
    """``n10.0.2`` after ``n2.1.0``: numeric parts compared as numbers."""
    match = _NODE_ID.match(node_id)
    if match:
        return (0, tuple(int(part) for part in match.group(1).split(".")), node_id)
    return (1, (), node_id)


@dataclass
class AspectVerdict:
    name: str
    score: float
    rationale: str


@dataclass
class TreeNode:
    """A search node as the search published it (its ``NodeCreated`` event), and where it stands
    in the tree."""

    event: NodeCreated
    timestamp: float
    #: ``root``, ``kept`` (by the beam at its level), ``pruned``, or ``open`` (level not done).
    status: str = "open"
    #: Position in the beam at its level (0 = best), for kept nodes.
    rank: int | None = None
    on_best_path: bool = False
    children: list[str] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.event.node_id

    @property
    def parent_id(self) -> str | None:
        return self.event.parent_id

    @property
    def level(self) -> int:
        return self.event.level

    @property
    def system_prompt(self) -> str:
        return self.event.system_prompt

    @property
    def query(self) -> str:
        return self.event.query

    @property
    def answer(self) -> str:
        return self.event.answer

    @property
    def reward(self) -> float:
        return self.event.reward

    @property
    def score(self) -> float:
        return self.event.score

    @property
    def path_rewards(self) -> list[float]:
        return list(self.event.path_rewards)

    @property
    def skipped(self) -> bool:
        return self.event.skipped

    @property
    def failed(self) -> bool:
        return self.event.critique.failed

    @property
    def error(self) -> str | None:
        return self.event.critique.error

    @property
    def aspects(self) -> list[AspectVerdict]:
        return [
            AspectVerdict(name, verdict.score, verdict.rationale)
            for name, verdict in self.event.critique.scores.items()
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "parent_id": self.parent_id,
            "level": self.level,
            "status": self.status,
            "rank": self.rank,
            "on_best_path": self.on_best_path,
            "reward": self.reward,
            "score": self.score,
            "path_rewards": self.path_rewards,
            "skipped": self.skipped,
            "failed": self.failed,
            "error": self.error,
            "aspects": {a.name: {"score": a.score, "rationale": a.rationale} for a in self.aspects},
            "system_prompt": self.system_prompt,
            "query": self.query,
            "answer": self.answer,
            "children": self.children,
            "timestamp": self.timestamp,
        }


@dataclass
class LevelReport:
    level: int
    kept: list[str]
    pruned: list[str]
    best_score: float
    mean_score: float
    depth_limit: int


@dataclass
class SearchTree:
    run_id: str
    run_status: str
    nodes: dict[str, TreeNode]
    levels: list[LevelReport]
    best_node_id: str | None
    #: True when the best node is the run's result; False while running (the beam's current best).
    best_is_final: bool
    best_path: list[str]
    roots: list[str]

    def parent_prompt(self, node: TreeNode) -> str | None:
        parent = self.nodes.get(node.parent_id) if node.parent_id else None
        return parent.system_prompt if parent else None

    def counts(self) -> dict[str, int]:
        counts = {"nodes": len(self.nodes), "root": 0, "kept": 0, "pruned": 0, "open": 0}
        for node in self.nodes.values():
            counts[node.status] = counts.get(node.status, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "format": JSON_FORMAT,
            "run_id": self.run_id,
            "run_status": self.run_status,
            "best_node_id": self.best_node_id,
            "best_is_final": self.best_is_final,
            "best_path": self.best_path,
            "counts": self.counts(),
            "levels": [
                {
                    "level": level.level,
                    "kept": level.kept,
                    "pruned": level.pruned,
                    "best_score": level.best_score,
                    "mean_score": level.mean_score,
                    "depth_limit": level.depth_limit,
                }
                for level in self.levels
            ],
            "roots": self.roots,
            "nodes": [node.to_json() for node in self.nodes.values()],
        }


def build_tree(
    run_id: str, run_status: str, envelopes: Iterable[Envelope], result: Any = None
) -> SearchTree:
    """The tree from a run's search events, in recorded order (pure: no I/O)."""
    created: dict[str, NodeCreated] = {}
    stamps: dict[str, float] = {}
    levels: dict[int, LevelCompleted] = {}
    finished: RunFinished | None = None
    for envelope in envelopes:
        payload = envelope.payload
        if isinstance(payload, NodeCreated):
            created[payload.node_id] = payload  # a resumed run re-publishes: the last one wins
            stamps[payload.node_id] = envelope.timestamp
        elif isinstance(payload, LevelCompleted):
            levels[payload.level] = payload
        elif isinstance(payload, RunFinished):
            finished = payload

    nodes: dict[str, TreeNode] = {}
    for node_id in sorted(created, key=node_sort_key):
        event = created[node_id]
        nodes[node_id] = TreeNode(
            event=event,
            timestamp=stamps[node_id],
            status="root" if event.parent_id is None else "open",
        )
    roots = []
    for node in nodes.values():
        parent = nodes.get(node.parent_id) if node.parent_id else None
        if parent is None:
            roots.append(node.node_id)
        else:
            parent.children.append(node.node_id)

    reports = [levels[level] for level in sorted(levels)]
    for report in reports:
        for rank, node_id in enumerate(report.kept):
            if node_id in nodes:
                nodes[node_id].status, nodes[node_id].rank = "kept", rank
        for node_id in report.pruned:
            if node_id in nodes:
                nodes[node_id].status = "pruned"

    best_id, final = None, False
    result_best = result.get("best_node_id") if isinstance(result, dict) else None
    if finished is not None and finished.best_node_id:
        best_id, final = finished.best_node_id, True
    elif result_best and run_status == "finished":
        best_id, final = result_best, True
    elif reports and reports[-1].kept:
        best_id = reports[-1].kept[0]
    elif roots:
        best_id = roots[0]
    path: list[str] = []
    cursor = nodes.get(best_id) if best_id else None
    while cursor is not None and cursor.node_id not in path:
        path.append(cursor.node_id)
        cursor.on_best_path = True
        cursor = nodes.get(cursor.parent_id) if cursor.parent_id else None
    path.reverse()

    return SearchTree(
        run_id=run_id,
        run_status=run_status,
        nodes=nodes,
        levels=[
            LevelReport(
                level=r.level,
                kept=list(r.kept),
                pruned=list(r.pruned),
                best_score=r.best_score,
                mean_score=r.mean_score,
                depth_limit=r.depth_limit,
            )
            for r in reports
        ],
        best_node_id=best_id if best_id in nodes else None,
        best_is_final=final,
        best_path=path,
        roots=roots,
    )


async def load_tree(store: RunStore, record: RunRecord) -> SearchTree:
    """The tree of a run as committed right now (one ordered pass over its search events)."""
    envelopes = [
        message.envelope async for message in store.iter_messages(record.run_id, kinds=TREE_KINDS)
    ]
    return build_tree(record.run_id, record.status, envelopes, record.result)


# ------------------------------------------------------------------------------------ console

_STATUS_STYLE = {"root": "bold", "kept": "green", "pruned": "red dim", "open": "yellow"}


def reward_style(value: float) -> str:
    if value >= 4.5:
        return "bold green"
    if value >= 3.5:
        return "green"
    if value >= 2.5:
        return "yellow"
    return "red"


def node_label(tree: SearchTree, node: TreeNode, *, chars: int = 60) -> Text:
    """One line for a node: id, reward, path score, kept/pruned, aspect scores, prompt summary.

    Built from :class:`Text` parts, so prompt text is never read as rich markup."""
    label = Text()
    best = node.on_best_path
    label.append("★ " if best else "  ", style="bold yellow")
    label.append(node.node_id, style="bold yellow" if best else "bold")
    label.append("  reward ")
    label.append(f"{node.reward:.2f}", style=reward_style(node.reward))
    if node.parent_id is not None:
        label.append(f"  path {node.score:.2f}")
    status = node.status + (f" #{node.rank + 1}" if node.rank is not None else "")
    label.append(f"  [{status}]", style=_STATUS_STYLE.get(node.status, ""))
    if node.skipped:
        label.append(" [skip: prompt carried over]", style="cyan")
    if node.failed:
        label.append(f" [judge failed: {excerpt(node.error, 40)}]", style="bold red")
    if node.aspects:
        label.append("  ")
        for index, aspect in enumerate(node.aspects):
            if index:
                label.append(" · ", style="dim")
            label.append(f"{aspect.name} ")
            label.append(f"{aspect.score:g}", style=reward_style(aspect.score))
    parent_prompt = tree.parent_prompt(node)
    if parent_prompt is None:
        summary = first_line(node.system_prompt, chars)
    elif parent_prompt == node.system_prompt:
        summary = "(same prompt as parent)"
    else:
        ops = word_diff(parent_prompt, node.system_prompt)
        added, removed = diff_stats(ops)
        summary = f"Δ+{added}/-{removed} words: {changed_line(ops, chars)}"
    label.append("\n    ")
    label.append(summary, style="dim italic")
    return label


def render_tree(
    tree: SearchTree, *, chars: int = 60, show_pruned: bool = True, title: str | None = None
) -> Tree:
    heading = Text(title or f"run {tree.run_id} ({tree.run_status})", style="bold")
    if tree.best_node_id:
        best = tree.nodes[tree.best_node_id]
        heading.append(
            f"  {'best' if tree.best_is_final else 'current best'} {best.node_id} "
            f"path score {best.score:.3f}",
            style="yellow",
        )
    counts = tree.counts()
    heading.append(
        f"  ({counts['nodes']} nodes: {counts['kept']} kept, {counts['pruned']} pruned"
        + (f", {counts['open']} open" if counts["open"] else "")
        + ")",
        style="dim",
    )
    root = Tree(heading, guide_style="dim")

    def add(branch: Tree, node_id: str) -> None:
        node = tree.nodes[node_id]
        if node.status == "pruned" and not show_pruned:
            return
        style = "yellow" if node.on_best_path else "dim"
        child_branch = branch.add(node_label(tree, node, chars=chars), guide_style=style)
        for child_id in node.children:
            add(child_branch, child_id)

    for node_id in tree.roots:
        add(root, node_id)
    return root


async def tree_view(
    db: Path,
    run: str,
    as_json: bool,
    console: Console,
    *,
    chars: int = 60,
    show_pruned: bool = True,
) -> None:
    async with open_readonly(db) as store:
        record = await store.get_run(run)
        tree = await load_tree(store, record)
    if as_json:
        print_json(console, tree.to_json())
        return
    if not tree.nodes:
        console.print(
            Text(
                f"run {record.run_id} ({record.kind}, {record.status}) has no search nodes yet"
                + ("" if record.kind == "optimize" else ": only optimize runs have a search tree")
            )
        )
        return
    console.print(render_tree(tree, chars=chars, show_pruned=show_pruned))
