"""Small helpers the run views share: opening the store read-only, formatting, JSON output."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from drpo.runs.store import RunStore, StoreError

#: Bumped when a ``--json`` output changes incompatibly; every JSON document carries it.
JSON_FORMAT = 1

_SPACES = re.compile(r"\s+")


def require_db(db: Path) -> None:
    if not db.exists():
        raise StoreError(f"no run database at {db} (run `drpo optimize` first, or pass --db)")


@asynccontextmanager
async def open_readonly(db: Path) -> AsyncIterator[RunStore]:
    """The store at ``db`` for reading only: safe beside a process that is writing it."""
    require_db(db)
    async with RunStore.open(db, readonly=True) as store:
        yield store


def when(timestamp: float | None) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM:SS`` (UTC), or ``-``."""
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def clock(timestamp: float) -> str:
    """A timestamp as ``HH:MM:SS.mmm`` (UTC), for log lines."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%H:%M:%S.%f")[:-3]


def duration(start: float | None, end: float | None) -> str:
    if not start:
        return "-"
    if not end:
        return "-"
    seconds = max(0.0, end - start)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def excerpt(text: str | None, limit: int = 60) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters with an ellipsis."""
    if not text:
        return ""
    flat = _SPACES.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: max(1, limit - 1)].rstrip() + "…"


def first_line(text: str | None, limit: int = 60) -> str:
    """The first non-blank line of ``text``, cut to ``limit`` characters."""
    for line in (text or "").splitlines():
        if line.strip():
            return excerpt(line, limit)
    return ""


def print_json(console: Console, data: Any) -> None:
    """Machine-readable output: plain JSON on the console's file, never wrapped or coloured."""
    console.file.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
    console.file.flush()


def print_json_line(console: Console, data: Any) -> None:
    """One JSON document per line (for streams such as ``drpo runs log --json --follow``)."""
    console.file.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    console.file.flush()
