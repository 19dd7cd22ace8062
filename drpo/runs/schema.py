"""What a drpo database is, and how to tell before touching it.

A database file is the user's record of every run and every paid model call, so opening one must
never damage it. Merely opening a file for writing in WAL mode rewrites its header, so
:func:`probe_database` looks at a file through a read-only connection first (its header bytes,
``PRAGMA application_id`` and ``PRAGMA user_version``) and refuses files it does not understand
with an error that says what the file is and what to do, leaving the file exactly as it was.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from drpo.domain.events import EndStatus, RunStatus
from drpo.errors import UserError

#: Bump when the schema changes; add a migration from the previous version when you do.
SCHEMA_VERSION = 2
#: ``PRAGMA application_id`` of drpo databases ("DRPO" in ASCII): tells other SQLite files apart.
APPLICATION_ID = 0x4452504F
SQLITE_HEADER = b"SQLite format 3\x00"

RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
#: Statuses after which a run does no more work (until it is resumed).
TERMINAL_STATUSES: frozenset[str] = frozenset(get_args(EndStatus))


class StoreError(UserError):
    """Base class of every run-store error."""


class NotADatabaseError(StoreError):
    """The file is not an SQLite database (or is damaged beyond reading)."""


class DatabaseNotFoundError(StoreError, FileNotFoundError):
    """A database opened read-only does not exist (a viewer never creates one)."""


class NotADrpoDatabaseError(NotADatabaseError):
    """The file is an SQLite database, but another application's."""


class SchemaVersionError(StoreError):
    """The database was written by a drpo with another schema version."""

    def __init__(self, path: Path, found: int, supported: int = SCHEMA_VERSION) -> None:
        self.path, self.found, self.supported = path, found, supported
        if found > supported:
            advice = (
                "it was written by a newer drpo; upgrade drpo (pip install -U drpo) to open it, "
                "or set DRPO_DB to another file to start a separate database"
            )
        else:
            advice = (
                "it was written by an older drpo and no migration from that version exists; "
                "open it with the drpo version that wrote it, or set DRPO_DB to another file"
            )
        super().__init__(
            f"database {path} has schema version {found}, but this drpo supports schema version "
            f"{supported}: {advice}. The file was not modified."
        )


class ReadOnlyPathError(StoreError):
    """The database (or the folder it must be created in) cannot be written."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened with ``readonly=True``."""


class StoreClosedError(StoreError):
    """The store's writer has stopped (its ``open`` block was left)."""


class WriteFailedError(StoreError):
    """A write that nobody awaited failed; reported by the next :meth:`flush`."""


class RunOwnedError(StoreError):
    """Another live process owns the run (holds its lease): two owners would pay twice."""


class LeaseLostError(StoreError):
    """This process's lease on a run was taken over (``--force`` elsewhere): stop working on it."""


class RunNotFoundError(StoreError, KeyError):
    """No run has that id (or id prefix)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class AmbiguousRunIdError(StoreError, KeyError):
    """A run id prefix matches more than one run."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


#: Who is running a run: one owner at a time, proven alive by its heartbeat (schema 2).
LEASES_DDL = """
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
) WITHOUT ROWID;
"""

#: SQL that brings a database of version N up to N + 1, run in the writer's first transaction.
MIGRATIONS: dict[int, str] = {1: LEASES_DDL}

