"""What one model call costs this process in CPU, from a bare HTTP loop up to drpo's full path.

Run: ``python benchmarks/callpath.py [--calls 3000] [--concurrency 64] [--rounds 3]
[--modes a,b,...] [--profile MODE]`` (``--help`` lists the modes).

The simulated model (``tests/sim_server_main.py``: the fake OpenAI server answering with
``tests/simulated_llm.respond``) runs in a process of its own with a fixed latency per call, so
its CPU is not charged to the client; its CPU time is measured too (from ``/proc`` via psutil)
and printed next to the client's, to show it is not what limits the numbers.

Three clients make the same chat request (a system prompt and a question, ~1.5 KB, like a
critic's or editor's call) against the same server:

* ``aiohttp``: a bare ``aiohttp.ClientSession.post`` loop that decodes the JSON reply: the
  floor for any Python client on this stack;
* ``sdk``: the bare official SDK, ``AsyncOpenAI.chat.completions.create`` (its retries off), on
  its default client (httpx2's transport), and ``sdk:aiohttp`` the same on its
  ``DefaultAioHttpClient``;
* ``drpo``: drpo's whole path for one call: a requester asks an agent-like handler over the
  ``Bus`` (request and reply envelopes), the handler calls through
  ``JournaledCaller.complete`` (the call journal, committed to SQLite before use) and
  ``OpenAIBackend`` (rate limiter, retry loop, response mapping), and a ``Recorder`` persists
  every bus envelope into the ``RunStore``.

``OpenAIBackend`` can post through two HTTP clients (``drpo.backends.openai_http``'s
``HttpClientKind``, chosen per endpoint with ``http_client`` under ``[endpoints]``): drpo's own
POST on aiohttp (``aiohttp``, the default) and the official SDK's client end to end
(``openai-sdk``). The backend and the full path run on each: ``backend:openai-sdk`` and
``drpo:openai-sdk`` name the SDK's. The report compares them layer by layer: CPU per call, its
spread over the rounds, the ratio to the default client and the difference. (Until commit
4e9a34c a fourth client, drpo's own asyncio HTTP/1.1 transport, was compared too; and until
issue 19 the SDK on httpx2's transport, which nothing could select.)

Measured, side by side in one run:

1. CPU microseconds per call for each client at ``--concurrency`` callers (``time.process_time``
   of this process, every thread included: aiosqlite's writer thread counts), and their ratios;
   the best of ``--rounds`` rounds (the least disturbed by other programs on a shared machine)
   and the spread of the rounds (worst minus best). Target: drpo <= 2x the bare SDK.
2. Calls/s of drpo's full path in one process at no RPM limit against a server with
   ``--latency`` (50 ms) of latency, with ``--callers`` (512) callers and the endpoint's default
   in-flight limit; target >= 1,000 calls/s. Client and server CPU utilisation are printed.

3. With ``--trace``: drpo's full path again with live tracing on (``drpo.tracing.live``: a
   follower process reads the run's committed rows and sends OTLP/HTTP to a sink on loopback,
   itself a process of its own): the added CPU per call in this process (target < 5 %), and the
   follower's own CPU per call (its start-up, measured on an empty run, taken off).

CPU time is the figure to trust on a busy machine (wall-clock rates also count other
programs), and the load average is printed before and after (the machine's other work shows
in the spread); ``--profile MODE`` writes a cProfile of one more round of that client to
``callpath-MODE.prof`` and prints its top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, get_args

import anyio

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import aiohttp  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

from drpo.agents.client import EVENTS, PROPOSE  # noqa: E402
from drpo.backends.base import ChatMessage, CompletionRequest  # noqa: E402
from drpo.backends.openai_api import (  # noqa: E402
    DEFAULT_HTTP_CLIENT,
    HttpClientKind,
    OpenAIBackend,
)
from drpo.backends.ratelimit import RateLimits  # noqa: E402
from drpo.bus import Bus, Envelope, loop  # noqa: E402
from drpo.domain.events import RunFinished, RunStarted  # noqa: E402
from drpo.domain.requests import Answer, ProposeAnswer  # noqa: E402
from drpo.jobs.session import quiet_collector  # noqa: E402
from drpo.runs.journal import JournaledCaller  # noqa: E402
from drpo.runs.recorder import recording  # noqa: E402
from drpo.runs.store import RunStore  # noqa: E402
from drpo.tracing.live import LiveTracer  # noqa: E402
from drpo.tracing.settings import TraceSettings  # noqa: E402

MODEL = "sim"
TOPIC = "agent.bench"
SYSTEM = (
    "You are a careful, honest assistant. Answer clearly and concisely, admit what you cannot "
    "know, and refuse harmful requests politely. "
) * 8
#: The three compared clients, and drpo's path layer by layer (each adds one to the one before).
MODES = ("aiohttp", "sdk", "drpo")
LAYERS = ("backend", "journal", "bus")
#: The HTTP clients OpenAIBackend can use; the layers measured on each one that is not drpo's
#: default are named "<layer>:<client>".
HTTP_CLIENTS: tuple[HttpClientKind, ...] = get_args(HttpClientKind)
OTHER_CLIENTS = tuple(kind for kind in HTTP_CLIENTS if kind != DEFAULT_HTTP_CLIENT)
COMPARED_LAYERS = ("backend", "drpo")
ORDER = (
    "aiohttp",
    "sdk",
    "sdk:aiohttp",
    "backend",
    *(f"backend:{kind}" for kind in OTHER_CLIENTS),
    "journal",
    "bus",
    "drpo",
    *(f"drpo:{kind}" for kind in OTHER_CLIENTS),
)
NOTES = {
    "aiohttp": "bare aiohttp.ClientSession.post loop",
    "sdk": "bare AsyncOpenAI.chat.completions.create",
    "sdk:aiohttp": "  the same on the SDK's DefaultAioHttpClient",
    "backend": f"drpo: OpenAIBackend.complete alone ({DEFAULT_HTTP_CLIENT})",
    "journal": "  + JournaledCaller (journal committed)",
    "bus": "  + Bus request/reply to a served handler",
    "drpo": f"  + Recorder: drpo's full path ({DEFAULT_HTTP_CLIENT})",
    **{f"backend:{kind}": f"  OpenAIBackend alone on {kind}" for kind in OTHER_CLIENTS},
    **{f"drpo:{kind}": f"  drpo's full path on {kind}" for kind in OTHER_CLIENTS},
}


def question(i: int) -> str:
    return f"Question {i}: how do I start running if I have never exercised before?"


def chat_request(i: int) -> CompletionRequest:
    return CompletionRequest(
        messages=(
            ChatMessage(role="system", content=SYSTEM),
            ChatMessage(role="user", content=question(i)),
        ),
        max_tokens=256,
    )


def chat_body(i: int) -> dict[str, Any]:
    """The JSON body the SDK and drpo send for ``chat_request(i)``."""
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question(i)},
        ],
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 256,
        "n": 1,
    }


# ------------------------------------------------------------------------------------ the server


@dataclass
class Server:
    base_url: str
    process: psutil.Process

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


@contextmanager
def sim_server(latency_s: float) -> Iterator[Server]:
    """``tests/sim_server_main.py`` as a process of its own; yields its URL and process."""
    proc = subprocess.Popen(
        [sys.executable, str(_ROOT / "tests" / "sim_server_main.py"), "--latency", str(latency_s)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("BASE_URL "):
            raise RuntimeError(f"the simulated server did not start: {line!r}")
        yield Server(line.split()[1], psutil.Process(proc.pid))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# ------------------------------------------------------------------------------------ clients

#: ``call(i)`` makes call number ``i`` and returns the reply text.
CallFn = Callable[[int], Awaitable[str]]


async def _drive(call: CallFn, calls: int, concurrency: int, first: int) -> None:
    """``calls`` calls numbered from ``first``, by ``concurrency`` callers taking the next."""
    next_index = first
    end = first + calls

    async def caller() -> None:
        nonlocal next_index
        while next_index < end:
            i = next_index
            next_index += 1
            text = await call(i)
            if not text:
                raise RuntimeError(f"call {i} got an empty reply")

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)


@dataclass
class Sample:
    mode: str
    calls: int
    wall_s: float
    #: This process's CPU, every thread (aiosqlite's writer thread included).
    cpu_s: float
    server_cpu_s: float
    #: The event loop thread's CPU alone: the one core a process is bound by.
    loop_cpu_s: float = 0.0

    @property
    def cpu_us_per_call(self) -> float:
        return self.cpu_s / self.calls * 1e6

    @property
    def capacity_per_s(self) -> float:
        """Calls/s the event loop thread could carry at 100 % of one core."""
        return self.calls / self.loop_cpu_s if self.loop_cpu_s else float("nan")

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall_s


async def _measure(
    mode: str,
    call: CallFn,
    server: Server,
    *,
    calls: int,
    concurrency: int,
    warmup: int,
    profile: cProfile.Profile | None,
) -> Sample:
    """Warm up (connections opened, caches filled), then time ``calls`` calls."""
    await _drive(call, warmup, concurrency, 0)
    server_cpu, cpu, wall = server.cpu_s(), time.process_time(), time.perf_counter()
    loop_cpu = time.thread_time()
    if profile is not None:
        profile.enable()
    try:
        await _drive(call, calls, concurrency, warmup)
    finally:
        if profile is not None:
            profile.disable()
    loop_cpu = time.thread_time() - loop_cpu
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    return Sample(mode, calls, wall, cpu, server.cpu_s() - server_cpu, loop_cpu)


async def run_aiohttp(server: Server, **options: Any) -> Sample:
    url = server.base_url + "/chat/completions"
    headers = {"authorization": "Bearer EMPTY"}
    connector = aiohttp.TCPConnector(limit=1000)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def call(i: int) -> str:
            async with client.post(url, json=chat_body(i), headers=headers) as response:
                response.raise_for_status()
                reply = await response.json()
            return str(reply["choices"][0]["message"]["content"])

        return await _measure("aiohttp", call, server, **options)


async def run_sdk(server: Server, *, aiohttp: bool = False, **options: Any) -> Sample:
    """The bare SDK on its default client (httpx2's transport), or on ``DefaultAioHttpClient``;
    the SDK's own connection limits either way (1,000 connections, more than the callers)."""
    http = openai.DefaultAioHttpClient() if aiohttp else openai.DefaultAsyncHttpxClient()
    client = openai.AsyncOpenAI(
        api_key="EMPTY", base_url=server.base_url, max_retries=0, http_client=http
    )
    async with client:

        async def call(i: int) -> str:
            completion = await client.chat.completions.create(**chat_body(i))
            return completion.choices[0].message.content or ""

        return await _measure("sdk:aiohttp" if aiohttp else "sdk", call, server, **options)


def _mode(layer: str, http: HttpClientKind) -> str:
    return layer if http == DEFAULT_HTTP_CLIENT else f"{layer}:{http}"


async def run_backend(
    server: Server, *, http: HttpClientKind = DEFAULT_HTTP_CLIENT, **options: Any
) -> Sample:
    """``OpenAIBackend.complete`` alone: limiter, retry loop, SDK, transport, reply mapping."""
    async with OpenAIBackend(MODEL, base_url=server.base_url, http=http) as backend:

        async def call(i: int) -> str:
            return (await backend.complete(chat_request(i))).text

        return await _measure(_mode("backend", http), call, server, **options)


async def run_drpo(
    server: Server,
    *,
    limits: RateLimits | None = None,
    bus_layer: bool = True,
    record: bool = True,
    mode: str | None = None,
    http: HttpClientKind = DEFAULT_HTTP_CLIENT,
    trace_url: str | None = None,
    **options: Any,
) -> Sample:
    """drpo's full path; ``bus_layer=False`` calls the journal directly, ``record=False``
    leaves the recorder out (the layers one by one, for the breakdown); ``http`` is the
    backend's HTTP client; ``trace_url``: traced live to that OTLP/HTTP URL (the requests go
    to the proposer's topic, between a run's start and end events, as in a real run)."""
    mode = mode or _mode("drpo", http)
    topic = PROPOSE.topic if trace_url else TOPIC
    # as drpo runs calls: inside a session's garbage-collector policy (drpo.jobs.session)
    with tempfile.TemporaryDirectory(prefix="drpo-callpath-") as folder, quiet_collector():
        async with RunStore.open(Path(folder) / "bench.db") as store:
            run_id = await store.create_run("bench")
            bus = Bus()
            bus.declare(EVENTS)
            tracer = None
            if trace_url is not None:
                tracer = LiveTracer(store.path, TraceSettings(enabled=True, endpoint=trace_url))
                await tracer.follow(run_id)
                await bus.emit(EVENTS, RunStarted(), sender="search", run_id=run_id)
            journal = JournaledCaller(store, run_id)
            backend = OpenAIBackend(MODEL, base_url=server.base_url, limits=limits, http=http)
            recorder = recording(bus, store) if record else nullcontext()
            async with backend, recorder, anyio.create_task_group() as tg:

                async def handle(envelope: Envelope) -> Answer:
                    message: ProposeAnswer = envelope.payload  # type: ignore[assignment]
                    index = int(message.query)
                    completion = await journal.complete(
                        backend, chat_request(index), role="proposer", node_id=envelope.node_id
                    )
                    return Answer(text=completion.text)

                ready = anyio.Event()
                tg.start_soon(
                    lambda: bus.serve(topic, handle, sender="agent", task_group=tg, ready=ready)
                )
                await ready.wait()

                async def call(i: int) -> str:
                    reply = await bus.request(
                        topic,
                        ProposeAnswer(model=MODEL, system_prompt="", query=str(i)),
                        sender="search",
                        run_id=run_id,
                        node_id=f"n{i}",
                    )
                    return reply.payload.text  # type: ignore[union-attr]

                async def call_journal(i: int) -> str:
                    completion = await journal.complete(
                        backend, chat_request(i), role="proposer", node_id=f"n{i}"
                    )
                    return completion.text

                sample = await _measure(
                    mode, call if bus_layer else call_journal, server, **options
                )
                if tracer is not None:
                    await bus.emit(
                        EVENTS, RunFinished(status="finished"), sender="search", run_id=run_id
                    )
                tg.cancel_scope.cancel()
            if tracer is not None:
                await tracer.aclose()
    return sample


async def run_journal(server: Server, **options: Any) -> Sample:
    """The backend through ``JournaledCaller`` (journal committed to SQLite), no bus."""
    return await run_drpo(server, bus_layer=False, record=False, mode="journal", **options)


async def run_bus(server: Server, **options: Any) -> Sample:
    """The journal behind a bus request/reply, without the recorder."""
    return await run_drpo(server, record=False, mode="bus", **options)


RUNNERS: dict[str, Callable[..., Awaitable[Sample]]] = {
    "aiohttp": run_aiohttp,
    "sdk": run_sdk,
    "sdk:aiohttp": partial(run_sdk, aiohttp=True),
    "backend": run_backend,
    "journal": run_journal,
    "bus": run_bus,
    "drpo": run_drpo,
    **{f"backend:{kind}": partial(run_backend, http=kind) for kind in OTHER_CLIENTS},
    **{f"drpo:{kind}": partial(run_drpo, http=kind) for kind in OTHER_CLIENTS},
}


# ------------------------------------------------------------------------------------ tracing

#: A collector that takes every OTLP/HTTP request and keeps nothing (a process of its own).
_SINK = """
import sys
from aiohttp import web
async def take(request):
    await request.read()
    return web.Response(status=200, content_type="application/x-protobuf", body=b"")
app = web.Application(client_max_size=256 * 2**20)
app.router.add_post("/v1/traces", take)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


@contextmanager
def trace_sink() -> Iterator[str]:
    """An OTLP/HTTP sink on loopback; yields its base URL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _SINK, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the trace sink did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def _children_cpu_s() -> float:
    """CPU of this process's finished (reaped) children: the tracing follower once it ended."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_tracing(server: Server, args: Any, options: dict[str, Any]) -> None:
    """drpo's full path without and with live tracing, interleaved; prints part 3."""
    plain: list[Sample] = []
    traced: list[tuple[Sample, float]] = []
    with trace_sink() as url:
        before = _children_cpu_s()
        loop.run(lambda: run_drpo(server, profile=None, trace_url=url, calls=0, concurrency=1,
                                   warmup=0))  # fmt: skip
        startup = _children_cpu_s() - before  # a follower that follows a run of no calls
        for round_ in range(args.rounds):
            plain.append(loop.run(lambda: run_drpo(server, profile=None, **options)))
            before = _children_cpu_s()
            sample = loop.run(lambda: run_drpo(server, profile=None, trace_url=url, **options))
            traced.append((sample, _children_cpu_s() - before))
            print(
                f"  round {round_ + 1} drpo {plain[-1].cpu_us_per_call:5.0f} us/call, traced "
                f"{sample.cpu_us_per_call:5.0f} us/call (+ follower {traced[-1][1]:.2f} s)",
                file=sys.stderr,
            )
    base = _best(plain)
    best, follower_s = min(traced, key=lambda item: item[0].cpu_s / item[0].calls)
    traced_calls = best.calls + options["warmup"]
    follower_us = max(0.0, follower_s - startup) / traced_calls * 1e6
    added = best.cpu_us_per_call / base.cpu_us_per_call - 1
    print(
        f"\nLive tracing (--trace), drpo full path, {args.calls} calls, {args.concurrency} callers, "
        f"best of {args.rounds} rounds:\n"
        f"  this process: {base.cpu_us_per_call:.0f} us/call untraced, "
        f"{best.cpu_us_per_call:.0f} us/call traced: {added:+.1%} (target < +5 %)\n"
        f"  the follower process (reads the store, builds 2 spans a call, OTLP to a sink): "
        f"{follower_us:.0f} us/call of its own CPU, after {startup:.2f} s to start"
    )


# ------------------------------------------------------------------------------------ report


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _profile_report(profile: cProfile.Profile, path: Path, top: int) -> str:
    profile.dump_stats(str(path))
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _load() -> str:
    """The load averages (1, 5, 15 min): how much else the machine was doing."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    _quiet_logs()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="modes: " + ", ".join(f"{mode} ({NOTES[mode].strip()})" for mode in ORDER),
    )
    parser.add_argument("--calls", type=int, default=3000, help="calls per round (3000)")
    parser.add_argument("--concurrency", type=int, default=64, help="callers in part 1 (64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client, best kept")
    parser.add_argument("--latency", type=float, default=0.05, help="server latency (0.05 s)")
    parser.add_argument("--callers", type=int, default=512, help="callers in part 2 (512)")
    parser.add_argument("--throughput-calls", type=int, default=10000, help="calls in part 2")
    parser.add_argument("--only", default="12", help="parts to run: 1, 2 or 12")
    parser.add_argument(
        "--modes", default=",".join(ORDER), help="clients in part 1 (default: all, in order)"
    )
    parser.add_argument("--profile", choices=ORDER, default=None, help="profile this client")
    parser.add_argument("--top", type=int, default=40, help="profile entries to print")
    parser.add_argument(
        "--trace", action="store_true", help="also part 3: the CPU live tracing adds per call"
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in RUNNERS]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {', '.join(ORDER)}")
    options = {"calls": args.calls, "concurrency": args.concurrency, "warmup": 300}
    rounds: dict[str, list[Sample]] = {}
    print(f"{os.cpu_count()} CPUs; load average {_load()} at the start", file=sys.stderr)
    with sim_server(args.latency) as server:
        if "1" in args.only:
            for round_ in range(args.rounds):
                for mode in modes:  # interleaved, so a noisy minute hits every client alike
                    sample = loop.run(
                        lambda m=mode: RUNNERS[m](server, profile=None, **options)  # type: ignore[misc]
                    )
                    print(
                        f"  round {round_ + 1} {mode:>14}: {sample.cpu_us_per_call:7.0f} us "
                        f"CPU/call  {sample.calls_per_s:7.0f} calls/s"
                        f"  server {sample.server_cpu_s / sample.wall_s:4.0%} CPU",
                        file=sys.stderr,
                    )
                    rounds.setdefault(mode, []).append(sample)
        throughput: Sample | None = None
        if "2" in args.only:
            throughput = loop.run(
                lambda: run_drpo(
                    server,
                    profile=None,
                    calls=args.throughput_calls,
                    concurrency=args.callers,
                    warmup=1000,
                )
            )
        profiled = ""
        if args.profile is not None:
            profile = cProfile.Profile()
            loop.run(
                lambda: RUNNERS[args.profile](server, profile=profile, **options)  # type: ignore[index]
            )
            name = args.profile.replace(":", "-")
            profiled = _profile_report(profile, Path(f"callpath-{name}.prof"), args.top)
        traced = io.StringIO()
        if args.trace:
            from contextlib import redirect_stdout

            with redirect_stdout(traced):
                measure_tracing(server, args, options)
    print(f"load average {_load()} at the end", file=sys.stderr)
    _print_report(rounds, throughput, args)
    print(traced.getvalue(), end="")
    if profiled:
        print(f"\ncProfile of one round of {args.profile} (by own time):")
        print(profiled)


def _best(samples: list[Sample]) -> Sample:
    return min(samples, key=lambda s: s.cpu_s / s.calls)


def _spread_us(samples: list[Sample]) -> float:
    """Worst minus best CPU per call over the rounds."""
    per_call = [s.cpu_us_per_call for s in samples]
    return max(per_call) - min(per_call)


def _print_report(rounds: dict[str, list[Sample]], throughput: Sample | None, args: Any) -> None:
    """Part 1 (best of the rounds, with their spread), the HTTP clients compared, part 2."""
    best = {mode: _best(samples) for mode, samples in rounds.items() if samples}
    print(
        f"\nCPU per call: {args.calls} chat calls, {args.concurrency} callers, "
        f"server latency {args.latency * 1000:.0f} ms (best of {args.rounds} rounds and the "
        "spread worst - best, process CPU time incl. threads)"
    )
    print(
        f"{'client':<20} {'CPU/call':>9} {'spread':>7} {'x aiohttp':>10} {'x sdk':>6} "
        f"{'calls/s':>8} {'server CPU':>11}"
    )
    base = best.get("aiohttp")
    sdk = best.get("sdk")
    for mode in ORDER:
        if mode not in best:
            continue
        s = best[mode]
        ratio_base = f"{s.cpu_s / s.calls / (base.cpu_s / base.calls):.2f}" if base else "-"
        ratio_sdk = f"{s.cpu_s / s.calls / (sdk.cpu_s / sdk.calls):.2f}" if sdk else "-"
        print(
            f"{mode:<20} {s.cpu_us_per_call:7.0f}us {_spread_us(rounds[mode]):5.0f}us "
            f"{ratio_base:>10} {ratio_sdk:>6} {s.calls_per_s:8.0f} "
            f"{s.server_cpu_s / s.wall_s:10.0%}  {NOTES.get(mode, '')}"
        )
    if "drpo" in best and sdk is not None:
        ratio = best["drpo"].cpu_us_per_call / sdk.cpu_us_per_call
        print(f"drpo full path / bare SDK CPU per call: {ratio:.2f}  (target <= 2.00)")
    _print_clients(best, rounds)
    if throughput is not None:
        t = throughput
        print(
            f"\nThroughput, drpo full path, no RPM limit, {args.callers} callers, "
            f"{args.latency * 1000:.0f} ms server latency, {t.calls} calls:\n"
            f"  measured {t.calls_per_s:,.0f} calls/s (target >= 1,000) with the client "
            f"process at {t.cpu_s / t.wall_s:.0%} CPU ({t.cpu_us_per_call:.0f} us/call, all "
            f"threads) and the server at {t.server_cpu_s / t.wall_s:.0%}\n"
            f"  the event loop thread used {t.loop_cpu_s / t.calls * 1e6:.0f} us of CPU per "
            f"call: one core carries {t.capacity_per_s:,.0f} calls/s (a busy machine's "
            "other programs take the rest of the wall clock)"
        )


def _print_clients(best: dict[str, Sample], rounds: dict[str, list[Sample]]) -> None:
    """Each compared layer on each HTTP client: CPU per call against the default client's."""
    lines = []
    for layer in COMPARED_LAYERS:
        default = best.get(layer)
        for kind in HTTP_CLIENTS:
            mode = _mode(layer, kind)
            if mode not in best or default is None:
                continue
            s = best[mode]
            lines.append(
                f"{layer:<8} {kind:<11} {s.cpu_us_per_call:7.0f}us "
                f"{_spread_us(rounds[mode]):5.0f}us "
                f"{s.cpu_us_per_call / default.cpu_us_per_call:10.2f} "
                f"{s.cpu_us_per_call - default.cpu_us_per_call:+8.0f}us"
            )
    if lines:
        print(
            f"\nHTTP clients of OpenAIBackend (default: {DEFAULT_HTTP_CLIENT}), best of the rounds:"
        )
        print(
            f"{'layer':<8} {'client':<11} {'CPU/call':>9} {'spread':>7} {'x default':>10} {'diff':>10}"
        )
        print("\n".join(lines))


if __name__ == "__main__":
    main()
