"""Bad input at the command line: one clear message, a non-zero exit, nothing lost."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from drpo.cli.app import app

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