DDL = (
    f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    config TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL CHECK (status IN {RUN_STATUSES!r}),
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,
    message_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    kind TEXT NOT NULL,
    sender TEXT NOT NULL,
    correlation_id TEXT,
    causation_id TEXT,
    node_id TEXT,
    timestamp REAL NOT NULL,
    envelope TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_run ON messages (run_id, seq);
CREATE INDEX IF NOT EXISTS messages_by_node ON messages (run_id, node_id, seq);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    role TEXT NOT NULL,
    node_id TEXT,
    backend TEXT NOT NULL,
    endpoint TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    sample_index INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,
    response TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    tries INTEGER NOT NULL DEFAULT 1,
    cost_usd REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    replayed INTEGER NOT NULL DEFAULT 0,
    UNIQUE (run_id, key)
);
CREATE INDEX IF NOT EXISTS calls_by_role ON calls (run_id, role);
CREATE TABLE IF NOT EXISTS aspect_cache (
    query_hash TEXT NOT NULL,
    critic_model TEXT NOT NULL,
    catalogue_version TEXT NOT NULL,
    selection TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (query_hash, critic_model, catalogue_version)
) WITHOUT ROWID;
"""
    + LEASES_DDL
)


def check_version(path: Path, version: int) -> None:
    """Refuse a version this drpo neither writes nor can migrate from (a newer one, or an older
    one with no migration path)."""
    if version == SCHEMA_VERSION:
        return
    if 0 < version < SCHEMA_VERSION and all(
        v in MIGRATIONS for v in range(version, SCHEMA_VERSION)
    ):
        return
    raise SchemaVersionError(path, version)


@dataclass(frozen=True)
class Probe:
    """What :func:`probe_database` found. ``new`` means: no schema yet, safe to create one."""

    path: Path
    exists: bool
    version: int = 0

    @property
    def new(self) -> bool:
        return self.version == 0


def read_only_uri(path: Path) -> str:
    """A ``file:`` URI that opens ``path`` read-only: SQLite will refuse every write through it."""
    return f"{path.resolve().as_uri()}?mode=ro"


def _header_ids(path: Path, header: bytes) -> tuple[int, int]:
    """``(application_id, user_version)`` from the 100-byte database header, after checking that
    the header is an SQLite header at all. Reading them here, rather than through SQLite, creates
    no ``-wal``/``-shm`` files beside the database."""
    if not header.startswith(SQLITE_HEADER):
        raise NotADatabaseError(
            f"{path} is not an SQLite database (its first bytes are {header[:16]!r}); "
            "point DRPO_DB (or --db) at a drpo database, or at a new file. "
            "The file was not modified."
        )
    page_size = int.from_bytes(header[16:18], "big")
    if (
        len(header) < 100
        or header[21:24] != b"\x40\x20\x20"
        or not (page_size == 1 or (512 <= page_size <= 32768 and page_size & (page_size - 1) == 0))
    ):
        raise NotADatabaseError(
            f"{path} starts like an SQLite database but its header is damaged; "
            "it cannot be opened. The file was not modified."
        )
    application_id = int.from_bytes(header[68:72], "big", signed=True)
    user_version = int.from_bytes(header[60:64], "big", signed=True)
    return application_id, user_version


def _pragma_ids(path: Path) -> tuple[int, int]:
    """``(application_id, user_version)`` as SQLite sees them, WAL included (read-only)."""
    conn = sqlite3.connect(read_only_uri(path), uri=True)
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return int(application_id), int(version)
    finally:
        conn.close()


def _list_tables(path: Path) -> list[str]:
    """The tables of a database that has no application id: blank, or another program's."""
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True)
        try:
            return [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            ]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise NotADatabaseError(
            f"{path} cannot be read as an SQLite database ({exc}); it may be damaged. "
            "The file was not modified."
        ) from exc


def probe_database(path: Path) -> Probe:
    """Check, without writing anything, that ``path`` is absent, empty, or a drpo database whose
    schema this drpo understands. Raises a :class:`StoreError` subclass otherwise.

    The version is read from the file's header: in WAL mode a newer version could still sit in
    the ``-wal`` file, which is why the writer checks it again inside its first transaction.
    Blocking (file I/O and sqlite3): call it from a worker thread.
    """
    if not path.exists():
        return Probe(path, exists=False)
    if path.is_dir():
        raise NotADatabaseError(f"{path} is a folder, not a database file")
    with path.open("rb") as handle:
        header = handle.read(100)
    if not header:
        return Probe(path, exists=True)  # an empty file is an empty SQLite database
    application_id, version = _header_ids(path, header)
    if application_id == APPLICATION_ID:
        check_version(path, version)
        return Probe(path, exists=True, version=version)
    tables = _list_tables(path) if application_id == 0 and version == 0 else None
    if tables == []:
        return Probe(path, exists=True)  # a blank SQLite file: it becomes a drpo database
    if tables:
        # the header may be stale while the ids still sit in an un-checkpointed WAL
        application_id, version = _pragma_ids(path)
        if application_id == APPLICATION_ID:
            check_version(path, version)
            return Probe(path, exists=True, version=version)
    raise NotADrpoDatabaseError(
        f"{path} is an SQLite database of another application (application_id="
        f"{application_id}, user_version={version}"
        + (f", tables: {', '.join(sorted(tables))}" if tables else "")
        + "); point DRPO_DB (or --db) at a drpo database or a new file. "
        "The file was not modified."
    )


def _has_write_bit(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def check_writable(path: Path) -> None:
    """Raise :class:`ReadOnlyPathError` unless drpo may write the database at ``path``.

    SQLite in WAL mode writes the file and two companions (``-wal``, ``-shm``) in its folder, so
    both must be writable. A file or folder without any write permission bit counts as
    read-only even for root (who could write it anyway): someone made it read-only on purpose.
    """
    hint = "open it read-only (readonly=True) to view it, or set DRPO_DB to a writable location"
    if path.exists():
        if not os.access(path, os.W_OK) or not _has_write_bit(path):
            raise ReadOnlyPathError(f"database {path} is read-only; {hint}")
        folder = path.parent
    else:
        folder = path.parent
        while not folder.exists():  # the nearest existing ancestor is where we must create
            folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK) or not _has_write_bit(folder):
        raise ReadOnlyPathError(
            f"folder {folder} is read-only, so database {path} cannot be "
            f"{'written' if path.exists() else 'created'} there; {hint}"
        )
