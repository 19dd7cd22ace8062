"""The run store: one SQLite database with runs, every bus message, the call journal and caches.

How it is put together, and why:

* **WAL mode, ``synchronous=NORMAL``.** Readers never block the writer nor the writer them; a
  commit is durable once it returns if the process dies (a power cut may lose the last few
  commits, never corrupt the file).
* **One writer task** (:class:`~drpo.runs.writer.BatchWriter`) fed by a bounded queue commits
  whatever is queued in one transaction. ``await`` a write (``create_run``, ``record_call``,
  ``append_messages(..., wait=True)``) and it returns after its commit; the recorder instead
  only queues (``append_messages``) and calls :meth:`RunStore.flush` when it needs durability.
* **Readers on their own read-only connections** (a small pool), so a transcript viewer or a
  journal lookup never waits behind a batch, and can never write by accident.
* **Opening never damages a file.** :func:`~drpo.runs.schema.probe_database` looks at the file
  read-only first and refuses what it does not understand (see :mod:`drpo.runs.schema`).
* **Structured concurrency.** The writer task lives in a task group owned by :meth:`RunStore.open`;
  leaving the block commits what is queued and closes every connection, even when cancelled.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import aiosqlite
import anyio
import anyio.to_thread
from pydantic import Field

from drpo.bus.envelope import Envelope, Failure
from drpo.domain.events import RunStatus
from drpo.domain.messages import MESSAGE_TYPES
from drpo.domain.values import AspectSelection
from drpo.runs.paths import default_db_path
from drpo.runs.schema import (
    APPLICATION_ID,
    DDL,
    MIGRATIONS,
    RUN_STATUSES,
    SCHEMA_VERSION,
    TERMINAL_STATUSES,
    AmbiguousRunIdError,
    DatabaseNotFoundError,
    LeaseLostError,
    NotADatabaseError,
    NotADrpoDatabaseError,
    Probe,
    ReadOnlyPathError,
    ReadOnlyStoreError,
    RunNotFoundError,
    RunOwnedError,
    SchemaVersionError,
    StoreClosedError,
    StoreError,
    WriteFailedError,
    check_version,
    check_writable,
    probe_database,
    read_only_uri,
)
from drpo.runs.writer import BatchWriter, WriteOp

BUSY_TIMEOUT_MS = 10_000


# ------------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One row of ``runs``; ``config`` and ``result`` are decoded JSON."""

    run_id: str
    kind: str
    name: str | None
    config: dict[str, Any]
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    result: Any
    error: str | None


#: What the message log holds: the search's messages and the bus's failures, told apart by kind.
StoredPayload = Annotated[Union[(*MESSAGE_TYPES, Failure)], Field(discriminator="kind")]
#: An envelope as the message log reads it back.
StoredEnvelope = Envelope[StoredPayload]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A persisted envelope and its position (``seq``) in the database's global order."""

    seq: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One entry of the call journal. ``request``/``response`` are JSON text, as stored.

    ``tries`` counts how often the call was made (a failed call is made again on resume);
    ``attempts`` sums the backend's own attempts over those tries; ``cost_usd`` sums their cost.
    """

    run_id: str
    key: str
    role: str
    backend: str
    model: str
    request: str
    status: Literal["ok", "error"]
    response: str | None = None
    error: str | None = None
    node_id: str | None = None
    endpoint: str = ""
    sample_index: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    cost_usd: float = 0.0
    tries: int = 1
    replayed: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    id: int | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """Who runs a run: an owner token, its process and host, and when it last proved alive."""

    run_id: str
    owner: str
    pid: int
    host: str
    acquired_at: float
    heartbeat_at: float


@dataclass(slots=True)
class RoleTotals:
    """What one role's calls in a run amount to (new and earlier calls alike)."""

    calls: int = 0  # backend invocations (tries), failed ones included
    ok: int = 0  # journal entries with a result
    errors: int = 0  # journal entries whose last try failed
    replayed: int = 0  # answers served from the journal instead of a backend
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: RoleTotals) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


