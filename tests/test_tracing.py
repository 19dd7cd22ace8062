"""A run as an OpenTelemetry trace (GenAI conventions): built from the store, the same however it
is fed (live, a few rows at a time, or all at once), the same ids every time, and a collector
that is down or a bad setting costs one line and nothing else.

Runs are real ``drpo optimize`` processes on the strict fake OpenAI server (it demands an API
key, which must never reach a span); the receiver tests against Arize Phoenix are in
``test_tracing_phoenix.py``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from fakeserver import FakeOpenAIServer, serve_fake_openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_server_main import sim_models
from simulated_llm import respond
from trace_helpers import (
    API_KEY,
    TINY,
    calls_of,
    check_tree,
    closed_port,
    db_rows,
    drpo_env,
    model_flags,
    model_spans,
    read_otlp_file,
    run_drpo,
    run_ids,
)

from drpo.runs.store import RunStore
from drpo.tracing.settings import TraceSettings, TraceURLError, traces_url
from drpo.tracing.spans import SpanRecord, TraceBuilder, build_spans

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def server():
    with serve_fake_openai(
        models=sim_models(), responder=respond, latency_s=0.002, api_key=API_KEY
    ) as sim:
        yield sim


def optimize(server: FakeOpenAIServer, folder: Path, *extra: str, env: Any = None) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    return run_drpo(
        "optimize", "--db", str(folder / "d.db"), *model_flags(server.base_url), *TINY,
        "--out", str(folder / "a.json"), *extra, cwd=folder, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plain_run(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run made without tracing."""
    folder = tmp_path_factory.mktemp("plain")
    result = optimize(server, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


@pytest.fixture(scope="module")
def resumed_run(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped by its call budget, then resumed to the end (its calls replayed)."""
    folder = tmp_path_factory.mktemp("resumed")
    first = optimize(server, folder, "--max-calls", "12")
    assert first.returncode == 1, first.stdout + first.stderr
    [run_id] = run_ids(folder / "d.db")
    again = run_drpo(
        "resume", run_id, "--max-calls", "1000", "--db", str(folder / "d.db"), cwd=folder
    )
    assert again.returncode == 0, again.stdout + again.stderr
    return folder


def export(folder: Path, name: str, *extra: str, env: Any = None) -> Path:
    [run_id] = run_ids(folder / "d.db")
    out = folder / name
    result = run_drpo(
        "runs", "export", run_id, "--db", str(folder / "d.db"), "--otlp-file", str(out), *extra,
        cwd=folder, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _artifact(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("run_id")
    return data


# ------------------------------------------------------------------------------------ export


def test_an_export_is_the_run_s_tree_with_its_journal_s_numbers(plain_run: Path) -> None:
    db = plain_run / "d.db"
    [run_id] = run_ids(db)
    spans = read_otlp_file(export(plain_run, "spans.jsonl"))
    check_tree(spans, calls_of(db, run_id))
    [root] = [s for s in spans if s.parent_id is None]
    assert root.name == "invoke_workflow drpo.optimize"
    assert root.attributes["drpo.status"] == "finished" and root.error is None
    assert root.attributes["drpo.run_id"] == run_id
    kinds = {s.name.split()[0]: s.kind for s in spans}
    assert kinds["chat"] == 3 or kinds["text_completion"] == 3  # SPAN_KIND_CLIENT: an API call
    agents = Counter(s.name for s in spans if s.name.startswith("invoke_agent"))
    assert set(agents) == {"invoke_agent proposer", "invoke_agent critic", "invoke_agent editor"}
    # kept and pruned, as the tree view says
    tree = json.loads(
        run_drpo("runs", "tree", run_id, "--db", str(db), "--json", cwd=plain_run).stdout
    )
    status = {n["node_id"]: n["status"] for n in tree["nodes"]}
    for span in spans:
        if span.name.startswith("drpo.node "):
            assert span.attributes["drpo.node_status"] == status[span.attributes["drpo.node_id"]]


def test_the_same_run_exported_twice_has_the_same_ids(plain_run: Path) -> None:
    first = read_otlp_file(export(plain_run, "one.jsonl"))
    second = read_otlp_file(export(plain_run, "two.jsonl"))
    assert first == second  # ids, names, times, attributes: everything but the resource


def test_a_resumed_run_marks_replayed_calls_and_pays_each_call_once(resumed_run: Path) -> None:
    db = resumed_run / "d.db"
    [run_id] = run_ids(db)
    calls = calls_of(db, run_id)
    assert sum(row["replayed"] for row in calls) > 0
    spans = read_otlp_file(export(resumed_run, "spans.jsonl"))
    check_tree(spans, calls)
    roots = sorted((s for s in spans if s.parent_id is None), key=lambda s: s.start_ns)
    assert [r.attributes["drpo.status"] for r in roots] == ["budget_exhausted", "finished"]
    assert roots[0].attributes["error.type"] == "budget_exhausted"
    assert roots[1].attributes["drpo.resumed"] is True
    replayed = [s for s in model_spans(spans) if s.attributes["drpo.replayed"]]
    assert replayed and all(s.attributes["drpo.attempt"] == 1 for s in replayed)
    made = {s.attributes["drpo.journal_key"] for s in model_spans(spans) if s not in replayed}
    assert {s.attributes["drpo.journal_key"] for s in replayed} <= made


def test_text_only_when_asked_for_and_never_the_key(plain_run: Path) -> None:
    dark = export(plain_run, "dark.jsonl").read_text(encoding="utf-8")
    queries = [r["config"] for r in db_rows(plain_run / "d.db", "SELECT config FROM runs")]
    first_query = json.loads(queries[0])["queries"][0]
    assert "gen_ai.input.messages" not in dark and first_query not in dark
    lit = export(plain_run, "lit.jsonl", "--content")
    spans = read_otlp_file(lit)
    messages = [s.attributes["gen_ai.input.messages"] for s in model_spans(spans)]
    assert all(json.loads(m)[0]["parts"][0]["type"] == "text" for m in messages)
    assert first_query in lit.read_text(encoding="utf-8")
    by_env = export(
        plain_run,
        "env.jsonl",
        env=drpo_env(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true"),
    )
    assert by_env.read_text(encoding="utf-8").count("gen_ai.output.messages") == len(messages)
    for path in (dark, lit.read_text(encoding="utf-8"), by_env.read_text(encoding="utf-8")):
        assert API_KEY not in path and API_KEY[-12:] not in path


# ------------------------------------------------------------------------------------ live


def test_a_collector_that_is_down_costs_one_warning_and_nothing_else(
    server: FakeOpenAIServer, plain_run: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    result = optimize(server, tmp_path / "down", "--trace-endpoint", url)
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "tracing:" in line]
    assert len(warnings) == 1, result.stderr
    assert "could not send spans" in warnings[0] and "drpo runs export" in warnings[0]
    assert "Traceback" not in result.stderr
    # the run is the same run: the same artifact, the same journal entries
    assert _artifact(tmp_path / "down" / "a.json") == _artifact(plain_run / "a.json")
    [traced], [plain] = run_ids(tmp_path / "down" / "d.db"), run_ids(plain_run / "d.db")
    keys = Counter(row["key"] for row in calls_of(tmp_path / "down" / "d.db", traced))
    assert keys == Counter(row["key"] for row in calls_of(plain_run / "d.db", plain))
    assert took < 60  # bounded: the follower is given flush_timeout_s (5 s), then let go


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--trace-endpoint", "127.0.0.1:6006"), "is not an OTLP/HTTP URL"),
        (("--trace-endpoint", "ftp://collector/v1/traces"), "is not an OTLP/HTTP URL"),
        (("--trace-endpoint", "http://user:pw@collector:4318"), "OTEL_EXPORTER_OTLP_HEADERS"),
    ],
)
def test_a_malformed_endpoint_is_one_line_before_anything_runs(
    server: FakeOpenAIServer, tmp_path: Path, flags: tuple[str, ...], expected: str
) -> None:
    result = optimize(server, tmp_path, *flags)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not (tmp_path / "d.db").exists() or run_ids(tmp_path / "d.db") == []


def test_without_the_extra_it_says_which_to_install(
    server: FakeOpenAIServer, plain_run: Path, tmp_path: Path
) -> None:
    """An installation without ``drpo[otel]``: a package ``opentelemetry`` with no SDK in it
    shadows the real one."""
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("", encoding="utf-8")
    env = drpo_env(PYTHONPATH=str(tmp_path / "shadow"))
    result = optimize(server, tmp_path / "run", "--trace", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'drpo[otel]'" in result.stderr and "Traceback" not in result.stderr
    assert (
        run_ids(tmp_path / "run" / "d.db") == [] if (tmp_path / "run" / "d.db").exists() else True
    )
    [run_id] = run_ids(plain_run / "d.db")
    exported = run_drpo(
        "runs", "export", run_id, "--db", str(plain_run / "d.db"), "--otlp-file",
        str(tmp_path / "x.jsonl"), cwd=tmp_path, env=env,
    )  # fmt: skip
    assert exported.returncode == 2 and "drpo[otel]" in exported.stderr
    plain = optimize(server, tmp_path / "untraced", env=env)  # no trace asked: no extra needed
    assert plain.returncode == 0, plain.stdout + plain.stderr


# ------------------------------------------------------------------------------------ builder


def _stored(folder: Path) -> tuple[Any, list[Any], list[Any]]:
    async def load() -> tuple[Any, list[Any], list[Any]]:
        async with RunStore.open(folder / "d.db", readonly=True) as store:
            [run] = await store.list_runs()
            messages = [m async for m in store.iter_messages(run.run_id)]
            return run, messages, await store.list_calls(run.run_id)

    return anyio.run(load)


def _key(span: SpanRecord) -> tuple[Any, ...]:
    return (span.span_id, span.parent_id, span.name, span.start_ns, span.end_ns, span.error,
            tuple(sorted(span.attributes.items())), span.links)  # fmt: skip


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fed_live_in_any_pieces_the_builder_gives_the_export(
    resumed_run: Path, plain_run: Path, data: st.DataObject
) -> None:
    """However the committed rows arrive (messages in store order, cut anywhere; journal rows
    no later than the messages that refer to them, and any number of later ones early), each
    span comes out once and the spans are the export's."""
    folder = data.draw(st.sampled_from([resumed_run, plain_run]))
    run, messages, calls = _stored(folder)
    whole = build_spans(run, messages, calls)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(messages)), max_size=12)))
    builder = TraceBuilder(run)
    got: list[SpanRecord] = []
    fed = 0
    by_time = sorted(calls, key=lambda c: c.updated_at)
    for end in [*cuts, len(messages)]:
        chunk = messages[fed:end]
        horizon = max((m.envelope.timestamp for m in messages[:end]), default=0.0)
        early = data.draw(st.floats(0.0, 2.0))  # rows committed after the messages were read
        ready = [c for c in by_time if c.updated_at <= horizon + early]
        builder.add_calls(ready)
        got += builder.add_messages(chunk)
        fed = end
    builder.add_calls(calls)
    got += builder.finish()
    assert len({s.span_id for s in got}) == len(got)
    assert sorted(map(_key, got)) == sorted(map(_key, whole))


