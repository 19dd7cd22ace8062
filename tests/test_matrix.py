"""Every preset on every kind of endpoint, for every job: ``drpo`` as a user runs it.

Endpoints:

* ``openai-chat``: the strict double of an OpenAI chat model (chat completions only, everything
  honoured), every role on it;
* ``completions``: a base model served on completions only (a vLLM base model) as the model
  being aligned, with the critic and editor on an instruct model of the same server;
* ``transformers-serve``: a real ``transformers serve`` of the embedded SmolLM2, every role on
  it (it ignores ``n`` and returns no logprobs);
* ``embedded``: the embedded SmolLM2 in-process, every role on it.

The doubles answer as each drpo role expects (``simulated_llm``), so every job finishes there.
The real 135M model is what it is: it cannot write the JSON verdicts of the ``paper`` and
``robust`` critic, and ``transformers serve`` returns no token probabilities for the ``small``
critic. Those cells must end the way the design says, with a one-line reason and the fix
named (:data:`EXPECTED`): that is what this test checks, cell by cell. Sizes are tiny (a few
levels, a few dozen tokens) so the whole matrix runs in minutes.

Every cell of the two doubles runs (a second or two each). Of the real model's 24 cells, which
cost up to a minute each on 2 cores, :data:`MODEL_CELLS` runs 14: every pair of two axes is
there (each preset with each job, each model endpoint with each preset and with each job), so
is every way a cell must end (each row of :data:`EXPECTED`, and each job finishing on the
embedded model with the default preset). ``test_the_model_cells_cover_every_pair`` checks it.
A finished optimize also goes on as a user would: its artifact is read, ``drpo runs show``
counts every role's calls, and ``drpo generate --artifact`` answers with it. The embedded
cells run the default models as a user who names none does (no ``[models]``), and the
embedded optimize takes its search sizes as flags; the default path's optimize (``small``,
embedded) is the suite's one embedded search end to end, closing note included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakeserver import OPENAI_CHAT, VLLM_BASE, VLLM_INSTRUCT, FakeOpenAIServer, serve_fake_openai
from sim_server_main import only_run_id, run_status
from simulated_llm import respond
from typer.testing import CliRunner

from drpo.cli.app import app
from drpo.cli.jobs import API_MODELS_COMMAND
from drpo.jobs.artifact import AlignedPrompt

PRESETS = ("small", "robust", "paper")
JOBS = ("optimize", "icl", "eval", "generate")

#: The cells that do not finish, and why (the reason is checked against the run's error).
EXPECTED: dict[tuple[str, str, str], tuple[str, str]] = {
    # the 135M model as the robust JSON critic: no verdict is readable (its selections fall
    # back to the default aspects), so the search stops at level 1 and names the fix
    **{
        ("robust", endpoint, "optimize"): ("failed", r"every verdict of level 1 was unreadable")
        for endpoint in ("transformers-serve", "embedded")
    },
    # the paper's critic has no fallback: an unreadable aspect selection ends the run, as the
    # paper's code did (here with the reason and the fix, not a traceback)
    **{
        ("paper", endpoint, job): ("failed", r"aspect selection for the query .* could not be read")
        for endpoint in ("transformers-serve", "embedded")
        for job in ("optimize", "icl")
    },
    # transformers serve returns no logprobs, which the small preset's critic reads
    **{
        ("small", "transformers-serve", job): ("failed", r"returns no token probabilities.*json")
        for job in ("optimize", "icl", "eval")
    },
}

#: The real model's cells that run (see the module docstring): every preset with the embedded
#: model, so that each job is seen to finish on the default path (``small``) and each failure of
#: the 135M critic ends as designed; the rest on ``transformers serve`` where it is cheapest,
#: filling in every pair of axes (an eval and an ICL run that finish on a real server, the
#: server's missing logprobs, the paper critic's unreadable selection).
MODEL_CELLS: frozenset[tuple[str, str, str]] = frozenset(
    {
        *(("small", "embedded", job) for job in JOBS),
        ("robust", "embedded", "optimize"),
        ("robust", "embedded", "icl"),
        ("robust", "embedded", "eval"),
        ("paper", "embedded", "generate"),
        ("small", "transformers-serve", "optimize"),
        ("robust", "transformers-serve", "generate"),
        *(("paper", "transformers-serve", job) for job in JOBS),
    }
)
MODEL_ENDPOINTS = ("transformers-serve", "embedded")

#: Tiny sizes: a few levels and a few dozen tokens, whatever the preset (a 135M model writes
#: no readable JSON verdict at any length, and a CPU writes a dozen tokens a second). On a real
#: model a JSON critic's reply is cut at 24 tokens (:data:`MODEL_CRITIC_TOKENS`), which is what
#: every such cell needs of it: an unreadable verdict or selection ends it as :data:`EXPECTED`
#: says, or an eval finishes with it (the doubles' verdicts need their 48).
SEARCH_SIZES = """
[search]
depth = 3
depth_extension = 1
beam_size = 2
n_actions = 2
num_train_queries = 6
"""
#: The same search sizes as ``drpo optimize`` flags (the embedded optimize's).
SEARCH_FLAGS = ("--depth", "3", "--depth-extension", "1", "--beam", "2", "--actions", "2",
                "--num-queries", "6")  # fmt: skip
SIZES = """
[proposer]
k = 1
max_tokens = 24
[critic]
max_tokens = 48
[editor]
max_tokens = 64
[icl]
rounds = 1
max_tokens = 64
"""


MODEL_CRITIC_TOKENS = 24


def _serve(models: dict) -> Iterator[FakeOpenAIServer]:
    with serve_fake_openai(responder=respond, models=models) as server:
        yield server


@pytest.fixture(scope="module")
def openai_double() -> Iterator[FakeOpenAIServer]:
    yield from _serve({"gpt-4o-mini": OPENAI_CHAT})


@pytest.fixture(scope="module")
def vllm_double() -> Iterator[FakeOpenAIServer]:
    yield from _serve({"base-7b": VLLM_BASE, "sim": VLLM_INSTRUCT})


def _models(endpoint: str, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(base model, critic and editor model) of an endpoint kind."""
    if endpoint == "openai-chat":
        url = request.getfixturevalue("openai_double").base_url
        return f"openai:gpt-4o-mini@{url}", f"openai:gpt-4o-mini@{url}"
    if endpoint == "completions":
        url = request.getfixturevalue("vllm_double").base_url
        return f"openai:base-7b@{url}", f"openai:sim@{url}"
    if endpoint == "transformers-serve":
        served = request.getfixturevalue("transformers_server")
        model = f"openai:{served.model}@{served.base_url}"
        return model, model
    return "local:smollm2", "local:smollm2"


