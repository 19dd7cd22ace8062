"""Client-side rate limits, shared by every caller of the same endpoint, model and key.

An API's limits belong to the key, not to one client object: fifty searches calling
``gpt-4o-mini`` with one key draw from one budget. So limiters live in a module-level registry
keyed by (base URL, model, sha256 of the key), and every ``OpenAIBackend`` for that triple gets
the same ``RateLimiter``.

How the limiter keeps "never more than the limit in any window" and still uses the limit:

* **Requests** are paced (GCRA with no burst allowance): each request gets a start time at least
  ``window / rpm`` after the previous one. Evenly spaced starts put at most ``rpm`` requests in
  any half-open window, including the first one after a quiet spell, because pacing never
  saves up credit. A steady load runs at ``(1 - headroom)`` of the limit; the small headroom
  absorbs the jitter between our start times and the server's arrival clock.
* **Tokens** use a sliding-window log: a request's estimated tokens (prompt chars / ``CHARS_PER_TOKEN``
  + max_tokens * n, :func:`~drpo.backends.openai_api.estimate_tokens`) are granted at the first time when the tokens started in the preceding window
  plus these fit, and the estimate is replaced by the real usage when the call returns.
* Start times are *reserved* in order under a plain lock and the caller then sleeps until its
  time, so the pacing state is loop-agnostic data and the limiter never holds a lock across an
  ``await``.
* **Calls in flight** are capped (``_InFlight``: a slot taken without a loop yield) *before*
  the start time is reserved, so a request that waited for a free slot cannot start late and
  bunch up with the ones behind it. The cap follows the endpoint (see "Calls in flight"
  below).
* ``x-ratelimit-*`` response headers can only lower the limits (never above the configured ones)
  and, when they say nothing is left, hold every caller until the reset time; so does a 429's
  ``Retry-After`` (``pause``).

``window_s`` is 60 in real use; tests shrink it so that "per minute" becomes "per second", and the
limits read from ``x-ratelimit-limit-*`` are taken to be per window as well.

Calls in flight
---------------

How many calls may wait on the server at once follows from Little's law: a rate of R requests
per second at a latency of L seconds keeps R * L calls in flight. A fixed cap is wrong both ways:
at 200 ms a cap of 64 holds a process to 320 calls/s however high the account's limit, and on a
slow endpoint with a small limit it lets far more calls pile up than the rate needs. So when a
request limit is known (configured, or learned from ``x-ratelimit-limit-requests``) the cap is

    ceil(in_flight_margin * R * L), at least MIN_IN_FLIGHT, at most max_in_flight

with R the paced rate and L a high estimate of one attempt's latency, kept like TCP's
retransmission timer (RFC 6298): a smoothed mean plus four mean deviations of the latencies the
backend reports (``observe_latency``), so ordinary jitter never makes the cap bind. The margin
(2 by default) leaves room for latency to grow before the next estimate catches up. With no
request limit, or before any latency is observed, the cap is ``max_in_flight``: the guard, which
only bounds local resources (sockets, memory); it is also kept under half the process's open-file
limit, so a cap can never make calls fail for want of file descriptors.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.lowlevel
from pydantic import BaseModel, ConfigDict, Field

try:
    import resource
except ImportError:  # Windows: no open-file limit to read
    resource = None  # type: ignore[assignment]

# --------------------------------------------------------------------------------------------
# Clocks


class Clock(Protocol):
    """Where the limiter and the retry loop get time from; tests inject a virtual one."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Wall-clock seconds since the epoch, only to read HTTP-date ``Retry-After`` headers."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks: ``time.monotonic`` for intervals and ``anyio.sleep`` to wait."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


# --------------------------------------------------------------------------------------------
# Settings

