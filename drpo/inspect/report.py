"""``drpo runs export RUN --html report.html``: one self-contained HTML file for a run.

How the file is put together, and why:

* **Self-contained and offline.** CSS, JavaScript and the reward plot (an SVG drawn here) are
  inline; a Content-Security-Policy ``default-src 'none'`` forbids every network fetch, and
  allows exactly one script: ours, by its sha256 hash. Even if model text ever reached the page
  as markup, no injected script could run.
* **The data once, as JSON.** The run, the tree (each node's prompt stored as a word diff
  against its parent's, so a prompt is stored once and its diff comes free), and the call table
  (columns + rows, repeated strings as indices) sit in one ``<script type="application/json">``
  block. ``<``, ``>``, ``&`` and U+2028/2029 are written as ``\\u`` escapes, so no text, such as
  ``</script>``, can end the block early.
* **Lazy rendering.** The page builds only what is on screen: the tree opens along the best path
  and builds a node's children when it is expanded; a node's details are built when it is
  selected; the call table renders one page of rows at a time (sorted and filtered in memory).
  Model text is only ever inserted with ``textContent`` (never ``innerHTML``).
* **Static parts server-side.** The header, settings, per-role totals and the plot are HTML/SVG
  written here (escaped with :func:`html.escape`), so they show even without JavaScript.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio.to_thread
from rich.console import Console
from rich.text import Text

from drpo import __version__ as drpo_version
from drpo.data.files import write_atomically
from drpo.inspect.calls import totals_of
from drpo.inspect.common import JSON_FORMAT, duration, open_readonly, print_json, when
from drpo.inspect.diff import changed_line, diff_stats, word_diff
from drpo.inspect.summary import summarize_run
from drpo.inspect.tree import SearchTree, load_tree
from drpo.runs.store import CallRecord, RunStore

REPORT_FORMAT = "drpo.report/1"
#: Columns of the embedded call table; those in ``_DICT_COLUMNS`` hold indices into a string list.
CALL_COLUMNS = (
    "id",
    "role",
    "model",
    "node",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "latency_s",
    "attempts",
    "tries",
    "cost_usd",
    "replayed",
    "created_at",
    "error",
)
_DICT_COLUMNS = ("role", "model", "status")


def _asset(name: str) -> str:
    return resources.files("drpo.inspect").joinpath(name).read_text(encoding="utf-8")


def json_for_script(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``: nothing in it can close
    the element or start markup (``<``, ``>`` and ``&`` are ``\\u`` escapes) and line
    separators cannot break older parsers."""
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or infinity somewhere: JSON has no such numbers
        text = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# ------------------------------------------------------------------------------------ data


def _round(value: float, digits: int = 4) -> float | None:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _nodes_data(tree: SearchTree, calls: list[CallRecord]) -> tuple[list[dict], list[str]]:
    per_node: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for call in calls:
        if call.node_id:
            per_node[call.node_id][0] += 1
            per_node[call.node_id][1] += call.cost_usd
    queries: list[str] = []
    query_index: dict[str, int] = {}
    nodes = []
    for node in tree.nodes.values():
        if node.query not in query_index:
            query_index[node.query] = len(queries)
            queries.append(node.query)
        parent_prompt = tree.parent_prompt(node)
        ops = word_diff(parent_prompt, node.system_prompt)
        added, removed = diff_stats(ops) if parent_prompt is not None else (0, 0)
        count, cost = per_node.get(node.node_id, (0, 0.0))
        nodes.append(
            {
                "id": node.node_id,
                "parent": node.parent_id,
                "level": node.level,
                "status": node.status,
                "rank": node.rank,
                "best": node.on_best_path,
                "reward": _round(node.reward),
                "score": _round(node.score),
                "path": [_round(r) for r in node.path_rewards],
                "skipped": node.skipped,
                "failed": node.failed,
                "error": node.error,
                "q": query_index[node.query],
                "answer": node.answer,
                "diff": [[op, text] for op, text in ops],
                "same": parent_prompt is not None and parent_prompt == node.system_prompt,
                "add": added,
                "del": removed,
                "change": changed_line(ops, 90) if parent_prompt is not None else "",
                "aspects": [[a.name, a.score, a.rationale] for a in node.aspects],
                "calls": int(count),
                "cost": _round(cost, 6),
                "t": node.timestamp,
            }
        )
    return nodes, queries


