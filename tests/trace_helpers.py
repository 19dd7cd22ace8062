"""What the tracing tests share: running a tiny real ``drpo optimize`` on the strict fake OpenAI
server, reading an OTLP JSON-lines file, and checking a trace's tree against the run's journal."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim_server_main import SIM_MODEL, drpo_command

#: The key the fake server demands (and that must never reach a trace).
API_KEY = "sk-drpo-test-SECRET-1234567890abcdef"
#: A search small enough for a second or two on the fake server: beam 2, 2 rewrites, 3 levels.
TINY = ("--preset", "paper", "--k", "0", "--depth", "3", "--num-queries", "6", "--beam", "2",
        "--actions", "2")  # fmt: skip


def drpo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DRPO_DB"))}
    env.update(OPENAI_API_KEY=API_KEY, COLUMNS="400", NO_COLOR="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_drpo(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        drpo_command(*args),
        cwd=cwd,
        env=env or drpo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def model_flags(base_url: str) -> list[str]:
    model = f"openai:{SIM_MODEL}@{base_url}"
    return ["--base-model", model, "--critic-model", model, "--editor-model", model]


def closed_port() -> int:
    """A loopback port nothing listens on (a collector that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def db_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def run_ids(db: Path) -> list[str]:
    return [row["run_id"] for row in db_rows(db, "SELECT run_id FROM runs ORDER BY created_at")]


def calls_of(db: Path, run_id: str) -> list[sqlite3.Row]:
    return db_rows(db, "SELECT * FROM calls WHERE run_id = ? ORDER BY id", (run_id,))


# ------------------------------------------------------------------------------------ spans


@dataclass(frozen=True)
class Span:
    """A span as a receiver sees it: ids as hex, attributes as plain values."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int | str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: str | None


def _value(value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    if "arrayValue" in value:
        return tuple(_value(item) for item in value["arrayValue"].get("values", []))
    return None


def read_otlp_file(path: Path) -> list[Span]:
    """Every span of an OTLP JSON-lines file (one ExportTraceServiceRequest per line)."""
    spans = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            for scope in resource["scopeSpans"]:
                for raw in scope["spans"]:
                    status = raw.get("status") or {}
                    spans.append(
                        Span(
                            trace_id=raw["traceId"],
                            span_id=raw["spanId"],
                            parent_id=raw.get("parentSpanId") or None,
                            name=raw["name"],
                            kind=raw["kind"],
                            start_ns=int(raw["startTimeUnixNano"]),
                            end_ns=int(raw["endTimeUnixNano"]),
                            attributes={a["key"]: _value(a["value"]) for a in raw["attributes"]},
                            error=status.get("message") if status.get("code") == 2 else None,
                        )
                    )
    return spans


def model_spans(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.attributes.get("gen_ai.operation.name") in MODEL_OPERATIONS]


MODEL_OPERATIONS = ("chat", "text_completion")


def check_tree(spans: list[Span], calls: list[sqlite3.Row]) -> None:
    """The trace's shape and numbers against the run's own call table:

    * one trace; every parent is in it; roots are the run's attempts;
    * each proposer answer and verdict call sits in run > level > node > agent call > model call;
    * one model span per journal entry made (replays aside), with the entry's key, model,
      sampling settings and tokens, and the GenAI span name;
    * the tokens of the trace are the journal's: a replayed call carries none.
    """
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "span ids are unique"
    assert len({s.trace_id for s in spans}) == 1
    for span in spans:
        assert span.parent_id is None or span.parent_id in by_id, span.name
        assert span.start_ns <= span.end_ns, span.name
    roots = [s for s in spans if s.parent_id is None]
    assert roots and all(r.name.startswith("invoke_workflow drpo.") for r in roots)

    def chain(span: Span) -> list[str]:
        names = []
        while span.parent_id is not None:
            span = by_id[span.parent_id]
            names.append(span.name.split()[0])
        return names

    made = [s for s in model_spans(spans) if not s.attributes["drpo.replayed"]]
    rows = {row["key"]: row for row in calls}
    assert Counter(s.attributes["drpo.journal_key"] for s in made) == Counter(
        row["key"] for row in calls
    )
    for span in made:
        row = rows[span.attributes["drpo.journal_key"]]
        request = json.loads(row["request"])
        operation = "chat" if request.get("messages") is not None else "text_completion"
        a = span.attributes
        assert span.name == f"{operation} {row['model']}"
        assert a["gen_ai.operation.name"] == operation
        assert a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == row["model"]
        assert a["gen_ai.request.max_tokens"] == request["max_tokens"]
        assert a["gen_ai.request.temperature"] == request.get("temperature", 0.0)
        assert a["gen_ai.request.top_p"] == request.get("top_p", 1.0)
        assert a["gen_ai.usage.input_tokens"] == row["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == row["completion_tokens"]
        assert a["drpo.role"] == row["role"]
        assert a["drpo.attempts"] == row["attempts"]
        assert len(a["gen_ai.response.finish_reasons"]) >= 1
        assert a["server.address"] == "127.0.0.1"
        if row["role"] in ("proposer", "critic") and (row["node_id"] or "").startswith("n"):
            assert chain(span)[:4] == ["invoke_agent", "drpo.node", "drpo.level", "invoke_workflow"]
    replayed = [s for s in model_spans(spans) if s.attributes["drpo.replayed"]]
    assert len(replayed) == sum(row["replayed"] for row in calls)
    for span in replayed:
        assert not any(k.startswith("gen_ai.usage.") for k in span.attributes)
    tokens = sum(s.attributes.get("gen_ai.usage.input_tokens", 0) for s in model_spans(spans))
    assert tokens == sum(row["prompt_tokens"] for row in calls)
    nodes = [s for s in spans if s.name.startswith("drpo.node n")]
    decided = [s for s in nodes if s.attributes["drpo.node_status"] in ("root", "kept", "pruned")]
    assert decided and all("drpo.reward" in s.attributes for s in decided)
    levels = [s for s in spans if s.name.startswith("drpo.level ")]
    assert {s.attributes["drpo.level"] for s in levels} >= {0, 1}
