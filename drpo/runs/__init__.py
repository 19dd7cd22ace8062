"""Runs: the SQLite run store, the recorder that persists every bus message, and the call journal."""

from drpo.runs.journal import (
    BudgetExceeded,
    JournaledCaller,
    JournaledCompletion,
    RoleCounters,
    content_key,
)
from drpo.runs.paths import default_db_path, run_artifacts_dir, run_log_path
from drpo.runs.recorder import Recorder, RecorderStoppedError, recording
from drpo.runs.schema import (
    SCHEMA_VERSION,
    AmbiguousRunIdError,
    DatabaseNotFoundError,
    NotADatabaseError,
    NotADrpoDatabaseError,
    ReadOnlyPathError,
    ReadOnlyStoreError,
    RunNotFoundError,
    SchemaVersionError,
    StoreClosedError,
    StoreError,
    WriteFailedError,
)
from drpo.runs.store import (
    CallRecord,
    RoleTotals,
    RunRecord,
    RunStore,
    RunTotals,
    StoredMessage,
    query_hash,
)

__all__ = [
    "SCHEMA_VERSION",
    "AmbiguousRunIdError",
    "BudgetExceeded",
    "CallRecord",
    "DatabaseNotFoundError",
    "JournaledCaller",
    "JournaledCompletion",
    "NotADatabaseError",
    "NotADrpoDatabaseError",
    "ReadOnlyPathError",
    "ReadOnlyStoreError",
    "Recorder",
    "RecorderStoppedError",
    "RoleCounters",
    "RoleTotals",
    "RunNotFoundError",
    "RunRecord",
    "RunStore",
    "RunTotals",
    "SchemaVersionError",
    "StoreClosedError",
    "StoreError",
    "StoredMessage",
    "WriteFailedError",
    "content_key",
    "default_db_path",
    "query_hash",
    "recording",
    "run_artifacts_dir",
    "run_log_path",
]
