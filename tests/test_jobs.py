"""One job contract (issue 19, item 3): every job registers its kind, how a run of it is created
and run from its record, and what its result is, in ``drpo.jobs.registry``; the Python API's
``resume`` and ``drpo resume`` read that table, and ``drpo.evaluate`` plans an evaluation as
``drpo eval`` does.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import pytest
from fakeserver import serve_fake_openai
from sim_server_main import sim_models
from simulated_llm import respond

import drpo
from drpo.cli.jobs import RESUMERS
from drpo.errors import UserError
from drpo.jobs.registry import JOB_MODULES, UnknownJobError, all_jobs, job_for


def test_every_job_module_registers_its_own_kind() -> None:
    for kind, module in JOB_MODULES.items():
        job = job_for(kind)
        assert job.kind == kind == import_module(module).RUN_KIND
        assert job.create.__module__ == job.run.__module__ == module
    assert [job.kind for job in all_jobs()] == ["optimize", "icl", "eval", "generate"]


def test_drpo_resume_continues_every_kind_the_table_holds() -> None:
    assert set(RESUMERS) == set(JOB_MODULES)


def test_an_unknown_kind_is_a_user_error_naming_the_kinds() -> None:
    with pytest.raises(UnknownJobError, match="optimize, icl, eval, generate") as caught:
        job_for("distill")
    assert isinstance(caught.value, UserError)


@pytest.mark.network
def test_evaluate_from_python_then_resume_recomputes_it(tmp_path: Path) -> None:
    """``drpo.evaluate`` is ``drpo eval``: the same plan, run and report; ``drpo.resume`` of
    the finished evaluation goes through the job table and sends nothing again."""
    queries = tmp_path / "queries.jsonl"
    rows = [{"id": i, "instruction": f"Explain topic {i}.", "category": "regular"} for i in (1, 2)]
    queries.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    db = tmp_path / "drpo.db"
    with serve_fake_openai(models=sim_models(), responder=respond) as server:
        model = f"openai:sim@{server.base_url}"
        run = drpo.evaluate(
            ["none"],
            texts=["Answer carefully."],
            queries=queries,
            model=model,
            judge=model,
            resamples=100,
            db=db,
        )
        assert run.finished, run.error
        sent = server.total
        assert sent == 8  # 2 prompts x 2 queries, an answer and a JSON verdict each
        again = drpo.resume(run.run_id, db=db)
        assert server.total == sent
    assert [p["label"] for p in run.summary["prompts"]] == ["none", "prompt2"]
    assert run.summary["judge_mode"] == "json"  # an API judge: JSON verdicts, as in drpo eval
    assert again.status == "finished" and again.summary["prompts"] == run.summary["prompts"]
    assert len(again.result.items) == 2 and again.result.items[0][0].answer


def test_evaluate_reports_a_bad_option_as_a_user_error(tmp_path: Path) -> None:
    queries = tmp_path / "q.txt"
    queries.write_text("one query\n", encoding="utf-8")
    with pytest.raises(UserError, match="--sample must be at least 1"):
        drpo.evaluate(queries=queries, sample=0, db=tmp_path / "drpo.db")
