"""The store's single writer: one task, one connection, batched commits.

Why one writer: SQLite allows one writing transaction at a time, so several writers would only
queue on its lock (and time out under load). One task that owns the write connection and drains
a bounded queue turns many small writes into few transactions: whatever is queued when a batch
starts (up to ``max_batch_rows`` rows) is committed together, which is what makes 10,000s of
messages per second durable. The queue is bounded so that producers (the recorder) slow down
when the disk cannot keep up, instead of growing memory.

Each write is a :class:`WriteOp` (one SQL statement with one or more parameter rows). A caller
either waits for the commit of the batch holding its op (:meth:`BatchWriter.write`), or only
for room in the queue (:meth:`BatchWriter.submit`); a failure of an op nobody waits for is kept
and raised by the next :meth:`BatchWriter.flush`, so nothing fails silently.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from drpo.runs.schema import StoreClosedError, WriteFailedError

log = structlog.get_logger("drpo.runs")

#: One statement's parameters: positional (a tuple) or named (a mapping).
Row = Sequence[Any] | Mapping[str, Any]


@dataclass(eq=False, slots=True)
class WriteOp:
    """One statement and its parameter rows; ``sql=None`` is a barrier (used by flush)."""

    sql: str | None
    rows: Sequence[Row] = ()
    done: anyio.Event | None = None
    error: BaseException | None = field(default=None)


class BatchWriter:
    """Owns the write connection; :meth:`run` is the one task that writes."""

    def __init__(
        self, conn: aiosqlite.Connection, *, max_batch_rows: int = 5000, queue_size: int = 1024
    ) -> None:
        self._conn = conn
        self.max_batch_rows = max_batch_rows
        self._send: MemoryObjectSendStream[WriteOp]
        self._receive: MemoryObjectReceiveStream[WriteOp]
        self._send, self._receive = anyio.create_memory_object_stream[WriteOp](queue_size)
        self._unreported: list[BaseException] = []
        self.committed_batches = 0
        self.committed_rows = 0

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

    async def _commit(self, batch: list[WriteOp]) -> None:
        """Commit ``batch`` in one transaction; on error, retry op by op to find the culprit."""
        writes = [op for op in batch if op.sql is not None and op.rows]
        try:
            if writes:
                await self._transaction(_coalesce(writes))
                self.committed_rows += sum(len(op.rows) for op in writes)
            self.committed_batches += 1
        except Exception:
            for op in writes:
                try:
                    await self._transaction([(op.sql, list(op.rows))])
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

    async def _transaction(self, statements: list[tuple[str | None, list[Row]]]) -> None:
        """Run ``statements`` in one ``BEGIN IMMEDIATE ... COMMIT``.

        aiosqlite runs each call on the connection's own thread, and every call is a round trip
        (a queue put, a thread wake-up, a wake-up of the event loop): ``BEGIN``, the statements
        and ``COMMIT`` as separate calls cost 75 us of CPU per small transaction, against 36 us
        as one call (measured; a run commits a small batch per model call at a steady load).
        So the whole transaction goes to that thread as one function when the connection lets
        us (aiosqlite's ``_execute`` and ``_conn``, there since 0.17), else call by call.
        """
        conn = self._conn
        run_in_thread = getattr(conn, "_execute", None)
        if run_in_thread is not None and hasattr(type(conn), "_conn"):
            await run_in_thread(_transaction_in_thread, conn, statements)
            return
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                assert sql is not None
                if len(rows) == 1:
                    await conn.execute(sql, rows[0])
                else:
                    await conn.executemany(sql, rows)
            await conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with anyio.CancelScope(shield=True):
                    try:
                        await conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
            raise


def _transaction_in_thread(
    conn: aiosqlite.Connection, statements: list[tuple[str | None, list[Row]]]
) -> None:
    """One transaction, run on the aiosqlite connection's own thread (the only thread that may
    use its sqlite3 connection)."""
    raw: sqlite3.Connection = conn._conn
    raw.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in statements:
            assert sql is not None
            if len(rows) == 1:
                raw.execute(sql, rows[0])
            else:
                raw.executemany(sql, rows)
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            try:
                raw.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _coalesce(ops: list[WriteOp]) -> list[tuple[str | None, list[Row]]]:
    """Merge consecutive ops with the same SQL into one executemany, keeping their order."""
    merged: list[tuple[str | None, list[Row]]] = []
    for op in ops:
        if merged and merged[-1][0] == op.sql:
            merged[-1][1].extend(op.rows)
        else:
            merged.append((op.sql, list(op.rows)))
    return merged


__all__ = ["BatchWriter", "Row", "WriteOp"]
