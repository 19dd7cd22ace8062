"""The run store: schema, runs, messages, journal rows, caches, safe opening, concurrency."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from drpo.bus.envelope import Envelope
from drpo.domain.events import Note
from drpo.domain.values import AspectSelection
from drpo.runs import paths, schema
from drpo.runs.schema import APPLICATION_ID, SCHEMA_VERSION
from drpo.runs.store import (
    AmbiguousRunIdError,
    CallRecord,
    DatabaseNotFoundError,
    LeaseLostError,
    NotADatabaseError,
    NotADrpoDatabaseError,
    ReadOnlyPathError,
    ReadOnlyStoreError,
    RunNotFoundError,
    RunOwnedError,
    RunStore,
    SchemaVersionError,
    StoreClosedError,
    WriteFailedError,
    message_row,
    query_hash,
)

pytestmark = pytest.mark.anyio


def _note(i: int, run_id: str = "r", node_id: str | None = None, kind: str = "note") -> Envelope:
    return Envelope(
        payload=Note(text=str(i)), topic="events", sender="t", run_id=run_id, node_id=node_id
    )


def _fingerprint(path: Path) -> tuple[bytes, int, list[str]]:
    """Bytes, modification time and the folder's listing: what "unchanged" means."""
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))


async def _make_db(path: Path) -> str:
    async with RunStore.open(path) as store:
        return await store.create_run("optimize", {"beam": 2}, name="seed")


# ------------------------------------------------------------------------------- basics


async def test_open_creates_folders_and_a_versioned_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "drpo.db"
    async with RunStore.open(path) as store:
        assert not store.readonly
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert {"runs", "messages", "calls", "aspect_cache", "meta"} <= tables
    async with RunStore.open(path) as store:  # and it opens again
        assert await store.list_runs() == []


async def test_runs_lifecycle_prefixes_and_listing(tmp_path: Path) -> None:
    async with RunStore.open(tmp_path / "drpo.db") as store:
        first = await store.create_run("optimize", {"beam": 2, "models": ["a"]}, name="one")
        second = await store.create_run("eval", {}, run_id="abc123")
        third = await store.create_run("icl", {}, run_id="abd999")
        run = await store.get_run(first)
        assert (run.kind, run.name, run.config, run.status) == (
            "optimize",
            "one",
            {"beam": 2, "models": ["a"]},
            "created",
        )
        assert run.started_at is None and run.finished_at is None

        await store.set_run_status(first, "running")
        started = (await store.get_run(first)).started_at
        assert started is not None
        await store.set_run_status(first, "interrupted", error="killed")
        await store.set_run_status(first, "running")  # resumed: started_at stays, finished clears
        resumed = await store.get_run(first)
        assert (
            resumed.started_at == started and resumed.finished_at is None and resumed.error is None
        )
        await store.set_run_status(
            first, "finished", result={"best_prompt": "Be kind.", "score": 4.5}
        )
        done = await store.get_run(first[:8])
        assert done.status == "finished" and done.finished_at is not None
        assert done.result == {"best_prompt": "Be kind.", "score": 4.5}

        assert (await store.get_run("abc")).run_id == second
        with pytest.raises(AmbiguousRunIdError, match="abc123"):
            await store.get_run("ab")
        with pytest.raises(RunNotFoundError, match="zzz"):
            await store.get_run("zzz")
        with pytest.raises(ValueError, match="unknown run status"):
            await store.set_run_status(first, "done")  # type: ignore[arg-type]
        assert [r.run_id for r in await store.list_runs()] == [third, second, first]
        assert [r.run_id for r in await store.list_runs(kind="eval")] == [second]
        assert [r.run_id for r in await store.list_runs(status="finished")] == [first]
        assert len(await store.list_runs(limit=2)) == 2


async def test_messages_filters_and_pages(tmp_path: Path) -> None:
    async with RunStore.open(tmp_path / "drpo.db") as store:
        envelopes = [_note(i, node_id=f"n{i % 3}") for i in range(25)]
        envelopes.append(
            Envelope(payload=Note(text="other"), topic="x", sender="t", run_id="other")
        )
        assert await store.append_messages(envelopes) == 26
        await store.flush()

        stored = [m async for m in store.iter_messages("r", page_size=4)]
        assert [m.envelope for m in stored] == envelopes[:25]  # lossless, in order
        assert [m.seq for m in stored] == sorted(m.seq for m in stored)
        node = [m.envelope async for m in store.iter_messages("r", node_id="n1")]
        assert node == [e for e in envelopes if e.node_id == "n1"] and node
        later = [m.envelope async for m in store.iter_messages("r", after_seq=stored[19].seq)]
        assert later == envelopes[20:25]
        assert [m async for m in store.iter_messages("r", kinds=["answer"])] == []
        assert len([m async for m in store.iter_messages("r", kinds=["note", "answer"])]) == 25
        assert await store.count_messages("r") == 25 and await store.count_messages() == 26

        await store.append_messages(envelopes[:3], wait=True)  # the same messages again: skipped
        assert await store.count_messages() == 26


