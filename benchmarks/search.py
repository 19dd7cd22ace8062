"""How close a DRPO search runs to its critical path, and how many searches one process carries.

Run: ``python benchmarks/search.py [--quick] [--latency 0.2] [--searches 50] [--rpm 3000]
[--only 14] [--profile PATH]``.

Every model call goes to a loopback OpenAI-compatible server (``tests/fakeserver.py`` answering
with ``tests/simulated_llm.respond``: role-aware, deterministic replies, varied judge scores) with
a fixed latency per call. The server runs in a process of its own, as a real endpoint would, so
its CPU time is not charged to the searches. The searches run through the whole stack: bus,
agents, call journal, run store (a fresh temporary database per scenario), OpenAI backend.

Scenarios, measured in one run:

1. One search at the paper's defaults (beam 2, 3 actions, depth 20 (+10), JSON critic; k=0 so
   no embedding retrieval): wall time over the critical-path floor. The floor is counted from
   the run itself: 2 rounds for the root (answer, judge), then per level 3 rounds (rewrite,
   answer, judge), or 2 when every beam node skipped its rewrite; times the latency. Spec §8:
   3D-1 rounds without skips. Target <= 1.10.
2. The same search with every call made one after another, the paper's code structure: a
   registry whose backends share one FIFO lock (one call on the wire at a time) and aspect
   selection made when a query is first judged, not up front. Our speed-up over it; the
   ceiling is calls / rounds (281 / 59 = 4.76 at these settings without skips).
3. Beam 4, 8 actions: the same two measurements; the ceiling is far higher.
4. N searches at once (different seeds) in one process with no rate limit (calls in flight per
   endpoint: the rate limiter's guard, 1024; ``--max-in-flight``): wall time over the slowest
   of the N searches run alone (its seed's search is the longest: the least the N can take
   together; target <= 1.3), over scenario 1's search (seed 0, whose critical path is
   shorter, so this ratio cannot reach 1 however fast the client), and over the longest
   critical-path floor among the N; the client's CPU time per call, the server process's CPU (to show it is not what limits the
   run), the event loop's worst lag (a 10 ms ticker's overshoot), peak memory (RSS sampled every
   50 ms, and ru_maxrss). The server runs in a process of its own, like every scenario's.
5. The same N searches against an RPM limit set in the config's ``[endpoints]`` (and enforced
   by the server with 429s): achieved requests per minute over the limit (target >= 0.95),
   failed calls (target 0).

``--quick`` shrinks depths (6; 4 for scenarios 3 and 5) so it runs in about 2 minutes; the full
run takes about 14 minutes on a 2-core machine (scenario 3's sequential baseline ~6 min,
scenario 5 ~5.5 min). ``--json PATH`` also writes every number, and ``--profile PATH`` writes a cProfile of
scenario 4. Every scenario runs as drpo runs: on drpo's event loop (``drpo.bus.loop``: uvloop,
or asyncio's own with ``DRPO_EVENT_LOOP=asyncio``) and under the job session's garbage-collector
policy (``drpo.jobs.session.quiet_collector``, which ``run_searches`` applies); the benchmark
only counts the collector's pauses.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # for tests.fakeserver / tests.simulated_llm

# The OpenAI SDK takes ~0.3 s to import; the registry imports it at the first API call. Import it
# here so that scenario 1 does not charge a once-per-process cost to one search.
import drpo.backends.openai_api  # noqa: E402, F401
import drpo.jobs.optimize as optimize_module  # noqa: E402
from drpo.agents.search import BeamSearch  # noqa: E402
from drpo.backends.base import Completion, CompletionRequest  # noqa: E402
from drpo.backends.ratelimit import RateLimits  # noqa: E402
from drpo.backends.registry import BackendRegistry  # noqa: E402
from drpo.backends.settings import EndpointSettings  # noqa: E402
from drpo.bus import loop  # noqa: E402
from drpo.jobs.config import RunSettings, build_config  # noqa: E402
from drpo.jobs.optimize import RunOutcome, RunPlan, run_searches  # noqa: E402
from drpo.jobs.workers import WorkerReport, run_in_workers, worker_count  # noqa: E402
from drpo.runs.store import RunStore  # noqa: E402

MODEL_NAME = "sim"


# ------------------------------------------------------------------------------------ the server


def _serve(conn: Any, latency_s: float, rpm_limit: int | None) -> None:
    """Child process: run the fake server until told to stop, then send back its counts."""
    sys.path.insert(0, str(_ROOT))
    from tests.fakeserver import FakeOpenAIServer
    from tests.simulated_llm import respond

    server = FakeOpenAIServer(responder=respond, latency_s=latency_s, rpm_limit=rpm_limit)
    server.start()
    _no_delay(server)
    cpu = time.process_time()  # this process, every thread: the server's CPU from now on
    conn.send(server.base_url)
    conn.recv()  # "stop"
    cpu = time.process_time() - cpu
    arrivals = server.arrivals
    conn.send(
        {
            "total": server.total,
            "rate_limited": server.rate_limited,
            "max_in_progress": server.max_in_progress,
            "arrivals": [a.t for a in arrivals if a.fault == "ok"],
            "cpu_s": cpu,
        }
    )
    server.stop()


def _no_delay(server: Any) -> None:
    """Turn Nagle's algorithm off for the server's connections.

    FakeOpenAIServer binds its own socket (``socket.socket(AF_INET, SOCK_STREAM)``, proto 0), so
    asyncio does not recognise the accepted connections as TCP and leaves Nagle on; uvicorn writes
    a response's head and body separately, and the body then waits for the client's delayed ACK:
    about 40 ms added to every call on a reused connection. Linux copies TCP_NODELAY from the
    listening socket to the connections it accepts, so setting it there fixes every connection.
    """
    import socket

    for listener in getattr(server._server, "servers", []):
        for sock in listener.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class ServerCounts:
    total: int = 0
    rate_limited: int = 0
    max_in_progress: int = 0
    arrivals: list[float] = field(default_factory=list)
    #: CPU seconds the server process used while it served (all its threads).
    cpu_s: float = 0.0


@contextmanager
def fake_server(latency_s: float, rpm_limit: int | None = None):
    """A simulated OpenAI-compatible endpoint in its own process; yields (base_url, counts),
    with counts filled in when the block ends. Arrival times are ``time.monotonic`` (one clock
    for every process on the machine)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(child, latency_s, rpm_limit), daemon=True)
    process.start()
    counts = ServerCounts()
    try:
        if not parent.poll(60):
            raise RuntimeError("the fake server did not start")
        yield parent.recv(), counts
    finally:
        parent.send("stop")
        if parent.poll(60):
            data = parent.recv()
            counts.total = data["total"]
            counts.rate_limited = data["rate_limited"]
            counts.max_in_progress = data["max_in_progress"]
            counts.arrivals = data["arrivals"]
            counts.cpu_s = data["cpu_s"]
        process.join(10)
        if process.is_alive():
            process.kill()


