"""The store's batch writer: a batch committed in few statements has the effect of its ops in order."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite
import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


async def _batched(path: Path, ops: list[tuple[str, list[tuple[int, int]]]]) -> tuple[dict, int]:
    async with aiosqlite.connect(path, isolation_level="IMMEDIATE") as conn:
        for statement in SCHEMA:
            await conn.execute(statement)
        writer = BatchWriter(conn)
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
@given(ops=ops_strategy)
def test_a_batch_has_the_effect_of_its_ops_one_by_one(tmp_path_factory, ops) -> None:
    folder = tmp_path_factory.mktemp("writer")
    expected = _one_by_one(folder / "plain.db", ops)
    got, batches = anyio.run(_batched, folder / "batched.db", ops)
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


@pytest.mark.anyio
async def test_the_writer_refuses_a_connection_that_begins_no_transaction(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "x.db", isolation_level=None) as conn:
        with pytest.raises(ValueError, match="IMMEDIATE"):
            BatchWriter(conn)
