"""Every model call of a run, from the call journal (``drpo runs calls``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from drpo.inspect.common import JSON_FORMAT, excerpt, open_readonly, print_json, when
from drpo.runs.store import CallRecord, RunStore

#: The keys of one call in ``--json`` output (and the report's call table), in order.
CALL_FIELDS = (
    "id",
    "role",
    "model",
    "backend",
    "endpoint",
    "node_id",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "latency_s",
    "attempts",
    "tries",
    "cost_usd",
    "replayed",
    "sample_index",
    "created_at",
    "updated_at",
    "error",
    "key",
)


@dataclass
class CallTotals:
    calls: int = 0  # journal entries
    tries: int = 0  # backend invocations (a failed call tried again counts twice)
    ok: int = 0
    errors: int = 0
    replayed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0

    def add(self, call: CallRecord) -> None:
        self.calls += 1
        self.tries += call.tries
        self.ok += call.status == "ok"
        self.errors += call.status == "error"
        self.replayed += call.replayed
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.cached_tokens += call.cached_tokens
        self.latency_s += call.latency_s
        self.cost_usd += call.cost_usd

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def call_json(call: CallRecord, *, full: bool = False) -> dict[str, Any]:
    data = {name: getattr(call, name) for name in CALL_FIELDS}
    if full:
        data["request"] = _decoded(call.request)
        data["response"] = _decoded(call.response)
    return data


def _decoded(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


async def load_calls(
    store: RunStore,
    run_id: str,
    *,
    role: str | None = None,
    status: str | None = None,
    node_id: str | None = None,
) -> list[CallRecord]:
    """The run's journal entries in the order they were first made, filtered."""
    calls = await store.list_calls(run_id, role=role, status=status)
    if node_id is not None:
        calls = [call for call in calls if call.node_id == node_id]
    return calls


def totals_of(calls: list[CallRecord]) -> tuple[CallTotals, dict[str, CallTotals]]:
    total, by_role = CallTotals(), {}
    for call in calls:
        total.add(call)
        by_role.setdefault(call.role, CallTotals()).add(call)
    return total, dict(sorted(by_role.items()))


#: Columns of the console table, and the narrowest console that still shows each (0: always).
_TABLE_COLUMNS = (
    ("#", "right", 0),
    ("role", "left", 0),
    ("model", "left", 110),
    ("node", "left", 0),
    ("status", "left", 0),
    ("tok in", "right", 0),
    ("tok out", "right", 0),
    ("cached", "right", 150),
    ("latency s", "right", 0),
    ("attempts", "right", 120),
    ("tries", "right", 140),
    ("cost $", "right", 0),
    ("replayed", "right", 130),
)


def calls_table(calls: list[CallRecord], title: str, width: int = 200) -> Table:
    """The calls as a table; on a narrow console the least useful columns are left out."""
    total, _ = totals_of(calls)
    footers = {
        "#": f"{total.calls}",
        "status": f"{total.errors} failed" if total.errors else "",
        "tok in": f"{total.prompt_tokens}",
        "tok out": f"{total.completion_tokens}",
        "cached": f"{total.cached_tokens}",
        "latency s": f"{total.latency_s:.1f}",
        "tries": f"{total.tries}",
        "cost $": f"{total.cost_usd:.4f}",
        "replayed": f"{total.replayed}",
    }
    columns = [(name, justify) for name, justify, needs in _TABLE_COLUMNS if width >= needs]
    table = Table(title=title, title_justify="left", show_footer=True, box=box.SIMPLE_HEAD)
    for name, justify in columns:
        table.add_column(name, justify=justify, footer=footers.get(name, ""))  # type: ignore[arg-type]
    for call in calls:
        status = Text(call.status, style="green" if call.status == "ok" else "bold red")
        if call.error:
            status.append(f" {excerpt(call.error, 40)}", style="red")
        cells = {
            "#": str(call.id),
            "role": Text(call.role),
            "model": Text(f"{call.backend}:{call.model}"),
            "node": Text(call.node_id or "-"),
            "status": status,
            "tok in": str(call.prompt_tokens),
            "tok out": str(call.completion_tokens),
            "cached": str(call.cached_tokens),
            "latency s": f"{call.latency_s:.2f}",
            "attempts": str(call.attempts),
            "tries": str(call.tries),
            "cost $": f"{call.cost_usd:.5f}",
            "replayed": str(call.replayed),
        }
        table.add_row(*(cells[name] for name, _ in columns))
    return table


async def calls_view(
    db: Path,
    run: str,
    as_json: bool,
    console: Console,
    *,
    role: str | None = None,
    status: str | None = None,
    node_id: str | None = None,
    full: bool = False,
) -> None:
    async with open_readonly(db) as store:
        record = await store.get_run(run)
        calls = await load_calls(store, record.run_id, role=role, status=status, node_id=node_id)
    total, by_role = totals_of(calls)
    if as_json:
        print_json(
            console,
            {
                "format": JSON_FORMAT,
                "run_id": record.run_id,
                "filters": {"role": role, "status": status, "node_id": node_id},
                "totals": total.to_json(),
                "by_role": {name: totals.to_json() for name, totals in by_role.items()},
                "calls": [call_json(call, full=full) for call in calls],
            },
        )
        return
    filters = ", ".join(
        f"{name} {value}"
        for name, value in (("role", role), ("status", status), ("node", node_id))
        if value
    )
    title = f"calls of run {record.run_id} ({record.status})" + (f": {filters}" if filters else "")
    if not calls:
        console.print(Text(f"{title}: none recorded"))
        return
    console.print(calls_table(calls, title, console.width))
    first, last = calls[0].created_at, calls[-1].updated_at
    console.print(
        Text(
            f"{total.calls} calls ({total.tries} tries, {total.ok} ok, {total.errors} failed, "
            f"{total.replayed} answers replayed), {total.prompt_tokens} + "
            f"{total.completion_tokens} tokens, ${total.cost_usd:.4f}; "
            f"{when(first)} .. {when(last)}",
            style="dim",
        )
    )
