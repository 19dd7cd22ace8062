"""How close the API backend runs to its configured request limit, and whether anything fails.

Starts the fake OpenAI server (tests/fakeserver.py) with 200 ms of latency per request,
configures the backend at 600 requests per minute (the real 60 s window), keeps far more calls
waiting than the limit lets through for ``duration_s``, and reports the achieved rate at the
server as a fraction of the limit (target >= 0.95) and the calls that failed (target 0).

    python -m benchmarks.api_rate --duration 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # for tests.fakeserver when run as a script

from drpo.backends.base import ChatMessage, CompletionRequest  # noqa: E402
from drpo.backends.openai_api import OpenAIBackend  # noqa: E402
from drpo.backends.ratelimit import RateLimits  # noqa: E402
from tests.fakeserver import max_in_window, serve_fake_openai  # noqa: E402

RPM_LIMIT = 600
SERVER_LATENCY_S = 0.2
WORKERS = 64  # far more than the ~2 calls in flight that 10 req/s x 200 ms needs


async def _saturate(base_url: str, duration_s: float) -> dict[str, Any]:
    """Run WORKERS callers back to back until the deadline; count successes and failures."""
    limits = RateLimits(rpm=RPM_LIMIT, max_in_flight=WORKERS)
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(10**9))

    async with OpenAIBackend("fake-model", base_url=base_url, limits=limits) as backend:

        async def worker() -> None:
            while True:
                request = CompletionRequest(
                    messages=(ChatMessage(role="user", content=f"call {next(counter)}"),),
                    max_tokens=16,
                )
                try:
                    completion = await backend.complete(request)
                except Exception as exc:  # a benchmark counts failures, it does not stop on them
                    failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    latencies.append(completion.latency_s)

        with anyio.move_on_after(duration_s):
            async with anyio.create_task_group() as tg:
                for _ in range(WORKERS):
                    tg.start_soon(worker)
    return {"latencies": latencies, "failures": failures}


def run_api_benchmark(duration_s: float = 30.0) -> dict[str, Any]:
    """Saturate a 600 RPM backend for ``duration_s`` against a 200 ms server; report the rate.

    ``achieved_fraction`` is requests that reached the server during the run, per minute, over
    the limit; ``failed_calls`` counts calls that raised. Calls still waiting for their turn when
    the time is up are cancelled, not counted as failures.
    """
    with serve_fake_openai(latency_s=SERVER_LATENCY_S) as server:
        started = time.monotonic()
        outcome = anyio.run(_saturate, server.base_url, duration_s)
        elapsed = time.monotonic() - started
        arrivals = [a.t for a in server.arrivals if started <= a.t < started + duration_s]
        answered = server.ok_answers()
    achieved_rpm = len(arrivals) / duration_s * 60
    latencies = outcome["latencies"]
    return {
        "duration_s": duration_s,
        "elapsed_s": round(elapsed, 2),
        "rpm_limit": RPM_LIMIT,
        "requests_in_run": len(arrivals),
        "achieved_rpm": round(achieved_rpm, 1),
        "achieved_fraction": round(achieved_rpm / RPM_LIMIT, 4),
        "completed_calls": len(latencies),
        "answered_by_server": answered,
        "failed_calls": len(outcome["failures"]),
        "first_failures": outcome["failures"][:3],
        "max_requests_in_any_60s": max_in_window(arrivals, 60.0),
        "max_requests_in_any_1s": max_in_window(arrivals, 1.0),
        "median_call_latency_s": round(statistics.median(latencies), 3) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to run")
    args = parser.parse_args()
    print(json.dumps(run_api_benchmark(args.duration), indent=2))


if __name__ == "__main__":
    main()