def test_ids_derive_from_the_run_and_differ_between_runs(
    plain_run: Path, resumed_run: Path
) -> None:
    spans_a = build_spans(*_stored(plain_run))
    spans_b = build_spans(*_stored(resumed_run))
    assert {s.trace_id for s in spans_a} != {s.trace_id for s in spans_b}
    assert not {s.span_id for s in spans_a} & {s.span_id for s in spans_b}


@pytest.mark.parametrize(
    ("given_url", "url"),
    [
        ("http://127.0.0.1:6006", "http://127.0.0.1:6006/v1/traces"),
        ("http://127.0.0.1:6006/", "http://127.0.0.1:6006/v1/traces"),
        ("https://collector.example/otlp/v1/traces", "https://collector.example/otlp/v1/traces"),
    ],
)
def test_a_base_url_gets_the_traces_path(given_url: str, url: str) -> None:
    assert traces_url(given_url) == url


@given(st.text(max_size=40))
def test_any_text_is_a_url_or_one_clear_error(text: str) -> None:
    try:
        url = traces_url(text)
    except TraceURLError as exc:
        assert "is not an OTLP/HTTP URL" in str(exc)
    else:
        assert url.startswith(("http://", "https://"))


def test_the_environment_names_the_endpoint_but_does_not_turn_tracing_on() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://phoenix:6006"}
    assert TraceSettings().url(env) == "http://phoenix:6006/v1/traces"
    assert TraceSettings().enabled is False
    traces = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"}
    assert TraceSettings().url(traces) == "http://c:4318/custom"
    assert TraceSettings(endpoint="http://x:1").url(traces) == "http://x:1/v1/traces"
    assert TraceSettings().captures_content(
        {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
    )
