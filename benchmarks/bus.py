"""Throughput of the bus and of the recorder.

Run: ``python benchmarks/bus.py [--messages N] [--profile]``. Prints, for this machine:

* messages/s through the bus: the bus alone (envelopes made beforehand), then one publisher
  that builds each envelope, as agents do, to one subscriber and to 10 subscribers (published
  messages/s and deliveries/s);
* messages/s durably persisted by the recorder into a real SQLite file in WAL mode, from the
  first publish until ``recorder.drain()`` returns, i.e. until the last batch is committed;
* the same from 1 and from 2 processes at once into one database file, each with its own store
  (its own writer connection), as ``drpo optimize --workers 2`` runs (``--processes 2``): what
  two writers taking SQLite's write lock in turn cost against one.

Each rate is given per second of wall clock and per second of this process's CPU time: on a
busy shared machine the wall clock also counts other programs, and the CPU rate is closer to
what an idle machine does. Targets on a 2-core machine: >= 100,000 msg/s through the bus,
>= 20,000 msg/s persisted. Run it a few times and read the best.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drpo.bus import Bus, Envelope, Subscription, loop
from drpo.domain.requests import Answer
from drpo.runs.recorder import Recorder
from drpo.runs.store import RunStore

TOPIC = "bench"
PAYLOAD_TEXT = "The capital of France is Paris. " * 4  # a short answer, like an agent reply


def _envelope(i: int, run_id: str = "r") -> Envelope:
    return Envelope(payload=Answer(text=PAYLOAD_TEXT), topic=TOPIC, sender="bench", run_id=run_id)


class Clock:
    """Wall-clock and CPU time of a stretch of work: on a busy shared machine the wall clock
    also counts other programs' time, the CPU clock (this process, all its threads) does not."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def rates(self, count: int) -> str:
        return f"{count / self.wall:>12,.0f} /s wall  {count / self.cpu:>12,.0f} /s cpu"


async def bus_throughput(messages: int, subscribers: int, *, prebuilt: bool = False) -> Clock:
    """Time to publish ``messages`` to ``subscribers`` subscribers until all have them.

    ``prebuilt`` makes the envelopes first, to time the bus alone.
    """
    bus = Bus(buffer_size=1024)
    subs = [bus.subscribe(TOPIC) for _ in range(subscribers)]
    envelopes = [_envelope(i) for i in range(messages)] if prebuilt else None

    async def consume(sub: Subscription) -> None:
        count = 0
        async for _ in sub:
            count += 1
            if count == messages:
                break

    with Clock() as clock:
        async with anyio.create_task_group() as tg:
            for sub in subs:
                tg.start_soon(consume, sub)
            if envelopes is not None:
                for envelope in envelopes:
                    await bus.publish(envelope)
            else:
                for i in range(messages):
                    await bus.publish(_envelope(i))
    return clock


async def recorder_throughput(
    messages: int, publishers: int = 4, *, db: Path | None = None, run_id: str = "r"
) -> tuple[Clock, int]:
    """Time for ``publishers`` concurrent publishers until all is committed to a WAL file
    (``db``: this one, which other processes may be writing too; None: a fresh one)."""
    with tempfile.TemporaryDirectory() as folder:
        async with RunStore.open(db or Path(folder) / "bench.db") as store:
            bus = Bus(buffer_size=1024)
            bus.declare(TOPIC)
            recorder = Recorder(bus, store)
            per_publisher = messages // publishers

            async def publish() -> None:
                for i in range(per_publisher):
                    await bus.publish(_envelope(i, run_id))

            async with anyio.create_task_group() as tg:
                await tg.start(recorder.run)
                with Clock() as clock:
                    async with anyio.create_task_group() as publishing:
                        for _ in range(publishers):
                            publishing.start_soon(publish)
                    await recorder.drain()
                tg.cancel_scope.cancel()
            stored = await store.count_messages(run_id)
            assert stored == per_publisher * publishers, (stored, per_publisher * publishers)
            return clock, recorder.batches


def _one_writer(db: str, messages: int, run_id: str, start: float) -> tuple[float, float, float]:
    """A process of ``writers_throughput``: (first publish, last commit, CPU s), its own clock
    started together with the others' (``start``: a shared ``time.monotonic`` moment)."""
    time.sleep(max(0.0, start - time.monotonic()))
    began = time.monotonic()
    clock, _ = loop.run(
        functools.partial(recorder_throughput, db=Path(db), run_id=run_id), messages
    )
    return began, time.monotonic(), clock.cpu


def writers_throughput(messages: int, processes: int) -> tuple[float, float]:
    """``processes`` processes persisting ``messages`` in all into one WAL database, each with
    its own store: (durable msg/s over the wall clock, over their CPU seconds)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "bench.db"
        loop.run(_create_schema, db)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            list(pool.map(time.sleep, [0.1] * processes))  # started and imported
            start = time.monotonic() + 0.5
            ends = list(
                pool.map(
                    _one_writer,
                    [str(db)] * processes,
                    [messages // processes] * processes,
                    [f"r{i}" for i in range(processes)],
                    [start] * processes,
                )
            )
    wall = max(end for _, end, _ in ends) - min(began for began, _, _ in ends)
    cpu = sum(cpu for _, _, cpu in ends)
    return messages / wall, messages / cpu


async def _create_schema(db: Path) -> None:
    async with RunStore.open(db):
        pass


async def main(messages: int) -> None:
    print(f"{messages:,} messages of {len(_envelope(0).model_dump_json())} bytes of JSON each")
    clock = await bus_throughput(messages, 1, prebuilt=True)
    print(f"bus alone (envelopes made beforehand), 1 -> 1:  published {clock.rates(messages)}")
    clock = await bus_throughput(messages, 1)
    print(f"bus with envelope construction, 1 -> 1:          published {clock.rates(messages)}")
    clock = await bus_throughput(messages, 10)
    print(f"bus with envelope construction, 1 -> 10:         published {clock.rates(messages)}")
    print(f"{'':49}deliveries {clock.rates(10 * messages)}")
    clock, batches = await recorder_throughput(messages)
    print(f"recorder, 4 publishers -> SQLite WAL, committed: persisted {clock.rates(messages)}")
    print(f"{'':49}({batches} batches)")


def main_processes(messages: int, processes: int) -> None:
    for count in sorted({1, processes}):
        wall, cpu = writers_throughput(messages, count)
        print(
            f"recorder, {count} process(es) -> one SQLite WAL file:  persisted "
            f"{wall:>12,.0f} /s wall  {cpu:>12,.0f} /s cpu"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="also persist from 1 and from N processes into one database (0: skip)",
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the run")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(loop.run, main, args.messages)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    else:
        loop.run(main, args.messages)
    if args.processes:
        main_processes(args.messages, args.processes)
