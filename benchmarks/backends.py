"""Backend benchmarks, measured side by side in one run.

(a) Local model (the embedded SmolLM2): tokens/s for 8 concurrent requests sharing one running
    batch in ``LocalBackend`` (its continuous engine), against the same 8 requests one at a time
    (target: >= 4x), in float32 and in bfloat16 side by side (issue 12: which dtype should be
    the default on this machine), with each dtype's weight memory and whether the dtypes' greedy
    answers agree; and against a ``transformers serve`` of the same weights on this machine (in
    the default dtype), sent the same 8 concurrent requests through ``OpenAIBackend``. All runs
    are greedy; which outputs are identical is checked and printed (float32 reproduces one-by-one
    answers in batches exactly; bf16 may part ways at near-ties, see tests/test_local_backend.py).
    Contenders are measured in interleaved rounds, and the output says how busy the machine was
    meanwhile (other processes' CPU use), because a shared machine can skew any one number
    several-fold.
(b) API: ``run_api_benchmark`` from ``benchmarks/api_rate.py`` (the achieved fraction of a
    600 requests/minute limit, and failed calls).

Run from the repository root::

    python benchmarks/backends.py            # about 4 minutes on 2 quiet CPU cores
    python benchmarks/backends.py --quick    # shorter completions, one round, 5 s of API
    python benchmarks/backends.py --dtypes bfloat16   # one dtype only
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: everything here is local

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # for tests.serving when run as a script

import anyio  # noqa: E402

from drpo.backends.base import ChatMessage, Completion, CompletionRequest  # noqa: E402

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, in detail.",
    "Describe the water cycle for a ten-year-old.",
    "Write a letter to a friend about your holiday by the sea.",
    "Explain why the sky is blue.",
    "Describe a busy market in the morning.",
    "Give advice to someone learning to cook.",
    "Explain how plants grow from seeds.",
)


@dataclass(frozen=True)
class Measurement:
    """One contender's run over the same requests: wall time and tokens really generated."""

    label: str
    completions: tuple[Completion, ...]
    wall_s: float

    @property
    def completion_tokens(self) -> int:
        return sum(c.usage.completion_tokens for c in self.completions)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


def requests_for(max_tokens: int) -> list[CompletionRequest]:
    return [
        CompletionRequest(
            messages=(ChatMessage(role="user", content=prompt),), max_tokens=max_tokens
        )
        for prompt in PROMPTS
    ]


async def one_at_a_time(
    label: str, backend: Any, requests: Sequence[CompletionRequest]
) -> Measurement:
    started = time.perf_counter()
    results = [await backend.complete(request) for request in requests]
    return Measurement(label, tuple(results), time.perf_counter() - started)


async def all_at_once(
    label: str, backend: Any, requests: Sequence[CompletionRequest]
) -> Measurement:
    results: list[Completion | None] = [None] * len(requests)

    async def call(i: int) -> None:
        results[i] = await backend.complete(requests[i])

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(call, i)
    wall = time.perf_counter() - started
    return Measurement(label, tuple(r for r in results if r is not None), wall)


async def warm_up(backend: Any) -> None:
    """One short call, so first-call costs (loading, lazy init) are not measured."""
    await backend.complete(requests_for(4)[0])


@dataclass(frozen=True)
class Served:
    """A running server to benchmark, by label."""

    label: str
    base_url: str
    model: str


def sequential_label(dtype: str) -> str:
    return f"local {dtype}, one at a time"


def batched_label(dtype: str) -> str:
    return f"local {dtype}, 8 concurrent (batched)"


@dataclass(frozen=True)
class LocalModelInfo:
    """One dtype's loaded model: load time and weight memory (tied weights counted once)."""

    dtype: str
    load_s: float
    weight_mb: float