def _command(
    job: str, preset: str, base: str, helper: str, endpoint: str, tmp_path: Path
) -> list[str]:
    db = str(tmp_path / "drpo.db")
    config = tmp_path / "sizes.toml"
    models = f'[models]\nbase = "{base}"\ncritic = "{helper}"\neditor = "{helper}"\n'
    if endpoint == "embedded":
        models = ""  # the defaults: every role on the embedded model
    flags = SEARCH_FLAGS if endpoint == "embedded" and job == "optimize" else ()
    search = "" if flags else SEARCH_SIZES
    # a CPU server works one request at a time: keep little in flight, so a run that stops
    # early does not leave the server busy with abandoned requests
    limits = (
        f'[endpoints."{helper}"]\nmax_in_flight = 2\n' if endpoint == "transformers-serve" else ""
    )
    sizes = SIZES
    if endpoint in MODEL_ENDPOINTS:
        sizes = sizes.replace(
            "[critic]\nmax_tokens = 48", f"[critic]\nmax_tokens = {MODEL_CRITIC_TOKENS}"
        )
    config.write_text(f'preset = "{preset}"\n{models}{search}{sizes}{limits}', encoding="utf-8")
    if job == "optimize":
        out = str(tmp_path / "aligned.json")
        return ["optimize", "--config", str(config), *flags, "--out", out, "--db", db]
    if job == "icl":
        out = str(tmp_path / "icl.json")
        return ["icl", "--config", str(config), "--limit", "1", "--out", out, "--db", db]
    if job == "eval":
        queries = tmp_path / "queries.jsonl"
        # one query on a real model (each answer and verdict costs seconds there), two on the
        # doubles: either way both prompts are answered and judged and the eval finishes
        model = endpoint in MODEL_ENDPOINTS
        lines = ['{"id": 1, "instruction": "How do I boil an egg?"}']
        if not model:
            lines.append('{"id": 2, "instruction": "Name a prime number."}')
        queries.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [
            "eval", "default", "none", "--queries", str(queries), "--model", base,
            "--judge", helper, "--config", str(config), "--max-tokens", "24",
            "--judge-max-tokens", str(MODEL_CRITIC_TOKENS if model else 48), "--db", db,
        ]  # fmt: skip
    return ["generate", "How do I start running?", "--model", base, "--max-tokens", "24",
            "--config", str(config), "--db", db]  # fmt: skip


