"""The local engine under this project's workload (issue 16): continuous engine vs static lane.

Measured in one run on one loaded model (the embedded SmolLM2, float32 by default so that a CPU
with native bf16 stands for the AVX2 machines most users have; ``--dtype auto`` for the device's
default):

* ``plain_generate_tokens_s``: 8 greedy prompts of 128 new tokens as one left-padded
  ``model.generate`` batch (the ceiling of a static batch: no scheduling at all);
* ``engine_tokens_s``: the same 8 requests sent concurrently through ``LocalBackend``;
* ``mixed_load_tokens_s``: the same 8 generations while 64 one-token scoring requests (the
  logprobs critic's shape) arrive spread over the generation; tokens/s of the generations, the
  wall time running until the last scoring request is answered; with ``scoring_wait_p95_s`` /
  ``scoring_wait_max_s``, what those requests waited (queue + run);
* ``prefill_tokens_s``: the batched prefill rate, 8 critic-sized prompts (~170 tokens) in one
  cold forward pass (no KV cache kept, last position's logits only), best of 3;
* ``decode_step_s``: the time of one decode step of a batch of 8 rows (the default
  ``max_batch_size``): ``model.generate`` of 33 forced tokens minus that of 1, divided by 32,
  best of 3 (so prefill is excluded and generate's own per-step bookkeeping included);
* the default job (``drpo optimize`` with no files and only the dtype forced, through an
  ``[endpoints."local:smollm2"]`` config) in a subprocess with a temporary ``HOME`` and
  ``DRPO_DB``. The subprocess loads the model first (``job_model_load_s``, reported apart) and
  then runs the command in the same process, so ``default_job_s`` excludes the load. From the
  run's own call table in its store: ``critic_wait_p95_s`` / ``critic_wait_max_s`` (the critic
  calls' ``latency_s``: queue + run), ``job_prefill_tokens`` (every call's prompt tokens) and
  ``job_critical_decode_steps`` (the longest chain of generation calls each issued after the
  previous one ended, summing completion tokens per sample: the steps no scheduler can overlap);
  ``floor_s = job_prefill_tokens / prefill_tokens_s + job_critical_decode_steps *
  decode_step_s`` and ``ratio = default_job_s / floor_s``. The floor counts every prompt token
  as prefill work, so a prefix cache that skips shared prompt tokens can bring the ratio
  under 1.

Each engine figure is measured for the continuous engine with the scoring lane and its prefix
cache (``continuous``, the default engine: keys without a prefix), the static batcher with the
scoring lane (``lane_``, ``DRPO_LOCAL_ENGINE=lane``) and the same with the prefix cache off
(``noprefix_``, through ``DRPO_PREFIX_CACHE_MB=0`` for the job), in the order given to
``--engines``. The first one measured also warms the model up, which favours the others
slightly. On a shared machine every figure is noisy. The reference figures (rates, plain
``generate``) run on the model's own thread, as the engine does: run on the main thread, they
kept a second OpenMP team alive that made the engine's decode steps 1.4x slower (issue 16:
engine_tokens_s 84 against 118 with them moved; see ``drpo/backends/model_thread.py``). The old batcher (scoring inside static
``generate`` batches, ``batcher_``) was measured side by side with these, then removed; its
figures are in issue 16's closing note.

Run from the repository root (hold the CPU lock on a shared machine)::

    python benchmarks/local.py --json local.json        # the default job takes minutes per engine
    python benchmarks/local.py --no-job                 # engine figures only, a few minutes
    python benchmarks/local.py --quick                  # 16 new tokens, 16 scorers, no job
    python benchmarks/local.py --job-only --engines continuous,noprefix
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


#: The engines compared: the name, its key prefix, and the environment of its job.
ENGINES: dict[str, tuple[str, dict[str, str]]] = {
    "continuous": ("", {"DRPO_LOCAL_ENGINE": "engine"}),
    "lane": ("lane_", {"DRPO_LOCAL_ENGINE": "lane"}),
    "noprefix": ("noprefix_", {"DRPO_LOCAL_ENGINE": "lane", "DRPO_PREFIX_CACHE_MB": "0"}),
}
ENGINE_KEYS = ("engine_tokens_s", "mixed_load_tokens_s", "scoring_wait_p95_s",
               "scoring_wait_max_s", "scoring_wait_median_s")  # fmt: skip
JOB_KEYS = ("default_job_s", "floor_s", "ratio", "critic_wait_p95_s", "critic_wait_max_s",
            "critic_wait_median_s", "job_model_load_s", "job_prefill_tokens",
            "job_critical_decode_steps", "job_calls")  # fmt: skip


def critic_sized_prompts(backend: LocalBackend) -> list[list[int]]:
    """8 prompts of about 170 tokens, the logprobs critic's verdict size in the default job."""
    from drpo.backends.local_model import encode_prompt

    loaded = backend.load()
    answer = " ".join(PROMPTS)  # about 60 words
    rows = []
    for i, query in enumerate(PROMPTS):
        text = JUDGE.format(query=query).replace("a short, careful answer.", answer) + f" ({i})"
        rows.append(encode_prompt(loaded, scoring_text(text)))
    return rows


