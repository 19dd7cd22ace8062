"""One run lifecycle for every job, seen from outside: real ``drpo`` processes against the strict
simulated server on loopback, killed, interrupted, resumed, and raced.

* ``drpo icl`` stops at its call budget like ``drpo optimize`` (status, exit code, message) and
  ``drpo resume`` finishes it;
* an ICL run and an evaluation killed with SIGKILL resume to the same result without sending a
  recorded request again (counted at the server), the evaluation with sampled answers and
  identical requests in flight at once, whose replay must hand each answer back to its node;
* two ``drpo resume`` of one run at once: exactly one proceeds, the other says who owns the run;
* without a terminal, ``drpo optimize`` prints one line per level and ``drpo eval`` prints every
  paired difference and interval in full.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fakeserver import FakeOpenAIServer, serve_fake_openai
from sim_server_main import (
    assert_nothing_recorded_was_sent_again,
    journal,
    model_flags,
    only_run_id,
    run_drpo,
    run_status,
    sim_models,
    start_drpo,
    wait_for,
    wait_until_quiet,
)
from simulated_llm import respond, role_of

pytestmark = pytest.mark.network

FAST_S = 0.005
_samples = itertools.count()


def sampled(body: dict[str, Any]) -> str | list[str]:
    """The simulated model, except that answers are *sampled*: identical requests get different
    answers, as an API model at T > 0 (or at T = 0, nondeterministically) gives them."""
    if role_of(body) == "propose":
        return f"Sampled answer number {next(_samples)}."
    return respond(body)


def slow(info: Any) -> float:
    """50-250 ms, spread by request, so a kill lands with calls in flight."""
    return 0.05 + int(info.body_hash[:4], 16) % 200 / 1000


@pytest.fixture(scope="module")
def server():
    with serve_fake_openai(responder=sampled, latency_s=FAST_S, models=sim_models()) as sim:
        yield sim


def _calls(db: Path, run_id: str | None) -> int:
    return len(journal(db, run_id)) if run_id else 0


def _kill_when(proc: Any, db: Path, enough: int) -> str:
    """SIGKILL ``proc`` once its run has journaled ``enough`` calls; returns the run id."""
    run_id = wait_for(lambda: only_run_id(db), timeout=60, what="the run to be created")

    def journaled() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"drpo exited ({proc.returncode}) before it could be killed")
        return _calls(db, run_id) >= enough

    wait_for(journaled, timeout=90, what=f"{enough} journaled calls")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return run_id


# ------------------------------------------------------------------------------ icl


def _icl_args(server: FakeOpenAIServer, db: Path, out: Path) -> list[str]:
    model = f"openai:sim@{server.base_url}"
    return [
        "icl", "--preset", "robust", "--critic-model", model, "--editor-model", model,
        "--limit", "3", "--rounds", "2", "--out", str(out), "--db", str(db),
    ]  # fmt: skip


def test_icl_stops_at_its_budget_like_optimize_and_resume_finishes_it(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    db, out = tmp_path / "drpo.db", tmp_path / "icl.json"
    server.latency_s = FAST_S
    stopped = run_drpo(*_icl_args(server, db, out), "--max-calls", "3", cwd=tmp_path)
    run_id = only_run_id(db)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"run {run_id} stopped: budget exhausted" in stopped.stderr
    assert f"drpo resume {run_id} --max-calls N" in stopped.stderr
    status, error = run_status(db, run_id)
    assert status == "budget_exhausted" and "calls budget" in error
    assert len(journal(db, run_id)) <= 3

    resumed = run_drpo("resume", run_id, "--max-calls", "1000", "--db", str(db), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert run_status(db, run_id) == ("finished", None)
    examples = json.loads(out.read_text(encoding="utf-8"))
    assert len(examples) == 3 and all(e["answer"].startswith("<START>") for e in examples)


def test_a_killed_icl_run_resumes_to_the_same_examples_without_paying_twice(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    server.latency_s = FAST_S
    clean_db, clean_out = tmp_path / "clean.db", tmp_path / "clean.json"
    clean = run_drpo(*_icl_args(server, clean_db, clean_out), cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    db, out = tmp_path / "drpo.db", tmp_path / "icl.json"
    server.latency_s = slow
    first = server.total
    proc = start_drpo(*_icl_args(server, db, out), cwd=tmp_path, output=tmp_path / "icl.log")
    run_id = _kill_when(proc, db, enough=8)
    split = wait_until_quiet(server)
    before = journal(db, run_id)
    assert run_status(db, run_id)[0] == "running"  # killed: nothing could say otherwise

    server.latency_s = FAST_S
    resumed = run_drpo("resume", run_id, "--db", str(db), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = journal(db, run_id)
    sent = Counter(a.body_hash for a in server.arrivals[split:])
    assert_nothing_recorded_was_sent_again(before, after, sent, server.arrivals[first:])
    assert json.loads(out.read_text()) == json.loads(clean_out.read_text())
    # recorded verdicts came back from the journal (selections also from the aspect cache)
    assert sum(entry.replayed for entry in after) > 0


# ------------------------------------------------------------------------------ eval


def _queries(tmp_path: Path, count: int = 6) -> Path:
    path = tmp_path / "queries.jsonl"
    lines = [
        json.dumps({"id": i, "instruction": f"Explain topic {i} simply."}) for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _eval_args(server: FakeOpenAIServer, tmp_path: Path, db: Path, out: Path) -> list[str]:
    model = f"openai:sim@{server.base_url}"
    # the same prompt twice: identical requests in flight at once, at different nodes
    return [
        "eval", "default", "default", "--label", "a", "--label", "b",
        "--queries", str(_queries(tmp_path)), "--model", model, "--judge", model,
        "--temperature", "0.7", "--db", str(db), "--json-out", str(out),
    ]  # fmt: skip


def _answers(path: Path) -> dict[tuple[Any, str], str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        (item["query_id"], label): result["answer"]
        for item in data["items"]
        for label, result in item["results"].items()
    }


def test_a_killed_sampled_evaluation_replays_each_answer_to_its_own_node(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    db, out = tmp_path / "drpo.db", tmp_path / "eval.json"
    server.latency_s = slow
    first = server.total
    proc = start_drpo(*_eval_args(server, tmp_path, db, out), cwd=tmp_path, output=tmp_path / "e")
    run_id = _kill_when(proc, db, enough=6)
    split = wait_until_quiet(server)
    before = journal(db, run_id)

    server.latency_s = FAST_S
    resumed = run_drpo("resume", run_id, "--db", str(db), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = journal(db, run_id)
    sent = Counter(a.body_hash for a in server.arrivals[split:])
    assert_nothing_recorded_was_sent_again(before, after, sent, server.arrivals[first:])

    # each item's answer is the sample journaled at its own node...
    again = tmp_path / "again.json"
    recomputed = run_drpo(
        "eval", "--resume", run_id, "--db", str(db), "--json-out", str(again), cwd=tmp_path
    )
    assert recomputed.returncode == 0, recomputed.stdout + recomputed.stderr
    answers = _answers(again)
    rows = {
        row["node_id"]: json.loads(row["response"])["choices"][0]["text"]
        for row in _proposer_rows(db, run_id)
    }
    labels = ("a", "b")
    for (query_id, label), answer in answers.items():
        assert answer == rows[f"e{labels.index(label)}.{query_id}"]
    # ...the two prompts (identical requests) got different samples, and a second replay
    # hands back exactly the same answers
    ids = {query_id for query_id, _ in answers}
    assert len(ids) == 6 and any(answers[q, "a"] != answers[q, "b"] for q in ids)
    assert len(journal(db, run_id)) == len(after)  # the recompute paid for nothing


def _proposer_rows(db: Path, run_id: str) -> list[Any]:
    from sim_server_main import query_db

    return query_db(
        db,
        "SELECT node_id, response FROM calls WHERE run_id = ? AND role = 'proposer'",
        (run_id,),
    )


def test_eval_output_without_a_terminal_shows_every_difference_in_full(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    server.latency_s = FAST_S
    model = f"openai:sim@{server.base_url}"
    result = run_drpo(
        "eval", "none", "default", "--prompt", "You are terse.", "--queries", str(_queries(tmp_path)),
        "--model", model, "--judge", model, "--db", str(tmp_path / "drpo.db"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "…" not in result.stdout  # nothing cut to fit 80 columns
    differences = re.findall(r"[+-]\d\.\d+\s+\[[+-]?\d\.\d+, [+-]?\d\.\d+\]", result.stdout)
    assert len(differences) >= 2, result.stdout


# ------------------------------------------------------------------------------ optimize


SETTINGS = ("--preset", "paper", "--k", "0", "--depth", "4", "--num-queries", "8")


def test_optimize_without_a_terminal_prints_one_line_per_level(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    server.latency_s = FAST_S
    db = tmp_path / "drpo.db"
    result = run_drpo(
        "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = only_run_id(db)
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"run={run_id} ")]
    levels = json.loads(run_drpo("runs", "show", run_id, "--db", str(db), "--json",
                                 cwd=tmp_path).stdout)["levels_done"]  # fmt: skip
    assert len(lines) == levels >= 3
    assert re.fullmatch(
        rf"run={run_id} level=1/\d+ best=\d\.\d{{3}} mean=\d\.\d{{3}} calls=\d+ cost=\$0\.0000",
        lines[0],
    )


def test_two_resumes_of_one_run_at_once_exactly_one_proceeds(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    db = tmp_path / "drpo.db"
    server.latency_s = FAST_S
    stopped = run_drpo(
        "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS,
        "--max-calls", "5", cwd=tmp_path,
    )  # fmt: skip
    run_id = only_run_id(db)
    assert stopped.returncode == 1 and run_status(db, run_id)[0] == "budget_exhausted"

    server.latency_s = slow  # long enough that both are alive at once
    first = start_drpo(
        "resume", run_id, "--max-calls", "1000", "--db", str(db), cwd=tmp_path,
        output=tmp_path / "first.log",
    )  # fmt: skip
    try:
        wait_for(lambda: run_status(db, run_id)[0] == "running", timeout=60, what="running")
        second = run_drpo("resume", run_id, "--max-calls", "1000", "--db", str(db), cwd=tmp_path)
        assert first.poll() is None, "the first resume ended before the second started"
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"run {run_id} is being run by process {first.pid}" in second.stderr
        started = time.monotonic()
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
        print(f"\nthe first resume finished {time.monotonic() - started:.1f} s after the refusal")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert run_status(db, run_id) == ("finished", None)
