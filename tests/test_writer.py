"""The store's batch writer: a batch committed in few statements has the effect of its ops in order."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drpo.runs.schema import WriteFailedError
from drpo.runs.writer import BatchWriter, WriteOp, _coalesce

SCHEMA = (
    "CREATE TABLE a (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)",
    "CREATE TABLE b (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)",
)
# Order-sensitive statements on two tables: an upsert doubles what is there, an update adds one.
STATEMENTS = (
    "INSERT INTO a (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = a.v * 2 + excluded.v",
    "UPDATE a SET v = v + 1 WHERE k = ? AND ? IS NOT NULL",
    "INSERT INTO b (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = b.v * 3 + excluded.v",
    "DELETE FROM b WHERE k = ? AND ? IS NOT NULL",
    "INSERT OR REPLACE INTO a (k, v) VALUES (?, ?)",
)

ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(STATEMENTS),
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)), min_size=1, max_size=3),
    ),
    max_size=30,
)


def _contents(conn: sqlite3.Connection) -> dict[str, list[tuple[int, int]]]:
    return {t: conn.execute(f"SELECT k, v FROM {t} ORDER BY k").fetchall() for t in ("a", "b")}


def _one_by_one(path: Path, ops: list[tuple[str, list[tuple[int, int]]]]) -> dict:
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in SCHEMA:
        conn.execute(statement)
    for sql, rows in ops:
        for row in rows:
            conn.execute(sql, row)
    try:
        return _contents(conn)
    finally:
        conn.close()


@contextmanager
def _writer_connection(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL").fetchall()
        for statement in SCHEMA:
            conn.execute(statement)
        yield conn
    finally:
        conn.close()


async def _batched(
    path: Path, ops: list[tuple[str, list[tuple[int, int]]]], inline_rows: int
) -> tuple[dict, int]:
    with _writer_connection(path) as conn:
        writer = BatchWriter(conn, inline_rows=inline_rows)
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            for sql, rows in ops:  # no await that yields in between: one batch
                await writer.submit(WriteOp(sql, rows))
            await writer.flush()
            writer.close()
        batches = writer.committed_batches
    raw = sqlite3.connect(path)
    try:
        return _contents(raw), batches
    finally:
        raw.close()


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, inline_rows=st.sampled_from([0, 5, 256]))
def test_a_batch_has_the_effect_of_its_ops_one_by_one(tmp_path_factory, ops, inline_rows) -> None:
    """On the event loop or on a worker thread (``inline_rows``), the same effect."""
    folder = tmp_path_factory.mktemp("writer")
    expected = _one_by_one(folder / "plain.db", ops)
    got, batches = anyio.run(_batched, folder / "batched.db", ops, inline_rows)
    assert got == expected
    assert batches <= 2  # the ops (when any) and the flush's barrier


def test_a_calls_journal_entries_and_messages_go_in_two_statements() -> None:
    message = "INSERT INTO messages (message_id) VALUES (?)"
    call = "INSERT INTO calls (key) VALUES (?)"
    replayed = "UPDATE calls SET replayed = replayed + 1 WHERE key = ?"
    ops = [WriteOp(message, [(1,)]), WriteOp(call, [(1,)]), WriteOp(message, [(2,)])]
    ops += [WriteOp(call, [(2,)]), WriteOp(replayed, [(1,)]), WriteOp(call, [(3,)])]
    assert _coalesce(ops) == [
        (message, [(1,), (2,)]),
        (call, [(1,), (2,)]),
        (replayed, [(1,)]),  # same table: the later upsert stays after it
        (call, [(3,)]),
    ]


def test_an_unrecognised_statement_is_never_moved() -> None:
    insert = "INSERT INTO a (k, v) VALUES (?, ?)"
    other = "WITH x AS (SELECT 1) INSERT INTO b (k, v) SELECT ?, ? FROM x"
    ops = [WriteOp(insert, [(1, 1)]), WriteOp(other, [(1, 1)]), WriteOp(insert, [(2, 2)])]
    assert [sql for sql, _ in _coalesce(ops)] == [insert, other, insert]


def test_the_writer_refuses_a_connection_that_begins_transactions_itself(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level="IMMEDIATE")
    try:
        with pytest.raises(ValueError, match="autocommit"):
            BatchWriter(conn)
    finally:
        conn.close()


# ---- write_through_cancellation: what the call journal writes each paid-for call with


async def _through_cancellation(
    path: Path, ops: list[tuple[str, list[tuple[int, int]], int | None]], queue_size: int
) -> tuple[dict, int, int]:
    """Each op written by a caller of its own, cancelled after ``cancel_after`` checkpoints
    (None: never); returns the table contents after a flush, the failures the callers saw and
    the failures the flush reported."""
    seen = reported = 0
    with _writer_connection(path) as conn:
        writer = BatchWriter(conn, queue_size=queue_size)

        async def caller(sql: str, rows: list[tuple[int, int]], cancel_after: int | None) -> None:
            nonlocal seen
            with anyio.CancelScope() as scope:
                if cancel_after == 0:
                    scope.cancel()
                elif cancel_after is not None:

                    async def cancel_later() -> None:
                        for _ in range(cancel_after):
                            await anyio.lowlevel.checkpoint()
                        scope.cancel()

                    tg.start_soon(cancel_later)
                try:
                    await writer.write_through_cancellation(sql, rows)
                except sqlite3.Error:
                    seen += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            async with anyio.create_task_group() as callers:
                for sql, rows, cancel_after in ops:
                    callers.start_soon(caller, sql, rows, cancel_after)
                    await anyio.lowlevel.checkpoint()  # each caller queues in turn
            try:
                await writer.flush()
            except WriteFailedError as error:
                reported = int(str(error).split()[0])
            writer.close()
    raw = sqlite3.connect(path)
    try:
        return _contents(raw), seen, reported
    finally:
        raw.close()


#: Fails on the NOT NULL column whatever the table holds.
FAILING = "INSERT INTO a (k, v) VALUES (?, NULL + ?)"


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from((*STATEMENTS, FAILING)),
            st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)), min_size=1, max_size=2),
            st.one_of(st.none(), st.integers(0, 6)),
        ),
        max_size=12,
    ),
    queue_size=st.sampled_from([1, 2, 1024]),
)
def test_a_write_whose_caller_is_cancelled_is_still_committed(
    tmp_path_factory, ops, queue_size
) -> None:
    """Cancelled callers or not, full queue or not: the tables end as if every op had been
    applied in order, and every failure is seen by its caller or reported by the next flush."""
    folder = tmp_path_factory.mktemp("through")
    good = [(sql, rows) for sql, rows, _ in ops if sql != FAILING]
    expected = _one_by_one(folder / "plain.db", good)
    got, seen, reported = anyio.run(_through_cancellation, folder / "w.db", ops, queue_size)
    assert got == expected
    assert seen + reported == sum(1 for sql, _, _ in ops if sql == FAILING)


# ---- where a batch runs: on the loop, or on a thread when the lock is held elsewhere


async def _hold_lock_then_write(path: Path) -> tuple[bool, int, list[tuple[int, int]], int]:
    """Another connection holds the write lock while the writer is asked to write: the writer
    must wait for it without blocking the event loop (a ticker keeps running meanwhile)."""
    ticks = 0
    with _writer_connection(path) as conn:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        writer = BatchWriter(conn, busy_timeout_ms=10_000)
        written = anyio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not written.is_set():
                ticks += 1
                await anyio.sleep(0.01)

        async def write() -> None:
            await writer.write(STATEMENTS[4], [(1, 7)])
            written.set()

        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO b (k, v) VALUES (9, 9)")
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                tg.start_soon(write)
                tg.start_soon(ticker)
                await anyio.sleep(0.3)
                pending_while_held, ticks_while_held = not written.is_set(), ticks
                other.execute("COMMIT")
                await written.wait()
                writer.close()
        finally:
            other.close()
        rows = conn.execute("SELECT k, v FROM a").fetchall()
    return pending_while_held, ticks_while_held, rows, writer.threaded_batches


def test_a_write_waits_for_a_lock_held_elsewhere_on_a_thread(tmp_path: Path) -> None:
    pending, ticks, rows, threaded = anyio.run(_hold_lock_then_write, tmp_path / "l.db")
    assert pending  # it waited for the other connection's transaction
    assert ticks > 1  # and the event loop went on meanwhile
    assert rows == [(1, 7)]
    assert threaded == 1


async def _writes_after_a_commit(path: Path, interval: float) -> list[int]:
    """A write, then three more queued one by one just after its commit: how many commits
    each flush saw."""
    with _writer_connection(path) as conn:
        writer = BatchWriter(conn, commit_interval_s=interval)
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            await writer.write(STATEMENTS[4], [(0, 0)])
            first = writer.committed_batches
            for k in (1, 2, 3):
                await writer.submit(WriteOp(STATEMENTS[4], [(k, k)]))
                await anyio.lowlevel.checkpoint()  # the writer takes what is queued so far
            await writer.flush()
            writer.close()
        return [first, writer.committed_batches - first]


def test_writes_just_after_a_commit_wait_for_one_commit_together(tmp_path: Path) -> None:
    assert anyio.run(_writes_after_a_commit, tmp_path / "g.db", 0.5) == [1, 1]  # with the flush
    assert anyio.run(_writes_after_a_commit, tmp_path / "n.db", 0.0)[1] > 1
