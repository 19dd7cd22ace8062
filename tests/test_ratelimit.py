"""The shared client-side rate limiter: pacing, token windows, headers, caps and sharing."""

from __future__ import annotations

import itertools
import math

import anyio
import anyio.lowlevel
import pytest
from fakeserver import VLLM_INSTRUCT, VirtualClock, max_in_window, serve_fake_openai

from drpo.backends import ratelimit
from drpo.backends.base import ChatMessage, CompletionRequest
from drpo.backends.openai_api import OpenAIBackend
from drpo.backends.ratelimit import (
    DEFAULT_MAX_IN_FLIGHT,
    MIN_IN_FLIGHT,
    SYSTEM_CLOCK,
    RateLimiter,
    RateLimits,
    parse_reset,
    shared_limiter,
)


def limiter(clock: VirtualClock, **limits: float) -> RateLimiter:
    return RateLimiter(RateLimits(**limits), clock=clock)  # type: ignore[arg-type]


def max_tokens_in_window(grants: list[tuple[float, float]], window_s: float) -> float:
    """The most tokens started in any half-open window ``[t, t + window_s)``."""
    return max(sum(n for s, n in grants if t <= s < t + window_s) for t, _ in grants)


# --------------------------------------------------------------------------------------------
# Requests per window


def test_pacing_never_puts_more_than_the_limit_in_any_window() -> None:
    clock = VirtualClock()
    rl = limiter(clock, rpm=10, window_s=1.0, headroom=0.0)
    starts = [rl.reserve().start_s for _ in range(50)]  # a burst, all asking at once
    assert starts[0] == clock.now()  # the first goes at once
    assert all(b > a for a, b in itertools.pairwise(starts))
    assert max_in_window(starts, 1.0) == 10  # the first burst does not overfill a window


def test_a_steady_load_gets_at_least_95_percent_of_the_limit() -> None:
    clock = VirtualClock()
    rl = limiter(clock, rpm=600, window_s=60.0)  # default headroom
    starts = [rl.reserve().start_s for _ in range(2000)]
    per_minute = (len(starts) - 1) / (starts[-1] - starts[0]) * 60
    assert 0.95 * 600 <= per_minute <= 600
    assert max_in_window(starts, 60.0) <= 600


def test_quiet_time_does_not_bank_a_burst() -> None:
    clock = VirtualClock()
    rl = limiter(clock, rpm=10, window_s=1.0, headroom=0.0)
    early = [rl.reserve().start_s for _ in range(5)]
    clock.advance(100)
    late = [rl.reserve().start_s for _ in range(20)]
    assert late[0] == clock.now()
    assert max_in_window(early + late, 1.0) == 10
    assert min(b - a for a, b in itertools.pairwise(late)) == pytest.approx(0.1)


def test_no_request_limit_means_no_waiting() -> None:
    clock = VirtualClock()
    rl = limiter(clock)
    assert {rl.reserve().start_s for _ in range(100)} == {clock.now()}


# --------------------------------------------------------------------------------------------
# Tokens per window


def test_token_window_never_exceeds_the_limit() -> None:
    clock = VirtualClock()
    rl = limiter(clock, tpm=1000, window_s=1.0, headroom=0.0)
    sizes = [300, 450, 100, 700, 250, 50, 999, 10, 400, 600] * 3
    grants = [(rl.reserve(n).start_s, float(n)) for n in sizes]
    assert max_tokens_in_window(grants, 1.0) <= 1000
    assert grants[0][0] == clock.now() and grants[1][0] == clock.now()  # 750 fit at once


def test_reconciling_real_usage_frees_the_estimate() -> None:
    clock = VirtualClock()
    rl = limiter(clock, tpm=1000, window_s=1.0, headroom=0.0)
    first = rl.reserve(800)
    assert rl.reserve(400).start_s == pytest.approx(first.start_s + 1.0)  # had to wait
    clock.advance(5)
    again = rl.reserve(800)
    again.reconcile(100)  # the call used far less than max_tokens allowed
    assert rl.reserve(400).start_s == clock.now()


def test_a_request_larger_than_the_limit_waits_for_an_empty_window_not_forever() -> None:
    clock = VirtualClock()
    rl = limiter(clock, tpm=1000, window_s=1.0, headroom=0.0)
    small = rl.reserve(100)
    huge = rl.reserve(5000)
    assert huge.start_s == pytest.approx(small.start_s + 1.0)


# --------------------------------------------------------------------------------------------
# Learning from the server