def load_locals(dtypes: Sequence[str]) -> tuple[dict[str, Any], list[LocalModelInfo]]:
    """Load the embedded model once per dtype, in this process, for the timed rounds."""
    from drpo.backends.local import LocalBackend

    backends: dict[str, LocalBackend] = {}
    infos: list[LocalModelInfo] = []
    for dtype in dtypes:
        local = LocalBackend("smollm2", max_batch_size=8, batch_window_s=0.01, dtype=dtype)
        started = time.perf_counter()
        loaded = local.load()
        load_s = time.perf_counter() - started
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in loaded.model.state_dict().values()
        }
        infos.append(LocalModelInfo(dtype, load_s, sum(storages.values()) / 2**20))
        print(f"  loaded {local.endpoint} in {dtype} in {load_s:.1f} s")
        backends[dtype] = local
    return backends, infos


#: Run in a fresh process per dtype: load, one batch of the 8 requests, then report memory. A
#: process of its own because RSS in this one mixes both dtypes and the allocator's reuse.
_MEMORY_PROBE = """
import json, sys
import anyio, psutil
sys.path.insert(0, sys.argv[3])
from backends import requests_for
from drpo.backends.local import LocalBackend

async def main():
    backend = LocalBackend("smollm2", max_batch_size=8, dtype=sys.argv[1])
    await backend.aload()
    async with anyio.create_task_group() as tg:
        for request in requests_for(int(sys.argv[2])):
            tg.start_soon(backend.complete, request)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss carries over the forking parent's peak.
    status = open("/proc/self/status").read().split("VmHWM:")
    peak_mb = int(status[1].split()[0]) / 1024 if len(status) > 1 else float("nan")
    print(json.dumps({"peak_mb": peak_mb, "after_mb": psutil.Process().memory_info().rss / 2**20}))

anyio.run(main)
"""


def memory_in_own_process(dtype: str, max_tokens: int) -> dict[str, float]:
    """Peak RSS (GGUF de-quantizing included) and RSS after a batch of 8, for one dtype."""
    import json
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, dtype, str(max_tokens), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe for {dtype} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


async def run_rounds(
    locals_by_dtype: dict[str, Any], servers: Sequence[Served], rounds: int, max_tokens: int
) -> dict[str, list[Measurement]]:
    """Measure every contender once per round, interleaved, so machine noise hits all alike."""
    from drpo.backends.openai_api import OpenAIBackend

    remote = {
        s.label: OpenAIBackend(s.model, base_url=s.base_url, timeout_s=600.0, max_attempts=1)
        for s in servers
    }
    requests = requests_for(max_tokens)
    results: dict[str, list[Measurement]] = {}
    try:
        for backend in (*locals_by_dtype.values(), *remote.values()):
            await warm_up(backend)
        for round_number in range(1, rounds + 1):
            measured: list[Measurement] = []
            batches: list[str] = []
            for dtype, local in locals_by_dtype.items():
                measured.append(await one_at_a_time(sequential_label(dtype), local, requests))
                # How the 8 joined the continuous engine's batch (the default local engine):
                # prefill passes, each letting the requests waiting at that step join.
                prefills_before = local.engine_stats.prefills
                measured.append(await all_at_once(batched_label(dtype), local, requests))
                batches.append(f"{dtype}: {local.engine_stats.prefills - prefills_before}")
            for label, backend in remote.items():
                measured.append(await all_at_once(label, backend, requests))
            for m in measured:
                results.setdefault(m.label, []).append(m)
            summary = ", ".join(f"{m.label}: {m.tokens_per_s:.1f} tok/s" for m in measured)
            print(
                f"  round {round_number}/{rounds} (prefill passes for the 8: {', '.join(batches)}; "
                f"load average {os.getloadavg()[0]:.1f}): {summary}"
            )
    finally:
        for backend in remote.values():
            await backend.aclose()
    return results


