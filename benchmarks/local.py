"""The local engine under this project's workload (issue 16), old batcher and new lane side by side.

Measured in one run on one loaded model (the embedded SmolLM2, forced to float32 so that a CPU
with native bf16 stands for the AVX2 machines most users have):

* ``plain_generate_tokens_s``: 8 greedy prompts of 128 new tokens as one left-padded
  ``model.generate`` batch (the ceiling of a static batch: no scheduling at all);
* ``engine_tokens_s``: the same 8 requests sent concurrently through ``LocalBackend``;
* ``mixed_load_tokens_s``: the same 8 generations while 64 one-token scoring requests (the
  logprobs critic's shape) arrive spread over the generation; tokens/s of the generations, the
  wall time running until the last scoring request is answered; with ``scoring_wait_p95_s`` /
  ``scoring_wait_max_s``, what those requests waited (queue + run).

Each figure is measured for the scoring lane (the default engine) and for the old batcher
(``DRPO_LOCAL_ENGINE=batcher``). The lane is measured first and its first call also warms the
model up, which favours the batcher slightly. Not yet here (issue 16, left): ``default_job_s``, ``floor_s``
and ``ratio`` for the default ``drpo optimize``.

Run from the repository root (hold the CPU lock on a shared machine)::

    python benchmarks/local.py --json local.json     # a few minutes on 2 cores
    python benchmarks/local.py --quick               # 16 new tokens, 16 scoring requests
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: everything here is local

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import anyio  # noqa: E402

from drpo.backends.base import ChatMessage, CompletionRequest  # noqa: E402
from drpo.backends.local import LocalBackend  # noqa: E402

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
JUDGE = (
    "Rate the answer below from 1 to 5 for helpfulness. Reply with one digit only.\n\n"
    "Query: {query}\nAnswer: It depends on many things; here is a short, careful answer."
)


def generation(prompt: str, max_tokens: int) -> CompletionRequest:
    return CompletionRequest(
        messages=(ChatMessage(role="user", content=prompt),), max_tokens=max_tokens
    )


def scoring(index: int) -> CompletionRequest:
    query = PROMPTS[index % len(PROMPTS)]
    return CompletionRequest(
        messages=(ChatMessage(role="user", content=JUDGE.format(query=f"{query} ({index})")),),
        max_tokens=1,
        top_logprobs=5,
    )


def plain_generate(backend: LocalBackend, max_tokens: int) -> float:
    """Tokens/s of one padded ``model.generate`` batch of the 8 prompts (greedy)."""
    import torch

    from drpo.backends.local_model import encode_prompt

    loaded = backend.load()
    rows = [encode_prompt(loaded, generation(p, max_tokens)) for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[loaded.pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode():  # warm up (first-call allocations), as the engines were not
        loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False
        )
    elapsed = time.perf_counter() - started
    new = out[:, width:]
    tokens = 0
    for row in new.tolist():
        ended = next((i for i, t in enumerate(row) if t in loaded.eos_ids), None)
        tokens += len(row) if ended is None else ended + 1
    return tokens / elapsed


async def engine(backend: LocalBackend, max_tokens: int, scorers: int) -> dict[str, float]:
    """The 8 generations concurrently, with ``scorers`` scoring requests arriving meanwhile."""
    tokens = 0
    waits: list[float] = []

    async def generate(prompt: str) -> None:
        nonlocal tokens
        completion = await backend.complete(generation(prompt, max_tokens))
        tokens += completion.usage.completion_tokens

    async def score(index: int, delay: float) -> None:
        await anyio.sleep(delay)
        started = time.perf_counter()
        await backend.complete(scoring(index))
        waits.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for prompt in PROMPTS:
            tg.start_soon(generate, prompt)
        for index in range(scorers):
            tg.start_soon(score, index, 0.05 * index)
    elapsed = time.perf_counter() - started
    result = {"tokens_s": tokens / elapsed, "wall_s": elapsed}
    if waits:
        ordered = sorted(waits)
        result["scoring_wait_p95_s"] = ordered[max(0, int(0.95 * len(ordered)) - 1)]
        result["scoring_wait_max_s"] = ordered[-1]
        result["scoring_wait_median_s"] = statistics.median(ordered)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 16 scorers")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    max_tokens, scorers = (16, 16) if args.quick else (128, 64)

    import torch

    started = time.perf_counter()
    backend = LocalBackend("smollm2", dtype="float32")
    backend.load()
    figures: dict[str, Any] = {
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "max_tokens": max_tokens,
        "scorers": scorers,
        "model_load_s": time.perf_counter() - started,
        "plain_generate_tokens_s": plain_generate(backend, max_tokens),
    }
    for name, value in (("lane", ""), ("batcher", "batcher")):
        os.environ["DRPO_LOCAL_ENGINE"] = value
        fresh = LocalBackend("smollm2", dtype="float32")  # same loaded model, fresh batcher
        alone = anyio.run(engine, fresh, max_tokens, 0)
        mixed = anyio.run(engine, fresh, max_tokens, scorers)
        prefix = "" if name == "lane" else "batcher_"
        figures[f"{prefix}engine_tokens_s"] = alone["tokens_s"]
        figures[f"{prefix}mixed_load_tokens_s"] = mixed["tokens_s"]
        for key in ("scoring_wait_p95_s", "scoring_wait_max_s", "scoring_wait_median_s"):
            figures[f"{prefix}{key}"] = mixed.get(key)
    os.environ.pop("DRPO_LOCAL_ENGINE", None)
    print(f"{'figure':32} {'lane (new)':>12} {'batcher (old)':>14}")
    for key in ("engine_tokens_s", "mixed_load_tokens_s", "scoring_wait_p95_s",
                "scoring_wait_max_s", "scoring_wait_median_s"):  # fmt: skip
        print(f"{key:32} {figures[key]:12.2f} {figures['batcher_' + key]:14.2f}")
    print(f"{'plain_generate_tokens_s':32} {figures['plain_generate_tokens_s']:12.2f}")
    print(f"model load {figures['model_load_s']:.1f} s (excluded); {figures['cpu']}, float32")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
