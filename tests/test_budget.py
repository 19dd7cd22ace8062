"""Budgets: ``--max-calls`` and ``--max-cost`` stop a run cleanly, ``drpo resume RUN`` with a larger
budget finishes it without paying for a recorded call twice, and the projection printed before
a run (calls per role, and the cost when the models have prices) is what the library computes
and bounds what the run spends.

``drpo`` runs as a subprocess against the simulated model on a loopback server; a price table
for that endpoint comes from a TOML config (``[endpoints."openai:sim@URL"]``).
"""

from __future__ import annotations

import json
import re
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
)
from simulated_llm import respond

from drpo.jobs.config import build_config, load_toml
from drpo.jobs.projection import project_calls, project_cost

pytestmark = pytest.mark.network

SETTINGS = ("--preset", "paper", "--k", "0", "--depth", "6", "--num-queries", "12")
#: USD per million tokens: high, so that the simulated run's few tokens cost dollars.
INPUT_PRICE, OUTPUT_PRICE = 100.0, 400.0


@pytest.fixture(scope="module")
def server():
    # Both endpoints (sim_models: a vLLM instruct model), so the paper preset's raw layout
    # (/v1/completions) is served; an OpenAI chat model would refuse it.
    with serve_fake_openai(models=sim_models(), responder=respond, latency_s=0.005) as sim:
        yield sim