def _cells() -> list[object]:
    cells = []
    for endpoint in ("openai-chat", "completions", "transformers-serve", "embedded"):
        marks = []
        if endpoint != "embedded":
            marks.append(pytest.mark.network)
        if endpoint in ("transformers-serve", "embedded"):
            marks.append(pytest.mark.model)
        for preset in PRESETS:
            for job in JOBS:
                if endpoint in MODEL_ENDPOINTS and (preset, endpoint, job) not in MODEL_CELLS:
                    continue
                cells.append(
                    pytest.param(
                        preset, endpoint, job, marks=marks, id=f"{preset}-{endpoint}-{job}"
                    )
                )
    return cells


@pytest.mark.parametrize(("preset", "endpoint", "job"), _cells())
def test_cell(
    preset: str, endpoint: str, job: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base, helper = _models(endpoint, request)
    # in this process, so a local model is loaded once for every cell that uses it
    result = CliRunner().invoke(app, _command(job, preset, base, helper, endpoint, tmp_path))
    db = tmp_path / "drpo.db"
    run_id = only_run_id(db)
    assert run_id is not None, result.output
    status, error = run_status(db, run_id)
    expected_status, reason = EXPECTED.get((preset, endpoint, job), ("finished", ""))
    assert status == expected_status, f"{status}: {error}\n{result.output[-2000:]}"
    if expected_status == "finished":
        assert result.exit_code == 0, result.output
    else:
        # a one-line reason naming the fix, a non-zero exit, and the run ready to resume
        assert result.exit_code == 1, result.output
        assert error and "\n" not in error and re.search(reason, error), error
        assert f"drpo resume {run_id}" in result.output
    if job == "optimize" and status == "finished":
        shown = CliRunner().invoke(app, ["runs", "show", run_id, "--db", str(db), "--json"])
        summary = json.loads(shown.stdout)
        framing = summary["settings"]["proposer"]["framing"]
        assert framing == ("chat" if endpoint == "openai-chat" else "raw"), framing
        assert summary["status"] == "finished"
        assert set(summary["by_role"]) >= {"proposer", "critic", "editor"}
        assert summary["settings"]["search"]["depth"] == 3  # from the flags, for the embedded
        lines = result.output.rstrip().splitlines()
        if endpoint == "embedded":
            # the default job's two closing lines: what a 135M judge shows, the API command
            assert lines[-1].endswith(API_MODELS_COMMAND) and "not find a good prompt" in lines[-2]
        else:
            assert API_MODELS_COMMAND not in result.output  # an API judge: no such note
        _generate_from_the_artifact(tmp_path, base, db)


def _generate_from_the_artifact(tmp_path: Path, base: str, db: Path) -> None:
    """The search's artifact holds its prompt and base model, and ``drpo generate`` answers
    with it (the model, the prompt and the examples all come from the artifact), in the layout
    it was searched with (the paper's ``inference`` framing sends chat, which a base model on
    completions refuses, as it should)."""
    artifact = AlignedPrompt.load(tmp_path / "aligned.json")
    assert artifact.base_model == base and artifact.system_prompt
    assert len(artifact.trace) >= 2  # depth 3: levels 1 and 2 after the root
    answer = CliRunner().invoke(
        app,
        ["generate", "How do I make tea?", "--artifact", str(tmp_path / "aligned.json"),
         "--framing", "searched", "--max-tokens", "24", "--db", str(db)],
    )  # fmt: skip
    assert answer.exit_code == 0, answer.output
    assert answer.output.strip()


def test_the_model_cells_cover_every_pair() -> None:
    """The sample of the real model's cells still holds every pair of axes, and every cell whose
    ending :data:`EXPECTED` names by kind (each reason, at least once)."""
    cells = MODEL_CELLS
    assert {(p, j) for p, _, j in cells} == {(p, j) for p in PRESETS for j in JOBS}
    assert {(p, e) for p, e, _ in cells} == {(p, e) for p in PRESETS for e in MODEL_ENDPOINTS}
    assert {(e, j) for _, e, j in cells} == {(e, j) for e in MODEL_ENDPOINTS for j in JOBS}
    assert {(p, "embedded", j) for p in ("small",) for j in JOBS} <= cells
    reasons = {reason for _, reason in EXPECTED.values()}
    assert {EXPECTED[cell][1] for cell in cells if cell in EXPECTED} == reasons
