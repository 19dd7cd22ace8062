"""The call journal: every model call of a run, written before anything uses its result.

This is what makes a run durable. A resumed run replays its search from the start; every call it
makes again is answered from the journal instead of the backend, so a run killed at any moment
resumes to the same result and pays for no call twice. That needs three things:

* **A content key** (:func:`content_key`) that names a call by what was asked (backend, endpoint,
  model, request), by where it was asked (its *place*: the agent role and the search node, such
  as ``editor@n3.1``), and by its ``sample_index``: how many identical requests were made at that
  place before. Asking the same thing twice at temperature 0.7 gives two samples, and a replay
  hands each node back its own samples whatever order the replies arrive in, because the index
  counts only within one place, whose requests are made in a fixed order.
* **Write before use.** A new call's journal entry is committed before ``complete`` returns.
* **Failures are not results.** A failed call is journaled with status ``error`` (for the record
  and the budget) and is made again on replay.

Budgets (``max_calls``, ``max_cost_usd``) cover the whole run: what the journal says was spent
before this caller started plus the new calls it makes; replayed answers are free. When a call
would go over budget, the caller first lets the calls already in flight finish and be journaled
(they were sent, so they are paid for), and only then raises :class:`BudgetExceeded`: the error
cancels the rest of the run, and a cancelled call's answer would be lost and bought again on
resume. The cost budget is checked before each call, so calls in flight when it is reached can
take the run somewhat past it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import anyio

from drpo.backends.base import Backend, Completion, CompletionRequest
from drpo.runs.store import CallRecord, RunStore

#: Part of every key, so that a future change of the key's recipe cannot match old entries.
KEY_FORMAT = "drpo.call/2"


class BudgetExceeded(Exception):
    """A run reached its call or cost budget; no new call was made."""

    def __init__(self, what: str, limit: float, spent: float, run_id: str) -> None:
        self.what, self.limit, self.spent, self.run_id = what, limit, spent, run_id
        unit = "$" if what == "cost" else ""
        super().__init__(
            f"run {run_id} reached its {what} budget ({unit}{spent:g} of {unit}{limit:g}); "
            "resume it with a larger budget to continue (recorded calls are replayed for free)"
        )


class JournaledCompletion(Completion):
    """A :class:`Completion` that says whether it came from the journal, and under which key."""

    replayed: bool = False
    journal_key: str = ""


_COMPLETION_FIELDS = frozenset(Completion.model_fields)


def _request_identity(
    backend_name: str, endpoint: str, model: str, request: CompletionRequest
) -> str:
    """Canonical JSON of what was asked, without the sample index.

    Fields left at their default are omitted, so adding a field with a default to
    ``CompletionRequest`` later does not change the keys of journals written before.
    """
    return json.dumps(
        {
            "format": KEY_FORMAT,
            "backend": backend_name,
            "endpoint": endpoint,
            "model": model,
            "request": request.model_dump(mode="json", exclude_defaults=True),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def _asked_at(identity: str, place: str) -> Any:
    """The hash of a request at its place, before the sample index: identical requests at one
    place share it (it counts them), and each key is it plus the index."""
    return hashlib.sha256(f"{identity}@{place}#".encode())


def _key_of(asked: Any, sample_index: int) -> str:
    key = asked.copy()
    key.update(str(sample_index).encode())
    return key.hexdigest()


def place_of(role: str, node_id: str | None) -> str:
    """Where in a run a call is made: its role at its search node (``critic@n2.0.1``)."""
    return f"{role}@{node_id or ''}"


def content_key(
    backend_name: str,
    endpoint: str,
    model: str,
    request: CompletionRequest,
    sample_index: int,
    place: str = "",
) -> str:
    """The journal key of a call: sha256 over canonical JSON of what was asked, where it was
    asked, and the index of this sample among identical requests at that place."""
    identity = _request_identity(backend_name, endpoint, model, request)
    return _key_of(_asked_at(identity, place), sample_index)


@dataclass(slots=True)
class RoleCounters:
    """Progress of one role in this caller: new calls, replayed answers, failures, spend."""

    calls: int = 0
    replayed: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0


class JournaledCaller:
    """Makes a run's model calls through the journal. Share one instance per run.

    Sample indices are counted per instance, and budgets are enforced per instance: every agent
    of a run should call through the same one.
    """

    def __init__(
        self,
        store: RunStore,
        run_id: str,
        *,
        max_calls: int | None = None,
        max_cost_usd: float | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.max_calls = max_calls
        self.max_cost_usd = max_cost_usd
        #: How many identical requests were made at each place: keyed by a digest of the
        #: request and its place (a request's identity is kilobytes; thousands are kept).
        self._asked: Counter[bytes] = Counter()
        self._loaded = False
        self._load_lock = anyio.Lock()
        self._replayable: set[str] = set()
        #: Spend of the run before this caller started (from the journal).
        self.prior_calls = 0
        self.prior_cost_usd = 0.0
        self._new_calls = 0  # started by this caller, including those still in flight
        self._new_cost_usd = 0.0
        self._in_flight = 0  # backend calls started and not yet journaled (or cancelled)
        self._idle: anyio.Event | None = None  # set when _in_flight drops back to 0
        #: The last budget refusal, if any: how a caller of the run tells a budget stop from a
        #: failure once the error has crossed the bus (where it arrives as a RemoteError).
        self.exhausted: BudgetExceeded | None = None
        self.counters: dict[str, RoleCounters] = {}

    # ---------------------------------------------------------------- state

    async def _load(self) -> None:
        """Read what the run already has: replayable keys and what was spent."""
        async with self._load_lock:
            if self._loaded:
                return
            self._replayable = await self.store.ok_call_keys(self.run_id)
            spent = (await self.store.run_totals(self.run_id)).total
            self.prior_calls, self.prior_cost_usd = spent.calls, spent.cost_usd
            self._loaded = True

    @property
    def calls_spent(self) -> int:
        """Backend calls charged to the run: before this caller, and by it (in flight included)."""
        return self.prior_calls + self._new_calls

    @property
    def cost_spent_usd(self) -> float:
        return self.prior_cost_usd + self._new_cost_usd

    def _counters(self, role: str) -> RoleCounters:
        counters = self.counters.get(role)
        if counters is None:
            counters = self.counters[role] = RoleCounters()
        return counters

    def totals(self) -> RoleCounters:
        """The sum of :attr:`counters` over roles."""
        total = RoleCounters()
        for counters in self.counters.values():
            for item in dataclass_fields(counters):
                setattr(total, item.name, getattr(total, item.name) + getattr(counters, item.name))
        return total

    def _over_budget(self) -> BudgetExceeded | None:
        if self.max_calls is not None and self.calls_spent >= self.max_calls:
            return BudgetExceeded("calls", self.max_calls, self.calls_spent, self.run_id)
        if self.max_cost_usd is not None and self.cost_spent_usd >= self.max_cost_usd:
            return BudgetExceeded("cost", self.max_cost_usd, self.cost_spent_usd, self.run_id)
        return None

    async def _check_budget(self) -> None:
        """Raise :class:`BudgetExceeded` if a new call would go over budget, but only once every
        call in flight has been journaled (one of them may also be cancelled, freeing room)."""
        while self._over_budget() is not None and self._in_flight:
            if self._idle is None or self._idle.is_set():
                self._idle = anyio.Event()
            await self._idle.wait()
        refused = self._over_budget()
        if refused is not None:
            self.exhausted = refused
            raise refused

    @property
    def in_flight(self) -> int:
        """Backend calls this caller has started and not yet journaled."""
        return self._in_flight

    def _call_ended(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    # ---------------------------------------------------------------- calling

    async def complete(
        self, backend: Backend, request: CompletionRequest, *, role: str, node_id: str | None = None
    ) -> JournaledCompletion:
        """Answer ``request`` from the journal if this run already made this call, else call
        ``backend`` and journal the result (committed) before returning it.

        Raises :class:`BudgetExceeded` instead of making a new call over budget, and re-raises
        the backend's error after journaling it.
        """
        # Numbered before the first await, among identical requests at the same place only.
        identity = _request_identity(backend.name, backend.endpoint, backend.model, request)
        place = place_of(role, node_id)
        asked = _asked_at(identity, place)
        digest = asked.digest()
        sample_index = self._asked[digest]
        self._asked[digest] += 1
        key = _key_of(asked, sample_index)

        if not self._loaded:
            await self._load()
        if key in self._replayable:
            record = await self.store.get_call(self.run_id, key)
            if record is not None and record.status == "ok" and record.response is not None:
                return await self._replay(record, role)

        await self._check_budget()
        self._new_calls += 1  # reserved now, so concurrent calls cannot overshoot max_calls
        self._in_flight += 1
        try:
            return await self._call(backend, request, role, node_id, key, sample_index)
        finally:
            self._call_ended()

    async def _call(
        self,
        backend: Backend,
        request: CompletionRequest,
        role: str,
        node_id: str | None,
        key: str,
        sample_index: int,
    ) -> JournaledCompletion:
        """Make a new call and journal it (the entry is committed before this returns)."""
        started = time.perf_counter()
        request_json = request.model_dump_json()
        base = {
            "run_id": self.run_id,
            "key": key,
            "role": role,
            "node_id": node_id,
            "backend": backend.name,
            "endpoint": backend.endpoint,
            "model": backend.model,
            "sample_index": sample_index,
            "request": request_json,
        }
        counters = self._counters(role)
        try:
            completion = await backend.complete(request)
        except anyio.get_cancelled_exc_class():
            self._new_calls -= 1  # never finished: not charged, and made again on resume
            raise
        except Exception as exc:
            counters.calls += 1
            counters.errors += 1
            with anyio.CancelScope(shield=True):
                await self.store.record_call(
                    CallRecord(
                        **base,
                        status="error",
                        error=f"{type(exc).__name__}: {exc}",
                        latency_s=time.perf_counter() - started,
                        attempts=int(getattr(exc, "attempts", 1) or 1),
                    )
                )
            raise
        usage = completion.usage
        self._new_cost_usd += completion.cost_usd
        counters.calls += 1
        counters.prompt_tokens += usage.prompt_tokens
        counters.completion_tokens += usage.completion_tokens
        counters.cached_tokens += usage.cached_tokens
        counters.cost_usd += completion.cost_usd
        response_json = completion.model_dump_json(include=set(_COMPLETION_FIELDS))
        # Once paid for, the result is written even if the caller is being cancelled: the store
        # commits a queued entry whether or not its caller still waits (no shield needed).
        await self.store.record_call(
            CallRecord(
                **base,
                status="ok",
                response=response_json,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                latency_s=completion.latency_s,
                attempts=completion.attempts,
                cost_usd=completion.cost_usd,
            )
        )
        fields = {name: getattr(completion, name) for name in _COMPLETION_FIELDS}
        return JournaledCompletion(**fields, replayed=False, journal_key=key)

    async def _replay(self, record: CallRecord, role: str) -> JournaledCompletion:
        assert record.response is not None
        self._counters(role).replayed += 1
        await self.store.mark_replayed(self.run_id, record.key)
        data: dict[str, Any] = json.loads(record.response)
        data.update(replayed=True, journal_key=record.key, latency_s=record.latency_s)
        return JournaledCompletion.model_validate(data)