#: The default guard on calls in flight per endpoint, model and key. Measured: 50 searches at
#: 200 ms per call want ~350 calls in flight at their peaks (benchmarks/search.py scenario 4),
#: and one process serves ~1,000-1,500 calls/s (benchmarks/callpath.py), i.e. 200-300 in flight
#: at 200 ms and more at the multi-second latencies of long generations; 1024 leaves room for
#: both while bounding sockets and memory. The old fixed 64 capped a process at 320 calls/s.
DEFAULT_MAX_IN_FLIGHT = 1024
#: The derived cap never goes below this: pacing sets the rate, and a few calls in flight more
#: than Little's law asks cost nothing.
MIN_IN_FLIGHT = 4


class RateLimits(BaseModel):
    """The limits of one endpoint+model+key: requests and tokens per window, calls in flight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Requests per window (per minute with the default window); None for no request limit.
    rpm: float | None = Field(default=None, gt=0)
    #: Tokens (prompt + completion) per window; None for no token limit.
    tpm: float | None = Field(default=None, gt=0)
    #: The guard on calls waiting on the server at once; the cap in force is derived below it
    #: from the request rate and the observed latency when a request limit is known.
    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1)
    #: Calls in flight allowed over rate x latency (Little's law), as a factor.
    in_flight_margin: float = Field(default=2.0, ge=1.0)
    #: The window the limits count over: 60 s for real endpoints, shorter in tests.
    window_s: float = Field(default=60.0, gt=0)
    #: Fraction of each limit kept unused so jitter between our clock and the server's arrival
    #: times can never push a window over the limit.
    headroom: float = Field(default=0.02, ge=0, lt=1)

    def tightened(self, other: RateLimits) -> RateLimits:
        """The strictest of two configurations, for two callers sharing one key."""
        return RateLimits(
            rpm=_min_or_none(self.rpm, other.rpm),
            tpm=_min_or_none(self.tpm, other.tpm),
            max_in_flight=min(self.max_in_flight, other.max_in_flight),
            in_flight_margin=min(self.in_flight_margin, other.in_flight_margin),
            window_s=self.window_s,
            headroom=max(self.headroom, other.headroom),
        )


def _min_or_none(a: float | None, b: float | None) -> float | None:
    """None means unlimited, so it loses to any number."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