def scoring_text(text: str) -> CompletionRequest:
    return CompletionRequest(
        messages=(ChatMessage(role="user", content=text),), max_tokens=1, top_logprobs=5
    )


def measured_rates(backend: LocalBackend) -> dict[str, float]:
    """This machine's batched prefill rate and batch-of-8 decode step time (see the docstring)."""
    import torch

    loaded = backend.load()
    rows = critic_sized_prompts(backend)
    width = max(map(len, rows))
    ids = torch.tensor([[loaded.pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    tokens = sum(map(len, rows))
    prefill: list[float] = []
    steps: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            started = time.perf_counter()
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            prefill.append(time.perf_counter() - started)

        def generate(new: int) -> float:
            started = time.perf_counter()
            loaded.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False,
            )  # fmt: skip
            return time.perf_counter() - started

        for _ in range(3):
            steps.append((generate(33) - generate(1)) / 32)
    return {
        "prefill_tokens_s": tokens / min(prefill),
        "prefill_prompt_tokens": tokens / len(rows),
        "decode_step_s": min(steps),
    }


#: Run in the job's subprocess: load the model (timed apart), then ``drpo optimize`` in-process
#: (it finds the model already loaded), then print one JSON line with the timings.
JOB_DRIVER = r"""
import json, sys, time
import drpo.cli  # first: it turns library progress bars off before transformers is imported
dtype, config = sys.argv[1], sys.argv[2]
started = time.perf_counter()
from drpo.backends.local import LocalBackend
backend = LocalBackend("smollm2", dtype=None if dtype == "auto" else dtype)
loaded = backend.load()
load_s = time.perf_counter() - started
from typer.main import get_command
from drpo.cli.app import app
started = time.perf_counter()
try:  # not standalone: click returns an Exit's code instead of leaving the process
    code = get_command(app).main(["optimize", "--config", config], standalone_mode=False) or 0
except SystemExit as exc:
    code = exc.code or 0
job_s = time.perf_counter() - started
print("\nDRPO-JOB " + json.dumps({"load_s": load_s, "job_s": job_s, "code": code,
      "prefix_cache": loaded.prefix_cache.stats.as_dict()}))
"""


def default_job(
    engine_env: dict[str, str], dtype: str, timeout_s: float, keep_db: Path | None = None
) -> dict[str, Any]:
    """The default ``drpo optimize`` in a subprocess with its own home; its figures and calls
    (and its database copied to ``keep_db``, to compare two runs' journals call by call)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="drpo-bench-job-") as folder:
        home = Path(folder)
        data = home / ".local" / "share"
        db = data / "drpo" / "drpo.db"
        config = home / "float.toml"
        config.write_text(
            '[endpoints."local:smollm2"]\n' + (f'dtype = "{dtype}"\n' if dtype != "auto" else ""),
            encoding="utf-8",
        )
        env = {
            **os.environ,
            "HF_HOME": os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface"),
            "DRPO_CACHE_DIR": os.environ.get("DRPO_CACHE_DIR")
            or str(Path.home() / ".cache" / "drpo"),
            "HOME": str(home),
            "XDG_DATA_HOME": str(data),
            "DRPO_DB": str(db),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
            **engine_env,
        }
        for name in ("DRPO_LOCAL_ENGINE", "DRPO_PREFIX_CACHE_MB"):  # only the engine's own
            if name not in engine_env:
                env.pop(name, None)
        done = subprocess.run(
            [sys.executable, "-c", JOB_DRIVER, dtype, str(config)],
            cwd=home, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
        line = next(
            (x for x in reversed(done.stdout.splitlines()) if x.startswith("DRPO-JOB ")), None
        )
        if line is None or done.returncode != 0:
            tail = (done.stdout + done.stderr)[-2000:]
            raise RuntimeError(f"the default job failed (exit {done.returncode}):\n{tail}")
        timings = json.loads(line.removeprefix("DRPO-JOB "))
        if timings["code"]:
            raise RuntimeError(f"drpo optimize exited {timings['code']}:\n{done.stdout[-2000:]}")
        calls = anyio.run(job_calls, db)
        result = anyio.run(job_result, db)
        if keep_db is not None:
            import shutil

            shutil.copyfile(db, keep_db)
    return {"timings": timings, "calls": calls, "result": result}


async def job_result(db: Path) -> Any:
    """The (only) run's recorded result: its best prompt and scores, to compare two versions
    of the code on the default job (greedy float32: the same code path gives the same)."""
    from drpo.domain.events import NodeCreated
    from drpo.inspect.common import open_readonly
    from drpo.inspect.tree import TREE_KINDS

    async with open_readonly(db) as store:
        (run,) = await store.list_runs()
        nodes = [
            message.envelope.payload
            async for message in store.iter_messages(run.run_id, kinds=TREE_KINDS)
            if isinstance(message.envelope.payload, NodeCreated)
        ]
    return {
        **run.result,
        "nodes": [
            {"node_id": n.node_id, "reward": n.reward, "score": n.score, "skipped": n.skipped,
             "prompt": n.system_prompt, "answer": n.answer}
            for n in nodes
        ],
    }  # fmt: skip


async def job_calls(db: Path) -> list[dict[str, Any]]:
    """Every call of the (only) run in ``db``, from its store: role, tokens, start, end."""
    from drpo.inspect.common import open_readonly

    async with open_readonly(db) as store:
        (run,) = await store.list_runs()
        records = await store.list_calls(run.run_id)
    return [
        {
            "role": r.role,
            "status": r.status,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "samples": _samples(r.request),
            "latency_s": r.latency_s,
            "end": r.updated_at,
            "start": r.updated_at - r.latency_s,
        }
        for r in records
        if not r.replayed
    ]


def _samples(request: str) -> int:
    try:
        return max(1, int(json.loads(request).get("n") or 1))
    except (ValueError, AttributeError, TypeError):
        return 1


def critical_decode_steps(calls: list[dict[str, Any]]) -> int:
    """The most decode steps along a chain of generation calls, each issued after the last ended.

    Calls that overlap in time could share decode steps in a batch; a call issued after
    another finished (an answer, then its rewrite) could not start earlier, whatever the engine.
    One-token calls are prefills (their cost is in the prefill term) and count no steps.
    """
    generations = sorted(
        (c for c in calls if c["completion_tokens"] > c["samples"]), key=lambda c: c["end"]
    )
    best: list[float] = []
    for i, call in enumerate(generations):
        steps = call["completion_tokens"] / call["samples"]
        before = [best[j] for j in range(i) if generations[j]["end"] <= call["start"]]
        best.append(steps + max(before, default=0.0))
    return round(max(best, default=0.0))


def job_figures(job: dict[str, Any], rates: dict[str, float]) -> dict[str, Any]:
    calls = job["calls"]
    critic = sorted(c["latency_s"] for c in calls if c["role"] == "critic")
    prefill_tokens = sum(c["prompt_tokens"] for c in calls)
    steps = critical_decode_steps(calls)
    floor_s = prefill_tokens / rates["prefill_tokens_s"] + steps * rates["decode_step_s"]
    job_s = job["timings"]["job_s"]
    return {
        "default_job_s": job_s,
        "floor_s": floor_s,
        "ratio": job_s / floor_s if floor_s else None,
        "critic_wait_p95_s": _p95(critic),
        "critic_wait_max_s": critic[-1] if critic else None,
        "critic_wait_median_s": statistics.median(critic) if critic else None,
        "job_model_load_s": job["timings"]["load_s"],
        "job_prefill_tokens": prefill_tokens,
        "job_critical_decode_steps": steps,
        "job_calls": {role: sum(c["role"] == role for c in calls) for role in _roles(calls)},
        "job_prefix_cache": job["timings"]["prefix_cache"],
    }


def _roles(calls: list[dict[str, Any]]) -> list[str]:
    return sorted({c["role"] for c in calls})


def _p95(ordered: list[float]) -> float | None:
    return ordered[max(0, int(0.95 * len(ordered)) - 1)] if ordered else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 16 scorers, no job")
    parser.add_argument("--no-job", action="store_true", help="skip the default job")
    parser.add_argument("--job-only", action="store_true", help="only the rates and the job")
    parser.add_argument(
        "--engines",
        default="continuous,lane",
        help="which of continuous,lane,noprefix",
    )
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or auto")
    parser.add_argument("--job-timeout", type=float, default=1800.0, help="seconds per job")
    parser.add_argument(
        "--keep-db", type=Path, help="copy the (last) job's database here (its journal, nodes)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--calls", action="store_true", help="also write each job's call table and result to --json"
    )
    args = parser.parse_args()
    max_tokens, scorers = (16, 16) if args.quick else (128, 64)
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = [name for name in engines if name not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}: use {', '.join(ENGINES)}")
    dtype = None if args.dtype == "auto" else args.dtype

    import torch

    from drpo.backends.local_model import model_thread
    from drpo.backends.prefix_cache import PrefixCacheStats

    started = time.perf_counter()
    backend = LocalBackend("smollm2", dtype=dtype)
    loaded = backend.load()
    figures: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "threads": torch.get_num_threads(),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "max_tokens": max_tokens,
        "scorers": scorers,
        "model_load_s": time.perf_counter() - started,
    }
    # On the model's own thread, like everything the engine runs: a second thread running torch
    # would keep a second OpenMP team alive, which slows every thread's parallel regions while
    # it lives (drpo.backends.model_thread), the engine's included.
    on_model = model_thread(loaded).call
    figures.update(on_model(measured_rates, backend))
    if not args.job_only:
        figures["plain_generate_tokens_s"] = on_model(plain_generate, backend, max_tokens)
        budget = loaded.prefix_cache.budget_bytes
        for name in engines:
            prefix, env = ENGINES[name]
            os.environ.pop("DRPO_LOCAL_ENGINE", None)
            os.environ.update({k: v for k, v in env.items() if k == "DRPO_LOCAL_ENGINE"})
            loaded.prefix_cache.clear()
            loaded.prefix_cache.stats = PrefixCacheStats()
            loaded.prefix_cache.budget_bytes = 0 if name == "noprefix" else budget
            fresh = LocalBackend("smollm2", dtype=dtype)  # same loaded model and engine
            alone = anyio.run(engine, fresh, max_tokens, 0)
            mixed = anyio.run(engine, fresh, max_tokens, scorers)
            figures[f"{prefix}engine_tokens_s"] = alone["tokens_s"]
            figures[f"{prefix}mixed_load_tokens_s"] = mixed["tokens_s"]
            for key in ENGINE_KEYS[2:]:
                figures[f"{prefix}{key}"] = mixed.get(key)
            if name == "continuous":  # what the prefix cache did for the scoring requests
                figures["prefix_cache"] = loaded.prefix_cache.stats.as_dict()
        os.environ.pop("DRPO_LOCAL_ENGINE", None)
        loaded.prefix_cache.budget_bytes = budget
    if not (args.no_job or args.quick):
        for name in engines:
            prefix, env = ENGINES[name]
            job = default_job(env, args.dtype, args.job_timeout, args.keep_db)
            for key, value in job_figures(job, figures).items():
                figures[f"{prefix}{key}"] = value
            if args.calls:  # every call of the job (role, tokens, start, end): to see why
                figures[f"{prefix}job_call_table"] = job["calls"]
                figures[f"{prefix}job_result"] = job["result"]
    report(figures, engines)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def report(figures: dict[str, Any], engines: list[str]) -> None:
    """The figures side by side, one column per engine."""
    titles = {
        "continuous": "engine (default)",
        "lane": "lane+prefix",
        "noprefix": "lane, no prefix",
    }
    print(f"{'figure':28}" + "".join(f"{titles[name]:>17}" for name in engines))
    for key in (*ENGINE_KEYS, *JOB_KEYS[:-1]):
        values = [figures.get(ENGINES[name][0] + key) for name in engines]
        if all(v is None for v in values):
            continue
        cells = "".join(
            f"{v:17.2f}" if isinstance(v, float | int) else f"{'-':>17}" for v in values
        )
        print(f"{key:28}{cells}")
    for key in ("plain_generate_tokens_s", "prefill_tokens_s", "decode_step_s"):
        if key in figures:
            print(f"{key:28}{figures[key]:17.3f}")
    print(
        f"model load {figures['model_load_s']:.1f} s (excluded); {figures['cpu']} "
        f"({figures['cpu_flags'] or 'no avx2/bf16 flags'}), {figures['dtype']}, "
        f"{figures['threads']} threads"
    )


def _cpu_flags() -> str:
    """The CPU flags that decide the default dtype (as the closing notes report them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                return " ".join(f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in flags)
    except OSError:
        pass
    return ""


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