@dataclass(slots=True)
class RunTotals:
    """Per-role totals of a run's calls, and their sum in :attr:`total`."""

    by_role: dict[str, RoleTotals] = field(default_factory=dict)

    @property
    def total(self) -> RoleTotals:
        total = RoleTotals()
        for totals in self.by_role.values():
            total.add(totals)
        return total


def new_run_id() -> str:
    """A fresh run id (what :meth:`RunStore.create_run` uses when given none)."""
    return uuid.uuid4().hex


def query_hash(query: str) -> str:
    """The key of a query in the aspect cache: sha256 of its text."""
    return hashlib.sha256(query.encode("utf-8")).hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def message_row(envelope: Envelope) -> tuple[Any, ...]:
    """The ``messages`` row of an envelope (its JSON is the lossless record; the rest indexes it)."""
    return (
        envelope.run_id,
        envelope.message_id,
        envelope.topic,
        envelope.payload.kind,
        envelope.sender,
        envelope.correlation_id,
        envelope.causation_id,
        envelope.node_id,
        envelope.timestamp,
        envelope.model_dump_json(),
    )


# ------------------------------------------------------------------------------------ SQL

_INSERT_RUN = """
INSERT INTO runs (run_id, kind, name, config, status, created_at, updated_at)
VALUES (?, ?, ?, ?, 'created', ?, ?)
"""
_SET_STATUS = f"""
UPDATE runs SET
    status = :status,
    updated_at = :now,
    started_at = CASE WHEN :status = 'running' THEN coalesce(started_at, :now)
                      ELSE started_at END,
    finished_at = CASE WHEN :status IN {tuple(sorted(TERMINAL_STATUSES))!r} THEN :now
                       WHEN :status = 'running' THEN NULL
                       ELSE finished_at END,
    result = coalesce(:result, result),
    error = :error
WHERE run_id = :run_id
"""
_INSERT_MESSAGE = """
INSERT INTO messages (run_id, message_id, topic, kind, sender, correlation_id, causation_id,
                      node_id, timestamp, envelope)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (message_id) DO NOTHING
"""
# A successful entry is final; an error entry is replaced by the next try of the same call.
_UPSERT_CALL = """
INSERT INTO calls (run_id, key, role, node_id, backend, endpoint, model, sample_index, request,
                   response, status, error, prompt_tokens, completion_tokens, cached_tokens,
                   latency_s, attempts, tries, cost_usd, created_at, updated_at, replayed)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, 0)
ON CONFLICT (run_id, key) DO UPDATE SET
    role = excluded.role,
    node_id = excluded.node_id,
    response = excluded.response,
    status = excluded.status,
    error = excluded.error,
    prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens,
    cached_tokens = excluded.cached_tokens,
    latency_s = excluded.latency_s,
    attempts = calls.attempts + excluded.attempts,
    tries = calls.tries + 1,
    cost_usd = calls.cost_usd + excluded.cost_usd,
    updated_at = excluded.updated_at
WHERE calls.status <> 'ok'
"""
_TAKE_LEASE = """
INSERT INTO leases (run_id, owner, pid, host, acquired_at, heartbeat_at)
VALUES (:run_id, :owner, :pid, :host, :now, :now)
ON CONFLICT (run_id) DO UPDATE SET
    owner = excluded.owner, pid = excluded.pid, host = excluded.host,
    acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at
WHERE leases.owner = :observed OR leases.owner = excluded.owner
"""
_RENEW_LEASE = "UPDATE leases SET heartbeat_at = ? WHERE run_id = ? AND owner = ?"
_DROP_LEASE = "DELETE FROM leases WHERE run_id = ? AND owner = ?"
_MARK_REPLAYED = "UPDATE calls SET replayed = replayed + 1 WHERE run_id = ? AND key = ?"
_PUT_ASPECTS = """
INSERT OR REPLACE INTO aspect_cache (query_hash, critic_model, catalogue_version, selection,
                                     created_at)
VALUES (?, ?, ?, ?, ?)
"""