def test_headers_lower_the_limits_but_never_raise_them() -> None:
    clock = VirtualClock()
    rl = limiter(clock, rpm=100, tpm=10_000)
    rl.observe_headers({"x-ratelimit-limit-requests": "5000", "x-ratelimit-limit-tokens": "1e9"})
    assert (rl.rpm, rl.tpm) == (100, 10_000)
    rl.observe_headers({"X-RateLimit-Limit-Requests": "40", "x-ratelimit-limit-tokens": "2000"})
    assert (rl.rpm, rl.tpm) == (40, 2000)


def test_headers_set_a_limit_when_none_was_configured() -> None:
    clock = VirtualClock()
    rl = limiter(clock)
    rl.observe_headers({"x-ratelimit-limit-requests": "60"})
    assert rl.rpm == 60
    first, second = rl.reserve(), rl.reserve()
    assert second.start_s - first.start_s >= 1.0  # 60 per minute: a second apart, at least


@pytest.mark.parametrize("kind", ["requests", "tokens"])
def test_nothing_remaining_holds_every_caller_until_the_reset(kind: str) -> None:
    clock = VirtualClock()
    rl = limiter(clock)
    rl.observe_headers({f"x-ratelimit-remaining-{kind}": "0", f"x-ratelimit-reset-{kind}": "1m30s"})
    assert rl.reserve().start_s == clock.now() + 90


def test_remaining_capacity_does_not_hold() -> None:
    clock = VirtualClock()
    rl = limiter(clock)
    rl.observe_headers({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "9s"})
    assert rl.reserve().start_s == clock.now()


def test_pause_holds_new_starts() -> None:
    clock = VirtualClock()
    rl = limiter(clock, rpm=60, window_s=1.0)
    rl.pause(150)
    assert rl.reserve().start_s == clock.now() + 150


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5)],
)
def test_reset_durations_parse(text: str, seconds: float) -> None:
    assert parse_reset(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "soon", "5 minutes", "1s later"])
def test_unreadable_reset_durations_are_ignored(text: str | None) -> None:
    assert parse_reset(text) is None


# --------------------------------------------------------------------------------------------
# Calls in flight and real time


@pytest.mark.anyio
async def test_calls_in_flight_are_capped() -> None:
    rl = RateLimiter(RateLimits(max_in_flight=3))
    inside = peak = 0

    async def call() -> None:
        nonlocal inside, peak
        async with rl.slot():
            inside += 1
            peak = max(peak, inside)
            await anyio.sleep(0.01)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(call)
    assert peak == 3