async def test_call_rows_upsert_and_totals(tmp_path: Path) -> None:
    base = {"run_id": "r", "backend": "openai", "model": "m", "request": "{}"}
    async with RunStore.open(tmp_path / "drpo.db") as store:
        await store.record_call(
            CallRecord(key="k1", role="critic", status="error", error="boom", **base)
        )
        await store.record_call(
            CallRecord(
                key="k1",
                role="critic",
                status="ok",
                response="{}",
                prompt_tokens=10,
                completion_tokens=5,
                cost_usd=0.25,
                attempts=2,
                **base,
            )
        )
        # an ok entry is final: a later write of the same key changes nothing
        await store.record_call(
            CallRecord(key="k1", role="critic", status="error", error="late", **base)
        )
        await store.record_call(
            CallRecord(
                key="k2", role="proposer", status="ok", response="{}", prompt_tokens=3, **base
            )
        )
        await store.mark_replayed("r", "k2")
        await store.flush()

        k1 = await store.get_call("r", "k1")
        assert k1 is not None
        assert (k1.status, k1.error, k1.tries, k1.attempts, k1.cost_usd) == ("ok", None, 2, 3, 0.25)
        assert await store.get_call("r", "nope") is None
        assert await store.ok_call_keys("r") == {"k1", "k2"}
        assert [c.key for c in await store.list_calls("r")] == ["k1", "k2"]
        assert [c.key for c in await store.list_calls("r", role="proposer")] == ["k2"]

        totals = await store.run_totals("r")
        assert set(totals.by_role) == {"critic", "proposer"}
        critic = totals.by_role["critic"]
        assert (critic.calls, critic.ok, critic.errors, critic.prompt_tokens, critic.cost_usd) == (
            2,
            1,
            0,
            10,
            0.25,
        )
        assert totals.by_role["proposer"].replayed == 1
        assert totals.total.calls == 3 and totals.total.prompt_tokens == 13


async def test_aspect_cache(tmp_path: Path) -> None:
    selection = AspectSelection(query="q", aspects=("helpfulness", "safety"), reasoning="r")
    qh = query_hash("q")
    async with RunStore.open(tmp_path / "drpo.db") as store:
        assert await store.get_aspect_selection(qh, "gpt", "v1") is None
        await store.put_aspect_selection(qh, "gpt", "v1", selection)
        assert await store.get_aspect_selection(qh, "gpt", "v1") == selection
        assert await store.get_aspect_selection(qh, "gpt", "v2") is None
        assert await store.get_aspect_selection(qh, "other", "v1") is None


# ------------------------------------------------------------------------------- failures


async def test_a_failed_write_is_reported_and_the_rest_of_its_batch_commits(tmp_path: Path) -> None:
    async with RunStore.open(tmp_path / "drpo.db") as store:
        run_id = await store.create_run("optimize", {})
        bad_row = (*message_row(_note(0))[:2], None, *message_row(_note(0))[3:])  # topic NULL
        await store.append_message_rows([bad_row])
        good = [_note(i) for i in range(1, 4)]
        await store.append_messages(good)
        with pytest.raises(sqlite3.IntegrityError):  # an awaited write raises its own error
            await store.create_run("optimize", {}, run_id=run_id)
        with pytest.raises(WriteFailedError, match="NOT NULL"):
            await store.flush()
        await store.flush()  # reported once
        assert [m.envelope async for m in store.iter_messages("r")] == good


async def test_an_error_in_the_block_comes_out_as_itself(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with RunStore.open(tmp_path / "drpo.db") as store:
            await store.create_run("eval", {})
            raise KeyError("mine")
    async with RunStore.open(tmp_path / "drpo.db") as store:  # what it wrote before is kept
        assert len(await store.list_runs()) == 1


async def test_writing_after_close_and_writing_read_only_fail_clearly(tmp_path: Path) -> None:
    path = tmp_path / "drpo.db"
    async with RunStore.open(path) as store:
        pass
    with pytest.raises(StoreClosedError):
        await store.create_run("optimize", {})
    async with RunStore.open(path, readonly=True) as viewer:
        assert viewer.readonly
        with pytest.raises(ReadOnlyStoreError, match="read-only"):
            await viewer.create_run("optimize", {})


# ------------------------------------------------------------------------------- safe opening


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(4096),
        b"run_id,status\nabc,finished\n",
        b"SQLite format 3\x00" + os.urandom(4080),
        b"SQLite format 3\x00" + b"\x00" * 3,
    ],
    ids=["random-bytes", "text-file", "sqlite-header-then-garbage", "truncated-header"],
)
@pytest.mark.parametrize("readonly", [False, True], ids=["write", "readonly"])
async def test_a_file_that_is_not_a_database_is_refused_untouched(
    tmp_path: Path, content: bytes, readonly: bool
) -> None:
    path = tmp_path / "drpo.db"
    path.write_bytes(content)
    before = _fingerprint(path)
    with pytest.raises(NotADatabaseError, match="not modified"):
        async with RunStore.open(path, readonly=readonly):
            pass
    assert _fingerprint(path) == before


