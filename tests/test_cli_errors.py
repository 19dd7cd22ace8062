"""Bad input at the command line: one clear message, a non-zero exit, nothing lost."""

from __future__ import annotations

import os
from typing import Any

import anyio
from typer.testing import CliRunner

from drpo.cli.app import app
from drpo.runs.store import RunStore

runner = CliRunner()


def test_malformed_training_file_is_reported_plainly(tmp_path):
    bad = tmp_path / "queries.json"
    bad.write_text("garbage{")
    result = runner.invoke(app, ["optimize", "--train", str(bad), "--db", str(tmp_path / "d.db")])
    assert result.exit_code == 2
    assert "expected valid JSON" in result.output
    assert "Traceback" not in result.output


def test_unknown_model_spec_says_how_to_write_one(tmp_path):
    result = runner.invoke(app, ["optimize", "--base-model", "gpt4", "--db", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "KIND:MODEL" in " ".join(result.output.split())


def test_corrupt_database_is_refused_and_left_unchanged(tmp_path):
    db = tmp_path / "corrupt.db"
    db.write_bytes(os.urandom(4096))
    before = db.read_bytes()
    result = runner.invoke(app, ["runs", "list", "--db", str(db)])
    assert result.exit_code == 2
    assert "not an SQLite database" in " ".join(result.output.split())
    assert db.read_bytes() == before


def test_api_critic_with_no_key_fails_before_the_search_starts(tmp_path, monkeypatch):
    """An API critic and no key in the environment: the one line that names the variable, the
    run recorded failed with it, and nothing of the search sent: the backends are built before
    the job, so the embedded base model (asked first) is never loaded for a run that cannot go
    on (issue 19: it took ~7 s to load before this error)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    db = tmp_path / "d.db"
    result = runner.invoke(app, ["optimize", "--critic-model", "openai:gpt-4o", "--db", str(db)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line = "no API key for https://api.openai.com/v1: set the environment variable OPENAI_API_KEY"
    assert line in output

    async def stored() -> tuple[Any, list[str]]:
        async with RunStore.open(db, readonly=True) as store:
            [run] = await store.list_runs()
            kinds = [m.envelope.payload.kind async for m in store.iter_messages(run.run_id)]
            return run, kinds

    run, kinds = anyio.run(stored)
    assert run.status == "failed"
    assert line in run.error
    assert kinds == ["run_started", "run_finished"]  # no request reached an agent