@pytest.mark.anyio
async def test_waiters_take_free_slots_in_order_and_a_cancelled_one_leaves_the_queue() -> None:
    rl = RateLimiter(RateLimits(max_in_flight=1))
    order: list[str] = []
    release = anyio.Event()

    async def holder() -> None:
        async with rl.slot():
            await release.wait()

    async def waiter(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            async with rl.slot():
                order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await anyio.wait_all_tasks_blocked()
        dropped = anyio.CancelScope()
        for name, scope in (("a", None), ("b", dropped), ("c", None)):
            tg.start_soon(waiter, name, scope)
            await anyio.wait_all_tasks_blocked()
        dropped.cancel()
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert order == ["a", "c"]
    assert rl._cap is not None and rl._cap.used == 0


@pytest.mark.anyio
async def test_a_slot_handed_to_a_cancelled_waiter_goes_on_to_the_next() -> None:
    rl = RateLimiter(RateLimits(max_in_flight=1))
    order: list[str] = []
    first = anyio.CancelScope()

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            async with rl.slot():
                await anyio.lowlevel.checkpoint()  # "first" is cancelled here, holding the slot
                order.append(name)

    async with anyio.create_task_group() as tg:
        async with rl.slot():
            tg.start_soon(waiter, "first", first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiter, "second", anyio.CancelScope())
            await anyio.wait_all_tasks_blocked()
        first.cancel()  # the slot was just handed to "first", which has not run yet
    assert order == ["second"]
    assert rl._cap is not None and rl._cap.used == 0


@pytest.mark.anyio
async def test_slots_start_no_earlier_than_the_pacing_allows() -> None:
    rl = RateLimiter(RateLimits(rpm=20, window_s=0.5))
    starts: list[float] = []
    early: list[float] = []

    async def call() -> None:
        async with rl.slot() as reservation:
            starts.append(reservation.start_s)
            early.append(reservation.start_s - SYSTEM_CLOCK.now())

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(call)
    assert len(starts) == 30
    assert max(early) <= 0  # nobody ran before its start time
    assert max_in_window(starts, 0.5) <= 20


@pytest.mark.network
@pytest.mark.anyio
async def test_the_server_never_sees_more_than_the_limit() -> None:
    """End to end: a server enforcing the same limit never has to refuse anything."""
    with serve_fake_openai(models={"m": VLLM_INSTRUCT}, rpm_limit=20, rpm_window_s=1.0) as srv:
        limits = RateLimits(rpm=20, window_s=1.0, headroom=0.1)  # jitter allowance
        async with OpenAIBackend("m", base_url=srv.base_url, limits=limits) as backend:
            async with anyio.create_task_group() as tg:
                for i in range(30):
                    request = CompletionRequest(
                        messages=(ChatMessage(role="user", content=f"q{i}"),)
                    )
                    tg.start_soon(backend.complete, request)
    assert srv.total == 30
    assert srv.rate_limited == 0
    assert srv.max_in_window(1.0) <= 20


@pytest.mark.network
@pytest.mark.anyio
async def test_the_backend_adapts_to_a_servers_limit_headers() -> None:
    """No limit configured: the server's headers set one, and its 429s are waited out."""
    with serve_fake_openai(
        models={"m": VLLM_INSTRUCT}, rpm_limit=10, rpm_window_s=0.5, ratelimit_headers=True
    ) as srv:
        # The server counts per 0.5 s, so 0.5 s is this test's "minute".
        backend = OpenAIBackend(
            "m",
            base_url=srv.base_url,
            limits=RateLimits(window_s=0.5),
            backoff_base_s=0.01,
            max_attempts=20,
        )
        async with backend:
            results = []

            async def call(i: int) -> None:
                request = CompletionRequest(prompt=f"q{i}")
                results.append(await backend.complete(request))

            async with anyio.create_task_group() as tg:
                for i in range(25):
                    tg.start_soon(call, i)
            learned = backend.limiter.rpm
    assert len(results) == 25
    assert learned == 10
    assert srv.ok_answers() == 25


# --------------------------------------------------------------------------------------------
# The in-flight cap follows the endpoint: Little's law under a guard


def test_without_a_request_limit_the_cap_is_the_guard() -> None:
    clock = VirtualClock()
    rl = limiter(clock)
    for _ in range(20):
        rl.observe_latency(0.2)
    assert rl.in_flight_cap == DEFAULT_MAX_IN_FLIGHT
    assert limiter(clock, max_in_flight=300).in_flight_cap == 300


def test_before_any_latency_is_seen_the_cap_is_the_guard() -> None:
    rl = limiter(VirtualClock(), rpm=6000, max_in_flight=500)
    assert rl.latency_estimate is None
    assert rl.in_flight_cap == 500


def test_the_cap_is_rate_times_latency_times_the_margin() -> None:
    # 6000 per minute at 2 % headroom is 98 requests/s; a steady 0.2 s latency has no deviation
    # left after enough samples, so the cap is ceil(2 * 98 * 0.2) = 40.
    rl = limiter(VirtualClock(), rpm=6000, max_in_flight=1000)
    for _ in range(200):
        rl.observe_latency(0.2)
    assert rl.latency_estimate == pytest.approx(0.2, rel=1e-6)
    assert rl.in_flight_cap == 40
    wider = limiter(VirtualClock(), rpm=6000, in_flight_margin=3.0)
    for _ in range(200):
        wider.observe_latency(0.2)
    assert wider.in_flight_cap == 59  # ceil(3 * 98 * 0.2)


def test_the_first_latency_counts_with_half_of_it_as_deviation() -> None:
    rl = limiter(VirtualClock(), rpm=6000)
    rl.observe_latency(0.1)  # RFC 6298: mean 0.1, deviation 0.05, so the bound is 0.3
    assert rl.latency_estimate == pytest.approx(0.3)
    assert rl.in_flight_cap == math.ceil(2 * 98 * 0.3)


def test_jittery_latency_raises_the_cap_and_it_settles_when_latency_does() -> None:
    rl = limiter(VirtualClock(), rpm=6000)
    for _ in range(200):
        rl.observe_latency(0.2)
    steady = rl.in_flight_cap
    for i in range(40):
        rl.observe_latency(0.1 if i % 2 else 0.5)  # same order of mean, much more spread
    assert rl.in_flight_cap > steady
    for _ in range(400):
        rl.observe_latency(0.2)
    assert rl.in_flight_cap == steady


def test_a_slower_endpoint_needs_more_calls_in_flight_up_to_the_guard() -> None:
    rl = limiter(VirtualClock(), rpm=6000, max_in_flight=100)
    for _ in range(200):
        rl.observe_latency(0.2)
    assert rl.in_flight_cap == 40
    for _ in range(200):
        rl.observe_latency(2.0)  # ten times slower: ten times the calls to hold the rate
    assert rl.in_flight_cap == 100  # ... but never above the guard


def test_a_small_request_limit_never_caps_below_the_floor() -> None:
    rl = limiter(VirtualClock(), rpm=6, max_in_flight=100)  # 0.1 requests/s
    for _ in range(50):
        rl.observe_latency(0.5)
    assert rl.in_flight_cap == MIN_IN_FLIGHT
    assert limiter(VirtualClock(), rpm=6, max_in_flight=2).in_flight_cap == 2  # guard wins


def test_a_learned_request_limit_sets_the_cap_too() -> None:
    rl = limiter(VirtualClock())
    for _ in range(200):
        rl.observe_latency(0.2)
    assert rl.in_flight_cap == DEFAULT_MAX_IN_FLIGHT
    rl.observe_headers({"x-ratelimit-limit-requests": "6000"})
    assert rl.in_flight_cap == 40


def test_unusable_latencies_are_ignored() -> None:
    rl = limiter(VirtualClock(), rpm=6000)
    for value in (-1.0, math.inf, math.nan):
        rl.observe_latency(value)
    assert rl.latency_estimate is None


def test_the_guard_stays_under_half_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit.resource, "getrlimit", lambda _which: (256, 4096))
    assert limiter(VirtualClock()).in_flight_cap == 128
    assert limiter(VirtualClock(), max_in_flight=50).in_flight_cap == 50


