"""Runs you can resume: ``drpo optimize`` killed mid-level (SIGKILL) or interrupted (Ctrl-C), then
``drpo resume RUN``, against a deterministic simulated model on a loopback server.

What is checked, per interruption:

(a) the resumed run's artifact equals that of an uninterrupted run with the same settings against
    the same server (apart from the run id);
(b) no request whose answer was journaled before the interruption is sent again: the server logs
    every arrival with the hash of its body, the log is split where the interrupted process had
    gone quiet, and each journal entry is mapped to the body it was sent as (see
    ``sim_server_main.body_hash_of``). For every body with R samples journaled before the
    interruption and T after the resume, the resumed process sent it at most T - R times;
    together, it sent at least as many requests as it journaled;
(c) the run ends ``finished``, its transcript is complete (``run_started`` first, ``run_finished``
    last, every level completed, every node of the uninterrupted run present) and
    ``drpo runs show RUN --json`` reads it.

Recorded calls come back on resume in two ways: from the journal (counted as ``replayed``) and,
for aspect selections, from the database's aspect cache, which answers a selection the killed
process completed without asking the journal at all. Either way nothing is sent again.

And the work that pruning or the end of the search leaves behind (in-process, same server): a
level closes only when all its children are judged, so the beam dropping a node leaves nothing
queued for it; aspect selections for queries the search never reached are abandoned when it
ends; and the held-out check that follows must not wait on one of those.

Run with ``-s`` to see the numbers of each kill/resume.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from fakeserver import FakeOpenAIServer, Fault, serve_fake_openai
from sim_server_main import (
    assert_nothing_recorded_was_sent_again,
    body_hash_of,
    journal,
    message_kinds,
    model_flags,
    only_run_id,
    query_db,
    run_drpo,
    run_status,
    sim_models,
    start_drpo,
    wait_for,
    wait_until_quiet,
)
from simulated_llm import respond, role_of

from drpo.data.loaders import default_train_queries
from drpo.jobs.config import build_config
from drpo.jobs.optimize import RunPlan, draw_query_order, run_searches
from drpo.runs.store import RunStore

pytestmark = pytest.mark.network

#: Small enough to take seconds, long enough to be caught mid-level: the paper's settings (beam
#: 2, 3 rewrites, JSON critic and editor, which the simulated model answers) at 6 levels.
SETTINGS = ("--preset", "paper", "--k", "0", "--depth", "6", "--num-queries", "12")
#: Server latency otherwise, and while a run is to be interrupted: 50-150 ms, spread by request
#: so that the calls of a level finish at different moments (a fixed latency makes them land
#: together, leaving little of a level to interrupt).
FAST_S = 0.005


def slow_latency(info) -> float:
    return 0.05 + int(info.body_hash[:4], 16) % 100 / 1000


@pytest.fixture(scope="module")
def server():
    # Both endpoints (sim_models: a vLLM instruct model), so the paper preset's raw layout
    # (/v1/completions) is served; an OpenAI chat model would refuse it.
    with serve_fake_openai(models=sim_models(), responder=respond, latency_s=FAST_S) as sim:
        yield sim


@pytest.fixture(scope="module")
def baseline(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run with the same settings, on the same server (its own database, so
    the aspect cache of one run does not answer the other's selections)."""
    folder = tmp_path_factory.mktemp("baseline")
    db, out = folder / "drpo.db", folder / "artifact.json"
    server.latency_s = FAST_S
    result = run_drpo(
        "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS, "--out", str(out),
        cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = only_run_id(db)
    assert run_id is not None
    return {
        "artifact": _artifact(out),
        "nodes": _node_ids(db, run_id),
        "levels": len(json.loads(out.read_text())["trace"]),
        "calls": len(journal(db, run_id)),
    }


# ------------------------------------------------------------------------------ helpers


def _artifact(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("run_id")
    return data


def _node_ids(db: Path, run_id: str) -> set[str]:
    return {row["node_id"] for row in message_kinds(db, run_id) if row["kind"] == "node_created"}


def _progress(db: Path, run_id: str) -> tuple[int, int]:
    """(levels completed, calls journaled for nodes of the next level)."""
    levels = query_db(
        db,
        "SELECT count(*) FROM messages WHERE run_id = ? AND kind = 'level_completed'",
        (run_id,),
    )
    done = levels[0][0] if levels else 0
    calls = query_db(
        db,
        "SELECT count(*) FROM calls WHERE run_id = ? AND substr(node_id, 1, ?) = ?",
        (run_id, len(f"n{done + 1}."), f"n{done + 1}."),
    )
    return done, calls[0][0] if calls else 0


def _mid_level(db: Path, run_id: str, proc) -> tuple[int, int] | None:
    """(levels completed, calls of the open level) once two levels are complete and the
    journal holds calls of the third; fails if the process ends first."""
    if proc.poll() is not None:
        raise AssertionError(f"drpo exited ({proc.returncode}) before it could be interrupted")
    done, open_calls = _progress(db, run_id)
    return (done, open_calls) if done >= 2 and open_calls else None


def _check_complete_transcript(db: Path, run_id: str, baseline: dict[str, Any]) -> None:
    rows = message_kinds(db, run_id)
    kinds = [row["kind"] for row in rows]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    finished = json.loads(rows[-1]["envelope"])["payload"]
    assert finished["status"] == "finished"
    levels = {
        json.loads(row["envelope"])["payload"]["level"]
        for row in rows
        if row["kind"] == "level_completed"
    }
    assert levels == set(range(1, baseline["levels"] + 1))
    assert _node_ids(db, run_id) == baseline["nodes"]


def _check_runs_show(db: Path, run_id: str, tmp_path: Path, artifact: dict[str, Any]) -> None:
    shown = run_drpo("runs", "show", run_id, "--db", str(db), "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["run_id"] == run_id and view["status"] == "finished"
    assert view["best_prompt"] == artifact["system_prompt"]


def _interrupt_and_resume(
    server: FakeOpenAIServer, baseline: dict[str, Any], tmp_path: Path, sig: signal.Signals
) -> dict[str, Any]:
    """Start a run, interrupt it mid-level with ``sig``, resume it, check (a), (b) and (c)."""
    db = tmp_path / "drpo.db"
    server.latency_s = slow_latency
    first_arrival = server.total
    proc = start_drpo(
        "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS,
        "--out", str(tmp_path / "interrupted.json"),
        cwd=tmp_path, output=tmp_path / "optimize.log",
    )  # fmt: skip
    try:
        run_id = wait_for(lambda: only_run_id(db), timeout=60, what="the run to be created")
        wait_for(lambda: _mid_level(db, run_id, proc), timeout=90, what="mid-level")
        proc.send_signal(sig)
        signalled = time.monotonic()
        returncode = proc.wait(timeout=30)
        exit_s = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "optimize.log").read_text(encoding="utf-8")
    split = wait_until_quiet(server)
    before = journal(db, run_id)
    status_before, _ = run_status(db, run_id)
    where = _progress(db, run_id)  # where it stopped, as recorded

    server.latency_s = FAST_S
    resumed = run_drpo(
        "resume", run_id, "--db", str(db), "--out", str(tmp_path / "resumed.json"), cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = journal(db, run_id)
    arrivals = server.arrivals
    sent_by_resume = Counter(a.body_hash for a in arrivals[split:])

    # (a) the same result as the uninterrupted run
    assert _artifact(tmp_path / "resumed.json") == baseline["artifact"]
    # (b) nothing recorded was paid for twice
    assert_nothing_recorded_was_sent_again(before, after, sent_by_resume, arrivals[first_arrival:])
    # (c) finished, a complete transcript, readable by `drpo runs show`
    assert run_status(db, run_id) == ("finished", None)
    _check_complete_transcript(db, run_id, baseline)
    _check_runs_show(db, run_id, tmp_path, baseline["artifact"])

    numbers = {
        "signal": sig.name,
        "exit after the signal (s)": round(exit_s, 2),
        "stopped at": f"{where[0]} levels complete, {where[1]} calls of level {where[0] + 1}",
        "calls journaled before": len(before),
        "requests sent by the interrupted process": split - first_arrival,
        "requests sent by resume": len(arrivals) - split,
        "replayed by resume": sum(entry.replayed for entry in after),
        "calls in the journal after": len(after),
        "calls of the uninterrupted run": baseline["calls"],
    }
    print(f"\n{sig.name} then resume:", json.dumps(numbers, indent=2))
    return {
        "returncode": returncode,
        "exit_s": exit_s,
        "log": log,
        "status_before": status_before,
        "run_id": run_id,
        "before": before,
        "after": after,
    }


# ------------------------------------------------------------------------------ the tests


def test_killed_mid_level_resumes_to_the_same_result_without_paying_twice(
    server: FakeOpenAIServer, baseline: dict[str, Any], tmp_path: Path
) -> None:
    outcome = _interrupt_and_resume(server, baseline, tmp_path, signal.SIGKILL)
    assert outcome["returncode"] == -signal.SIGKILL
    assert outcome["status_before"] == "running"  # nobody could record anything else
    assert outcome["before"], "killed before any call was journaled: not a mid-run kill"
    replayed = sum(entry.replayed for entry in outcome["after"])
    assert replayed > 0


def test_ctrl_c_marks_the_run_interrupted_and_resume_finishes_it(
    server: FakeOpenAIServer, baseline: dict[str, Any], tmp_path: Path
) -> None:
    outcome = _interrupt_and_resume(server, baseline, tmp_path, signal.SIGINT)
    # Exits promptly (in-flight calls are cancelled, not awaited; the bound is only generous
    # because the machine may be loaded), with the shell's code for SIGINT, and says how to go on.
    assert outcome["returncode"] == 130, outcome["log"]
    assert outcome["exit_s"] < 20
    run_id = outcome["run_id"]
    assert outcome["status_before"] == "interrupted"
    assert f"drpo resume {run_id}" in outcome["log"]
    assert "Traceback" not in outcome["log"]
    # the transcript says so too: an interrupted run_finished, then the resumed segment
    db = tmp_path / "drpo.db"
    finished = [
        json.loads(row["envelope"])["payload"]["status"]
        for row in message_kinds(db, run_id)
        if row["kind"] == "run_finished"
    ]
    assert finished == ["interrupted", "finished"]


def test_resume_refuses_a_finished_run_and_an_unknown_one(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    db = tmp_path / "drpo.db"
    server.latency_s = FAST_S
    flags = ("--db", str(db), *model_flags(server.base_url))
    done = run_drpo(
        "optimize", *flags, "--k", "0", "--depth", "2", "--num-queries", "4", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    run_id = only_run_id(db)
    again = run_drpo("resume", run_id, "--db", str(db), cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr
    unknown = run_drpo("resume", "nosuchrun", "--db", str(db), cwd=tmp_path)
    assert unknown.returncode == 2 and "no run" in unknown.stderr


# ------------------------------------------------------------------------------ pruning


def _config(base_url: str, **search: Any):
    model = f"openai:sim@{base_url}"
    return build_config(
        overrides={
            "models": {"base": model, "critic": model, "editor": model},
            "preset": "paper",
            "search": {"depth": 5, "depth_extension": 2, "num_train_queries": 12, **search},
            "proposer": {"k": 0},
        }
    )


@pytest.mark.anyio
async def test_a_pruned_node_gets_no_work_after_its_level_closes(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """A level ends only when every child has its answer and verdict; then the beam is cut. So
    at pruning time nothing is queued for the dropped nodes, and nothing is asked for them
    after: no rewrite, no answer, no verdict, and no child."""
    server.latency_s = FAST_S
    async with RunStore.open(tmp_path / "drpo.db") as store:
        [outcome] = await run_searches([RunPlan(config=_config(server.base_url))], store=store)
    assert outcome.status == "finished", outcome.error
    db, run_id = tmp_path / "drpo.db", outcome.run_id
    rows = message_kinds(db, run_id)
    closed_at: dict[str, float] = {}  # pruned node -> time its level closed
    parents: dict[str, str | None] = {}
    for row in rows:
        payload = json.loads(row["envelope"])["payload"]
        if row["kind"] == "level_completed":
            stamp = json.loads(row["envelope"])["timestamp"]
            closed_at.update(dict.fromkeys(payload["pruned"], stamp))
        elif row["kind"] == "node_created":
            parents[payload["node_id"]] = payload["parent_id"]
    assert closed_at, "no level pruned anything: the test needs a wider tree"
    assert not set(closed_at) & set(parents.values()), "a pruned node has a child"
    calls = journal(db, run_id)
    for entry in calls:
        if entry.node_id in closed_at:
            assert entry.role != "editor", f"pruned {entry.node_id} was rewritten"
            assert entry.created_at <= closed_at[entry.node_id], f"{entry.node_id} asked late"
    # requests tagged with a pruned node after its level closed (none were published)
    for row in rows:
        if row["node_id"] in closed_at and row["kind"] in (
            "propose_answer",
            "judge",
            "edit_prompt",
        ):
            assert json.loads(row["envelope"])["timestamp"] <= closed_at[row["node_id"]]


@pytest.mark.anyio
async def test_held_out_check_after_unreached_selections_were_cancelled(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Selections start for every reachable query at once (depth + extension); those the search
    never reached are cancelled when it ends. The held-out check then scores the final beam on
    exactly those queries. A selection still in flight at the end must not leave the held-out
    check waiting on it."""
    config = _config(server.base_url, depth=3, held_out_queries=2)
    queries = draw_query_order(default_train_queries(), 12, 0)
    unreached = queries[3:5]  # held-out queries, inside the prefetched range (3 + 2)
    first_seen: set[str] = set()

    def latency(info) -> float:  # the first selection requests for them are slow
        if role_of(info.body) == "select" and any(q in info.text for q in unreached):
            if info.body_hash not in first_seen:
                first_seen.add(info.body_hash)
                return 2.0
        return FAST_S

    server.latency_s = latency
    try:
        async with RunStore.open(tmp_path / "drpo.db") as store:
            with anyio.fail_after(12):
                [outcome] = await run_searches([RunPlan(config=config)], store=store)
    finally:
        server.latency_s = FAST_S
    assert outcome.status == "finished", outcome.error
    assert len(outcome.result.held_out) == len(outcome.result.final_beam)


@pytest.mark.anyio
async def test_selections_for_unreached_queries_are_abandoned_when_the_search_ends(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Aspect selection starts for every query the search may reach (depth + extension) when the
    run starts. A selection the search never needed that is still in flight at the end is
    cancelled: the run does not wait for it (here it would wait forever) and it is not
    journaled, so the journal holds only answers that were received."""
    config = _config(server.base_url, depth=3)
    queries = draw_query_order(default_train_queries(), 12, 0)
    unreached = queries[3:5]
    server.latency_s = FAST_S

    def plan(info):
        if role_of(info.body) == "select" and any(q in info.text for q in unreached):
            return Fault("hang", hang_s=60)
        return None

    server.faults = plan
    try:
        async with RunStore.open(tmp_path / "drpo.db") as store:
            with anyio.fail_after(30):
                [outcome] = await run_searches([RunPlan(config=config)], store=store)
            calls = await store.list_calls(outcome.run_id)
    finally:
        server.faults = None
    assert outcome.status == "finished", outcome.error
    assert outcome.result.levels == 3  # no depth extension: the hung queries were not needed
    hung = [a for a in server.arrivals if a.fault == "hang"]
    assert len(hung) == len(unreached)  # asked at the start, as designed...
    recorded = {body_hash_of(c.model, json.loads(c.request)) for c in calls}
    assert not recorded & {a.body_hash for a in hung}  # ...abandoned, never recorded