def _calls_data(calls: list[CallRecord]) -> dict[str, Any]:
    strings: dict[str, list[str]] = {name: [] for name in _DICT_COLUMNS}
    index: dict[str, dict[str, int]] = {name: {} for name in _DICT_COLUMNS}

    def code(column: str, value: str) -> int:
        table = index[column]
        if value not in table:
            table[value] = len(strings[column])
            strings[column].append(value)
        return table[value]

    rows = [
        [
            call.id,
            code("role", call.role),
            code("model", f"{call.backend}:{call.model}"),
            call.node_id,
            code("status", call.status),
            call.prompt_tokens,
            call.completion_tokens,
            call.cached_tokens,
            _round(call.latency_s, 3),
            call.attempts,
            call.tries,
            _round(call.cost_usd, 7),
            call.replayed,
            round(call.created_at, 3),
            call.error,
        ]
        for call in calls
    ]
    return {"columns": list(CALL_COLUMNS), "strings": strings, "rows": rows}


async def build_report_data(store: RunStore, run: str) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able data (read-only; safe on a live run)."""
    record = await store.get_run(run)
    summary = await summarize_run(store, record)
    tree = await load_tree(store, record)
    calls = await store.list_calls(record.run_id)
    nodes, queries = _nodes_data(tree, calls)
    total, by_role = totals_of(calls)
    return {
        "format": REPORT_FORMAT,
        "generated_at": time.time(),
        "drpo_version": drpo_version,
        "run": summary.to_json() | {"config_queries": len(record.config.get("queries") or [])},
        "tree": {
            "best_node_id": tree.best_node_id,
            "best_is_final": tree.best_is_final,
            "best_path": tree.best_path,
            "counts": tree.counts(),
            "levels": [level.__dict__ for level in tree.levels],
        },
        "queries": queries,
        "nodes": nodes,
        "totals": total.to_json(),
        "by_role": {role: totals.to_json() for role, totals in by_role.items()},
        "calls": _calls_data(calls),
        **_evaluation_data(record),
    }


# ------------------------------------------------------------------------------------ evaluation


def _evaluation_data(record: Any) -> dict[str, Any]:
    """An ``eval`` run's result (``drpo eval``) under "evaluation"; nothing for other runs."""
    return {"evaluation": record.result} if record.kind == "eval" and record.result else {}


def _evaluation_html(data: dict[str, Any]) -> str:
    """The "Evaluation" section (drawn by :mod:`drpo.inspect.evaluation`), or "" for other runs."""
    if "evaluation" not in data:
        return ""
    from drpo.inspect.evaluation import evaluation_section_html

    return evaluation_section_html(data["evaluation"])


# ------------------------------------------------------------------------------------ the plot


