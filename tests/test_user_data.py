"""The suite never touches the data of whoever runs it (issue 19, item 8).

A full ``pytest`` run once left a ``generate`` run in the user's own ``~/.local/share/drpo``.
``tests/conftest.py`` now gives every test (and every session fixture) a temporary home and
``DRPO_DB``. Here a full ``drpo optimize`` with no ``--db`` lands in the test's own database, and
the same test, run by pytest in a process whose home is a given folder, leaves that folder
exactly as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import USER_HOME
from fakeserver import serve_fake_openai
from sim_server_main import model_flags, only_run_id, run_drpo, run_status, sim_models
from simulated_llm import respond

pytestmark = pytest.mark.network

#: A small search (the simulated model; a few dozen calls, no ICL examples to retrieve).
SETTINGS = ("--preset", "paper", "--k", "0", "--depth", "3", "--num-queries", "4")


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``root``: mode, size and (for a file) content; absent root: empty."""
    if not root.exists():
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[str(path.relative_to(root))] = (info.st_mode, info.st_size, content)
    return found


def test_a_cli_job_without_db_writes_only_into_the_tests_home(
    isolated_home: Path, tmp_path: Path
) -> None:
    """``drpo optimize`` with no ``--db`` (a subprocess, inheriting the suite's environment)."""
    user_data = USER_HOME / ".local" / "share" / "drpo"
    before = _tree(user_data)
    with serve_fake_openai(models=sim_models(), responder=respond, latency_s=0.005) as server:
        result = run_drpo(
            "optimize", *model_flags(server.base_url), *SETTINGS, "--out", str(tmp_path / "a.json"),
            cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    db = Path(os.environ["DRPO_DB"])
    assert db.is_relative_to(isolated_home)
    assert run_status(db, only_run_id(db)) == ("finished", None)
    assert (db.parent / "logs").is_dir()  # the run's log went beside that database too
    assert _tree(user_data) == before


def test_the_suite_leaves_a_given_home_untouched(tmp_path: Path) -> None:
    """The test above, run by pytest with ``HOME`` a given folder holding a drpo database of its
    own and nothing that points elsewhere: not a byte of that home changes."""
    home = tmp_path / "home"
    own = home / ".local" / "share" / "drpo"
    own.mkdir(parents=True)
    (own / "drpo.db").write_bytes(b"the user's own runs")
    (home / ".bashrc").write_text("# the user's\n")
    before = _tree(home)
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DRPO_DB", "XDG_DATA_HOME", "HF_HOME", "DRPO_CACHE_DIR", "XDG_CACHE_HOME")
    }
    env["HOME"] = str(home)
    here = Path(__file__).resolve()
    node = f"tests/{here.name}::test_a_cli_job_without_db_writes_only_into_the_tests_home"
    inner_tmp = tmp_path / "inner"  # not the home: pytest's own temporary folders
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            inner_tmp,
            node,
        ],
        cwd=here.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert _tree(home) == before