def start_servers(args: argparse.Namespace, logs: Path) -> list[tuple[Served, Any]]:
    """Export the plain copy once and start each ``transformers serve`` variant asked for.

    The servers compute in the local backend's default dtype for the CPU (what
    ``start_transformers_serve`` passes to ``--dtype``), named in each label.
    """
    from drpo.backends.local_model import default_dtype
    from tests.serving import (
        default_plain_copy_dir,
        save_plain_copy,
        start_transformers_serve,
    )

    dtype = str(default_dtype("cpu")).removeprefix("torch.")
    model_dir = save_plain_copy("smollm2", args.cache_dir or default_plain_copy_dir("smollm2"))
    variants = [(f"transformers serve {dtype}, 8 concurrent", ())]
    if args.serve_continuous_batching:
        variants.append(
            (f"transformers serve {dtype} --continuous-batching", ("--continuous-batching",))
        )
    started: list[tuple[Served, Any]] = []
    for number, (label, extra) in enumerate(variants):
        begun = time.perf_counter()
        process = start_transformers_serve(
            model_dir, logs / f"serve-{number}.log", dtype=dtype, extra_args=extra
        )
        print(f"  {label}: server ready in {time.perf_counter() - begun:.1f} s")
        started.append((Served(label, process.base_url, process.model), process))
    return started


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(results: dict[str, list[Measurement]], baseline_label: str) -> None:
    """Median wall time and tokens/s per contender, the best round, and the ratio to a baseline."""
    baseline = results[baseline_label]
    print(
        f"  {'contender':<46} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'best':>7} "
        f"{'vs ' + baseline_label:>10}"
    )
    for label, runs in results.items():
        ratios = [m.tokens_per_s / b.tokens_per_s for m, b in zip(runs, baseline, strict=True)]
        print(
            f"  {label:<46} {runs[0].completion_tokens:>7} {median([m.wall_s for m in runs]):>8.2f} "
            f"{median([m.tokens_per_s for m in runs]):>9.1f} "
            f"{max(m.tokens_per_s for m in runs):>7.1f} {median(ratios):>9.2f}x"
        )


def same_outputs(a: Measurement, b: Measurement) -> str:
    same = sum(x == y for x, y in zip(a.texts, b.texts, strict=True))
    return f"{same}/{len(a.texts)} identical texts"


@dataclass
class MachineLoad:
    """How busy the machine was while we measured: other processes' share of the CPUs."""

    started_wall: float = 0.0
    started_busy: float = 0.0
    started_own: float = 0.0
    load_before: float = 0.0

    def start(self) -> None:
        import psutil

        self.started_wall = time.perf_counter()
        self.started_busy = _busy_cpu_s()
        self.started_own = sum(psutil.Process().cpu_times()[:2])
        self.load_before = os.getloadavg()[0]

    def report(self) -> str:
        """Other processes' average CPU use (in cores), and a plain verdict: quiet or not."""
        import psutil

        wall = time.perf_counter() - self.started_wall
        busy = _busy_cpu_s() - self.started_busy
        own = sum(psutil.Process().cpu_times()[:2]) - self.started_own
        others = max(0.0, busy - own) / wall if wall > 0 else float("nan")
        cores = os.cpu_count() or 1
        verdict = (
            "quiet"
            if others < 0.1 * cores
            else "NOT quiet: other processes competed for the CPUs, so absolute numbers are "
            "low and noisy; compare contenders within a round, and the best column"
        )
        return (
            f"  machine: {cores} CPUs; other processes used {others:.2f} cores on average while "
            f"we measured (load average {self.load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after): {verdict}"
        )


