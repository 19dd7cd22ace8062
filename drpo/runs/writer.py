"""The store's single writer: one task, one connection, batched commits.

Why one writer: SQLite allows one writing transaction at a time, so several writers would only
queue on its lock (and time out under load). One task that owns the write connection and drains
a bounded queue turns many small writes into few transactions: whatever is queued when a batch
starts (up to ``max_batch_rows`` rows) is committed together, which is what makes 10,000s of
messages per second durable. The queue is bounded so that producers (the recorder) slow down
when the disk cannot keep up, instead of growing memory.

**Group commit.** A commit costs about the same for one row as for several (each touches a
page of the table and of each index), and under load one per write was most of a journal
entry's cost. So while writes keep coming the writer commits at most once per
``commit_interval_s`` (2 ms): a write that finds the writer idle longer than that is committed
at once, and one that arrives just after a commit waits for the next, with every write that
arrives meanwhile (as PostgreSQL's ``commit_delay``). Measured with 64 callers at ~1,100 journaled
calls/s (``benchmarks/callpath.py``, journal layer): 4.5k commits for 6k calls at 468 us of CPU
a call without the interval; 1.6k commits and 363 us with it, and each call waits at most 2 ms
more for its commit.

Each write is a :class:`WriteOp` (one SQL statement with one or more parameter rows). A caller
either waits for the commit of the batch holding its op (:meth:`BatchWriter.write`), or only
for room in the queue (:meth:`BatchWriter.submit`); a failure of an op nobody waits for is kept
and raised by the next :meth:`BatchWriter.flush`, so nothing fails silently.

Where a transaction runs. Committing a small batch to a WAL database with ``synchronous =
NORMAL`` is a few appends to the WAL file and no ``fsync`` (~15 us of CPU for one journal
entry), while handing it to another thread and back (aiosqlite, or ``anyio.to_thread``) costs
~100-140 us of CPU on an ordinary 2-core machine: the thread hand-off was most of what a model
call's journal entry cost. So the writer owns a plain :mod:`sqlite3` connection and commits a
small batch (up to ``inline_rows`` rows) on the event loop itself, and only what could block
goes to a worker thread:

* **waiting for the lock**: the inline attempt never waits (its busy timeout is 0); when another
  connection (another worker process) holds the write lock, the batch is retried on a thread
  that waits up to ``busy_timeout_ms``, as before;
* **large batches** (more than ``inline_rows`` rows, when the queue has built up);
* **checkpoints**: the connection's automatic checkpoint, which ``fsync``s and copies the WAL
  into the database inside whichever commit crosses 1,000 pages, is off
  (``wal_autocheckpoint = 0``), and the writer runs a passive checkpoint on a thread after
  every ``checkpoint_rows`` committed rows instead (closing the connection checkpoints the rest).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from drpo.runs.schema import StoreClosedError, WriteFailedError

log = structlog.get_logger("drpo.runs")

#: One statement's parameters: positional (a tuple) or named (a mapping).
Row = Sequence[Any] | Mapping[str, Any]

#: Statements of one transaction: each SQL with its parameter rows.
Statements = list[tuple[str | None, list[Row]]]


@dataclass(eq=False, slots=True)
class WriteOp:
    """One statement and its parameter rows; ``sql=None`` is a barrier (used by flush)."""

    sql: str | None
    rows: Sequence[Row] = ()
    done: anyio.Event | None = None
    error: BaseException | None = field(default=None)


class BatchWriter:
    """Owns the write connection; :meth:`run` is the one task that writes.

    ``conn`` is a :mod:`sqlite3` connection in autocommit mode (``isolation_level=None``: the
    writer begins each transaction itself) opened with ``check_same_thread=False`` (a batch that
    must wait runs on a worker thread), used by nothing else while the writer runs.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        max_batch_rows: int = 5000,
        queue_size: int = 1024,
        inline_rows: int = 256,
        busy_timeout_ms: int = 10_000,
        checkpoint_rows: int = 2000,
        commit_interval_s: float = 0.002,
    ) -> None:
        if conn.isolation_level is not None:
            raise ValueError(
                "the writer needs a connection in autocommit mode (isolation_level=None, got "
                f"{conn.isolation_level!r}): it begins each batch's transaction itself"
            )
        self._conn = conn
        self.max_batch_rows = max_batch_rows
        self.inline_rows = inline_rows
        self.busy_timeout_ms = busy_timeout_ms
        self.checkpoint_rows = checkpoint_rows
        self.commit_interval_s = commit_interval_s
        self._last_commit = -float("inf")
        self._send: MemoryObjectSendStream[WriteOp]
        self._receive: MemoryObjectReceiveStream[WriteOp]
        self._send, self._receive = anyio.create_memory_object_stream[WriteOp](queue_size)
        self._unreported: list[BaseException] = []
        self._rows_since_checkpoint = 0
        self.committed_batches = 0
        self.committed_rows = 0
        #: Batches that went to a worker thread (large, or the lock was held elsewhere).
        self.threaded_batches = 0
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA wal_autocheckpoint = 0")

    # ------------------------------------------------------------------ producers

    async def submit(self, op: WriteOp) -> None:
        """Queue ``op``; returns once it is queued (waits while the queue is full)."""
        try:
            try:
                self._send.send_nowait(op)
            except anyio.WouldBlock:
                await self._send.send(op)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise StoreClosedError("the run store is closed; no more writes are accepted") from None

    async def write(self, sql: str, rows: Sequence[Row]) -> None:
        """Queue one statement and return after the transaction holding it has committed."""
        op = WriteOp(sql, rows, anyio.Event())
        await self._wait(op)

    async def write_through_cancellation(self, sql: str, rows: Sequence[Row]) -> None:
        """Like :meth:`write`, and once queued the statement is committed even if the caller is
        cancelled while it waits: the writer commits whatever is queued, so the wait needs no
        shielded cancel scope (the journal writes one entry per model call, and each cancel
        scope's entry and exit asks asyncio for the running task, a ``getpid()`` system call on
        CPython 3.11). A caller that was cancelled meanwhile leaves its failure, if the write
        fails, to the next :meth:`flush`, like a write nobody awaits. When the queue is full
        the caller waits for room and the commit shielded, as a shielded :meth:`write` would.
        """
        op = WriteOp(sql, rows, anyio.Event())
        try:
            self._send.send_nowait(op)
        except anyio.WouldBlock:
            with anyio.CancelScope(shield=True):
                await self._wait(op)
            return
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise StoreClosedError("the run store is closed; no more writes are accepted") from None
        assert op.done is not None
        try:
            await op.done.wait()
        except BaseException:
            self._abandon(op)
            raise
        if op.error is not None:
            raise op.error

    def _abandon(self, op: WriteOp) -> None:
        """Nobody waits for ``op`` any more: a failure it had is reported by the next flush,
        and one it has later is reported as for an op queued with no waiter."""
        if op.error is not None:
            self._unreported.append(op.error)
        else:
            op.done = None

    async def flush(self) -> None:
        """Return once everything queued before this call is committed.

        Raises :class:`WriteFailedError` if a write that nobody awaited has failed since the
        last flush.
        """
        await self._wait(WriteOp(None, (), anyio.Event()))
        if self._unreported:
            errors, self._unreported = self._unreported, []
            raise WriteFailedError(
                f"{len(errors)} queued write(s) failed; the first: {errors[0]!r}"
            ) from errors[0]

    async def _wait(self, op: WriteOp) -> None:
        await self.submit(op)
        assert op.done is not None
        await op.done.wait()
        if op.error is not None:
            raise op.error

    def close(self) -> None:
        """Accept no more writes; :meth:`run` commits what is queued and returns."""
        self._send.close()

    # ------------------------------------------------------------------ the writer task

    async def run(self) -> None:
        """Commit queued ops in batches until :meth:`close` and the queue is empty.

        Shielded from cancellation: a cancelled run still commits what was queued (callers may
        be waiting in shielded flushes), and stops when its ``open`` block closes the queue.
        """
        with anyio.CancelScope(shield=True):
            async with self._receive:
                async for first in self._receive:
                    wait = self._last_commit + self.commit_interval_s - anyio.current_time()
                    if wait > 0:  # committed a moment ago: let the writes now on their way join
                        await anyio.sleep(wait)
                    batch = [first]
                    rows = len(first.rows)
                    while rows < self.max_batch_rows:
                        try:
                            op = self._receive.receive_nowait()
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                        batch.append(op)
                        rows += len(op.rows)
                    await self._commit(batch)
                    self._last_commit = anyio.current_time()
                    if self._rows_since_checkpoint >= self.checkpoint_rows:
                        await self._checkpoint()

    async def _commit(self, batch: list[WriteOp]) -> None:
        """Commit ``batch`` in one transaction; on error, retry op by op to find the culprit."""
        writes = [op for op in batch if op.sql is not None and op.rows]
        try:
            if writes:
                rows = sum(len(op.rows) for op in writes)
                await self._transaction(_coalesce(writes), rows)
                self.committed_rows += rows
            self.committed_batches += 1
        except Exception:
            for op in writes:
                try:
                    await self._transaction([(op.sql, list(op.rows))], len(op.rows))
                    self.committed_rows += len(op.rows)
                except Exception as exc:
                    op.error = exc
                    if op.done is None:
                        log.error("queued write failed", sql=op.sql, error=repr(exc))
                        self._unreported.append(exc)
        finally:
            for op in batch:
                if op.done is not None:
                    op.done.set()

    async def _transaction(self, statements: Statements, rows: int) -> None:
        """Run ``statements`` in one ``BEGIN IMMEDIATE ... COMMIT``: here on the event loop when
        the batch is small and the lock free, else on a worker thread (see the module's doc).

        :func:`_coalesce` has merged every op it may into one ``executemany``.
        """
        if rows <= self.inline_rows:
            try:
                _run_transaction(self._conn, statements)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
            else:
                self._rows_since_checkpoint += rows
                return
        self.threaded_batches += 1
        await anyio.to_thread.run_sync(self._wait_and_run, statements)
        self._rows_since_checkpoint += rows

    def _wait_and_run(self, statements: Statements) -> None:
        """On a worker thread: the transaction, waiting for the write lock if it is held."""
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        try:
            _run_transaction(conn, statements)
        finally:
            conn.execute("PRAGMA busy_timeout = 0")

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database on a worker thread (passive: it never waits for
        readers, and what it cannot copy now the next checkpoint or the close copies)."""
        self._rows_since_checkpoint = 0
        try:
            await anyio.to_thread.run_sync(_passive_checkpoint, self._conn)
        except sqlite3.Error as exc:  # the data is committed; the WAL only stays longer
            log.warning("WAL checkpoint failed", error=repr(exc))


def _run_transaction(conn: sqlite3.Connection, statements: Statements) -> None:
    """``BEGIN IMMEDIATE``, the statements, ``COMMIT``; rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in statements:
            assert sql is not None
            if len(rows) == 1:
                conn.execute(sql, rows[0])
            else:
                conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _passive_checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """The database's write lock is held by another connection (SQLITE_BUSY and its extended
    codes): the one failure that waiting, on a thread, can cure."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


#: The table a write statement changes (every statement the store writes is one of these forms).
_TARGET = re.compile(
    r"^\s*(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)"
    r"\s+(\w+)",
    re.IGNORECASE,
)


def _target(sql: str | None) -> str | None:
    match = _TARGET.match(sql or "")
    return match.group(1).lower() if match else None


def _coalesce(ops: list[WriteOp]) -> list[tuple[str | None, list[Row]]]:
    """Merge ops with the same SQL into one executemany where the order of effects is kept.

    An op joins the latest group with its SQL when every group after that one writes other
    tables (statements on different tables commute: the schema has no triggers or foreign
    keys), else it starts a group; a statement whose table is not recognised never moves.
    A model call's journal entry and its messages go to two tables, so a batch of many calls
    costs two ``executemany`` instead of one statement per call.
    """
    groups: list[tuple[str | None, str | None, list[Row]]] = []
    for op in ops:
        table = _target(op.sql)
        for sql, group_table, rows in reversed(groups):
            if sql == op.sql:
                rows.extend(op.rows)
                break
            if table is None or group_table is None or group_table == table:
                groups.append((op.sql, table, list(op.rows)))
                break
        else:
            groups.append((op.sql, table, list(op.rows)))
    return [(sql, rows) for sql, _, rows in groups]


__all__ = ["BatchWriter", "Row", "WriteOp"]