def _run_record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        kind=row["kind"],
        name=row["name"],
        config=json.loads(row["config"]),
        status=row["status"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        error=row["error"],
    )


def _call_record(row: sqlite3.Row) -> CallRecord:
    return CallRecord(**{name: row[name] for name in row.keys()})


# ------------------------------------------------------------------------------------ readers


class _ReaderPool:
    """A few read-only connections, opened on demand and reused.

    Each connection has its own thread (aiosqlite), so reads run beside the writer. A connection
    goes back to the pool outside any transaction, so that it never pins an old snapshot.
    """

    def __init__(self, uri: str, size: int) -> None:
        self._uri = uri
        self._idle: list[aiosqlite.Connection] = []
        self._all: list[aiosqlite.Connection] = []
        self._slots = anyio.Semaphore(size)
        self._closed = False

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self._uri, uri=True, isolation_level=None)
        self._all.append(conn)
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._closed:
            raise StoreClosedError("the run store is closed")
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            finally:
                with anyio.CancelScope(shield=True):
                    if conn.in_transaction:
                        await conn.execute("ROLLBACK")
                self._idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        conns, self._all, self._idle = self._all, [], []
        for conn in conns:
            await conn.close()


# ------------------------------------------------------------------------------------ the store


class RunStore:
    """Runs, messages, the call journal and the aspect cache in one SQLite file.

    Use :meth:`open`; the constructor is internal.
    """

    def __init__(self, path: Path, *, writer: BatchWriter | None, readers: int) -> None:
        self.path = path
        self._writer = writer
        self._readers = _ReaderPool(read_only_uri(path), readers)

    @property
    def readonly(self) -> bool:
        return self._writer is None

    # ---------------------------------------------------------------- opening

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: Path | str | None = None,
        *,
        readonly: bool = False,
        max_batch_rows: int = 5000,
        queue_size: int = 1024,
        readers: int = 4,
        commit_interval_s: float = 0.002,
    ) -> AsyncIterator[RunStore]:
        """Open (creating it if needed) the database at ``path`` (default: :func:`default_db_path`).

        ``readonly=True`` opens an existing database for viewing: nothing is ever written, and
        every write method raises :class:`ReadOnlyStoreError`.

        Raises :class:`NotADatabaseError` for a file that is not a drpo database,
        :class:`SchemaVersionError` for one of another schema version and
        :class:`ReadOnlyPathError` when the file or its folder cannot be written; in every case
        the file is left untouched.

        ``commit_interval_s``: under load, the writer commits at most this often (see
        :mod:`drpo.runs.writer`, group commit); 0 commits every batch at once.
        """
        db = _db_path(path)
        probe = await anyio.to_thread.run_sync(probe_database, db)
        if readonly:
            if not probe.exists or probe.new:
                raise DatabaseNotFoundError(f"there is no drpo database at {db} to open read-only")
            store = cls(db, writer=None, readers=readers)
            try:
                yield store
            finally:
                with anyio.CancelScope(shield=True):
                    await store._readers.aclose()
            return

        await anyio.to_thread.run_sync(check_writable, db)
        await anyio.to_thread.run_sync(lambda: db.parent.mkdir(parents=True, exist_ok=True))
        # autocommit (isolation_level=None): the writer begins each batch's transaction itself;
        # check_same_thread=False: a batch that must wait for the lock runs on a worker thread
        conn = await anyio.to_thread.run_sync(
            lambda: sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
        )
        store = None
        try:
            await anyio.to_thread.run_sync(_prepare_writer_connection, conn, probe)
            writer = BatchWriter(
                conn,
                max_batch_rows=max_batch_rows,
                queue_size=queue_size,
                busy_timeout_ms=BUSY_TIMEOUT_MS,
                commit_interval_s=commit_interval_s,
            )
            store = cls(db, writer=writer, readers=readers)
            error: BaseException | None = None
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer.run)
                    try:
                        yield store
                        await writer.flush()  # report failed background writes on a clean exit
                    finally:
                        writer.close()  # the writer commits what is queued, then its task ends
            except BaseExceptionGroup as group:
                # The writer task never raises, so the group holds the block's own exception:
                # hand it back as it was raised, not wrapped in a group.
                if len(group.exceptions) != 1:
                    raise
                error = group.exceptions[0]
            if error is not None:
                raise error
        finally:
            with anyio.CancelScope(shield=True):
                if store is not None:
                    await store._readers.aclose()
                await anyio.to_thread.run_sync(conn.close)  # checkpoints what the WAL holds

    def _require_writer(self) -> BatchWriter:
        if self._writer is None:
            raise ReadOnlyStoreError(
                f"the run store {self.path} was opened read-only; open it without "
                "readonly=True to write"
            )
        return self._writer

    async def flush(self) -> None:
        """Return once every write queued so far is committed (see :meth:`BatchWriter.flush`)."""
        await self._require_writer().flush()

    @property
    def committed_rows(self) -> int:
        """Rows committed by this store's writer since it opened (for benchmarks and progress)."""
        return self._writer.committed_rows if self._writer is not None else 0

    # ---------------------------------------------------------------- reading helpers

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._readers.connection() as conn:
            return list(await conn.execute_fetchall(sql, params))

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read-only connection inside one read transaction: every query in the block sees the
        same committed state, however many batches the writer commits meanwhile."""
        async with self._readers.connection() as conn:
            await conn.execute("BEGIN")
            yield conn

    # ---------------------------------------------------------------- runs

    async def create_run(
        self,
        kind: str,
        config: Mapping[str, Any] | None = None,
        name: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a run in status ``created``; returns its id once committed."""
        writer = self._require_writer()
        run_id = run_id or new_run_id()
        now = time.time()
        await writer.write(
            _INSERT_RUN, [(run_id, kind, name, _dumps(dict(config or {})), now, now)]
        )
        return run_id

    async def set_run_status(
        self,
        run_id: str,
        status: RunStatus,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        """Move a run to ``status`` (``running`` stamps ``started_at`` once and clears
        ``finished_at``; terminal statuses stamp ``finished_at``). ``result`` is kept if None."""
        writer = self._require_writer()
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
        run = await self.get_run(run_id)
        params = {
            "run_id": run.run_id,
            "status": status,
            "now": time.time(),
            "result": _dumps(result) if result is not None else None,
            "error": error,
        }
        await writer.write(_SET_STATUS, [params])

    async def get_run(self, run_id: str) -> RunRecord:
        """The run with this id, or with this unique id prefix (as users type them)."""
        rows = await self._fetchall("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows and run_id:
            rows = await self._fetchall(
                "SELECT * FROM runs WHERE substr(run_id, 1, ?) = ? ORDER BY created_at LIMIT 5",
                (len(run_id), run_id),
            )
        if not rows:
            raise RunNotFoundError(f"no run with id {run_id!r} in {self.path}")
        if len(rows) > 1:
            ids = ", ".join(row["run_id"] for row in rows)
            raise AmbiguousRunIdError(
                f"run id prefix {run_id!r} matches several runs ({ids}); type more of it"
            )
        return _run_record(rows[0])

    async def list_runs(
        self, *, kind: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Runs, newest first."""
        where, params = _where(kind=kind, status=status)
        sql = f"SELECT * FROM runs {where} ORDER BY created_at DESC, run_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_run_record(row) for row in await self._fetchall(sql, params)]

    # ---------------------------------------------------------------- messages

    async def append_messages(self, envelopes: Iterable[Envelope], *, wait: bool = False) -> int:
        """Queue envelopes for the ``messages`` table, in order; returns how many.

        Returns once they are queued; with ``wait=True``, once they are committed (else call
        :meth:`flush`). An envelope already stored (same message id) is skipped.
        """
        rows = [message_row(envelope) for envelope in envelopes]
        await self.append_message_rows(rows, wait=wait)
        return len(rows)

    async def append_message_rows(
        self, rows: Sequence[tuple[Any, ...]], *, wait: bool = False
    ) -> None:
        """Like :meth:`append_messages`, for rows already made by :func:`message_row`."""
        writer = self._require_writer()
        if not rows:
            return
        if wait:
            await writer.write(_INSERT_MESSAGE, rows)
        else:
            await writer.submit(WriteOp(_INSERT_MESSAGE, rows))

    async def iter_messages(
        self,
        run_id: str,
        *,
        node_id: str | None = None,
        after_seq: int | None = None,
        kinds: Iterable[str] | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[StoredMessage]:
        """A run's messages in order (optionally one node's, after a position, of some kinds).

        Reads a page at a time, each in its own short read, so a long iteration holds no
        connection between pages and sees messages committed while it runs.
        """
        clauses = ["run_id = ?", "seq > ?"]
        params: list[Any] = [run_id]
        if node_id is not None:
            clauses.append("node_id = ?")
            params.append(node_id)
        kind_list = list(kinds) if kinds is not None else None
        if kind_list is not None:
            if not kind_list:
                return
            clauses.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)
        sql = (
            f"SELECT seq, envelope FROM messages WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?"
        )
        last = after_seq if after_seq is not None else 0
        while True:
            page_params = [params[0], last, *params[1:], page_size]
            rows = await self._fetchall(sql, page_params)
            for row in rows:
                yield StoredMessage(row[0], StoredEnvelope.model_validate_json(row[1]))
            if len(rows) < page_size:
                return
            last = rows[-1][0]

    async def count_messages(self, run_id: str | None = None) -> int:
        """How many messages are stored (for one run, or in all)."""
        if run_id is None:
            rows = await self._fetchall("SELECT count(*) FROM messages")
        else:
            rows = await self._fetchall("SELECT count(*) FROM messages WHERE run_id = ?", (run_id,))
        return int(rows[0][0])

    # ---------------------------------------------------------------- the call journal

    async def record_call(self, record: CallRecord) -> None:
        """Write a journal entry and return once it is committed.

        An ``ok`` entry is final; an ``error`` entry is replaced by a later try of the same key
        (its ``tries``, ``attempts`` and ``cost_usd`` accumulate). A caller cancelled while it
        waits does not take the entry back: once queued it is committed all the same (see
        :meth:`BatchWriter.write_through_cancellation`), so a paid-for call is never lost.
        """
        writer = self._require_writer()
        now = time.time()
        row = (
            record.run_id,
            record.key,
            record.role,
            record.node_id,
            record.backend,
            record.endpoint,
            record.model,
            record.sample_index,
            record.request,
            record.response,
            record.status,
            record.error,
            record.prompt_tokens,
            record.completion_tokens,
            record.cached_tokens,
            record.latency_s,
            record.attempts,
            record.cost_usd,
            record.created_at or now,
            now,
        )
        await writer.write_through_cancellation(_UPSERT_CALL, [row])

    async def mark_replayed(self, run_id: str, key: str) -> None:
        """Count one more answer served from the journal entry (queued, not awaited)."""
        await self._require_writer().submit(WriteOp(_MARK_REPLAYED, [(run_id, key)]))

    async def get_call(self, run_id: str, key: str) -> CallRecord | None:
        rows = await self._fetchall(
            "SELECT * FROM calls WHERE run_id = ? AND key = ?", (run_id, key)
        )
        return _call_record(rows[0]) if rows else None

    async def ok_call_keys(self, run_id: str) -> set[str]:
        """Keys of the run's successful journal entries (what a resumed run can replay)."""
        rows = await self._fetchall(
            "SELECT key FROM calls WHERE run_id = ? AND status = 'ok'", (run_id,)
        )
        return {row[0] for row in rows}

    async def list_calls(
        self, run_id: str, *, role: str | None = None, status: str | None = None
    ) -> list[CallRecord]:
        """A run's journal entries in the order they were first made."""
        where, params = _where(run_id=run_id, role=role, status=status)
        rows = await self._fetchall(f"SELECT * FROM calls {where} ORDER BY id", params)
        return [_call_record(row) for row in rows]

    async def calls_since(
        self, run_id: str, after_id: int, *, again: Sequence[int] = ()
    ) -> list[CallRecord]:
        """A run's journal entries made after the entry ``after_id``, and the entries ``again``
        as they are now (a failed call is written again when it is made again), in id order:
        for a reader that follows the journal while it is written."""
        ids = [int(call_id) for call_id in again]
        extra = f" OR id IN ({', '.join('?' * len(ids))})" if ids else ""
        rows = await self._fetchall(
            f"SELECT * FROM calls WHERE run_id = ? AND (id > ?{extra}) ORDER BY id",
            (run_id, after_id, *ids),
        )
        return [_call_record(row) for row in rows]

    async def replay_counts(self, run_id: str) -> dict[int, int]:
        """How often each replayed entry (by id) was answered from the journal, for a reader
        that follows a resumed run (``mark_replayed`` changes nothing else of an entry)."""
        rows = await self._fetchall(
            "SELECT id, replayed FROM calls WHERE run_id = ? AND replayed > 0", (run_id,)
        )
        return {row[0]: row[1] for row in rows}

    async def run_totals(self, run_id: str) -> RunTotals:
        """Calls, tokens and cost per role of a run, from the journal."""
        rows = await self._fetchall(
            """
            SELECT role, sum(tries), sum(status = 'ok'), sum(status = 'error'), sum(replayed),
                   sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(cost_usd)
            FROM calls WHERE run_id = ? GROUP BY role ORDER BY role
            """,
            (run_id,),
        )
        return RunTotals({row[0]: RoleTotals(*row[1:]) for row in rows})

    # ---------------------------------------------------------------- the aspect cache

    async def get_aspect_selection(
        self, query_hash: str, critic_model: str, catalogue_version: str
    ) -> AspectSelection | None:
        """A cached aspect selection for this query, critic model and aspect catalogue."""
        rows = await self._fetchall(
            "SELECT selection FROM aspect_cache WHERE query_hash = ? AND critic_model = ? "
            "AND catalogue_version = ?",
            (query_hash, critic_model, catalogue_version),
        )
        return AspectSelection.model_validate_json(rows[0][0]) if rows else None

    async def put_aspect_selection(
        self,
        query_hash: str,
        critic_model: str,
        catalogue_version: str,
        selection: AspectSelection,
    ) -> None:
        """Cache an aspect selection (replacing an older one); returns once committed."""
        await self._require_writer().write(
            _PUT_ASPECTS,
            [
                (
                    query_hash,
                    critic_model,
                    catalogue_version,
                    selection.model_dump_json(),
                    time.time(),
                )
            ],
        )

    # ---------------------------------------------------------------- leases

    async def get_lease(self, run_id: str) -> Lease | None:
        rows = await self._fetchall("SELECT * FROM leases WHERE run_id = ?", (run_id,))
        return Lease(**{name: rows[0][name] for name in rows[0].keys()}) if rows else None

    async def acquire_lease(
        self,
        run_id: str,
        owner: str,
        *,
        pid: int,
        host: str,
        ttl_s: float,
        force: bool = False,
    ) -> Lease:
        """Make ``owner`` the run's one owner, unless another live owner holds it.

        A lease is free when nobody holds it, when its heartbeat is older than ``ttl_s``, when
        its process is gone (same host, no such pid: a kill -9), or with ``force``. The take-over
        is one conditional write, so of two processes racing for a free lease exactly one wins.
        Raises :class:`RunOwnedError` naming the owner otherwise.
        """
        writer = self._require_writer()
        held = await self.get_lease(run_id)
        if held is not None and held.owner != owner and not force and _alive(held, host, ttl_s):
            raise RunOwnedError(_owned_message(held, ttl_s))
        params = {
            "run_id": run_id,
            "owner": owner,
            "pid": pid,
            "host": host,
            "now": time.time(),
            "observed": held.owner if held is not None else owner,
        }
        await writer.write(_TAKE_LEASE, [params])
        now_held = await self.get_lease(run_id)
        if now_held is None or now_held.owner != owner:
            assert now_held is not None
            raise RunOwnedError(_owned_message(now_held, ttl_s))
        return now_held

    async def renew_lease(self, run_id: str, owner: str) -> None:
        """Prove ``owner`` is alive; raises :class:`LeaseLostError` if the lease was taken."""
        await self._require_writer().write(_RENEW_LEASE, [(time.time(), run_id, owner)])
        held = await self.get_lease(run_id)
        if held is None or held.owner != owner:
            by = f"process {held.pid} on {held.host}" if held else "nobody"
            raise LeaseLostError(f"run {run_id} was taken over by {by} (--force); stopping here")

    async def release_lease(self, run_id: str, owner: str) -> None:
        await self._require_writer().write(_DROP_LEASE, [(run_id, owner)])


def _alive(lease: Lease, host: str, ttl_s: float) -> bool:
    """Whether a lease's owner may still be running: a fresh heartbeat, and (on this host) a
    process with its pid."""
    if time.time() - lease.heartbeat_at > ttl_s:
        return False
    if lease.host != host:
        return True  # another machine: only its heartbeat can tell
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _owned_message(lease: Lease, ttl_s: float) -> str:
    ago = max(0.0, time.time() - lease.heartbeat_at)
    return (
        f"run {lease.run_id} is being run by process {lease.pid} on {lease.host} (alive "
        f"{ago:.0f} s ago); stop that process first. A lease whose owner died is taken over "
        f"once its heartbeat is {ttl_s:g} s old, or at once with --force"
    )


def _db_path(path: Path | str | None) -> Path:
    if path is not None and str(path) == ":memory:":
        raise ValueError("the run store needs a file: its readers use their own connections")
    return Path(path).expanduser() if path is not None else default_db_path()


def _where(**equals: Any) -> tuple[str, list[Any]]:
    """``WHERE a = ? AND b = ?`` for the arguments that are not None."""
    used = {name: value for name, value in equals.items() if value is not None}
    if not used:
        return "", []
    return "WHERE " + " AND ".join(f"{name} = ?" for name in used), list(used.values())


def _prepare_writer_connection(conn: sqlite3.Connection, probe: Probe) -> None:
    """Switch to WAL, and create the schema if the file has none yet.

    The version is read again inside the write transaction: another process may have created
    the schema between the probe and now.
    """
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    rows = conn.execute("PRAGMA journal_mode = WAL").fetchall()  # read to the end: no
    row = rows[0] if rows else None  # statement is left in progress
    if row is None or str(row[0]).lower() != "wal":
        raise StoreError(f"could not switch {probe.path} to WAL mode (got {row!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = (conn.execute("PRAGMA user_version").fetchall() or [(0,)])[0][0]
        if version == 0:
            for statement in DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            now = time.time()
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("created_at", str(now))],
            )
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            created = True
        else:
            check_version(probe.path, version)
            for step in range(version, SCHEMA_VERSION):  # older: migrate in this transaction
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    ("schema_version", str(SCHEMA_VERSION)),
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            created = False
        conn.execute("COMMIT")
        if created:
            # move the new header into the main file now, so a reader's header probe sees a
            # drpo database even while this writer holds the WAL (or if it is killed). The
            # pragma returns a row: read it to the end, or its statement stays in progress
            # until the cursor is collected, and a COMMIT meanwhile fails.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


__all__ = [
    "AmbiguousRunIdError",
    "CallRecord",
    "DatabaseNotFoundError",
    "Lease",
    "LeaseLostError",
    "NotADatabaseError",
    "NotADrpoDatabaseError",
    "ReadOnlyPathError",
    "ReadOnlyStoreError",
    "RoleTotals",
    "RunNotFoundError",
    "RunOwnedError",
    "RunRecord",
    "RunStatus",
    "RunStore",
    "RunTotals",
    "SchemaVersionError",
    "StoreClosedError",
    "StoreError",
    "StoredMessage",
    "WriteFailedError",
    "message_row",
    "query_hash",
]
