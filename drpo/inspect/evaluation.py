"""The "Evaluation" section of a run's HTML report (``drpo runs export RUN --html``).

Static HTML written server-side (every value escaped), so it shows without JavaScript: the mean
score per aspect of each prompt with its paired difference against the baseline, the overall
score by category and by tag, and the queries that changed most.
"""

from __future__ import annotations

import html
from typing import Any

_GROUP_TITLES = {
    "category": "category",
    "task_types": "task type",
    "topics": "topic",
    "difficulty": "difficulty",
}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def format_number(value: Any) -> str:
    """A score as shown in the evaluation's tables ("-" when there is none)."""
    return "-" if value is None else f"{value:.2f}"


def format_difference(entry: dict[str, Any] | None) -> str:
    """A paired difference and its interval, as shown in the tables: "+0.12 [-0.03, +0.27]"."""
    if not entry or entry.get("diff") is None:
        return "-"
    text = f"{entry['diff']:+.2f}"
    if entry.get("low") is not None:
        text += f" [{entry['low']:+.2f}, {entry['high']:+.2f}]"
    return text


def _table(head: list[str], rows: list[list[str]], caption: str = "") -> str:
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    thead = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<table class="numbers eval">{cap}<thead><tr>{thead}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def evaluation_section_html(result: dict[str, Any] | None) -> str:
    """The section for an ``eval`` run's result, or "" when there is none (other runs)."""
    if not isinstance(result, dict) or "prompts" not in result:
        return ""
    aspects: list[str] = result.get("aspects", [])
    prompts: list[dict[str, Any]] = result["prompts"]
    comparisons = {c["label"]: c for c in result.get("comparisons", [])}
    confidence = round(100 * (result.get("bootstrap") or {}).get("confidence", 0.95))
    cats = ", ".join(f"{n} {name}" for name, n in (result.get("categories") or {}).items())
    parts = [
        '<section id="evaluation-section"><h2>Evaluation</h2>',
        f"<p>{_e(result.get('n_queries'))} queries ({_e(cats)}); judge "
        f"{_e(result.get('judge'))} ({_e(result.get('judge_mode'))}). Differences are paired "
        f"against <b>{_e(prompts[0]['label'] if prompts else '-')}</b>, with "
        f"{confidence}% bootstrap intervals over queries.</p>",
    ]
    rows = []
    for entry in prompts:
        comparison = comparisons.get(entry["label"])
        rows.append(
            [
                entry["label"],
                entry.get("model") or "-",
                *(format_number((entry["aspects"].get(a) or {}).get("mean")) for a in aspects),
                format_number(entry.get("overall")),
                "baseline" if comparison is None else format_difference(comparison["overall"]),
                "-"
                if comparison is None
                else f"{comparison['wins']}/{comparison['ties']}/{comparison['losses']}",
                str(entry.get("failed", 0)),
            ]
        )
    parts.append(
        _table(
            ["prompt", "model", *aspects, "overall", "Δ overall", "W/T/L", "failed"],
            rows,
            "Mean score (1-5) per aspect",
        )
    )
    if comparisons:
        parts.append(
            _table(
                ["prompt", *aspects],
                [
                    [label, *(format_difference(c["aspects"].get(a)) for a in aspects)]
                    for label, c in comparisons.items()
                ],
                "Paired difference per aspect",
            )
        )
    for kind, groups in (prompts[0].get("groups") or {}).items() if prompts else ():
        title = _GROUP_TITLES.get(kind, kind)
        parts.append(
            _table(
                [title, "n", *(p["label"] for p in prompts), *(f"Δ {lb}" for lb in comparisons)],
                [
                    [
                        name,
                        str(info["n"]),
                        *(format_number(p["groups"][kind][name]["overall"]) for p in prompts),
                        *(
                            format_difference(c["groups"][kind].get(name))
                            for c in comparisons.values()
                        ),
                    ]
                    for name, info in groups.items()
                ],
                f"Overall score by {title}",
            )
        )
    for label, comparison in comparisons.items():
        for title, key in (("most improved", "most_improved"), ("most worsened", "most_worsened")):
            changes = comparison.get(key) or []
            if not changes:
                continue
            parts.append(
                _table(
                    ["id", "category", "score", "query", "baseline answer", "answer"],
                    [
                        [
                            str(c["id"]),
                            c["category"],
                            f"{format_number(c['baseline_score'])} → {format_number(c['score'])} ({c['diff']:+.2f})",
                            c["instruction"],
                            c.get("baseline_answer", ""),
                            c.get("answer", ""),
                        ]
                        for c in changes
                    ],
                    f"{label} vs {comparison['baseline']}: {title}",
                )
            )
    parts.append("</section>")
    return "".join(parts)
