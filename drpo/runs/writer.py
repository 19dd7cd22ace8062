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

import re
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
        if conn.isolation_level != "IMMEDIATE":
            raise ValueError(
                'the writer needs a connection opened with isolation_level="IMMEDIATE" '
                f"(got {conn.isolation_level!r}): sqlite3 then begins each batch's transaction"
            )
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
        (a queue put, a thread wake-up, a wake-up of the event loop, ~40 us of CPU). So the
        transaction costs one call per statement group and one for the commit: the connection
        is opened with ``isolation_level="IMMEDIATE"``, so sqlite3 itself issues ``BEGIN
        IMMEDIATE`` before the first write (no call of its own), and :func:`_group` has merged
        every op it may into one ``executemany``.
        """
        conn = self._conn
        try:
            for sql, rows in statements:
                assert sql is not None
                if len(rows) == 1:
                    await conn.execute(sql, rows[0])
                else:
                    await conn.executemany(sql, rows)
            await conn.commit()
        except BaseException:
            if conn.in_transaction:
                with anyio.CancelScope(shield=True):
                    try:
                        await conn.rollback()
                    except sqlite3.Error:
                        pass
            raise


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
