"""``drpo runs list|show|tree|log|calls|export`` on recorded runs, finished and still running.

The runs are made by tests/run_fixtures.py: the real beam search, bus, recorder and store, with
scripted agents that journal every "model call". The views are driven through the real CLI
(typer's CliRunner) with ``--json``, and through the library calls the CLI is built on.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
from run_fixtures import FixtureRun, build_db, record_run
from typer.testing import CliRunner

from drpo.bus.envelope import Envelope
from drpo.cli.runs import runs_app
from drpo.inspect.calls import load_calls
from drpo.inspect.diff import diff_stats, new_text, old_text, word_diff
from drpo.inspect.report import build_report_data, export_report, json_for_script
from drpo.inspect.summary import summarize_run
from drpo.inspect.transcript import LogEntry, follow_log, read_log
from drpo.inspect.tree import build_tree, load_tree
from drpo.runs.store import RunStore

FIXTURES = Path(__file__).parent / "run_fixtures.py"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FixtureRun]:
    """One database with three runs: plain, failed-then-resumed (hostile text), and failed."""
    db = tmp_path_factory.mktemp("inspect") / "runs.db"

    async def main() -> dict[str, FixtureRun]:
        async with RunStore.open(db) as store:
            plain = await record_run(store, run_id="plain0001", name="plain", depth=4)
            resumed = await record_run(
                store,
                run_id="resumed01",
                name="resumed [b]x[/b]",
                depth=5,
                hostile=True,
                fail_at_call=25,
            )
            failed = await record_run(
                store, run_id="failed001", name="failed", depth=4, fail_at_call=12, resume=False
            )
        return {"plain": plain, "resumed": resumed, "failed": failed}

    return anyio.run(main)


def cli(*args: str) -> str:
    result = CliRunner().invoke(runs_app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def cli_json(*args: str):
    return json.loads(cli(*args, "--json"))


async def _messages(db: Path, run_id: str) -> list[tuple[int, Envelope]]:
    async with RunStore.open(db, readonly=True) as store:
        return [(m.seq, m.envelope) async for m in store.iter_messages(run_id)]


def messages(run: FixtureRun) -> list[tuple[int, Envelope]]:
    return anyio.run(_messages, run.db, run.run_id)


# ------------------------------------------------------------------------------------ list, show


def test_list_shows_every_run_with_status_models_progress_best_and_cost(recorded):
    db = str(recorded["plain"].db)
    runs = {run["run_id"]: run for run in cli_json("list", "--db", db)}
    assert set(runs) == {"plain0001", "resumed01", "failed001"}
    plain = runs["plain0001"]
    assert plain["status"] == "finished" and runs["failed001"]["status"] == "failed"
    assert plain["base_model"] == "local:smollm2" and plain["critic_model"] == "openai:gpt-4o-mini"
    assert plain["progress"] == "3/3" and plain["levels_done"] == 3
    assert plain["best_score"] is not None and plain["cost_usd"] > 0
    assert plain["calls"] == recorded["plain"].calls
    assert plain["started_at"] and plain["finished_at"]
    assert [run["run_id"] for run in cli_json("list", "--db", db, "--status", "failed")] == [
        "failed001"
    ]
    text = cli("list", "--db", db)
    assert "plain0001" in text and "finished" in text


def test_show_has_settings_best_prompt_levels_and_per_role_totals(recorded):
    run = recorded["resumed"]
    shown = cli_json("show", "resum", "--db", str(run.db))  # a unique prefix is enough
    assert shown["run_id"] == run.run_id and shown["status"] == "finished"
    assert shown["settings"]["search"]["beam_size"] == 2
    assert shown["best_prompt"] and shown["best_score"] is not None
    assert [level["level"] for level in shown["levels"]] == [1, 2, 3, 4]  # replays deduped
    by_role = shown["by_role"]
    assert set(by_role) == {"proposer", "critic", "editor"}
    assert sum(role["calls"] for role in by_role.values()) == run.calls
    assert shown["totals"]["replayed"] == run.replayed > 0
    text = cli("show", run.run_id, "--db", str(run.db))
    assert "best prompt" in text and "calls per role" in text
    assert "resumed [b]x[/b]" in text  # names and model text are printed as text, not markup


# ------------------------------------------------------------------------------------ tree


def test_tree_json_has_every_node_once_with_kept_pruned_and_the_best_path(recorded):
    run = recorded["resumed"]
    tree = cli_json("tree", run.run_id, "--db", str(run.db))
    nodes = {node["node_id"]: node for node in tree["nodes"]}
    # the resumed run published its early nodes twice: each appears once
    created = [e for _, e in messages(run) if e.payload.kind == "node_created"]
    assert len(created) > len(nodes) == len(run.node_ids)
    assert set(nodes) == set(run.node_ids)
    for level in tree["levels"]:
        assert len(level["kept"]) == 2  # the beam
        for node_id in level["kept"]:
            assert nodes[node_id]["status"] == "kept"
        for node_id in level["pruned"]:
            assert nodes[node_id]["status"] == "pruned"
    statuses = Counter(node["status"] for node in nodes.values())
    assert statuses["root"] == 1 and statuses["open"] == 0
    assert statuses["kept"] + statuses["pruned"] == len(nodes) - 1
    # the best path runs from the root to the run's best node through parents
    path = tree["best_path"]
    assert tree["best_is_final"] and path[0] == "n0" and path[-1] == tree["best_node_id"]
    for parent, child in itertools.pairwise(path):
        assert nodes[child]["parent_id"] == parent and child in nodes[parent]["children"]
    assert all(nodes[node_id]["on_best_path"] for node_id in path)
    assert sum(node["on_best_path"] for node in nodes.values()) == len(path)
    final = tree["levels"][-1]
    assert final["kept"][0] == tree["best_node_id"]
    # aspects with scores and rationales
    some = nodes[path[-1]]
    assert some["aspects"] and all(
        {"score", "rationale"} <= set(v) for v in some["aspects"].values()
    )


def test_tree_text_marks_kept_pruned_and_best_and_hides_pruned_on_request(recorded):
    run = recorded["plain"]
    text = cli("tree", run.run_id, "--db", str(run.db))
    assert "kept #1" in text and "[pruned]" in text and "★" in text and "Δ+" in text
    without = cli("tree", run.run_id, "--db", str(run.db), "--no-pruned")
    assert "[pruned]" not in without and "kept #1" in without


def test_tree_of_a_running_search_has_open_nodes_and_a_current_best(tmp_path):
    """Built from a prefix of the events, as a viewer sees a run mid-level."""
    run = anyio.run(lambda: build_db(tmp_path / "r.db", depth=4))
    events = [e for _, e in messages(run) if e.topic == "search.events"]
    last_level = max(i for i, e in enumerate(events) if e.payload.kind == "level_completed")
    cut = events[:last_level]  # everything before the last level's verdict
    tree = build_tree(run.run_id, "running", cut)
    assert not tree.best_is_final
    assert tree.counts()["open"] > 0
    assert tree.best_node_id == tree.levels[-1].kept[0]


# ------------------------------------------------------------------------------------ log


def _log(run: FixtureRun, *args: str) -> list[dict]:
    out = cli("log", run.run_id, "--db", str(run.db), "--json", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_log_lists_every_message_in_order_with_a_gist(recorded):
    run = recorded["plain"]
    entries = _log(run)
    stored = messages(run)
    assert [e["seq"] for e in entries] == [seq for seq, _ in stored]
    assert entries[0]["kind"] == "run_started" and entries[-1]["kind"] == "run_finished"
    keys = {
        "format", "seq", "timestamp", "run_id", "sender", "topic", "kind", "node_id",
        "message_id", "correlation_id", "causation_id", "gist", "payload",
    }  # fmt: skip
    assert all(set(e) == keys for e in entries)
    judged = next(e for e in entries if e["kind"] == "judged")
    assert judged["gist"].startswith(("reward ", "judgement failed"))
    candidates = next(e for e in entries if e["kind"] == "prompt_candidates")
    assert candidates["gist"].startswith("3 candidate(s)")
    text = cli("log", run.run_id, "--db", str(run.db))
    assert "search -> agent.proposer propose_answer [n0]" in text
    assert "critic -> reply judged" in text


def test_log_filters_by_node_agent_and_kind(recorded):
    run = recorded["plain"]
    node = run.node_ids[3]
    entries = _log(run, "--node", node)
    assert entries and all(e["node_id"] == node for e in entries)
    assert {"propose_answer", "answer", "judge", "judged", "node_created"} <= {
        e["kind"] for e in entries
    }
    critic = _log(run, "--agent", "critic")
    assert critic and all(
        e["sender"] == "critic" or e["topic"].startswith("agent.critic") for e in critic
    )
    assert {e["kind"] for e in critic} == {"select_aspects", "aspects_selected", "judge", "judged"}
    both = _log(run, "--agent", "critic", "--node", node)
    assert {e["kind"] for e in both} == {"judge", "judged"}
    kinds = _log(run, "--kind", "level_completed", "--kind", "run_finished")
    assert [e["kind"] for e in kinds] == ["level_completed"] * 3 + ["run_finished"]


def test_log_of_a_failed_and_resumed_run_shows_the_failure_and_both_endings(recorded):
    run = recorded["resumed"]
    endings = _log(run, "--kind", "run_finished", "--kind", "failure", "--kind", "run_started")
    kinds = [e["kind"] for e in endings]
    assert kinds.count("run_started") == 2 and "failure" in kinds
    finished = [e for e in endings if e["kind"] == "run_finished"]
    assert [e["payload"]["status"] for e in finished] == ["failed", "finished"]
    full = cli("log", run.run_id, "--db", str(run.db), "--full", "--kind", "failure")
    assert "503 Service Unavailable" in full
    answers = cli("log", run.run_id, "--db", str(run.db), "--full", "--kind", "answer")
    assert "[bold red]rich markup[/]" in answers  # model text is never read as rich markup


# ------------------------------------------------------------------------------------ calls


def test_calls_lists_every_journal_entry_with_tokens_latency_attempts_cost(recorded):
    run = recorded["resumed"]
    data = cli_json("calls", run.run_id, "--db", str(run.db))
    calls = data["calls"]
    assert data["totals"]["calls"] == len(calls) == run.calls - run.error_calls  # retried in place
    keys = {
        "id", "role", "model", "backend", "endpoint", "node_id", "status", "prompt_tokens",
        "completion_tokens", "cached_tokens", "latency_s", "attempts", "tries", "cost_usd",
        "replayed", "sample_index", "created_at", "updated_at", "error", "key",
    }  # fmt: skip
    assert all(set(call) == keys for call in calls)
    assert Counter(call["role"] for call in calls) == {
        role: count - (role == run.failed_role) * run.error_calls
        for role, count in run.calls_by_role.items()
    }
    assert sum(call["replayed"] for call in calls) == run.replayed > 0
    retried = [call for call in calls if call["tries"] == 2]
    assert len(retried) == 1 and retried[0]["status"] == "ok" and retried[0]["attempts"] > 4
    assert data["totals"]["tries"] == run.calls
    assert all(call["prompt_tokens"] > 0 and call["latency_s"] > 0 for call in calls)
    editor = cli_json("calls", run.run_id, "--db", str(run.db), "--role", "editor")["calls"]
    assert editor and {call["role"] for call in editor} == {"editor"}
    node_calls = cli_json("calls", run.run_id, "--db", str(run.db), "--node", "n0")["calls"]
    assert {call["node_id"] for call in node_calls} == {"n0"}
    full = cli_json("calls", run.run_id, "--db", str(run.db), "--role", "editor", "--full")
    assert full["calls"][0]["request"]["messages"] and full["calls"][0]["response"]["choices"]


def test_calls_shows_failed_calls_and_a_readable_table(recorded):
    run = recorded["failed"]
    failed = cli_json("calls", run.run_id, "--db", str(run.db), "--status", "error")["calls"]
    assert len(failed) == 1 and "503" in failed[0]["error"] and failed[0]["attempts"] == 4
    text = cli("calls", run.run_id, "--db", str(run.db))
    assert "error" in text and "proposer" in text and "cost $" in text
    bad = CliRunner().invoke(runs_app, ["calls", run.run_id, "--db", str(run.db), "--status", "x"])
    assert bad.exit_code == 2


# ------------------------------------------------------------------------------------ export


def test_export_writes_one_self_contained_safe_html_file(recorded, tmp_path):
    run = recorded["resumed"]
    out = tmp_path / "sub" / "report.html"
    result = cli_json("export", run.run_id, "--db", str(run.db), "--html", str(out))
    assert result["path"] == str(out) and result["nodes"] == len(run.node_ids)
    page = out.read_text(encoding="utf-8")
    assert result["bytes"] == len(page.encode())
    # offline: nothing is fetched (no src/href to anything but data:), and the CSP forbids it
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)
    assert "default-src 'none'" in page and "http://" not in page.split("<style>")[0]
    # the only executable script is ours, allowed by its hash
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page
    # hostile model text never appears as markup; the embedded data round-trips exactly
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    block = re.search(r'<script type="application/json" id="drpo-data">(.*?)</script>', page, re.S)
    data = json.loads(block.group(1))
    answers = " ".join(node["answer"] for node in data["nodes"])
    assert "</script><script>window.__pwned = 1</script>" in answers or "<img src=x" in answers
    assert {node["id"] for node in data["nodes"]} == set(run.node_ids)
    assert len(data["calls"]["rows"]) == result["calls"]
    # each prompt is its diff against the parent's
    prompts = {node["id"]: new_text([tuple(op) for op in node["diff"]]) for node in data["nodes"]}
    for node in data["nodes"]:
        if node["parent"]:
            assert old_text([tuple(op) for op in node["diff"]]) == prompts[node["parent"]]
    assert 'id="reward-plot"' in page and 'id="plot-best"' in page


def test_json_for_script_cannot_close_the_script_element():
    nasty = {"a": "</script><script>alert(1)</script>", "b": "<!-- x -->", "c": "\u2028 & >"}
    text = json_for_script(nasty)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == nasty


def test_json_for_script_writes_non_finite_numbers_as_null():
    assert json.loads(json_for_script({"r": [float("nan"), 1.5, float("inf")]})) == {
        "r": [None, 1.5, None]
    }


def test_report_assets_are_package_data():
    """report.js and report.css are read with importlib.resources: a wheel must ship them."""
    import tomllib

    from drpo.inspect import report

    assert report._asset("report.js") and report._asset("report.css")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["drpo"]
    for asset in ("inspect/report.js", "inspect/report.css"):
        assert any(Path(asset).match(pattern) for pattern in patterns), (
            f"add {asset!r} (or 'inspect/*.js' / 'inspect/*.css') to "
            "[tool.setuptools.package-data] drpo in pyproject.toml"
        )


def test_word_diff_rebuilds_both_texts_and_counts_words():
    old = "You are a helpful assistant.\nBe brief."
    new = "You are a careful assistant.\nPrefer examples.\nBe brief."
    ops = word_diff(old, new)
    assert new_text(ops) == new and old_text(ops) == old
    assert ("+", "careful") in ops and ("-", "helpful") in ops
    assert diff_stats(ops) == (3, 1)
    assert word_diff(None, new) == [("=", new)] and word_diff(new, new) == [("=", new)]


def test_errors_are_clear_and_not_tracebacks(recorded, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(runs_app, ["tree", "nope", "--db", str(recorded["plain"].db)])
    assert missing.exit_code == 2 and "no run with id 'nope'" in missing.stderr
    nodb = runner.invoke(runs_app, ["list", "--db", str(tmp_path / "none.db")])
    assert nodb.exit_code == 2 and "no run database" in nodb.stderr


def test_views_of_a_run_without_search_events(tmp_path):
    db = tmp_path / "icl.db"

    async def main():
        async with RunStore.open(db) as store:
            return await store.create_run("icl", {"settings": {}})

    run_id = anyio.run(main)
    assert "no search nodes yet" in cli("tree", run_id, "--db", str(db))
    assert cli_json("tree", run_id, "--db", str(db))["nodes"] == []
    assert cli_json("calls", run_id, "--db", str(db))["calls"] == []
    assert cli("log", run_id, "--db", str(db), "--json") == ""
    assert cli_json("export", run_id, "--db", str(db), "--html", str(tmp_path / "r.html"))


# ------------------------------------------------------------------------------------ live runs


def existing_db(path: Path) -> Path:
    """A drpo database that exists before the live run starts (created, then closed), as it
    does after any earlier run: readers open it while the writer appends."""

    async def create() -> None:
        async with RunStore.open(path):
            pass

    anyio.run(create)
    return path


@pytest.mark.anyio
async def test_views_open_a_brand_new_database_while_its_first_run_is_written(tmp_path):
    db = tmp_path / "new.db"
    async with RunStore.open(db) as writer_store:
        await writer_store.create_run("optimize", {}, run_id="first")
        async with RunStore.open(db, readonly=True) as store:
            assert [run.run_id for run in await store.list_runs()] == ["first"]


@pytest.mark.anyio
async def test_views_read_a_run_while_another_task_writes_it(tmp_path):
    db = tmp_path / "live.db"
    async with RunStore.open(db):
        pass
    seen: dict[str, list] = {"nodes": [], "calls": [], "messages": [], "statuses": []}
    async with RunStore.open(db) as writer_store:
        done = anyio.Event()
        final: list[FixtureRun] = []

        async def write() -> None:
            final.append(
                await record_run(writer_store, run_id="live", depth=5, delay=0.03, name="live")
            )
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            async with RunStore.open(db, readonly=True) as store:
                while not done.is_set():
                    try:
                        record = await store.get_run("live")
                    except KeyError:
                        await anyio.sleep(0.01)
                        continue
                    tree = await load_tree(store, record)
                    calls = await load_calls(store, "live")
                    entries = [e async for e in read_log(store, "live")]
                    summary = await summarize_run(store, record)
                    data = await build_report_data(store, "live")
                    assert len(data["nodes"]) >= len(tree.nodes)
                    assert summary.status in ("created", "running", "finished")
                    seen["nodes"].append(len(tree.nodes))
                    seen["calls"].append(len(calls))
                    seen["messages"].append(len(entries))
                    seen["statuses"].append(record.status)
                    await anyio.sleep(0.02)
                # once the writer is done, the readers see all of it
                record = await store.get_run("live")
                tree = await load_tree(store, record)
                assert record.status == "finished" and len(tree.nodes) == len(final[0].node_ids)
                report = await export_report(store, "live", tmp_path / "live.html")
                assert report.nodes == len(final[0].node_ids)
    # the views saw the run grow while it was being written
    assert "running" in seen["statuses"]
    for series in seen.values():
        if series and isinstance(series[0], int):
            assert series == sorted(series)
    assert min(seen["messages"]) < max(seen["messages"])
    assert any(0 < n < len(final[0].node_ids) for n in seen["nodes"])


@pytest.mark.anyio
async def test_follow_hands_over_every_message_and_stops_when_the_run_finishes(tmp_path):
    db = tmp_path / "follow.db"
    async with RunStore.open(db):
        pass
    got: list[LogEntry] = []
    judged: list[LogEntry] = []
    async with RunStore.open(db) as writer_store:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: record_run(writer_store, run_id="follow", depth=4, delay=0.01))
            async with RunStore.open(db, readonly=True) as store:
                while True:
                    try:
                        await store.get_run("follow")
                        break
                    except KeyError:
                        await anyio.sleep(0.01)
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as readers:
                        readers.start_soon(
                            lambda: follow_log(store, "follow", got.append, interval=0.02)
                        )
                        readers.start_soon(
                            lambda: follow_log(
                                store, "follow", judged.append, interval=0.03, kinds=["judged"]
                            )
                        )
                status = (await store.get_run("follow")).status
                total = await store.count_messages("follow")
    # follow returned by itself, once the run was over, with every message exactly once
    assert status == "finished"
    assert [e.seq for e in got] == sorted({e.seq for e in got}) and len(got) == total
    assert got[-1].kind == "run_finished" or "run_finished" in {e.kind for e in got[-3:]}
    assert judged and {e.kind for e in judged} == {"judged"}


def test_follow_from_the_cli_while_another_process_writes(tmp_path):
    db = existing_db(tmp_path / "proc.db")
    writer = subprocess.Popen(
        [sys.executable, str(FIXTURES), "--db", str(db), "--run-id", "proc1", "--delay", "0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the other process has created the run
            assert writer.poll() is None or writer.returncode == 0, writer.stderr.read()
            result = CliRunner().invoke(runs_app, ["show", "proc1", "--db", str(db)])
            if result.exit_code == 0:
                break
            assert time.monotonic() < deadline, "the writer never created its run"
            time.sleep(0.05)
        out = cli("log", "proc1", "--db", str(db), "--follow", "--json", "--interval", "0.05")
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, writer.stderr.read()
    entries = [json.loads(line) for line in out.splitlines()]
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(set(seqs))
    assert "run_finished" in {e["kind"] for e in entries}
    # nothing was missed: the followed stream equals the finished log
    assert seqs == [e["seq"] for e in _log(FixtureRun(db=db, run_id="proc1", status=""))]
