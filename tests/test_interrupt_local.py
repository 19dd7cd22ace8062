"""Ctrl-C while the real embedded model is generating: the process ends at once, the run is
recorded as interrupted, and it resumes from its journal.

The local model runs ``generate`` on a worker thread, batch by batch; before generation checked
a cancel flag between tokens, a Ctrl-C waited for the whole batch (over a minute on 2 cores).
The time from the signal to the exit is printed (run with ``-s``), not asserted: machines here
are shared and their speed varies several-fold.

Both ``drpo`` processes load the embedded model's plain safetensors copy (``plain_model_dir``:
the same SmolLM2 weights, run by the same local engine), which loads in about a second, where
the GGUF file takes half a minute to dequantize in every new process; loading the GGUF file
itself is the session's ``local_backend``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from sim_server_main import journal, only_run_id, run_drpo, run_status, start_drpo, wait_for

pytestmark = pytest.mark.model


def test_ctrl_c_mid_generation_exits_and_the_run_resumes(
    tmp_path: Path, plain_model_dir: Path
) -> None:
    db = tmp_path / "drpo.db"
    model = f"local:{plain_model_dir}"
    models = ("--base-model", model, "--critic-model", model, "--editor-model", model)
    proc = start_drpo(
        "optimize", *models, "--db", str(db), cwd=tmp_path, output=tmp_path / "run.log"
    )
    try:
        run_id = wait_for(lambda: only_run_id(db), timeout=120, what="the run to be created")

        def generating() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "run.log").read_text())
            return len(journal(db, run_id)) >= 4  # the model is loaded and busy with batches

        wait_for(generating, timeout=300, what="the embedded model to be generating")
        time.sleep(1.0)  # well inside the next batch
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        returncode = proc.wait(timeout=120)
        exit_s = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "run.log").read_text(encoding="utf-8")
    print(f"\nexit {exit_s:.2f} s after Ctrl-C while the embedded model was generating")
    assert returncode == 130, log
    assert f"run {run_id} interrupted" in log and f"drpo resume {run_id}" in log
    assert run_status(db, run_id)[0] == "interrupted"
    recorded = len(journal(db, run_id))

    # resumable: a resume replays what was recorded and goes on (stopped here by a small budget)
    resumed = run_drpo(
        "resume", run_id, "--max-calls", str(recorded + 2), "--db", str(db), cwd=tmp_path,
        timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert "stopped: budget exhausted" in resumed.stderr
    after = journal(db, run_id)
    assert len(after) >= recorded and sum(entry.replayed for entry in after) > 0