# ------------------------------------------------------------------------------------ sequential


class _SerialBackend:
    """A backend whose calls wait for one lock shared by every backend of the registry."""

    def __init__(self, inner: Any, lock: anyio.Lock) -> None:
        self._inner = inner
        self._lock = lock
        self.name = inner.name
        self.model = inner.model

    @property
    def endpoint(self) -> str:
        return self._inner.endpoint

    async def complete(self, request: CompletionRequest) -> Completion:
        async with self._lock:
            return await self._inner.complete(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class SerialRegistry(BackendRegistry):
    """Every call of every agent and search, one after another (anyio.Lock is FIFO)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock: anyio.Lock | None = None
        self._serial: dict[str, _SerialBackend] = {}

    def get(self, spec_text: str) -> Any:
        if self._lock is None:
            self._lock = anyio.Lock()
        backend = super().get(spec_text)
        key = f"{backend.name}:{backend.model}@{backend.endpoint}"
        if key not in self._serial:
            self._serial[key] = _SerialBackend(backend, self._lock)
        return self._serial[key]


class _LazyAspectsSearch(BeamSearch):
    """The paper's order of work: a query's aspects are selected when it is first judged (our
    search selects every reachable query's aspects up front, which only pays when calls overlap)."""

    def _start_aspect_selection(self, tg: Any, queries: Sequence[str] | None = None) -> None:
        if queries is not None:
            super()._start_aspect_selection(tg, queries)


@contextmanager
def paper_order():
    original = optimize_module.BeamSearch
    optimize_module.BeamSearch = _LazyAspectsSearch  # type: ignore[misc]
    try:
        yield
    finally:
        optimize_module.BeamSearch = original  # type: ignore[misc]


# ------------------------------------------------------------------------------------ measuring


@dataclass
class GcStats:
    """Time the cyclic garbage collector stopped the process, per generation."""

    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    longest_s: float = 0.0

    @property
    def total_s(self) -> float:
        return sum(self.seconds)


@contextmanager
def collector_pauses() -> Iterator[GcStats]:
    """Count the collector's pauses; its settings are drpo's own (the job session's policy)."""
    stats = GcStats()
    started = [0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause = time.perf_counter() - started[0]
        generation = info["generation"]
        stats.collections[generation] += 1
        stats.seconds[generation] += pause
        stats.longest_s = max(stats.longest_s, pause)

    gc.callbacks.append(timer)
    try:
        yield stats
    finally:
        gc.callbacks.remove(timer)


def search_config(
    base_url: str,
    *,
    beam: int,
    actions: int,
    depth: int,
    extension: int,
    seed: int = 0,
    endpoint: EndpointSettings | None = None,
) -> RunSettings:
    model = f"openai:{MODEL_NAME}@{base_url}"
    overrides: dict[str, Any] = {
        "preset": "paper",
        "models": {"base": model, "critic": model, "editor": model},
        "search": {
            "beam_size": beam,
            "n_actions": actions,
            "depth": depth,
            "depth_extension": extension,
            "seed": seed,
        },
        "proposer": {"k": 0},
        "critic": {"mode": "json"},
    }
    if endpoint is not None:
        overrides["endpoints"] = {model: endpoint.model_dump()}
    return build_config(overrides=overrides)


@dataclass
class RunStats:
    wall_s: float
    outcomes: list[RunOutcome]
    calls: list[int]
    call_errors: int
    rounds: list[int]
    levels: list[int]
    skipped_levels: list[int]
    max_lag_s: float
    p99_lag_s: float
    peak_rss_mb: float
    rss_before_mb: float
    cpu_s: float
    #: With workers: the parent's CPU (it creates the runs and waits) and the workers' own.
    parent_cpu_s: float = 0.0
    workers_cpu_s: float = 0.0
    workers: int = 1
    gc: GcStats = field(default_factory=GcStats)


async def _ticker(lags: list[float], rss: list[float], stop: anyio.Event) -> None:
    import psutil

    process = psutil.Process()
    period, tick = 0.01, 0
    while not stop.is_set():
        started = time.perf_counter()
        await anyio.sleep(period)
        lags.append(max(0.0, time.perf_counter() - started - period))
        tick += 1
        if tick % 5 == 0:
            rss.append(process.memory_info().rss / 2**20)


async def _critical_rounds(store: RunStore, run_id: str) -> tuple[int, int, int]:
    """(rounds on the critical path, levels, levels where every node skipped its rewrite)."""
    by_level: dict[int, list[bool]] = {}
    async for message in store.iter_messages(run_id, kinds=["node_created"]):
        payload = message.envelope.payload
        by_level.setdefault(payload.level, []).append(payload.skipped)
    rounds, all_skipped = 2, 0  # the root: answer, judge
    for level, skipped in sorted(by_level.items()):
        if level == 0:
            continue
        if all(skipped):
            rounds += 2
            all_skipped += 1
        else:
            rounds += 3
    return rounds, len(by_level), all_skipped


async def measure(
    configs: list[RunSettings], registry: BackendRegistry | None, workers: int = 1
) -> RunStats:
    """Run ``configs`` as one sweep; ``workers`` > 1 runs it in that many worker processes
    (``drpo.jobs.workers``), whose CPU and event-loop lag are added to the figures."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="drpo-bench-") as folder:
        async with RunStore.open(Path(folder) / "bench.db") as store:
            lags: list[float] = []
            rss_before = psutil.Process().memory_info().rss / 2**20
            rss: list[float] = [rss_before]
            stop = anyio.Event()
            outcomes: list[RunOutcome] = []

            reports: list[WorkerReport] = []

            async def searches() -> None:
                nonlocal outcomes
                plans = [RunPlan(config=config) for config in configs]
                if worker_count(plans, workers) > 1:
                    outcomes = await run_in_workers(
                        plans,
                        store=store,
                        workers=workers,
                        endpoints=configs[0].endpoints,
                        measure_lag=True,
                        reports=reports,
                    )
                else:
                    outcomes = await run_searches(plans, store=store, registry=registry)
                stop.set()

            started, cpu = time.perf_counter(), time.process_time()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_ticker, lags, rss, stop)
                tg.start_soon(searches)
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu
            parent_cpu = cpu
            workers_cpu = sum(report.cpu_s for report in reports)
            cpu += workers_cpu  # every process of the client (workers from their start)
            if reports:  # the loops that run the searches: the workers' (the parent's idles)
                lags = [lag for report in reports for lag in report.lags_s]
            calls, rounds, levels, skipped, errors = [], [], [], [], 0
            for outcome in outcomes:
                records = await store.list_calls(outcome.run_id)
                calls.append(sum(r.tries for r in records))
                errors += sum(1 for r in records if r.status != "ok")
                r, lv, sk = await _critical_rounds(store, outcome.run_id)
                rounds.append(r)
                levels.append(lv)
                skipped.append(sk)
    ordered = sorted(lags) or [0.0]
    return RunStats(
        wall_s=wall,
        outcomes=outcomes,
        calls=calls,
        call_errors=errors,
        rounds=rounds,
        levels=levels,
        skipped_levels=skipped,
        max_lag_s=ordered[-1],
        p99_lag_s=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        peak_rss_mb=max(rss),
        rss_before_mb=rss_before,
        cpu_s=cpu,
        parent_cpu_s=parent_cpu,
        workers_cpu_s=workers_cpu,
        workers=len(reports) or 1,
    )


def run_scenario(
    latency: float,
    make: Callable[[str], list[RunSettings]],
    *,
    sequential: bool = False,
    rpm_limit: int | None = None,
    profile: Path | None = None,
    workers: int = 1,
) -> tuple[RunStats, ServerCounts]:
    """Run searches against a fresh server process; ``profile`` writes a cProfile of them."""
    with fake_server(latency, rpm_limit) as (base_url, counts):
        configs = make(base_url)
        profiler = cProfile.Profile() if profile is not None else None
        if profiler is not None:
            profiler.enable()
        try:
            with collector_pauses() as collector:
                if sequential:
                    with paper_order():
                        stats = loop.run(measure, configs, SerialRegistry())
                else:
                    stats = loop.run(measure, configs, None, workers)
            stats.gc = collector
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(str(profile))
    failed = [o for o in stats.outcomes if o.status != "finished"]
    if failed:
        raise RuntimeError(f"{len(failed)} searches did not finish: {failed[0].error}")
    return stats, counts


# ------------------------------------------------------------------------------------ report


@dataclass
class Row:
    scenario: str
    metric: str
    value: str
    target: str = ""
    note: str = ""


def _quiet_logs() -> None:
    """Only warnings from drpo's structlog loggers: 100 searches log a start and an end each
    (set up with drpo's own call, so that worker processes repeat it)."""
    from drpo.runs.logs import configure_logging

    configure_logging(level="warning")


def main() -> None:
    _quiet_logs()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller depths: ~2-3 minutes")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per call (0.2)")
    parser.add_argument("--searches", type=int, default=50, help="searches at once (50)")
    parser.add_argument("--rpm", type=int, default=3000, help="the RPM limit of scenario 5")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=RateLimits().max_in_flight,
        help="the in-flight guard per endpoint in scenarios 4 and 5 (the limiter's default, "
        f"{RateLimits().max_in_flight}; under an RPM limit the cap is derived below it)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes for the sweeps of scenarios 4 and 5 (drpo optimize --workers; "
        "1: one process, as before)",
    )
    parser.add_argument("--only", default="12345", help="scenarios to run, e.g. 14")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a cProfile of scenario 4 here"
    )
    args = parser.parse_args()
    lat = args.latency
    depth, ext = (6, 2) if args.quick else (20, 10)
    wide_depth, rpm_depth = (4, 4) if args.quick else (20, 20)
    rows: list[Row] = []
    raw: dict[str, Any] = {
        "latency_s": lat,
        "quick": args.quick,
        "event_loop": "uvloop" if loop.uses_uvloop() else "asyncio",
        "depth": depth,
        "depth_extension": ext,
    }
    started_all = time.perf_counter()

    def paper(url: str, **kw: Any) -> list[RunSettings]:
        return [search_config(url, beam=2, actions=3, depth=depth, extension=ext, **kw)]

    def wide(url: str) -> list[RunSettings]:
        return [search_config(url, beam=4, actions=8, depth=wide_depth, extension=ext)]

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started_all:6.1f}s] {text}", file=sys.stderr, flush=True)

    one = None
    if "1" in args.only or "2" in args.only or "4" in args.only:
        say(f"1: one search, beam 2 x 3 actions, depth {depth} (+{ext}), {lat * 1000:.0f} ms/call")
        one, _ = run_scenario(lat, paper)
        floor = one.rounds[0] * lat
        ratio = one.wall_s / floor
        raw["1"] = {
            "wall_s": one.wall_s,
            "rounds": one.rounds[0],
            "levels": one.levels[0],
            "all_skipped_levels": one.skipped_levels[0],
            "calls": one.calls[0],
            "floor_s": floor,
            "ratio": ratio,
        }
        rows += [
            Row(
                "1 paper defaults",
                "levels (all-skip levels)",
                f"{one.levels[0]} ({one.skipped_levels[0]})",
            ),
            Row("1 paper defaults", "calls", str(one.calls[0])),
            Row("1 paper defaults", "critical path", f"{one.rounds[0]} rounds = {floor:.2f} s"),
            Row("1 paper defaults", "wall time", f"{one.wall_s:.2f} s"),
            Row("1 paper defaults", "wall / critical-path floor", f"{ratio:.3f}", "<= 1.10"),
        ]
    if "2" in args.only and one is not None:
        say("2: the same search, every call one after another")
        seq, _ = run_scenario(lat, paper, sequential=True)
        ceiling = seq.calls[0] / one.rounds[0]
        speedup = seq.wall_s / one.wall_s
        raw["2"] = {
            "wall_s": seq.wall_s,
            "calls": seq.calls[0],
            "speedup": speedup,
            "ceiling": ceiling,
        }
        rows += [
            Row(
                "2 sequential",
                "calls (paper order)",
                str(seq.calls[0]),
                "",
                f"{seq.calls[0] * lat:.1f} s of latency",
            ),
            Row("2 sequential", "wall time", f"{seq.wall_s:.2f} s"),
            Row(
                "2 sequential",
                "speed-up of 1 over 2",
                f"{speedup:.2f}x",
                f"ceiling {ceiling:.2f}x",
                "calls / rounds",
            ),
        ]
    if "3" in args.only:
        say(f"3: beam 4 x 8 actions, depth {wide_depth} (+{ext}): concurrent, then sequential")
        conc, _ = run_scenario(lat, wide)
        seq, _ = run_scenario(lat, wide, sequential=True)
        floor = conc.rounds[0] * lat
        speedup = seq.wall_s / conc.wall_s
        ceiling = seq.calls[0] / conc.rounds[0]
        raw["3"] = {
            "wall_s": conc.wall_s,
            "floor_s": floor,
            "calls": conc.calls[0],
            "sequential_wall_s": seq.wall_s,
            "sequential_calls": seq.calls[0],
            "speedup": speedup,
            "ceiling": ceiling,
        }
        rows += [
            Row(
                "3 beam 4 x 8",
                "calls (concurrent / sequential)",
                f"{conc.calls[0]} / {seq.calls[0]}",
            ),
            Row(
                "3 beam 4 x 8",
                "wall / critical-path floor",
                f"{conc.wall_s / floor:.3f}",
                "",
                f"{conc.rounds[0]} rounds",
            ),
            Row(
                "3 beam 4 x 8",
                "wall time concurrent / sequential",
                f"{conc.wall_s:.2f} s / {seq.wall_s:.2f} s",
            ),
            Row(
                "3 beam 4 x 8",
                "speed-up over sequential",
                f"{speedup:.2f}x",
                f"ceiling {ceiling:.2f}x",
            ),
        ]
    n = args.searches
    if "4" in args.only and one is not None:
        say(
            f"4: {n} searches at once, no rate limit, at most {args.max_in_flight} in flight, "
            f"{args.workers} worker process(es)"
        )
        unlimited = EndpointSettings(max_in_flight=args.max_in_flight)

        def many(url: str) -> list[RunSettings]:
            return [
                search_config(
                    url, beam=2, actions=3, depth=depth, extension=ext, seed=s, endpoint=unlimited
                )
                for s in range(n)
            ]

        multi, counts = run_scenario(lat, many, profile=args.profile, workers=args.workers)
        floors = [r * lat for r in multi.rounds]
        # The searches differ by seed, and so by length: the slowest of them, run alone, is the
        # least the N can take together. Measured here, after the N, on a fresh server.
        slowest_seed = max(range(n), key=lambda s: multi.rounds[s])

        def slowest(url: str) -> list[RunSettings]:
            return [many(url)[slowest_seed]]

        alone, _ = run_scenario(lat, slowest)
        rusage_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        raw["4"] = {
            "wall_s": multi.wall_s,
            "one_search_wall_s": one.wall_s,
            "ratio": multi.wall_s / one.wall_s,
            "longest_floor_s": max(floors),
            "slowest_seed": slowest_seed,
            "slowest_alone_wall_s": alone.wall_s,
            "ratio_to_slowest_alone": multi.wall_s / alone.wall_s,
            "calls": sum(multi.calls),
            "max_lag_s": multi.max_lag_s,
            "p99_lag_s": multi.p99_lag_s,
            "peak_rss_mb": multi.peak_rss_mb,
            "rss_before_mb": multi.rss_before_mb,
            "ru_maxrss_mb": rusage_mb,
            "server_max_in_progress": counts.max_in_progress,
            "server_cpu_s": counts.cpu_s,
            "cpu_s": multi.cpu_s,
            "workers": multi.workers,
            "parent_cpu_s": multi.parent_cpu_s,
            "workers_cpu_s": multi.workers_cpu_s,
            "cpu_ms_per_call": multi.cpu_s / sum(multi.calls) * 1000,
            "gc_s": multi.gc.total_s,
            "gc_collections": multi.gc.collections,
            "gc_longest_s": multi.gc.longest_s,
        }
        rows += [
            Row(
                f"4 {n} at once",
                "calls",
                f"{sum(multi.calls)}",
                "",
                f"server peak {counts.max_in_progress} in flight",
            ),
            Row(
                f"4 {n} at once",
                "wall time",
                f"{multi.wall_s:.2f} s",
                "",
                f"longest floor {max(floors):.2f} s",
            ),
            Row(
                f"4 {n} at once",
                "wall / one search's (seed 0)",
                f"{multi.wall_s / one.wall_s:.2f}x",
                "",
                f"seed 0's floor is {one.rounds[0] * lat:.2f} s",
            ),
            Row(
                f"4 {n} at once",
                "wall / the slowest search's alone",
                f"{multi.wall_s / alone.wall_s:.2f}x",
                "<= 1.3x",
                f"seed {slowest_seed} alone: {alone.wall_s:.2f} s",
            ),
            Row(f"4 {n} at once", "wall / longest floor", f"{multi.wall_s / max(floors):.2f}x"),
            Row(
                f"4 {n} at once",
                "client CPU per call",
                f"{multi.cpu_s / sum(multi.calls) * 1000:.2f} ms",
                "",
                f"{multi.cpu_s:.1f} s CPU in {multi.wall_s:.1f} s"
                + (
                    f" ({multi.workers} workers {multi.workers_cpu_s:.1f} s, from their start; "
                    f"parent {multi.parent_cpu_s:.1f} s)"
                    if multi.workers > 1
                    else ""
                ),
            ),
            Row(
                f"4 {n} at once",
                "server CPU (own process)",
                f"{counts.cpu_s / multi.wall_s:.0%} of a core",
                "",
                f"{counts.cpu_s:.1f} s CPU: not the bottleneck while well under 100%",
            ),
            Row(
                f"4 {n} at once",
                "GC pauses (drpo's policy)",
                f"{multi.gc.total_s:.2f} s" if multi.workers == 1 else "-",
                "",
                f"collections per generation {multi.gc.collections}, longest "
                f"{multi.gc.longest_s * 1000:.0f} ms"
                if multi.workers == 1
                else "not counted in worker processes",
            ),
            Row(
                f"4 {n} at once",
                "event loop lag worst (p99)",
                f"{multi.max_lag_s * 1000:.0f} ms ({multi.p99_lag_s * 1000:.0f} ms)",
            ),
            Row(
                f"4 {n} at once",
                "peak RSS (before)",
                f"{multi.peak_rss_mb:.0f} MB ({multi.rss_before_mb:.0f} MB)",
                "",
                f"ru_maxrss {rusage_mb:.0f} MB",
            ),
        ]
    if "5" in args.only:
        say(f"5: {n} searches at once under {args.rpm} RPM, depth {rpm_depth} (+{ext})")
        limited = EndpointSettings(rpm=args.rpm, max_in_flight=args.max_in_flight)

        def paced(url: str) -> list[RunSettings]:
            return [
                search_config(
                    url, beam=2, actions=3, depth=rpm_depth, extension=ext, seed=s, endpoint=limited
                )
                for s in range(n)
            ]

        capped, counts = run_scenario(lat, paced, rpm_limit=args.rpm, workers=args.workers)
        times = sorted(counts.arrivals)
        span = times[-1] - times[0] if len(times) > 1 else float("nan")
        achieved = (len(times) - 1) / span * 60 if span > 0 else float("nan")
        busiest = _max_in_window(times, 60.0)
        raw["5"] = {
            "wall_s": capped.wall_s,
            "calls": sum(capped.calls),
            "arrivals": len(times),
            "span_s": span,
            "achieved_rpm": achieved,
            "fraction": achieved / args.rpm,
            "server_429": counts.rate_limited,
            "failed_calls": capped.call_errors,
            "max_in_any_60s": busiest,
            "max_lag_s": capped.max_lag_s,
        }
        rows += [
            Row(f"5 {n} at {args.rpm} RPM", "calls answered", f"{len(times)} in {span:.1f} s"),
            Row(
                f"5 {n} at {args.rpm} RPM",
                "achieved RPM / limit",
                f"{achieved:.0f} / {args.rpm} = {achieved / args.rpm:.3f}",
                ">= 0.95",
            ),
            Row(f"5 {n} at {args.rpm} RPM", "429s from the server", str(counts.rate_limited), "0"),
            Row(f"5 {n} at {args.rpm} RPM", "failed calls", str(capped.call_errors), "0"),
            Row(
                f"5 {n} at {args.rpm} RPM",
                "most requests in any 60 s",
                str(busiest),
                f"<= {args.rpm}",
            ),
        ]
    raw["total_s"] = time.perf_counter() - started_all
    _print_table(rows, lat, raw["total_s"], raw["event_loop"])
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=2))


def _max_in_window(times: list[float], window: float) -> int:
    best, left = 0, 0
    for right, t in enumerate(times):
        while times[left] <= t - window:
            left += 1
        best = max(best, right - left + 1)
    return best


def _print_table(rows: list[Row], latency: float, total_s: float, event_loop: str) -> None:
    widths = [
        max(len(getattr(r, f)) for r in rows) if rows else 0
        for f in ("scenario", "metric", "value", "target")
    ]
    head = ("scenario", "metric", "value", "target")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + "  note"
    print(
        f"\nDRPO search benchmark ({latency * 1000:.0f} ms per call; event loop: {event_loop}; "
        f"garbage collector: the job session's policy; {total_s:.0f} s in all)"
    )
    print(line)
    print("-" * len(line))
    for r in rows:
        cells = (r.scenario, r.metric, r.value, r.target)
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + r.note)


if __name__ == "__main__":
    main()
