"""The first run explains itself (issue 16): the default job's closing note, and no library
progress bars in a piped log."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import typer.main

from drpo.cli.app import app
from drpo.cli.jobs import API_MODELS_COMMAND, build_settings, embedded_judge_note


def test_the_default_job_ends_with_the_api_models_command() -> None:
    note = embedded_judge_note(build_settings(None, None, {}))
    assert len(note) == 2
    assert "SmolLM2-135M" in note[0] and "not find a good prompt" in note[0]
    assert note[1].endswith(API_MODELS_COMMAND)


def test_the_api_models_command_is_a_valid_robust_search_without_the_note() -> None:
    words = shlex.split(API_MODELS_COMMAND)
    assert words[:2] == ["drpo", "optimize"]
    optimize = typer.main.get_command(app).commands["optimize"]  # type: ignore[attr-defined]
    params = optimize.make_context("optimize", words[2:]).params
    config = build_settings(
        params["preset"],
        None,
        {"models": {"base": params["base_model"][0], "critic": params["critic_model"],
                    "editor": params["editor_model"]}},
    )  # fmt: skip
    assert config.preset == "robust"
    assert {config.models.base, config.models.critic, config.models.editor} <= {
        "openai:gpt-4o-mini",
        "openai:gpt-4o",
    }
    assert embedded_judge_note(config) == []


def test_only_an_embedded_judge_gets_the_note() -> None:
    api_judges = {"models": {"critic": "openai:gpt-4o", "editor": "openai:gpt-4o"}}
    assert embedded_judge_note(build_settings(None, None, api_judges)) == []
    local_editor = {"models": {"critic": "openai:gpt-4o", "editor": "local:smollm2"}}
    assert len(embedded_judge_note(build_settings(None, None, local_editor))) == 2


BAR = "Converting and de-quantizing GGUF tensors..."


def _stderr_of(code: str) -> str:
    """Run ``code`` in a fresh interpreter with stderr piped (not a terminal), as in a log."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_piped_log_gets_no_library_progress_bars() -> None:
    # tqdm.auto's bar is what transformers' GGUF loader draws (transformers' own switch does
    # not reach it); without drpo's CLI it is drawn into a pipe, with it, not.
    bar = f"from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc={BAR!r}): pass\n"
    assert BAR in _stderr_of(bar)
    quiet = _stderr_of(
        "import drpo.cli\n" + bar + "from transformers.utils import logging\n"
        "assert not logging.is_progress_bar_enabled()\n"
    )
    assert BAR not in quiet


@pytest.mark.model
def test_loading_the_embedded_model_under_the_cli_draws_no_gguf_bars() -> None:
    stderr = _stderr_of(
        "import drpo.cli\n"
        "from drpo.backends.local import LocalBackend\n"
        "LocalBackend('smollm2').load()\n"
    )
    assert "de-quantizing" not in stderr and "%|" not in stderr, stderr