@pytest.fixture(scope="module")
def baseline(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same search with no budget: its artifact, and how many calls it needs."""
    folder = tmp_path_factory.mktemp("baseline")
    db, out = folder / "drpo.db", folder / "artifact.json"
    result = run_drpo(
        "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS, "--out", str(out),
        cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = only_run_id(db)
    entries = journal(db, run_id)
    return {
        "artifact": _comparable(out),
        "calls": len(entries),
    }


def _comparable(path: Path) -> dict[str, Any]:
    """An artifact without what differs between runs of the same search: the run id, and the
    budget and price settings (they decide when a run stops, not what it finds)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("run_id")
    data["settings"].pop("budget")
    data["settings"].pop("endpoints")
    return data


def _price_config(tmp_path: Path, base_url: str) -> Path:
    config = tmp_path / "prices.toml"
    config.write_text(
        f'[endpoints."openai:sim@{base_url}"]\n'
        f"input_price = {INPUT_PRICE}\noutput_price = {OUTPUT_PRICE}\n",
        encoding="utf-8",
    )
    return config


def _resume_and_check(
    server: FakeOpenAIServer,
    baseline: dict[str, Any],
    tmp_path: Path,
    db: Path,
    run_id: str,
    first_arrival: int,
    *flags: str,
) -> list:
    """Resume with ``flags``; check it finished, found what the unlimited run found, and paid for
    no call recorded before."""
    before = journal(db, run_id)
    split = server.total
    out = tmp_path / "resumed.json"
    resumed = run_drpo("resume", run_id, "--db", str(db), *flags, "--out", str(out), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert run_status(db, run_id) == ("finished", None)
    assert _comparable(out) == baseline["artifact"]
    after = journal(db, run_id)
    arrivals = server.arrivals
    sent = Counter(a.body_hash for a in arrivals[split:])
    assert_nothing_recorded_was_sent_again(before, after, sent, arrivals[first_arrival:])
    assert len(after) == baseline["calls"]
    numbers = {
        "calls journaled before": len(before),
        "requests sent by resume": len(arrivals) - split,
        "replayed by resume": sum(e.replayed for e in after) - sum(e.replayed for e in before),
        "calls in the journal after": len(after),
    }
    print(f"\nresume {' '.join(flags)}:", json.dumps(numbers))
    return after


def test_max_calls_stops_cleanly_and_a_larger_budget_finishes_the_run(
    server: FakeOpenAIServer, baseline: dict[str, Any], tmp_path: Path
) -> None:
    db = tmp_path / "drpo.db"
    limit = baseline["calls"] // 3
    first_arrival = server.total
    stopped = run_drpo(
        "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS,
        "--max-calls", str(limit), cwd=tmp_path,
    )  # fmt: skip
    run_id = only_run_id(db)
    # a non-zero exit, a clear message, the right status
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"run {run_id} stopped: budget exhausted" in stopped.stderr
    assert f"reached its calls budget ({limit} of {limit})" in stopped.stderr
    assert f"drpo resume {run_id} --max-calls N" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    status, error = run_status(db, run_id)
    assert status == "budget_exhausted" and "calls budget" in error
    # exactly the budget was spent, and every request the server answered is in the journal
    # (calls in flight when the budget ran out finished and were recorded, not thrown away)
    entries = journal(db, run_id)
    assert len(entries) == limit == server.total - first_arrival
    assert all(entry.status == "ok" for entry in entries)

    # resuming with the same budget stops at once, without a single request
    before = server.total
    again = run_drpo("resume", run_id, "--db", str(db), cwd=tmp_path)
    assert again.returncode == 1 and "budget exhausted" in again.stderr
    assert server.total == before and run_status(db, run_id)[0] == "budget_exhausted"

    after = _resume_and_check(
        server, baseline, tmp_path, db, run_id, first_arrival, "--max-calls", "1000"
    )
    assert sum(entry.replayed for entry in after) > 0


def test_max_cost_with_a_price_table_stops_and_resumes(
    server: FakeOpenAIServer, baseline: dict[str, Any], tmp_path: Path
) -> None:
    db = tmp_path / "drpo.db"
    config = _price_config(tmp_path, server.base_url)
    budget = 1.0  # dollars; the whole run costs several at these prices
    first_arrival = server.total
    stopped = run_drpo(
        "optimize", "--db", str(db), "--config", str(config), *model_flags(server.base_url),
        *SETTINGS, "--max-cost", str(budget), cwd=tmp_path,
    )  # fmt: skip
    run_id = only_run_id(db)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"run {run_id} stopped: budget exhausted" in stopped.stderr
    assert "reached its cost budget ($" in stopped.stderr
    assert f"drpo resume {run_id} --max-cost USD" in stopped.stderr
    assert run_status(db, run_id)[0] == "budget_exhausted"
    entries = journal(db, run_id)
    spent = sum(entry.cost_usd for entry in entries)
    # calls are priced from their token usage, the run stopped once the budget was reached
    # (calls already in flight may take it a little past), and nothing answered was lost
    assert all(entry.cost_usd > 0 for entry in entries)
    assert budget <= spent < budget + max(entry.cost_usd for entry in entries) * 20
    assert len(entries) == server.total - first_arrival < baseline["calls"]

    after = _resume_and_check(
        server, baseline, tmp_path, db, run_id, first_arrival, "--max-cost", "1000"
    )
    total = sum(entry.cost_usd for entry in after)
    assert total > spent


def test_the_projection_printed_before_a_run_shows_calls_and_cost(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    db = tmp_path / "drpo.db"
    config_path = _price_config(tmp_path, server.base_url)
    flags = (*model_flags(server.base_url), *SETTINGS)
    result = run_drpo(
        "optimize", "--db", str(db), "--config", str(config_path), *flags, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stderr.split())  # the console may wrap long lines

    model = f"openai:sim@{server.base_url}"
    config = build_config(
        load_toml(config_path),
        {
            "preset": "paper",
            "models": {"base": model, "critic": model, "editor": model},
            "search": {"depth": 6, "num_train_queries": 12},
            "proposer": {"k": 0},
        },
    )
    calls = project_calls(config)
    extended = project_calls(config, 6 + config.search.depth_extension)
    assert f"proposer {calls.proposer}," in text
    assert f"critic {calls.critic_select} aspect-selection + {calls.critic_judge} judging" in text
    assert f"editor {calls.editor} requests" in text
    assert f"total {calls.total} (at most {extended.total})" in text

    cost = project_cost(config)
    ceiling = project_cost(config, extended.depth)
    shown = re.search(r"projected cost: at most \$([0-9.]+) \(\$([0-9.]+) with extensions", text)
    assert shown, text
    assert float(shown.group(1)) == pytest.approx(cost.total, abs=1e-4)
    assert float(shown.group(2)) == pytest.approx(ceiling.total, abs=1e-4)
    # tokens per call from the templates, priced with the endpoint's table
    per_call = cost.tokens["proposer"]
    expected = calls.proposer * (per_call.input * INPUT_PRICE + per_call.output * OUTPUT_PRICE)
    assert cost.cost["proposer"] == pytest.approx(expected / 1e6)
    # a ceiling: the finished run spent less than projected with extensions
    spent = sum(entry.cost_usd for entry in journal(db, only_run_id(db)))
    assert 0 < spent <= ceiling.total


def test_no_cost_line_without_prices(server: FakeOpenAIServer, tmp_path: Path) -> None:
    """Models with no known price (and local ones, which are free) get no cost line."""
    result = run_drpo(
        "optimize", "--db", str(tmp_path / "drpo.db"), *model_flags(server.base_url),
        "--preset", "paper", "--k", "0", "--depth", "2", "--num-queries", "4", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "projected calls for" in result.stderr
    assert "projected cost" not in result.stderr