async def test_another_applications_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE contacts (name TEXT)")
    conn.commit()
    conn.close()
    before = _fingerprint(path)
    with pytest.raises(NotADrpoDatabaseError, match="contacts"):
        async with RunStore.open(path):
            pass
    assert _fingerprint(path) == before


async def test_a_blank_sqlite_file_becomes_a_drpo_database(tmp_path: Path) -> None:
    path = tmp_path / "blank.db"
    path.touch()
    async with RunStore.open(path) as store:
        await store.create_run("eval", {})
    async with RunStore.open(path) as store:
        assert len(await store.list_runs()) == 1


async def test_an_older_schema_is_migrated_in_place_keeping_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "drpo.db"
    async with RunStore.open(path) as store:
        run_id = await store.create_run("optimize", {"settings": {}})
    conn = sqlite3.connect(path)  # make it a version-1 database: no leases table
    conn.execute("DROP TABLE leases")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    async with RunStore.open(path, readonly=True) as store:  # a viewer reads it as it is
        assert (await store.get_run(run_id)).kind == "optimize"
    async with RunStore.open(path) as store:
        assert (await store.get_run(run_id)).kind == "optimize"
        assert await store.get_lease(run_id) is None  # the new table exists
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 98, SCHEMA_VERSION - 1])
@pytest.mark.parametrize("readonly", [False, True], ids=["write", "readonly"])
async def test_another_schema_version_is_refused_untouched(
    tmp_path: Path, version: int, readonly: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MIGRATIONS", {})  # an older version with no migration path
    path = tmp_path / "drpo.db"
    await _make_db(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    before = _fingerprint(path)
    with pytest.raises(SchemaVersionError) as raised:
        async with RunStore.open(path, readonly=readonly):
            pass
    message = str(raised.value)
    assert f"schema version {version}" in message
    assert f"supports schema version {SCHEMA_VERSION}" in message
    assert ("upgrade drpo" if version > SCHEMA_VERSION else "older drpo") in message
    assert "not modified" in message
    assert (raised.value.found, raised.value.supported) == (version, SCHEMA_VERSION)
    assert _fingerprint(path) == before


async def test_a_read_only_database_file_is_refused_for_writing_but_opens_read_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "drpo.db"
    run_id = await _make_db(path)
    path.chmod(0o444)
    try:
        before = _fingerprint(path)
        with pytest.raises(ReadOnlyPathError, match="read-only"):
            async with RunStore.open(path):
                pass
        assert _fingerprint(path) == before
        async with RunStore.open(path, readonly=True) as viewer:
            assert (await viewer.get_run(run_id)).name == "seed"
        assert _fingerprint(path)[:2] == before[:2]  # a viewer may add -wal/-shm, never writes
    finally:
        path.chmod(0o644)


async def test_a_read_only_folder_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ReadOnlyPathError, match="locked"):
            async with RunStore.open(folder / "sub" / "drpo.db"):
                pass
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


async def test_opening_read_only_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(DatabaseNotFoundError, match="no drpo database"):
        async with RunStore.open(tmp_path / "missing.db", readonly=True):
            pass
    assert not (tmp_path / "missing.db").exists()


# ------------------------------------------------------------------------------- concurrency


async def test_a_reader_sees_consistent_snapshots_while_the_writer_commits(tmp_path: Path) -> None:
    batch, batches = 50, 40
    async with RunStore.open(tmp_path / "drpo.db") as store:
        # A read transaction stays on its snapshot while the writer commits, and does not
        # block it (in rollback-journal mode this commit would wait for the reader).
        await store.append_messages([_note(i) for i in range(batch)], wait=True)
        async with store.snapshot() as conn:
            (count,) = await (await conn.execute("SELECT count(*) FROM messages")).fetchone()
            with anyio.fail_after(5):
                await store.append_messages([_note(i) for i in range(batch, 2 * batch)], wait=True)
            (again,) = await (await conn.execute("SELECT count(*) FROM messages")).fetchone()
            assert count == again == batch
        assert await store.count_messages() == 2 * batch

        # While batches are committed, every read sees whole batches and a gap-free sequence.
        observed: list[int] = []
        writing = True

        async def write() -> None:
            nonlocal writing
            for b in range(2, batches):
                await store.append_messages([_note(b * batch + i) for i in range(batch)])
                await anyio.lowlevel.checkpoint()
            await store.flush()
            writing = False

        async def read() -> None:
            while writing:
                async with store.snapshot() as conn:
                    cursor = await conn.execute("SELECT count(*), min(seq), max(seq) FROM messages")
                    count, low, high = await cursor.fetchone()
                assert count % batch == 0 and high - low + 1 == count
                observed.append(count)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(write)
        assert observed == sorted(observed) and observed
        assert await store.count_messages() == batches * batch


async def test_cancellation_commits_what_was_queued_and_leaves_no_task(tmp_path: Path) -> None:
    path = tmp_path / "drpo.db"
    before = asyncio.all_tasks()
    with anyio.CancelScope() as scope:
        async with RunStore.open(path) as store:
            for i in range(20):
                await store.append_messages([_note(i * 100 + j) for j in range(100)])
            scope.cancel()
            await anyio.sleep_forever()
    assert asyncio.all_tasks() == before
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 2000
    finally:
        conn.close()


# ------------------------------------------------------------------------------- paths


def test_default_paths_follow_xdg_and_drpo_db(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DRPO_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert paths.default_db_path() == tmp_path / "xdg" / "drpo" / "drpo.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.default_db_path() == tmp_path / "home" / ".local" / "share" / "drpo" / "drpo.db"
    monkeypatch.setenv("DRPO_DB", str(tmp_path / "mine.db"))
    assert paths.default_db_path() == tmp_path / "mine.db"
    assert paths.run_log_path("abc") == tmp_path / "logs" / "abc.jsonl"
    assert (
        paths.run_artifacts_dir("abc", tmp_path / "x" / "d.db")
        == tmp_path / "x" / "artifacts" / "abc"
    )
    with pytest.raises(ValueError):
        paths.run_log_path("../escape")


# ------------------------------------------------------------------------------------ leases


async def test_one_owner_per_run_and_a_clear_refusal_for_the_second(tmp_path: Path) -> None:
    async with RunStore.open(tmp_path / "drpo.db") as store:
        run_id = await store.create_run("optimize", {})
        mine = await store.acquire_lease(run_id, "a", pid=os.getpid(), host="h", ttl_s=30)
        assert (mine.owner, mine.pid) == ("a", os.getpid())
        with pytest.raises(RunOwnedError, match=rf"process {os.getpid()} on h.*--force"):
            await store.acquire_lease(run_id, "b", pid=os.getpid(), host="h", ttl_s=30)
        again = await store.acquire_lease(run_id, "a", pid=os.getpid(), host="h", ttl_s=30)
        assert again.owner == "a"  # the owner may take it again (a heartbeat of sorts)
        await store.release_lease(run_id, "a")
        assert (await store.acquire_lease(run_id, "b", pid=1, host="h", ttl_s=30)).owner == "b"


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped: it names no process now."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


async def test_a_dead_owners_lease_is_taken_over(tmp_path: Path) -> None:
    dead_pid = _dead_pid()
    async with RunStore.open(tmp_path / "drpo.db") as store:
        run_id = await store.create_run("optimize", {})
        await store.acquire_lease(run_id, "killed", pid=dead_pid, host="h", ttl_s=30)
        # on the same host a vanished pid frees the lease at once
        taken = await store.acquire_lease(run_id, "next", pid=os.getpid(), host="h", ttl_s=30)
        assert taken.owner == "next"
        # on another host only the heartbeat can tell: fresh, it is refused; stale, taken
        with pytest.raises(RunOwnedError):
            await store.acquire_lease(run_id, "far", pid=os.getpid(), host="other", ttl_s=30)
        assert (
            await store.acquire_lease(run_id, "far", pid=os.getpid(), host="other", ttl_s=0)
        ).owner == "far"


async def test_force_takes_a_live_lease_and_the_old_owner_learns_it(tmp_path: Path) -> None:
    async with RunStore.open(tmp_path / "drpo.db") as store:
        run_id = await store.create_run("optimize", {})
        await store.acquire_lease(run_id, "old", pid=os.getpid(), host="h", ttl_s=30)
        await store.renew_lease(run_id, "old")
        forced = await store.acquire_lease(
            run_id, "new", pid=os.getpid(), host="h", ttl_s=30, force=True
        )
        assert forced.owner == "new"
        with pytest.raises(LeaseLostError, match="taken over"):
            await store.renew_lease(run_id, "old")
        await store.release_lease(run_id, "old")  # releasing someone else's lease does nothing
        assert (await store.get_lease(run_id)).owner == "new"
