"""structlog, configured once: readable lines on the console, JSON lines in each run's log file.

Log calls bind ``run_id``, ``node`` and ``agent``; every event that carries a ``run_id`` is also
appended to that run's own JSON-lines file (see :func:`drpo.runs.paths.run_log_path`), so a
run's log travels with the run whatever else the process was doing at the time.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog

_configured = False


class RunLogFiles:
    """A structlog processor that appends events bound to a run to that run's JSON-lines file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, TextIO] = {}
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        run_id = event_dict.get("run_id")
        if run_id:
            line = json.dumps(event_dict, default=str, ensure_ascii=False)
            with self._lock:
                handle = self._files.get(run_id)
                if handle is None:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    handle = self._files[run_id] = (self.folder / f"{run_id}.jsonl").open(
                        "a", encoding="utf-8"
                    )
                handle.write(line + "\n")
                handle.flush()
        return event_dict

    def close(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()


_run_files: RunLogFiles | None = None


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write, not the stream that was
    current when logging was configured (test runners swap and close it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    *, log_folder: Path | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Set up structlog for the process. Safe to call again: only the first call counts,
    except that a later call may add the run-log folder."""
    global _configured, _run_files
    if _configured and (_run_files is not None or log_folder is None):
        return
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_folder is not None:
        _run_files = RunLogFiles(log_folder)
        processors.append(_run_files)
    processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _configured = True
    _settings.update(log_folder=log_folder, level=level)


#: The arguments of the configuration in force (empty: not configured by drpo), for a worker
#: process to configure its logging the same way (``drpo.jobs.workers``).
_settings: dict[str, Any] = {}


def logging_settings() -> dict[str, Any] | None:
    """How :func:`configure_logging` was called in this process (None: it was not), to be
    repeated in a worker process: its runs' log lines then go where this process's go."""
    return dict(_settings) if _configured and _settings else None
