"""drpo runs seen by a real trace receiver: Arize Phoenix, started on 127.0.0.1 with its own
temporary storage (offline), once per test session.

A real ``drpo optimize`` on the strict fake OpenAI server sends its trace live (``--trace``);
the test reads it back through Phoenix's REST API and checks the tree (run > level > node > agent
call > model call), the GenAI attributes and the token counts against the run's call table; an
export of the same run after the fact is the same spans, and sending it again adds nothing.

Phoenix lives in ``.venv-phoenix`` (``scripts/setup.sh --tests``; its ~150 packages stay out of drpo's
venv); ``DRPO_PHOENIX`` may name another ``phoenix`` executable. Without one these tests skip,
except where ``DRPO_REQUIRE_PHOENIX`` is set (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeserver import FakeOpenAIServer, serve_fake_openai
from sim_server_main import sim_models
from simulated_llm import respond
from trace_helpers import (
    API_KEY,
    TINY,
    Span,
    calls_of,
    check_tree,
    closed_port,
    model_flags,
    read_otlp_file,
    run_drpo,
    run_ids,
)

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]


def phoenix_executable() -> Path | None:
    given = os.environ.get("DRPO_PHOENIX")
    path = Path(given) if given else ROOT / ".venv-phoenix" / "bin" / "phoenix"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Phoenix on loopback ports, storage in a temporary folder; yields its base URL."""
    executable = phoenix_executable()
    if executable is None:
        if os.environ.get("DRPO_REQUIRE_PHOENIX"):
            pytest.fail(
                "Phoenix is not installed: run scripts/setup.sh --tests (it makes .venv-phoenix)"
            )
        pytest.skip("Phoenix is not installed (scripts/setup.sh --tests makes .venv-phoenix)")
    folder = tmp_path_factory.mktemp("phoenix")
    port, grpc_port = closed_port(), closed_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))},
        "PHOENIX_WORKING_DIR": str(folder),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (folder / "phoenix.log").open("w")
    process = subprocess.Popen(
        [str(executable), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("Phoenix did not start:\n" + (folder / "phoenix.log").read_text())
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with serve_fake_openai(
        models=sim_models(), responder=respond, latency_s=0.002, api_key=API_KEY
    ) as sim:
        yield sim


def phoenix_spans(url: str, trace_id: str, *, expect: int | None = None) -> list[Span]:
    """A trace's spans as Phoenix keeps them (REST API, OTLP shape); waits for ``expect``."""
    deadline = time.monotonic() + 30
    while True:
        spans: list[Span] = []
        cursor = None
        while True:
            query = f"trace_id={trace_id}&limit=1000" + (f"&cursor={cursor}" if cursor else "")
            with urllib.request.urlopen(
                f"{url}/v1/projects/default/spans/otlpv1?{query}", timeout=10
            ) as response:
                page = json.load(response)
            spans += [_span(raw) for raw in page["data"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        if expect is None or len(spans) >= expect or time.monotonic() > deadline:
            return spans
        time.sleep(0.5)


def _plain(value: dict[str, Any]) -> Any:
    for key in ("string_value", "bool_value", "int_value", "double_value"):
        if value.get(key) is not None:
            return value[key]
    array = value.get("array_value")
    if array is not None:
        return tuple(_plain(item) for item in array.get("values") or [])
    return None


def _span(raw: dict[str, Any]) -> Span:
    status = raw.get("status") or {}
    return Span(
        trace_id=raw["trace_id"],
        span_id=raw["span_id"],
        parent_id=raw.get("parent_span_id") or None,
        name=raw["name"],
        kind=raw["kind"],
        start_ns=int(raw["start_time_unix_nano"]),
        end_ns=int(raw["end_time_unix_nano"]),
        attributes={a["key"]: _plain(a["value"]) for a in raw.get("attributes") or []},
        error=status.get("message") if status.get("code") == 2 else None,
    )


def assert_same_spans(ours: list[Span], theirs: list[Span]) -> None:
    """Phoenix holds every span we made, with our ids, parents, names, times and attributes
    (it adds its own OpenInference ones, and keeps no span kind)."""
    held = {span.span_id: span for span in theirs}
    assert set(held) == {span.span_id for span in ours}
    for span in ours:
        got = held[span.span_id]
        assert (got.trace_id, got.parent_id, got.name) == (span.trace_id, span.parent_id, span.name)
        assert abs(got.start_ns - span.start_ns) < 1000 and abs(got.end_ns - span.end_ns) < 1000
        for key, value in span.attributes.items():
            if isinstance(value, float):
                assert got.attributes[key] == pytest.approx(value), key
            else:
                assert got.attributes[key] == value, key


def _export(folder: Path, run_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_drpo("runs", "export", run_id, "--db", str(folder / "d.db"), *extra, cwd=folder)


def test_a_live_run_in_phoenix_is_the_run_and_its_export(
    phoenix: str, server: FakeOpenAIServer, tmp_path: Path
) -> None:
    result = run_drpo(
        "optimize", "--db", str(tmp_path / "d.db"), *model_flags(server.base_url), *TINY,
        "--out", str(tmp_path / "a.json"), "--trace-endpoint", phoenix, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tracing:" not in result.stderr  # nothing to warn about
    [run_id] = run_ids(tmp_path / "d.db")
    exported = _export(tmp_path, run_id, "--otlp-file", str(tmp_path / "spans.jsonl"))
    assert exported.returncode == 0, exported.stderr
    ours = read_otlp_file(tmp_path / "spans.jsonl")
    trace_id = ours[0].trace_id
    live = phoenix_spans(phoenix, trace_id, expect=len(ours))
    check_tree(live, calls_of(tmp_path / "d.db", run_id))  # what Phoenix holds is the run
    assert_same_spans(ours, live)  # ... and the export after the fact
    model = [s for s in live if s.attributes.get("gen_ai.operation.name") == "chat"]
    assert model and all(s.attributes["openinference.span.kind"] == "LLM" for s in model)
    # sending the same run again (after the fact) adds nothing: same ids
    again = _export(tmp_path, run_id, "--otlp", phoenix)
    assert again.returncode == 0, again.stderr
    time.sleep(2)
    assert len(phoenix_spans(phoenix, trace_id)) == len(ours)


def test_a_resumed_run_in_phoenix_pays_each_call_once(
    phoenix: str, server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Stopped by its budget and resumed, both traced live: two attempts in one trace, the
    calls the resume answered from the journal marked replayed, the tokens the journal's."""
    common = ("--db", str(tmp_path / "d.db"), "--trace-endpoint", phoenix)
    first = run_drpo(
        "optimize", *model_flags(server.base_url), *TINY, "--max-calls", "12",
        "--out", str(tmp_path / "a.json"), *common, cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 1, first.stdout + first.stderr
    [run_id] = run_ids(tmp_path / "d.db")
    second = run_drpo("resume", run_id, "--max-calls", "1000", *common, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _export(tmp_path, run_id, "--otlp-file", str(tmp_path / "s.jsonl")).returncode == 0
    ours = read_otlp_file(tmp_path / "s.jsonl")
    live = phoenix_spans(phoenix, ours[0].trace_id, expect=len(ours))
    calls = calls_of(tmp_path / "d.db", run_id)
    check_tree(live, calls)
    assert_same_spans(ours, live)
    roots = sorted((s for s in live if s.parent_id is None), key=lambda s: s.start_ns)
    assert [r.attributes["drpo.status"] for r in roots] == ["budget_exhausted", "finished"]
    replayed = [s for s in live if s.attributes.get("drpo.replayed") is True]
    assert replayed and sum(row["replayed"] for row in calls) == len(replayed)
    tokens = sum(s.attributes.get("llm.token_count.prompt", 0) for s in live)
    assert tokens == sum(row["prompt_tokens"] for row in calls)  # Phoenix's own count