def reward_plot_svg(levels: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> str:
    """Best and mean path score of the beam per level, and every node's score as a faint dot."""
    width, height = 720, 280
    left, right, top, bottom = 48, 16, 16, 40

    def finite(value: Any) -> bool:
        return isinstance(value, int | float) and math.isfinite(value)

    levels = [lv for lv in levels if finite(lv["best_score"]) and finite(lv["mean_score"])]
    nodes = [node for node in nodes if finite(node["score"])]
    if not levels:
        return (
            f'<svg id="reward-plot" class="plot empty" viewBox="0 0 {width} 60" role="img" '
            'aria-label="reward per level"><text x="12" y="34">no level has completed yet</text>'
            "</svg>"
        )
    xs = [int(level["level"]) for level in levels]
    values = [level["best_score"] for level in levels] + [level["mean_score"] for level in levels]
    values += [node["score"] for node in nodes if node["level"] > 0]
    low = min(1.0, min(values))
    high = max(5.0, max(values))
    low, high = max(0.0, float(int(low))), float(int(high + 0.999))
    first, last = min(xs), max(xs)
    span = max(1, last - first)

    def x(level: float) -> float:
        return left + (level - first) / span * (width - left - right)

    def y(value: float) -> float:
        return top + (high - value) / (high - low or 1) * (height - top - bottom)

    parts = [
        f'<svg id="reward-plot" class="plot" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="reward per level: best and mean of the beam">'
    ]
    tick = low
    while tick <= high + 1e-9:
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" '
            f'y2="{y(tick):.1f}"/><text class="axis" x="{left - 8}" y="{y(tick) + 4:.1f}" '
            f'text-anchor="end">{tick:g}</text>'
        )
        tick += 0.5 if high - low <= 3 else 1.0
    step = max(1, round(span / 12))
    for level in range(first, last + 1, step):
        parts.append(
            f'<text class="axis" x="{x(level):.1f}" y="{height - bottom + 18}" '
            f'text-anchor="middle">{level}</text>'
        )
    parts.append(
        f'<text class="axis" x="{(left + width - right) / 2:.1f}" y="{height - 4}" '
        'text-anchor="middle">level</text>'
    )
    for node in nodes:
        if node["level"] <= 0 or node["level"] < first or node["level"] > last:
            continue
        label = html.escape(f"{node['id']} ({node['status']}): path score {node['score']:.3f}")
        parts.append(
            f'<circle class="pt-node {html.escape(node["status"])}" cx="{x(node["level"]):.1f}" '
            f'cy="{y(node["score"]):.1f}" r="2.5"><title>{label}</title></circle>'
        )
    for key, css in (("mean_score", "mean"), ("best_score", "best")):
        points = " ".join(f"{x(lv['level']):.1f},{y(lv[key]):.1f}" for lv in levels)
        parts.append(f'<polyline id="plot-{css}" class="line {css}" points="{points}"/>')
        for lv in levels:
            label = html.escape(f"level {lv['level']}: {css} {lv[key]:.3f}")
            parts.append(
                f'<circle class="pt-{css}" cx="{x(lv["level"]):.1f}" cy="{y(lv[key]):.1f}" '
                f'r="3.5"><title>{label}</title></circle>'
            )
    legend_y = top + 6
    parts.append(
        f'<g class="legend" transform="translate({width - right - 250},{legend_y})">'
        '<line class="line best" x1="0" x2="18" y1="0" y2="0"/>'
        '<text x="24" y="4">best of beam</text>'
        '<line class="line mean" x1="104" x2="122" y1="0" y2="0"/>'
        '<text x="128" y="4">beam mean</text>'
        '<circle class="key-node" cx="214" cy="0" r="2.5"/>'
        '<text x="222" y="4">node</text></g>'
    )
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------ HTML


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _header_html(summary: dict[str, Any], data: dict[str, Any]) -> str:
    totals = data["totals"]
    counts = data["tree"]["counts"]
    status = summary["status"]
    best = summary.get("best_score")
    facts = [
        ("status", f'<span class="status {_e(status)}">{_e(status)}</span>'),
        ("kind", _e(summary["kind"])),
        ("base model", _e(summary.get("base_model") or "-")),
        ("critic", _e(summary.get("critic_model") or "-")),
        ("editor", _e(summary.get("editor_model") or "-")),
        ("best score", _e("-" if best is None else f"{best:.3f}")),
        (
            "levels",
            _e(
                f"{summary['levels_done']}"
                + (f" (depth limit {summary['depth_limit']})" if summary.get("depth_limit") else "")
            ),
        ),
        ("nodes", _e(f"{counts['nodes']} ({counts['kept']} kept, {counts['pruned']} pruned)")),
        (
            "calls",
            _e(
                f"{totals['calls']} ({totals['tries']} tries, {totals['errors']} failed, "
                f"{totals['replayed']} answers replayed)"
            ),
        ),
        ("unreadable verdicts", _e(_share(summary.get("failed_judgement_share")))),
        ("unusable rewrites", _e(_share(summary.get("failed_edit_share")))),
        ("tokens", _e(f"{totals['prompt_tokens']:,} in / {totals['completion_tokens']:,} out")),
        ("cost", _e(f"${totals['cost_usd']:.4f}")),
        ("created", _e(when(summary["created_at"]) + " UTC")),
        ("started", _e(when(summary.get("started_at")))),
        ("finished", _e(when(summary.get("finished_at")))),
        ("duration", _e(duration(summary.get("started_at"), summary.get("finished_at")))),
    ]
    rows = "".join(f"<div><dt>{name}</dt><dd>{value}</dd></div>" for name, value in facts)
    name = summary.get("name")
    title = f"run {_e(summary['run_id'])}" + (f" · {_e(name)}" if name else "")
    error = (
        f'<p id="run-error" class="error">{_e(summary["error"])}</p>'
        if summary.get("error")
        else ""
    )
    return f'<h1 id="run-title">{title}</h1><dl id="run-facts" class="facts">{rows}</dl>{error}'


