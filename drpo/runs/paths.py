"""Where drpo keeps its files: one database per user, and per-run logs and artifacts beside it.

Everything hangs off the database's folder so that moving or pointing at another database
(``DRPO_DB=/elsewhere/drpo.db``) takes a run's logs and artifacts along with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: Environment variable that overrides the database path.
DB_ENV_VAR = "DRPO_DB"
DB_FILENAME = "drpo.db"

# Run ids become file names: keep them to characters that cannot escape the folder.
_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/drpo``, else ``~/.local/share/drpo``.

    The XDG spec says a relative ``XDG_DATA_HOME`` is invalid and must be ignored, so it is.
    """
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "drpo"


def default_db_path() -> Path:
    """The database to use when none is named: ``$DRPO_DB`` if set, else ``data_dir()/drpo.db``."""
    override = os.environ.get(DB_ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    return data_dir() / DB_FILENAME


def _check_run_id(run_id: str) -> str:
    if not _SAFE_RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} cannot be used in a file name")
    return run_id


def logs_dir(db_path: Path | str | None = None) -> Path:
    """The folder of the run log files of the database at ``db_path`` (default database if None)."""
    db = Path(db_path) if db_path is not None else default_db_path()
    return db.expanduser().parent / "logs"


def run_log_path(run_id: str, db_path: Path | str | None = None) -> Path:
    """The JSON-lines log file of one run: ``<db folder>/logs/<run_id>.jsonl``."""
    return logs_dir(db_path) / f"{_check_run_id(run_id)}.jsonl"


def run_artifacts_dir(run_id: str, db_path: Path | str | None = None) -> Path:
    """The folder for a run's exported files (reports, best prompts): ``<db folder>/artifacts/<run_id>``."""
    db = Path(db_path) if db_path is not None else default_db_path()
    return db.expanduser().parent / "artifacts" / _check_run_id(run_id)
