"""Backend benchmarks, measured side by side in one run.

(a) Local model (the embedded SmolLM2): tokens/s for 8 concurrent requests merged into one batch
    by ``LocalBackend``, against the same 8 requests one at a time (target: >= 4x), and against a
    ``transformers serve`` of the same weights on this machine, sent the same 8 concurrent
    requests through ``OpenAIBackend``. All runs are greedy, so every contender produces the same
    tokens (checked and printed) and tokens/s compares like with like.
(b) API: ``run_api_benchmark`` from ``benchmarks/api_rate.py`` (the achieved fraction of a
    600 requests/minute limit, and failed calls).

Run from the repository root::

    python benchmarks/backends.py            # about 2-3 minutes on 2 CPU cores
    python benchmarks/backends.py --quick    # shorter completions and API run
"""

from __future__ import annotations

import argparse
import inspect
import os
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


async def measure_local(max_tokens: int) -> tuple[Measurement, Measurement, int]:
    from drpo.backends.local import LocalBackend

    backend = LocalBackend("smollm2", max_batch_size=8, batch_window_s=0.01)
    started = time.perf_counter()
    await backend.aload()
    print(f"  loaded {backend.endpoint} in {time.perf_counter() - started:.1f} s")
    await warm_up(backend)
    requests = requests_for(max_tokens)
    sequential = await one_at_a_time("local, one at a time", backend, requests)
    before = backend.batch_stats.batches
    batched = await all_at_once("local, 8 concurrent (batched)", backend, requests)
    return sequential, batched, backend.batch_stats.batches - before


async def measure_served(base_url: str, model: str, label: str, max_tokens: int) -> Measurement:
    from drpo.backends.openai_api import OpenAIBackend

    backend = OpenAIBackend(model, base_url=base_url, timeout_s=600.0, max_attempts=1)
    try:
        await warm_up(backend)
        return await all_at_once(label, backend, requests_for(max_tokens))
    finally:
        await backend.aclose()


def run_served(
    model_dir: Path, label: str, max_tokens: int, extra_args: Sequence[str] = ()
) -> Measurement:
    from drpo.backends.export import start_transformers_serve

    with tempfile.TemporaryDirectory() as logs:
        started = time.perf_counter()
        served = start_transformers_serve(
            model_dir, Path(logs) / "serve.log", extra_args=extra_args
        )
        print(f"  {label}: server ready in {time.perf_counter() - started:.1f} s")
        try:
            return anyio.run(measure_served, served.base_url, served.model, label, max_tokens)
        finally:
            served.stop()


def print_table(rows: Sequence[Measurement], baseline: Measurement) -> None:
    print(f"  {'contender':<44} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'vs one-by-one':>14}")
    for row in rows:
        ratio = row.tokens_per_s / baseline.tokens_per_s
        print(
            f"  {row.label:<44} {row.completion_tokens:>7} {row.wall_s:>8.2f} "
            f"{row.tokens_per_s:>9.1f} {ratio:>13.2f}x"
        )


def same_outputs(a: Measurement, b: Measurement) -> str:
    same = sum(x == y for x, y in zip(a.texts, b.texts, strict=True))
    return f"{same}/{len(a.texts)} identical texts"


def local_section(args: argparse.Namespace) -> None:
    print(f"\n(a) local model, 8 requests, greedy, max_tokens={args.max_tokens}")
    import torch

    print(
        f"  torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cuda={torch.cuda.is_available()}"
    )
    sequential, batched, batches = anyio.run(measure_local, args.max_tokens)
    rows = [sequential, batched]
    served: list[Measurement] = []
    if not args.skip_serve:
        from drpo.backends.export import default_plain_copy_dir, save_plain_copy

        model_dir = save_plain_copy("smollm2", args.cache_dir or default_plain_copy_dir("smollm2"))
        served.append(run_served(model_dir, "transformers serve, 8 concurrent", args.max_tokens))
        if args.serve_continuous_batching:
            served.append(
                run_served(
                    model_dir,
                    "transformers serve --continuous-batching",
                    args.max_tokens,
                    ("--continuous-batching",),
                )
            )
    rows.extend(served)
    print()
    print_table(rows, sequential)
    print()
    speedup = batched.tokens_per_s / sequential.tokens_per_s
    verdict = "meets" if speedup >= 4 else "misses"
    print(f"  batching speed-up: {speedup:.2f}x ({verdict} the >= 4x target); {batches} batch(es)")
    print(f"  batched vs one-by-one outputs: {same_outputs(batched, sequential)}")
    for row in served:
        print(
            f"  local batched vs {row.label}: {batched.tokens_per_s / row.tokens_per_s:.2f}x "
            f"tokens/s; outputs: {same_outputs(batched, row)}"
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
        "--max-tokens", type=int, default=None, help="per request (default 64, quick 24)"
    )
    parser.add_argument(
        "--api-duration", type=float, default=None, help="seconds (default 30, quick 5)"
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
        args.max_tokens = 24 if args.quick else 64
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