@pytest.mark.anyio
async def test_the_capacity_limiter_follows_the_derived_cap() -> None:
    clock = VirtualClock()
    rl = limiter(clock, rpm=6000, max_in_flight=1000)
    async with rl.slot():
        assert rl._cap is not None and rl._cap.total == 1000
        for _ in range(200):
            rl.observe_latency(0.2)
        assert rl._cap.total == 40


@pytest.mark.anyio
async def test_the_cap_shrinks_without_cutting_calls_already_in_flight() -> None:
    rl = RateLimiter(RateLimits(rpm=600_000, window_s=60.0, max_in_flight=8), clock=VirtualClock())
    inside = peak_after = 0
    shrunk = anyio.Event()

    async def call() -> None:
        nonlocal inside, peak_after
        async with rl.slot():
            inside += 1
            if shrunk.is_set():
                peak_after = max(peak_after, inside)
            await anyio.sleep(0.01)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(call)
        await anyio.sleep(0.005)  # eight in flight now
        for _ in range(50):
            rl.observe_latency(0.00003)  # 9800/s x 30 us x 2: the floor, 4
        assert rl.in_flight_cap == MIN_IN_FLIGHT
        shrunk.set()
        for _ in range(12):
            tg.start_soon(call)
    assert peak_after <= 8  # the eight already inside finished; new ones waited their turn


@pytest.mark.network
@pytest.mark.anyio
async def test_the_backend_reports_each_successful_attempts_latency() -> None:
    clock = VirtualClock()  # no virtual time passes during real I/O: every latency is 0
    with serve_fake_openai(models={"m": VLLM_INSTRUCT}) as srv:
        async with OpenAIBackend(
            "m", base_url=srv.base_url, limits=RateLimits(rpm=6000), clock=clock
        ) as backend:
            for i in range(3):
                await backend.complete(CompletionRequest(prompt=f"q{i}"))
            assert backend.limiter._latency_samples == 3
            assert backend.limiter.latency_estimate == 0.0
            assert backend.limiter.in_flight_cap == MIN_IN_FLIGHT


# --------------------------------------------------------------------------------------------
# Sharing


def test_one_limiter_per_endpoint_model_and_key() -> None:
    a = shared_limiter("http://h/v1", "m", "key-1", RateLimits(rpm=100))
    assert shared_limiter("http://h/v1/", "m", "key-1") is a
    assert shared_limiter("http://h/v1", "m", "key-2") is not a
    assert shared_limiter("http://h/v1", "other", "key-1") is not a
    assert shared_limiter("http://other/v1", "m", "key-1") is not a
    # A later caller can tighten the shared limits, never loosen them.
    shared_limiter("http://h/v1", "m", "key-1", RateLimits(rpm=1000, max_in_flight=8))
    assert a.limits.rpm == 100 and a.limits.max_in_flight == 8


def test_the_registry_never_holds_the_key() -> None:
    from drpo.backends import ratelimit

    limiter_ = shared_limiter("http://h/v1", "m", "sk-very-secret-key")
    keys = [key for key, value in ratelimit._registry.items() if value is limiter_]
    assert keys and "sk-very-secret-key" not in repr(keys)
