"""Backend benchmarks, measured side by side in one run.

(a) Local model (the embedded SmolLM2): tokens/s for 8 concurrent requests merged into one batch
    by ``LocalBackend``, against the same 8 requests one at a time (target: >= 4x), and against a
    ``transformers serve`` of the same weights on this machine, sent the same 8 concurrent
    requests through ``OpenAIBackend``. All runs are greedy, so every contender produces the same
    tokens (checked and printed) and tokens/s compares like with like.
(b) API: ``run_api_benchmark`` from ``benchmarks/api_rate.py`` (the achieved fraction of a
    600 requests/minute limit, and failed calls).

Run from the repository root::

    python benchmarks/backends.py            # about 2 minutes on 2 quiet CPU cores
    python benchmarks/backends.py --quick    # shorter completions, one round, 5 s of API
"""

from __future__ import annotations

import argparse
import inspect
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

import anyio

from drpo.backends.base import ChatMessage, Completion, CompletionRequest

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


async def run_rounds(
    servers: Sequence[Served], rounds: int, max_tokens: int
) -> dict[str, list[Measurement]]:
    """Measure every contender once per round, interleaved, so machine noise hits all alike."""
    from drpo.backends.local import LocalBackend
    from drpo.backends.openai_api import OpenAIBackend

    local = LocalBackend("smollm2", max_batch_size=8, batch_window_s=0.01)
    started = time.perf_counter()
    await local.aload()
    print(f"  loaded {local.endpoint} in {time.perf_counter() - started:.1f} s")
    remote = {
        s.label: OpenAIBackend(s.model, base_url=s.base_url, timeout_s=600.0, max_attempts=1)
        for s in servers
    }
    requests = requests_for(max_tokens)
    results: dict[str, list[Measurement]] = {}
    try:
        for backend in (local, *remote.values()):
            await warm_up(backend)
        for round_number in range(1, rounds + 1):
            batches_before = local.batch_stats.batches
            measured = [
                await one_at_a_time(SEQUENTIAL, local, requests),
                await all_at_once(BATCHED, local, requests),
            ]
            batches = local.batch_stats.batches - batches_before - len(requests)
            for label, backend in remote.items():
                measured.append(await all_at_once(label, backend, requests))
            for m in measured:
                results.setdefault(m.label, []).append(m)
            summary = ", ".join(f"{m.label}: {m.tokens_per_s:.1f} tok/s" for m in measured)
            print(f"  round {round_number}/{rounds} ({batches} batch for the 8): {summary}")
    finally:
        for backend in remote.values():
            await backend.aclose()
    return results


SEQUENTIAL = "local, one at a time"
BATCHED = "local, 8 concurrent (batched)"


def start_servers(args: argparse.Namespace, logs: Path) -> list[tuple[Served, Any]]:
    """Export the plain copy once and start each ``transformers serve`` variant asked for."""
    from tests.serving import (
        default_plain_copy_dir,
        save_plain_copy,
        start_transformers_serve,
    )

    model_dir = save_plain_copy("smollm2", args.cache_dir or default_plain_copy_dir("smollm2"))
    variants = [("transformers serve, 8 concurrent", ())]
    if args.serve_continuous_batching:
        variants.append(("transformers serve --continuous-batching", ("--continuous-batching",)))
    started: list[tuple[Served, Any]] = []
    for number, (label, extra) in enumerate(variants):
        begun = time.perf_counter()
        process = start_transformers_serve(
            model_dir, logs / f"serve-{number}.log", extra_args=extra
        )
        print(f"  {label}: server ready in {time.perf_counter() - begun:.1f} s")
        started.append((Served(label, process.base_url, process.model), process))
    return started


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(results: dict[str, list[Measurement]]) -> None:
    baseline = results[SEQUENTIAL]
    print(f"  {'contender':<42} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'vs one-by-one':>14}")
    for label, runs in results.items():
        ratios = [m.tokens_per_s / b.tokens_per_s for m, b in zip(runs, baseline, strict=True)]
        print(
            f"  {label:<42} {runs[0].completion_tokens:>7} {median([m.wall_s for m in runs]):>8.2f} "
            f"{median([m.tokens_per_s for m in runs]):>9.1f} {median(ratios):>13.2f}x"
        )


def same_outputs(a: Measurement, b: Measurement) -> str:
    same = sum(x == y for x, y in zip(a.texts, b.texts, strict=True))
    return f"{same}/{len(a.texts)} identical texts"


def local_section(args: argparse.Namespace) -> None:
    print(
        f"\n(a) local model, 8 chat requests, greedy, max_tokens={args.max_tokens}, "
        f"{args.rounds} interleaved round(s), medians"
    )
    import torch

    print(
        f"  torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cuda={torch.cuda.is_available()}, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as logs:
        servers = [] if args.skip_serve else start_servers(args, Path(logs))
        try:
            results = anyio.run(run_rounds, [s for s, _ in servers], args.rounds, args.max_tokens)
        finally:
            for _, process in servers:
                process.stop()
    print()
    print_table(results)
    print()
    sequential, batched = results[SEQUENTIAL], results[BATCHED]
    speedup = median(
        [b.tokens_per_s / s.tokens_per_s for b, s in zip(batched, sequential, strict=True)]
    )
    verdict = "meets" if speedup >= 4 else "misses"
    print(f"  batching speed-up: {speedup:.2f}x ({verdict} the >= 4x target)")
    print(f"  batched vs one-by-one outputs: {same_outputs(batched[0], sequential[0])}")
    for label, runs in results.items():
        if label in (SEQUENTIAL, BATCHED):
            continue
        ratio = median(
            [b.tokens_per_s / r.tokens_per_s for b, r in zip(batched, runs, strict=True)]
        )
        print(
            f"  local batched vs {label}: {ratio:.2f}x tokens/s; "
            f"outputs: {same_outputs(batched[0], runs[0])}"
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