def _busy_cpu_s() -> float:
    """CPU seconds all processes spent so far (everything but idle and iowait)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def local_section(args: argparse.Namespace) -> None:
    dtypes = list(args.dtypes)
    print(
        f"\n(a) local model, 8 chat requests, greedy, max_tokens={args.max_tokens}, "
        f"dtypes {', '.join(dtypes)}, {args.rounds} interleaved round(s), medians"
    )
    import torch

    from drpo.backends.local_model import cpu_has_native_bf16, default_dtype

    default = str(default_dtype("cpu")).removeprefix("torch.")
    print(
        f"  torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cuda={torch.cuda.is_available()}, CPU native bf16={cpu_has_native_bf16()} "
        f"(default dtype on this CPU: {default})"
    )
    load = MachineLoad()
    load.start()
    backends, infos = load_locals(dtypes)
    with tempfile.TemporaryDirectory() as logs:
        servers = [] if args.skip_serve else start_servers(args, Path(logs))
        try:
            results = anyio.run(
                run_rounds, backends, [s for s, _ in servers], args.rounds, args.max_tokens
            )
        finally:
            for _, process in servers:
                process.stop()
    print()
    print(load.report())
    print()
    print_table(results, sequential_label(dtypes[0]))
    print()
    for info in infos:
        memory = memory_in_own_process(info.dtype, args.max_tokens)
        print(
            f"  {info.dtype:<9} weights {info.weight_mb:4.0f} MB; a process of its own that loads "
            f"it and runs the 8 as one batch: peak RSS {memory['peak_mb']:.0f} MB, "
            f"{memory['after_mb']:.0f} MB after; loaded in {info.load_s:.1f} s"
        )
    print()
    for dtype in dtypes:
        sequential, batched = results[sequential_label(dtype)], results[batched_label(dtype)]
        speedup = median(
            [b.tokens_per_s / s.tokens_per_s for b, s in zip(batched, sequential, strict=True)]
        )
        verdict = "meets" if speedup >= 4 else "misses"
        print(
            f"  {dtype}: batching speed-up {speedup:.2f}x ({verdict} the >= 4x target); "
            f"batched vs one-by-one outputs: {same_outputs(batched[0], sequential[0])}"
        )
    for first, second in itertools.pairwise(dtypes):
        for label in (sequential_label, batched_label):
            a, b = results[label(first)], results[label(second)]
            ratio = median([y.tokens_per_s / x.tokens_per_s for x, y in zip(a, b, strict=True)])
            print(
                f"  {label(second)} vs {first}: {ratio:.2f}x tokens/s (per-round median); "
                f"outputs: {same_outputs(a[0], b[0])}"
            )
    reference = batched_label(default if default in dtypes else dtypes[0])
    for label, runs in results.items():
        if label.startswith("local "):
            continue
        ratio = median(
            [b.tokens_per_s / r.tokens_per_s for b, r in zip(results[reference], runs, strict=True)]
        )
        print(
            f"  {reference} vs {label}: {ratio:.2f}x tokens/s; "
            f"outputs: {same_outputs(results[reference][0], runs[0])}"
        )


def api_section(args: argparse.Namespace) -> None:
    print(f"\n(b) API rate, {args.api_duration:.0f} s against a 600 requests/minute limit")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from api_rate import run_api_benchmark  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"  skipped: benchmarks/api_rate.py is not available ({exc})")
        return
    if inspect.iscoroutinefunction(run_api_benchmark):
        result = anyio.run(run_api_benchmark, args.api_duration)
    else:
        result = run_api_benchmark(duration_s=args.api_duration)
    width = max((len(str(key)) for key in result), default=0)
    for key, value in result.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {key!s:<{width}}  {shown}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short completions and API run")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="per request (default 48, quick 24)"
    )
    parser.add_argument(
        "--api-duration", type=float, default=None, help="seconds (default 30, quick 5)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved (default 2, quick 1)")
    parser.add_argument(
        "--dtypes",
        type=lambda text: [d.strip() for d in text.split(",") if d.strip()],
        default=["float32", "bfloat16"],
        help="local model dtypes to compare, comma-separated (default float32,bfloat16)",
    )
    parser.add_argument("--skip-serve", action="store_true", help="no transformers serve contender")
    parser.add_argument("--skip-api", action="store_true", help="no API rate benchmark")
    parser.add_argument(
        "--serve-continuous-batching",
        action="store_true",
        help="also run transformers serve with --continuous-batching (very slow on CPU)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where the plain model copy lives"
    )
    args = parser.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 24 if args.quick else 48
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.api_duration is None:
        args.api_duration = 5.0 if args.quick else 30.0
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    local_section(args)
    if not args.skip_api:
        api_section(args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
