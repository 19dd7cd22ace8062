"""``import drpo`` is the public API: each job as one call, the same runs the CLI makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakeserver import serve_fake_openai
from sim_server_main import sim_models
from simulated_llm import respond

import drpo


def test_import_drpo_is_light_and_names_the_public_api() -> None:
    code = "import sys, drpo; print(json.dumps(sorted(m for m in sys.modules if m.startswith('drpo'))))"
    loaded = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    )
    assert json.loads(loaded.stdout) == ["drpo"]  # names are imported on first use
    assert set(drpo.__all__) >= {"optimize", "generate", "icl", "resume", "AlignedPrompt"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        drpo.nope  # noqa: B018


@pytest.mark.network
def test_optimize_then_generate_from_python(tmp_path: Path) -> None:
    with serve_fake_openai(models=sim_models(), responder=respond) as server:
        model = f"openai:sim@{server.base_url}"
        run = drpo.optimize(
            preset="paper",
            base_model=model,
            critic_model=model,
            editor_model=model,
            search={"depth": 3, "num_train_queries": 6},
            proposer={"k": 0},
            db=tmp_path / "drpo.db",
            artifact=tmp_path / "prompt.json",
        )
        assert run.finished, run.error
        artifact = drpo.AlignedPrompt.load(run.summary["artifact"])
        assert artifact.system_prompt == run.result.best.system_prompt
        answers = drpo.generate(
            ["How do I start running?"], artifact=tmp_path / "prompt.json", db=tmp_path / "drpo.db"
        )
        assert len(answers) == 1 and answers[0].startswith("Simulated answer")
        again = drpo.resume(run.run_id, db=tmp_path / "drpo.db")
    assert again.status == "finished"  # a finished search replays from its journal for free


@pytest.mark.network
def test_resume_keeps_the_recorded_budget_unless_told_otherwise(tmp_path: Path) -> None:
    """A resume's limits override the recorded ones one by one; limits it does not set stay."""
    db = tmp_path / "drpo.db"
    with serve_fake_openai(models=sim_models(), responder=respond) as server:
        model = f"openai:sim@{server.base_url}"
        run = drpo.icl(
            preset="robust",
            critic_model=model,
            editor_model=model,
            limit=2,
            budget={"max_calls": 3},
            out=tmp_path / "examples.json",
            db=db,
        )
        assert run.status == "budget_exhausted", run.error
        again = drpo.resume(run.run_id, db=db)  # no limit given: the recorded 3 calls hold
        assert again.status == "budget_exhausted"
        served = server.total
        done = drpo.resume(run.run_id, db=db, max_calls=1000)
        assert done.status == "finished", done.error
        assert server.total > served
