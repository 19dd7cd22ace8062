"""Throughput of the bus and of the recorder.

Run: ``python benchmarks/bus.py [--messages N] [--profile]``. Prints, for this machine:

* messages/s through the bus, one publisher to one subscriber, and to 10 subscribers
  (published messages/s and deliveries/s), counting envelope construction, as agents do;
* messages/s durably persisted by the recorder into a real SQLite file in WAL mode: from the
  first publish until ``recorder.drain()`` returns, i.e. until the last batch is committed.

Targets on a 2-core machine: >= 100,000 msg/s through the bus, >= 20,000 msg/s persisted.
Timings here are wall-clock on a shared machine: run it a few times and read the best.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drpo.bus import Bus, Envelope  # noqa: E402
from drpo.bus.messages import Answer  # noqa: E402
from drpo.runs.recorder import Recorder  # noqa: E402
from drpo.runs.store import RunStore  # noqa: E402

TOPIC = "bench"
PAYLOAD_TEXT = "The capital of France is Paris. " * 4  # a short answer, like an agent reply


def _envelope(i: int) -> Envelope:
    return Envelope(payload=Answer(text=PAYLOAD_TEXT), topic=TOPIC, sender="bench", run_id="r")


async def bus_throughput(messages: int, subscribers: int) -> tuple[float, float]:
    """(published msg/s, delivered msg/s) for one publisher and ``subscribers`` subscribers."""
    bus = Bus(buffer_size=1024)
    subs = [bus.subscribe(TOPIC) for _ in range(subscribers)]
    delivered = 0

    async def consume(sub: object) -> None:
        nonlocal delivered
        count = 0
        async for _ in sub:  # type: ignore[attr-defined]
            count += 1
            if count == messages:
                break
        delivered += count

    async with anyio.create_task_group() as tg:
        for sub in subs:
            tg.start_soon(consume, sub)
        start = time.perf_counter()
        for i in range(messages):
            await bus.publish(_envelope(i))
    elapsed = time.perf_counter() - start  # the group waits until every subscriber has all
    return messages / elapsed, delivered / elapsed


async def recorder_throughput(messages: int, publishers: int = 4) -> tuple[float, int]:
    """(persisted msg/s, batches) for ``publishers`` concurrent publishers into a WAL file."""
    with tempfile.TemporaryDirectory() as folder:
        async with RunStore.open(Path(folder) / "bench.db") as store:
            bus = Bus(buffer_size=1024)
            bus.declare(TOPIC)
            recorder = Recorder(bus, store)
            per_publisher = messages // publishers

            async def publish() -> None:
                for i in range(per_publisher):
                    await bus.publish(_envelope(i))

            async with anyio.create_task_group() as tg:
                await tg.start(recorder.run)
                start = time.perf_counter()
                async with anyio.create_task_group() as publishing:
                    for _ in range(publishers):
                        publishing.start_soon(publish)
                await recorder.drain()
                elapsed = time.perf_counter() - start
                tg.cancel_scope.cancel()
            stored = await store.count_messages("r")
            assert stored == per_publisher * publishers, (stored, per_publisher * publishers)
            return stored / elapsed, recorder.batches


async def main(messages: int) -> None:
    print(f"bus, 1 publisher -> 1 subscriber:   {messages:,} messages")
    published, delivered = await bus_throughput(messages, 1)
    print(f"    {published:>12,.0f} published msg/s   {delivered:>12,.0f} deliveries/s")
    print(f"bus, 1 publisher -> 10 subscribers: {messages:,} messages")
    published, delivered = await bus_throughput(messages, 10)
    print(f"    {published:>12,.0f} published msg/s   {delivered:>12,.0f} deliveries/s")
    print(f"recorder, 4 publishers -> SQLite (WAL, synchronous=NORMAL): {messages:,} messages")
    persisted, batches = await recorder_throughput(messages)
    print(f"    {persisted:>12,.0f} persisted msg/s   ({batches} batches)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the run")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(anyio.run, main, args.messages)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    else:
        anyio.run(main, args.messages)