def _settings_html(settings: dict[str, Any]) -> str:
    rows = []
    for section in ("search", "proposer", "critic", "budget", "models"):
        values = settings.get(section)
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
            rows.append(f"<tr><th>{_e(section)}.{_e(key)}</th><td>{_e(shown)}</td></tr>")
    if not rows:
        return ""
    return (
        '<details id="settings"><summary>Settings</summary>'
        f'<table class="settings">{"".join(rows)}</table></details>'
    )


def _roles_html(data: dict[str, Any]) -> str:
    head = (
        "<tr><th>role</th><th>calls</th><th>tries</th><th>failed</th><th>replayed</th>"
        "<th>tokens in</th><th>tokens out</th><th>cached</th><th>latency s</th><th>cost $</th></tr>"
    )

    def row(name: str, t: dict[str, Any], css: str = "") -> str:
        return (
            f'<tr class="{css}"><th>{_e(name)}</th><td>{t["calls"]}</td><td>{t["tries"]}</td>'
            f"<td>{t['errors']}</td><td>{t['replayed']}</td><td>{t['prompt_tokens']:,}</td>"
            f"<td>{t['completion_tokens']:,}</td><td>{t['cached_tokens']:,}</td>"
            f"<td>{t['latency_s']:.1f}</td><td>{t['cost_usd']:.4f}</td></tr>"
        )

    body = "".join(row(role, totals) for role, totals in data["by_role"].items())
    body += row("total", data["totals"], "total")
    return f'<table id="roles-table" class="numbers"><thead>{head}</thead><tbody>{body}</tbody></table>'


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src '@@SCRIPT_HASH@@'">
<meta name="generator" content="drpo @@VERSION@@">
<title>@@TITLE@@</title>
<link rel="icon" href="data:,">
<style>@@CSS@@</style>
</head>
<body>
<header id="run-header">@@HEADER@@</header>
<main>
<section id="overview">
@@SETTINGS@@
<div id="best-prompt-box"><h2>Best prompt @@BEST_NOTE@@</h2><pre id="best-prompt" class="prompt">@@BEST_PROMPT@@</pre></div>
</section>
@@EVALUATION@@
<section id="plot-section"><h2>Reward per level</h2>@@PLOT@@</section>
<section id="tree-section">
<h2>Search tree</h2>
<div class="toolbar" id="tree-toolbar">
<button type="button" id="tree-best">Best path</button>
<button type="button" id="tree-expand">Expand all</button>
<button type="button" id="tree-collapse">Collapse all</button>
<label><input type="checkbox" id="tree-hide-pruned"> hide pruned</label>
<span class="legend-inline"><span class="tag kept">kept</span> <span class="tag pruned">pruned</span> <span class="tag open">open</span> <span class="star">★</span> best path</span>
</div>
<div class="split">
<div id="tree" role="tree" aria-label="search tree"><noscript>The tree needs JavaScript.</noscript></div>
<aside id="node-detail" aria-live="polite"><p class="hint">Select a node to see its prompt (with the changes from its parent), answer and critique.</p></aside>
</div>
</section>
<section id="calls-section">
<h2>Model calls</h2>
@@ROLES@@
<div class="toolbar" id="calls-toolbar">
<label>role <select id="calls-role"><option value="">all</option></select></label>
<label>status <select id="calls-status"><option value="">all</option></select></label>
<label>node <input id="calls-node" type="search" placeholder="e.g. n3. or n3.0.1" size="12"></label>
<label>search <input id="calls-text" type="search" placeholder="model, error…" size="16"></label>
<label>rows <select id="calls-size"><option>25</option><option selected>50</option><option>100</option><option>500</option></select></label>
</div>
<table id="calls-table" class="numbers calls"><thead></thead><tbody></tbody></table>
<div id="calls-pager" class="pager"></div>
</section>
</main>
<footer>drpo @@VERSION@@ · report generated @@GENERATED@@ UTC · data format @@FORMAT@@</footer>
<script type="application/json" id="drpo-data">@@DATA@@</script>
<script>@@JS@@</script>
</body>
</html>
"""


def render_html(data: dict[str, Any]) -> str:
    """The report for ``data`` (from :func:`build_report_data`)."""
    summary = data["run"]
    script = _asset("report.js")
    if "</script" in script.lower():  # pragma: no cover - a guard on our own asset
        raise ValueError("report.js must not contain '</script'")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    best_prompt = summary.get("best_prompt")
    best_note = ""
    if best_prompt is None and data["tree"]["best_node_id"]:
        best_id = data["tree"]["best_node_id"]
        node = next((n for n in data["nodes"] if n["id"] == best_id), None)
        if node is not None:
            best_prompt = "".join(text for op, text in node["diff"] if op != "-")
            best_note = f"(current best, node {best_id}; the run has not finished)"
    elif data["tree"]["best_node_id"]:
        best_note = f"(node {data['tree']['best_node_id']})"
    replacements = {
        "@@SCRIPT_HASH@@": f"sha256-{digest}",
        "@@VERSION@@": _e(data["drpo_version"]),
        "@@TITLE@@": _e(
            f"drpo run {summary['run_id'][:12]}"
            + (f" · {summary['name']}" if summary.get("name") else "")
        ),
        "@@CSS@@": _asset("report.css"),
        "@@HEADER@@": _header_html(summary, data),
        "@@SETTINGS@@": _settings_html(summary.get("settings") or {}),
        "@@BEST_NOTE@@": _e(best_note),
        "@@BEST_PROMPT@@": _e(best_prompt or "(none yet)"),
        "@@EVALUATION@@": _evaluation_html(data),
        "@@PLOT@@": reward_plot_svg(data["tree"]["levels"], data["nodes"]),
        "@@ROLES@@": _roles_html(data),
        "@@GENERATED@@": _e(when(data["generated_at"])),
        "@@FORMAT@@": _e(data["format"]),
        "@@DATA@@": json_for_script(data),
        "@@JS@@": script,
    }
    # One pass, so that text already substituted is never scanned for placeholders again.
    out, position = [], 0
    while True:
        start = _TEMPLATE.find("@@", position)
        if start < 0:
            out.append(_TEMPLATE[position:])
            break
        end = _TEMPLATE.index("@@", start + 2) + 2
        out.append(_TEMPLATE[position:start])
        out.append(replacements[_TEMPLATE[start:end]])
        position = end
    return "".join(out)


@dataclass
class ExportResult:
    run_id: str
    path: Path
    bytes: int
    nodes: int
    calls: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": JSON_FORMAT,
            "run_id": self.run_id,
            "path": str(self.path),
            "bytes": self.bytes,
            "nodes": self.nodes,
            "calls": self.calls,
            "seconds": round(self.seconds, 4),
        }


async def export_report(store: RunStore, run: str, out: Path) -> ExportResult:
    """Write the report of ``run`` to ``out`` (atomically: a reader never sees half a file)."""
    started = time.perf_counter()
    data = await build_report_data(store, run)
    page = render_html(data).encode("utf-8")
    out = await anyio.to_thread.run_sync(write_atomically, out, page)
    return ExportResult(
        run_id=data["run"]["run_id"],
        path=out,
        bytes=len(page),
        nodes=len(data["nodes"]),
        calls=len(data["calls"]["rows"]),
        seconds=time.perf_counter() - started,
    )


async def export_view(
    db: Path, run: str, out: Path | None, as_json: bool, console: Console
) -> None:
    async with open_readonly(db) as store:
        record = await store.get_run(run)
        target = out if out is not None else Path(f"drpo-report-{record.run_id[:12]}.html")
        result = await export_report(store, record.run_id, target)
    if as_json:
        print_json(console, result.to_json())
        return
    console.print(
        Text(
            f"wrote {result.path} ({result.bytes / 1024:.0f} KiB: {result.nodes} nodes, "
            f"{result.calls} calls) in {result.seconds:.2f}s"
        )
    )


__all__ = [
    "REPORT_FORMAT",
    "ExportResult",
    "build_report_data",
    "export_report",
    "json_for_script",
    "render_html",
    "reward_plot_svg",
]