# --------------------------------------------------------------------------------------------
# Reading x-ratelimit-* headers

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_reset(text: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: ``"6m0s"``, ``"1.5s"``, ``"20ms"`` or ``"2"``."""
    if text is None:
        return None
    text = text.strip().lower()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------------------------
# The token window


@dataclass
class _TokenEntry:
    """Tokens granted at one start time; ``tokens`` is corrected to real usage afterwards."""

    start_s: float
    tokens: float


class _TokenWindow:
    """A sliding-window log of granted tokens: no window of ``window_s`` holds more than the cap.

    Entries are appended in non-decreasing start order (the limiter reserves in order), so the
    tokens that share a window with a new start ``t`` are exactly those started after
    ``t - window_s``.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._entries: deque[_TokenEntry] = deque()

    def prune(self, now: float) -> None:
        """Forget entries that no window reaching ``now`` or later can contain."""
        while self._entries and self._entries[0].start_s <= now - self.window_s:
            self._entries.popleft()

    def used_at(self, t: float) -> float:
        """Tokens started in the window that ends at ``t``."""
        return sum(e.tokens for e in self._entries if e.start_s > t - self.window_s)

    def earliest(self, tokens: float, not_before: float, capacity: float) -> float:
        """The first time at or after ``not_before`` when ``tokens`` more fit under ``capacity``.

        A request bigger than the whole capacity waits for an empty window rather than forever;
        the server then decides whether it is too large.
        """
        need = min(tokens, capacity)
        live = [e for e in self._entries if e.start_s > not_before - self.window_s]
        used = sum(e.tokens for e in live)
        if used + need <= capacity:
            return not_before
        for entry in live:
            used -= entry.tokens
            if used + need <= capacity:
                return max(not_before, entry.start_s + self.window_s)
        return max(not_before, live[-1].start_s + self.window_s) if live else not_before

    def add(self, start_s: float, tokens: float) -> _TokenEntry:
        entry = _TokenEntry(start_s, tokens)
        self._entries.append(entry)
        return entry


# --------------------------------------------------------------------------------------------
# The limiter


@dataclass
class Reservation:
    """One granted start; ``reconcile`` swaps the token estimate for what the call really used."""

    start_s: float
    estimated_tokens: int
    _entry: _TokenEntry | None = field(default=None, repr=False)
    _lock: threading.Lock | None = field(default=None, repr=False)

    def reconcile(self, actual_tokens: int) -> None:
        if self._entry is None or self._lock is None:
            return
        with self._lock:
            self._entry.tokens = max(0, actual_tokens)


class RateLimiter:
    """Requests-per-window pacing, a tokens-per-window log, and a cap on calls in flight.

    Use ``async with limiter.slot(estimated_tokens) as reservation:`` around exactly one HTTP
    attempt: the body starts no earlier than the limits allow, and at most ``in_flight_cap``
    bodies run at once (derived from the request rate and latency, at most ``max_in_flight``).
    """

    def __init__(self, limits: RateLimits | None = None, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._limits = limits or RateLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._server_rpm: float | None = None
        self._server_tpm: float | None = None
        self._next_request_s = -math.inf  # GCRA's theoretical arrival time
        self._last_start_s = -math.inf
        self._not_before_s = -math.inf  # held by a 429 Retry-After or an exhausted header
        self._tokens = _TokenWindow(self._limits.window_s)
        self._granted = 0
        # Latency of one attempt, smoothed as RFC 6298 smooths round-trip times.
        self._latency_mean: float | None = None
        self._latency_dev = 0.0
        self._latency_samples = 0
        self._guard = min(self._limits.max_in_flight, _file_descriptor_guard())
        self._in_flight_cap = self._derive_cap()
        # anyio primitives belong to one event loop; remember which one built the cap.
        self._cap_loop: anyio.lowlevel.EventLoopToken | None = None
        self._cap: _InFlight | None = None

    # ---- configuration ------------------------------------------------------------------

    @property
    def limits(self) -> RateLimits:
        return self._limits

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def rpm(self) -> float | None:
        """The request limit in force: the configured one, lowered by server headers."""
        return _min_or_none(self._limits.rpm, self._server_rpm)

    @property
    def tpm(self) -> float | None:
        """The token limit in force: the configured one, lowered by server headers."""
        return _min_or_none(self._limits.tpm, self._server_tpm)

    @property
    def granted(self) -> int:
        """Starts reserved so far (every attempt counts, retries included)."""
        return self._granted

    def tighten(self, limits: RateLimits) -> None:
        """Adopt the strictest of the current and the given limits (another caller joined)."""
        with self._lock:
            self._limits = self._limits.tightened(limits)
            self._guard = min(self._limits.max_in_flight, _file_descriptor_guard())
        self._update_cap()

    # ---- calls in flight ----------------------------------------------------------------

    @property
    def in_flight_cap(self) -> int:
        """Calls allowed in flight now: derived from rate and latency, under the guard."""
        return self._in_flight_cap

    @property
    def latency_estimate(self) -> float | None:
        """A high estimate of one attempt's latency (mean + 4 deviations); None before any."""
        if self._latency_mean is None:
            return None
        return self._latency_mean + 4 * self._latency_dev

    def observe_latency(self, seconds: float) -> None:
        """Learn from one successful attempt's latency (request sent to reply read)."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        with self._lock:
            mean = self._latency_mean
            if mean is None:  # RFC 6298 2.2: the first sample sets the mean, half of it the dev
                self._latency_mean, self._latency_dev = seconds, seconds / 2
            else:  # 2.3: beta = 1/4, alpha = 1/8
                self._latency_dev += (abs(mean - seconds) - self._latency_dev) / 4
                self._latency_mean = mean + (seconds - mean) / 8
            self._latency_samples += 1
        if self.rpm is not None:
            self._update_cap()  # with no request limit the cap is the guard, whatever latency

    def _derive_cap(self) -> int:
        """Little's law with a margin, between MIN_IN_FLIGHT and the guard."""
        guard = self._guard
        rpm = self.rpm
        latency = self.latency_estimate
        if rpm is None or latency is None:
            return guard
        rate = rpm * (1 - self._limits.headroom) / self._limits.window_s
        wanted = math.ceil(self._limits.in_flight_margin * rate * latency)
        return max(min(MIN_IN_FLIGHT, guard), min(wanted, guard))

    def _update_cap(self) -> None:
        cap = self._derive_cap()
        if cap == self._in_flight_cap:
            return
        self._in_flight_cap = cap
        if self._cap is not None and self._cap_loop == _current_loop_token():
            self._cap.set_total(cap)  # a larger cap lets waiting callers in at once

    def pause(self, seconds: float) -> None:
        """Start nothing new for ``seconds``: the server said the key is over its limit."""
        if seconds <= 0:
            return
        with self._lock:
            self._not_before_s = max(self._not_before_s, self._clock.now() + seconds)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn from ``x-ratelimit-*`` headers: lower limits, and hold when nothing remains."""
        lowered = {key.lower(): value for key, value in headers.items()}
        if not any(key.startswith("x-ratelimit-") for key in lowered):
            return  # most servers (vLLM, local ones) send none: nothing to lock or learn
        now = self._clock.now()
        rpm_before = self.rpm
        with self._lock:
            for kind in ("requests", "tokens"):
                limit = _header_number(lowered, f"x-ratelimit-limit-{kind}")
                if limit is not None and limit > 0:
                    if kind == "requests":
                        self._server_rpm = limit
                    else:
                        self._server_tpm = limit
                remaining = _header_number(lowered, f"x-ratelimit-remaining-{kind}")
                reset = parse_reset(lowered.get(f"x-ratelimit-reset-{kind}"))
                if remaining is not None and remaining <= 0 and reset:
                    self._not_before_s = max(self._not_before_s, now + reset)
        if self.rpm != rpm_before:
            self._update_cap()

    # ---- granting -----------------------------------------------------------------------

    def reserve(self, estimated_tokens: int = 0) -> Reservation:
        """Book the earliest start the limits allow, in order, and return it (no waiting)."""
        with self._lock:
            now = self._clock.now()
            start = max(now, self._not_before_s, self._last_start_s)
            rpm = self.rpm
            if rpm is not None:
                start = max(start, self._next_request_s)
            tpm = self.tpm
            entry = None
            if tpm is not None:
                self._tokens.prune(now)
                capacity = tpm * (1 - self._limits.headroom)
                start = self._tokens.earliest(estimated_tokens, start, capacity)
                entry = self._tokens.add(start, estimated_tokens)
            if rpm is not None:
                self._next_request_s = start + self._spacing(rpm)
            self._last_start_s = start
            self._granted += 1
            return Reservation(start, estimated_tokens, entry, self._lock if entry else None)

    def _spacing(self, rpm: float) -> float:
        """Seconds between starts; rounded up a hair so that float error in the running sum
        can never fit ``rpm + 1`` starts into one window even with zero headroom."""
        return self._limits.window_s / (rpm * (1 - self._limits.headroom)) * (1 + 1e-9)

    def _capacity(self) -> _InFlight:
        """The cap for the running event loop (a new loop, e.g. a new test, gets a new one)."""
        token = _current_loop_token()
        if self._cap is None or self._cap_loop != token:
            self._cap = _InFlight(self._in_flight_cap)
            self._cap_loop = token
        return self._cap

    def slot(self, estimated_tokens: int = 0) -> _Slot:
        """``async with limiter.slot(tokens) as reservation:`` waits for a free in-flight slot,
        then for this call's start time, then runs the body (one HTTP attempt)."""
        return _Slot(self, estimated_tokens)

    def __repr__(self) -> str:
        return (
            f"RateLimiter({self._limits!r}, rpm={self.rpm}, tpm={self.tpm}, "
            f"in_flight_cap={self._in_flight_cap})"
        )


def _current_loop_token() -> anyio.lowlevel.EventLoopToken | None:
    try:
        return anyio.lowlevel.current_token()
    except RuntimeError:  # no event loop here (a synchronous caller, a test)
        return None


def _file_descriptor_guard() -> int:
    """Half the process's open-file limit: each call in flight holds a socket, and the run store,
    logs and the rest need descriptors too."""
    if resource is None:
        return DEFAULT_MAX_IN_FLIGHT * 64
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return DEFAULT_MAX_IN_FLIGHT * 64
    return max(MIN_IN_FLIGHT, soft // 2)


class _InFlight:
    """A counting cap on calls in flight, first come first served.

    Why not anyio's ``CapacityLimiter``: its ``acquire`` yields to the event loop twice even when
    a slot is free (a cancellation checkpoint before, a shielded one after), about 9 us and two
    trips through a busy loop's ready queue per call. Here a free slot is taken without
    yielding; the attempt that follows awaits the network anyway, and cancellation is checked
    there. A waiter is handed its slot by the release that frees it, so late arrivals cannot
    overtake the queue. One event loop only (the limiter keeps one per loop).
    """

    __slots__ = ("_waiters", "total", "used")

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: deque[anyio.Event] = deque()

    async def acquire(self) -> None:
        if self.used < self.total and not self._waiters:
            self.used += 1
            return
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():  # handed a slot, but cancelled before taking it: pass it on
                self.release()
            else:
                self._waiters.remove(granted)
            raise

    def release(self) -> None:
        self.used -= 1
        self._grant()

    def set_total(self, total: int) -> None:
        """A new cap; a smaller one lets the calls inside finish, a larger one admits waiters."""
        self.total = total
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used < self.total:
            self.used += 1
            self._waiters.popleft().set()


class _Slot:
    """One attempt's place under the limits: an in-flight slot, then its start time."""

    __slots__ = ("_cap", "_limiter", "_tokens")

    def __init__(self, limiter: RateLimiter, estimated_tokens: int) -> None:
        self._limiter = limiter
        self._tokens = estimated_tokens
        self._cap: _InFlight | None = None

    async def __aenter__(self) -> Reservation:
        limiter = self._limiter
        cap = limiter._capacity()
        await cap.acquire()
        self._cap = cap
        try:
            reservation = limiter.reserve(self._tokens)
            delay = reservation.start_s - limiter.clock.now()
            if delay > 0:
                await limiter.clock.sleep(delay)
        except BaseException:
            self._cap = None
            cap.release()
            raise
        return reservation

    async def __aexit__(self, *exc_info: object) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


# --------------------------------------------------------------------------------------------
# The registry: one limiter per (base URL, model, key)

_registry: weakref.WeakValueDictionary[tuple[str, str, str, int], RateLimiter] = (
    weakref.WeakValueDictionary()
)
_registry_lock = threading.Lock()


def key_fingerprint(api_key: str) -> str:
    """A stable name for a key that does not reveal it (the registry never holds the key)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def shared_limiter(
    base_url: str,
    model: str,
    api_key: str,
    limits: RateLimits | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
) -> RateLimiter:
    """The limiter every caller of this endpoint, model and key shares.

    The first caller's limits create it; later callers that pass limits can only tighten them.
    A limiter lives as long as some backend holds it. Callers with an injected clock (tests) get
    limiters of their own clock, so virtual time never leaks into real callers.
    """
    key = (base_url.rstrip("/"), model, key_fingerprint(api_key), id(clock))
    with _registry_lock:
        limiter = _registry.get(key)
        if limiter is None:
            limiter = RateLimiter(limits, clock=clock)
            _registry[key] = limiter
        elif limits is not None:
            limiter.tighten(limits)
        return limiter
