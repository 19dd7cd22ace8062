"""The recorder persists every envelope on the bus, in publish order, and loses nothing."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from drpo.bus import Bus, Envelope
from drpo.domain.events import Note
from drpo.domain.requests import Answer
from drpo.runs.recorder import Recorder, RecorderStoppedError, recording
from drpo.runs.store import RunStore

pytestmark = pytest.mark.anyio


def _stored_ids(path: Path) -> list[str]:
    """Message ids in the database's order, read through a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT message_id FROM messages ORDER BY seq")]
    finally:
        conn.close()


async def _burst(bus: Bus, publishers: int, per_publisher: int, called: list[Envelope]) -> None:
    """Several publishers at once; ``called`` gets each envelope as its publish is called."""

    async def publish(name: str) -> None:
        for i in range(per_publisher):
            envelope = Envelope(
                payload=Note(text=f"{name}:{i}"), topic="events", sender=name, run_id="r"
            )
            called.append(envelope)
            await bus.publish(envelope)
            if i % 97 == 0:
                await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for p in range(publishers):
            tg.start_soon(publish, f"p{p}")


def _check_each_publishers_order(stored: list[Envelope], publishers: int, per: int) -> None:
    for p in range(publishers):
        texts = [e.payload.text for e in stored if e.sender == f"p{p}"]  # type: ignore[union-attr]
        assert texts == [f"p{p}:{i}" for i in range(per)]
    assert len({e.sender for e in stored[:per]}) > 1  # they really interleaved


async def test_a_burst_is_persisted_whole_and_in_tap_order(tmp_path: Path) -> None:
    publishers, per_publisher = 5, 2000
    total = publishers * per_publisher
    path = tmp_path / "drpo.db"
    # A slow store (tiny batches, tiny queue) makes the recorder wait on it; the taps are big
    # enough never to block a publisher, so every tap sees the same order: the order in which
    # publish was called.
    async with RunStore.open(path, max_batch_rows=200, queue_size=2) as store:
        bus = Bus()
        bus.declare("events")
        witness = bus.tap(buffer_size=total)
        called: list[Envelope] = []
        async with recording(bus, store, batch_size=300, tap_buffer=total) as recorder:
            await _burst(bus, publishers, per_publisher, called)
            with anyio.fail_after(30):
                await recorder.drain()
            assert len(_stored_ids(path)) == total  # durable once drain returns
        assert recorder.batches > 1
        seen = [await witness.receive() for _ in range(total)]
        stored = [m.envelope async for m in store.iter_messages("r", page_size=1000)]
    assert stored == seen == called  # nothing lost, nothing reordered, lossless JSON
    _check_each_publishers_order(stored, publishers, per_publisher)


async def test_with_backpressure_on_the_tap_nothing_is_lost(tmp_path: Path) -> None:
    publishers, per_publisher = 5, 2000
    path = tmp_path / "drpo.db"
    # Small buffers everywhere: publishers wait on the recorder's tap, which waits on the store.
    async with RunStore.open(path, max_batch_rows=300, queue_size=4) as store:
        bus = Bus(buffer_size=64)
        bus.declare("events")
        called: list[Envelope] = []
        async with recording(bus, store, batch_size=100, tap_buffer=32) as recorder:
            await _burst(bus, publishers, per_publisher, called)
            with anyio.fail_after(30):
                await recorder.drain()
        stored = [m.envelope async for m in store.iter_messages("r", page_size=1000)]
    assert sorted(e.message_id for e in stored) == sorted(e.message_id for e in called)
    _check_each_publishers_order(stored, publishers, per_publisher)
    assert _stored_ids(path) == [e.message_id for e in stored]


async def test_stopping_flushes_everything_published_before_the_stop(tmp_path: Path) -> None:
    path = tmp_path / "drpo.db"
    before = asyncio.all_tasks()
    async with RunStore.open(path) as store:
        bus = Bus()
        bus.declare("events")
        async with recording(bus, store, tap_buffer=5000) as recorder:
            # publish() does not yield while there is room, so all of these are still waiting
            # on the tap when the block is left and the recorder cancelled.
            for i in range(3000):
                await bus.emit("events", Answer(text=str(i)), sender="s", run_id="r")
            assert recorder.recorded == 0
        assert recorder.recorded == 3000
        # committed, not just queued: a connection of its own sees them all
        assert len(_stored_ids(path)) == 3000
        # the tap is gone: publishing goes on without a recorder and without blocking
        for _ in range(10):
            await bus.emit("events", Answer(text="after"), sender="s", run_id="r")
        with pytest.raises(RecorderStoppedError, match="10 message"):
            await recorder.drain()
    assert asyncio.all_tasks() == before


async def test_the_recorder_ends_when_the_bus_closes(tmp_path: Path) -> None:
    async with RunStore.open(tmp_path / "drpo.db") as store:
        bus = Bus()
        bus.declare("events")
        recorder = Recorder(bus, store)  # tapped from here: nothing published after is missed
        for i in range(50):
            await bus.emit("events", Note(text=str(i)), sender="s", run_id="r")
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder.run)
            await anyio.lowlevel.checkpoint()
            bus.close()
        assert await store.count_messages("r") == 50
