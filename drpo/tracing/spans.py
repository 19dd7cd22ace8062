"""The spans of a run, built from what the store records and nothing else.

One trace per run (its id derived from the run id). Each *attempt* of the run (its first start,
then every resume) is a root span, ``invoke_workflow drpo.<kind>``, and under it:

* a span per search level (``drpo.level L``: the beam kept and pruned, its scores), holding the
  level's node spans and the editor's rewrites of the previous level's beam (a rewrite is made
  at the parent node, and is what the level's candidates come from);
* a span per node (``drpo.node n2.0.1``: a prompt candidate, its reward, its aspect scores, kept
  or pruned), holding the agent calls made at it; nodes that are not search nodes (ICL examples,
  evaluation items, generated answers, held-out checks) are grouped the same way under the run;
* a span per agent call (``invoke_agent critic``: proposer answer, aspect selection, verdict,
  rewrite), from its request and reply on the bus;
* inside it, a GenAI client span per model call (``chat gpt-4o`` / ``text_completion smollm2``)
  from the call journal: one logical call with the backend's retries inside it (``drpo.attempts``),
  as the conventions ask. A call a resumed run answered from the journal is a span of its own with
  ``drpo.replayed = true`` and no ``gen_ai.usage.*``: it was not paid for again.

**Ids are derived** from the run id, the attempt, node ids, message ids and journal keys (never
random), so the same run built twice gives the same trace and span ids, and a collector that
already holds a span ignores it when it is sent again.

**The live trace and the export are the same spans.** :class:`TraceBuilder` is fed journal rows
and bus messages and returns each span once it is final, whatever the feeding: all at once (an
export) or a few rows at a time as they are committed (live). That rests on three facts of how
drpo records: a model call's journal entry is committed before its agent replies; a replay is
counted before the reply; messages are stored in publish order. So the builder decides
everything about an agent call when its reply arrives, from rows that are all there by then:

* the model calls *made* in it are the journal rows at its places (its role at its node, or the
  aspect selection's place of its query) last written inside its request-reply window; the first
  agent call to close claims a row;
* the calls it *replayed* are the rows that the agent call in the same slot (same role, place and
  order among the attempt's agent calls there) made in an earlier attempt, as many times as the
  journal counted replays.

What the store cannot tell is left out rather than guessed: a failed try that a resume made again
is overwritten in the journal by the later try, so an export shows only that later try (with
``drpo.tries``), while the live trace of the failed attempt had it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from yarl import URL

from drpo.agents.aspect_cache import selection_place
from drpo.agents.client import SERVICES, Service
from drpo.backends.kinds import ModelSpecError, parse_model_spec
from drpo.bus.bus import REPLIES_TOPIC
from drpo.bus.envelope import Envelope, Failure
from drpo.domain.events import LevelCompleted, NodeCreated, RunFinished, RunStarted
from drpo.domain.requests import (
    AnswerRewritten,
    AspectsSelected,
    EditAnswer,
    EditPrompt,
    Judge,
    Judged,
    PromptCandidates,
    ProposeAnswer,
    SelectAspects,
)
from drpo.runs.store import CallRecord, RunRecord, StoredMessage

AttributeValue = str | bool | int | float | tuple[str, ...] | tuple[float, ...] | tuple[int, ...]
SpanKind = Literal["internal", "client"]

_SEARCH_NODE = re.compile(r"^n(\d+)(?:\.\d+)*$")
_SERVICES_BY_TOPIC: dict[str, Service] = {service.topic: service for service in SERVICES}
#: ``gen_ai.provider.name`` of each backend kind: the well-known value where one applies (an
#: OpenAI-compatible server speaks OpenAI's API; ``server.address`` tells which), else our own.
PROVIDERS = {"openai": "openai", "local": "transformers"}


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span, independent of any tracing library (:mod:`drpo.tracing.otel` turns
    it into an OpenTelemetry span)."""

    trace_id: int
    span_id: int
    parent_id: int | None
    name: str
    kind: SpanKind
    start_ns: int
    end_ns: int
    attributes: dict[str, AttributeValue]
    #: The span's error description; None: the operation did not fail.
    error: str | None = None
    #: Spans of the same trace this one refers to (a replayed call: the call it replays).
    links: tuple[int, ...] = ()


# ------------------------------------------------------------------------------------ ids


def _digest(size: int, *parts: object) -> int:
    text = "\x1f".join(str(part) for part in parts)
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=size).digest(), "big")
    return value or 1  # an all-zero id is invalid in OpenTelemetry


def trace_id_of(run_id: str) -> int:
    """The run's trace id: 128 bits derived from its run id."""
    return _digest(16, "drpo.trace/1", run_id)


def span_id_of(run_id: str, *parts: object) -> int:
    return _digest(8, "drpo.span/1", run_id, *parts)


def _ns(timestamp: float) -> int:
    return round(timestamp * 1e9)


def search_level(node_id: str | None) -> int | None:
    """The level of a search node id (``n3.1.0`` is at level 3); None for other ids."""
    match = _SEARCH_NODE.match(node_id or "")
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------ state


@dataclass
class _Group:
    """A span being assembled: a level, a node, or an attempt's run span."""

    span_id: int
    start: float | None = None
    end: float | None = None

    def cover(self, start: float, end: float) -> None:
        self.start = start if self.start is None else min(self.start, start)
        self.end = end if self.end is None else max(self.end, end)


@dataclass
class _Node(_Group):
    node_id: str = ""
    level: int | None = None
    created: NodeCreated | None = None
    created_at: float | None = None
    status: str = "open"
    rank: int | None = None
    emitted: bool = False


@dataclass
class _Level(_Group):
    level: int = 0
    completed: LevelCompleted | None = None
    emitted: bool = False


@dataclass
class _AgentCall:
    span_id: int
    envelope: Envelope
    service: Service
    #: (role, journal place, order among the attempt's agent calls at that place).
    slots: list[tuple[str, str | None, int]]


@dataclass
class _Attempt:
    index: int
    start: float
    span: _Group
    started: RunStarted | None = None
    finished: RunFinished | None = None
    last: float = 0.0
    open_calls: dict[str, _AgentCall] = field(default_factory=dict)
    order: Counter[tuple[str, str | None]] = field(default_factory=Counter)
    nodes: dict[str, _Node] = field(default_factory=dict)
    levels: dict[int, _Level] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ builder


class TraceBuilder:
    """Builds a run's spans from journal rows (:meth:`add_calls`) and messages
    (:meth:`add_messages`, in store order), returning each span once, when it is final.

    Feed every journal row that a batch of messages can refer to before the messages (all of
    them, for an export; those committed before the messages were read, live), and call
    :meth:`finish` when no more will come: it closes what is still open (an attempt that was
    killed has no end event).
    """

    def __init__(self, run: RunRecord, *, content: bool = False) -> None:
        self.run = run
        self.content = content
        self.trace_id = trace_id_of(run.run_id)
        self._calls: dict[int, CallRecord] = {}
        self._by_place: dict[tuple[str, str | None], list[int]] = {}
        self._claimed: dict[int, int] = {}  # row id -> its tries when a span was made of it
        self._made_span: dict[int, int] = {}  # row id -> span id of the call that made it
        self._slot_rows: dict[tuple[str, str | None, int], list[int]] = {}
        self._replays_used: Counter[int] = Counter()
        self._attempts: list[_Attempt] = []
        self._seen_messages: set[str] = set()

    # ---------------------------------------------------------------- feeding

    def add_calls(self, calls: Iterable[CallRecord]) -> None:
        """Journal rows, new or written again (a later try, more replays): the last one wins."""
        for call in calls:
            assert call.id is not None, "journal rows come from the store, with their id"
            if call.id not in self._calls:
                self._by_place.setdefault((call.role, call.node_id), []).append(call.id)
            self._calls[call.id] = call

    def set_replay_counts(self, counts: Mapping[int, int]) -> None:
        """How often each row (by id) was answered from the journal, as the store says now."""
        for call_id, replayed in counts.items():
            call = self._calls.get(call_id)
            if call is not None and call.replayed != replayed:
                self._calls[call_id] = _with_replays(call, replayed)

    def add_messages(self, messages: Iterable[StoredMessage]) -> list[SpanRecord]:
        """Messages in store order; returns the spans they completed."""
        out: list[SpanRecord] = []
        for message in messages:
            envelope = message.envelope
            if envelope.message_id in self._seen_messages:
                continue
            self._seen_messages.add(envelope.message_id)
            self._on_message(envelope, out)
        return out

    def finish(self) -> list[SpanRecord]:
        """Close the last attempt if it has no end event; returns the spans that completes."""
        out: list[SpanRecord] = []
        if self._attempts and self._attempts[-1].finished is None:
            self._close_attempt(self._attempts[-1], None, out)
        return out

    # ---------------------------------------------------------------- messages

    def _on_message(self, envelope: Envelope, out: list[SpanRecord]) -> None:
        payload = envelope.payload
        if isinstance(payload, RunStarted):
            if self._attempts and self._attempts[-1].finished is None:
                self._close_attempt(self._attempts[-1], None, out)
            self._new_attempt(envelope.timestamp, payload)
            return
        attempt = self._current(envelope.timestamp)
        if attempt.finished is not None:
            return  # late replies to calls cancelled when the attempt ended: nothing to add
        attempt.last = max(attempt.last, envelope.timestamp)
        service = _SERVICES_BY_TOPIC.get(envelope.topic)
        if service is not None and isinstance(payload, service.request):
            self._open_call(attempt, envelope, service)
        elif envelope.topic == REPLIES_TOPIC and envelope.correlation_id in attempt.open_calls:
            call = attempt.open_calls.pop(envelope.correlation_id or "")
            self._close_call(attempt, call, envelope.timestamp, envelope, out)
        elif isinstance(payload, NodeCreated):
            self._node_created(attempt, envelope, payload, out)
        elif isinstance(payload, LevelCompleted):
            self._level_completed(attempt, envelope.timestamp, payload, out)
        elif isinstance(payload, RunFinished):
            attempt.finished = payload
            self._close_attempt(attempt, envelope.timestamp, out)

    def _new_attempt(self, timestamp: float, started: RunStarted | None) -> _Attempt:
        index = len(self._attempts)
        attempt = _Attempt(
            index=index,
            start=timestamp,
            span=_Group(span_id_of(self.run.run_id, "run", index), timestamp, timestamp),
            started=started,
            last=timestamp,
        )
        self._attempts.append(attempt)
        return attempt

    def _current(self, timestamp: float) -> _Attempt:
        """The attempt a message belongs to: the last one started (a reply that arrives after
        its attempt ended, to a call cancelled at the end, belongs to it too)."""
        if not self._attempts:
            return self._new_attempt(timestamp, None)  # messages with no RunStarted before them
        return self._attempts[-1]

    # ---------------------------------------------------------------- agent calls

    def _open_call(self, attempt: _Attempt, envelope: Envelope, service: Service) -> None:
        places = _places(service, envelope)
        slots = []
        for place in places:
            slots.append((*place, attempt.order[place]))
            attempt.order[place] += 1
        attempt.open_calls[envelope.message_id] = _AgentCall(
            span_id_of(self.run.run_id, "agent", envelope.message_id), envelope, service, slots
        )

    def _close_call(
        self,
        attempt: _Attempt,
        call: _AgentCall,
        end: float,
        reply: Envelope | None,
        out: list[SpanRecord],
    ) -> None:
        start = call.envelope.timestamp
        for slot in call.slots:
            self._claim_made(attempt, call, slot, start, end, out)
            if attempt.index > 0:
                self._claim_replayed(attempt, call, slot, start, out)
        parent = self._parent_of_call(attempt, call)
        parent.cover(start, end)
        out.append(self._agent_span(attempt, call, parent.span_id, end, reply))

    def _claim_made(
        self,
        attempt: _Attempt,
        call: _AgentCall,
        slot: tuple[str, str | None, int],
        start: float,
        end: float,
        out: list[SpanRecord],
    ) -> None:
        for row_id in self._by_place.get(slot[:2], ()):
            row = self._calls[row_id]
            if self._claimed.get(row_id) == row.tries or not start <= row.updated_at <= end:
                continue
            self._claimed[row_id] = row.tries
            rows = self._slot_rows.setdefault(slot, [])
            if row_id not in rows:
                rows.append(row_id)
            span = self._model_span(attempt, row, call.span_id, start)
            self._made_span[row_id] = span.span_id
            out.append(span)

    def _claim_replayed(
        self,
        attempt: _Attempt,
        call: _AgentCall,
        slot: tuple[str, str | None, int],
        start: float,
        out: list[SpanRecord],
    ) -> None:
        for row_id in self._slot_rows.get(slot, ()):
            row = self._calls[row_id]
            if (
                row.status != "ok"
                or row.updated_at >= attempt.start
                or self._replays_used[row_id] >= row.replayed
            ):
                continue
            self._replays_used[row_id] += 1
            out.append(self._replay_span(attempt, row, call.span_id, start))

    def _parent_of_call(self, attempt: _Attempt, call: _AgentCall) -> _Group:
        node_id = call.envelope.node_id
        if node_id is None or (call.service.request is SelectAspects and self._is_search()):
            return attempt.span
        level = search_level(node_id) if self._is_search() else None
        if level is not None and call.service.request is EditPrompt:
            return self._level(attempt, level + 1)  # the rewrite makes the next level's nodes
        return self._node(attempt, node_id)

    def _is_search(self) -> bool:
        return self.run.kind == "optimize"

    # ---------------------------------------------------------------- nodes and levels

    def _node(self, attempt: _Attempt, node_id: str) -> _Node:
        node = attempt.nodes.get(node_id)
        if node is None:
            level = search_level(node_id) if self._is_search() else None
            node = attempt.nodes[node_id] = _Node(
                span_id_of(self.run.run_id, "node", attempt.index, node_id),
                node_id=node_id,
                level=level,
            )
            if level is not None:
                self._level(attempt, level)  # the level exists once one of its nodes does
        return node

    def _level(self, attempt: _Attempt, level: int) -> _Level:
        found = attempt.levels.get(level)
        if found is None:
            found = attempt.levels[level] = _Level(
                span_id_of(self.run.run_id, "level", attempt.index, level), level=level
            )
        return found

    def _node_created(
        self, attempt: _Attempt, envelope: Envelope, event: NodeCreated, out: list[SpanRecord]
    ) -> None:
        node = self._node(attempt, event.node_id)
        node.created, node.created_at = event, envelope.timestamp
        node.cover(envelope.timestamp, envelope.timestamp)
        if event.parent_id is None:
            node.status = "root"
        if node.level == 0:  # the root is level 0 alone: it is complete once judged
            self._close_level(attempt, self._level(attempt, 0), envelope.timestamp, out)

    def _level_completed(
        self, attempt: _Attempt, timestamp: float, event: LevelCompleted, out: list[SpanRecord]
    ) -> None:
        level = self._level(attempt, event.level)
        level.completed = event
        for rank, node_id in enumerate(event.kept):
            if node_id in attempt.nodes:
                attempt.nodes[node_id].status, attempt.nodes[node_id].rank = "kept", rank
        for node_id in event.pruned:
            if node_id in attempt.nodes:
                attempt.nodes[node_id].status = "pruned"
        self._close_level(attempt, level, timestamp, out)

    def _close_level(
        self, attempt: _Attempt, level: _Level, end: float | None, out: list[SpanRecord]
    ) -> None:
        if level.emitted:
            return
        for node in attempt.nodes.values():
            if node.level == level.level and not node.emitted and node.start is not None:
                self._emit_node(attempt, node, level.span_id, out)
                level.cover(node.start, node.end or node.start)
        if level.start is None:
            return  # nothing happened at this level (the attempt ended before it)
        level.emitted = True
        if end is not None:
            level.cover(level.start, end)
        attempt.span.cover(level.start, level.end or level.start)
        out.append(self._level_span(attempt, level))

    def _emit_node(
        self, attempt: _Attempt, node: _Node, parent: int, out: list[SpanRecord]
    ) -> None:
        node.emitted = True
        out.append(self._node_span(attempt, node, parent))

    # ---------------------------------------------------------------- attempts

    def _close_attempt(self, attempt: _Attempt, end: float | None, out: list[SpanRecord]) -> None:
        """Close an attempt at its end event, or (killed: ``end`` None) at the last thing it
        recorded. Agent calls still open then (cancelled when the search ended, or cut off)
        end with it."""
        window_end = self._attempt_window_end(attempt)
        if end is None:
            last_row = max(
                (
                    row.updated_at
                    for row in self._calls.values()
                    if attempt.start <= row.updated_at < window_end
                ),
                default=attempt.last,
            )
            end = max(attempt.last, last_row)
        attempt.last = end
        for call in list(attempt.open_calls.values()):
            self._close_call(attempt, call, end, None, out)
        attempt.open_calls.clear()
        for row_id, row in sorted(self._calls.items()):
            if self._claimed.get(row_id) != row.tries and attempt.start <= row.updated_at <= end:
                self._claimed[row_id] = row.tries
                span = self._model_span(attempt, row, attempt.span.span_id, attempt.start)
                self._made_span[row_id] = span.span_id
                out.append(span)
        for level in sorted(attempt.levels.values(), key=lambda item: item.level):
            self._close_level(attempt, level, None, out)
        for node in attempt.nodes.values():
            if not node.emitted and node.start is not None:
                self._emit_node(attempt, node, attempt.span.span_id, out)
                attempt.span.cover(node.start, node.end or node.start)
        attempt.span.cover(attempt.start, end)
        out.append(self._run_span(attempt))

    def _attempt_window_end(self, attempt: _Attempt) -> float:
        later = [a.start for a in self._attempts if a.index > attempt.index]
        return min(later) if later else float("inf")

    # ---------------------------------------------------------------- span attributes

    def _base(self, attempt: _Attempt) -> dict[str, AttributeValue]:
        return {"drpo.run_id": self.run.run_id, "drpo.attempt": attempt.index}

    def _run_span(self, attempt: _Attempt) -> SpanRecord:
        kind = self.run.kind
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.workflow.name": f"drpo.{kind}",
            **self._base(attempt),
            "drpo.run_kind": kind,
            "drpo.resumed": attempt.index > 0,
        }
        if self.run.name:
            attributes["drpo.run_name"] = self.run.name
        settings = self.run.config.get("settings") if isinstance(self.run.config, dict) else None
        models = settings.get("models") if isinstance(settings, dict) else None
        if isinstance(models, dict):
            for role in ("base", "critic", "editor"):
                if isinstance(models.get(role), str):
                    attributes[f"drpo.models.{role}"] = models[role]
        finished = attempt.finished
        status = finished.status if finished is not None else "unfinished"
        attributes["drpo.status"] = status
        error = None
        if finished is not None:
            if finished.best_node_id:
                attributes["drpo.best_node_id"] = finished.best_node_id
            if finished.best_score is not None:
                attributes["drpo.best_score"] = finished.best_score
            if self.content and finished.best_prompt:
                attributes["drpo.best_prompt"] = finished.best_prompt
        if status != "finished":
            attributes["error.type"] = status
            error = (finished.error if finished is not None else None) or status
        span = attempt.span
        return SpanRecord(
            self.trace_id,
            span.span_id,
            None,
            f"invoke_workflow drpo.{kind}",
            "internal",
            _ns(span.start or attempt.start),
            _ns(span.end or attempt.last),
            attributes,
            error,
        )

    def _level_span(self, attempt: _Attempt, level: _Level) -> SpanRecord:
        attributes: dict[str, AttributeValue] = {**self._base(attempt), "drpo.level": level.level}
        event = level.completed
        if event is not None:
            attributes.update(
                {
                    "drpo.kept": tuple(event.kept),
                    "drpo.pruned": tuple(event.pruned),
                    "drpo.best_score": event.best_score,
                    "drpo.mean_score": event.mean_score,
                    "drpo.depth_limit": event.depth_limit,
                    "drpo.judged": event.judged,
                    "drpo.failed_judgements": event.failed_judgements,
                    "drpo.edits": event.edits,
                    "drpo.failed_edits": event.failed_edits,
                }
            )
        assert level.start is not None
        return SpanRecord(
            self.trace_id,
            level.span_id,
            attempt.span.span_id,
            f"drpo.level {level.level}",
            "internal",
            _ns(level.start),
            _ns(level.end or level.start),
            attributes,
        )

    def _node_span(self, attempt: _Attempt, node: _Node, parent: int) -> SpanRecord:
        attributes: dict[str, AttributeValue] = {
            **self._base(attempt),
            "drpo.node_id": node.node_id,
            "drpo.node_status": node.status,
        }
        if node.level is not None:
            attributes["drpo.level"] = node.level
        if node.status in ("kept", "pruned"):
            attributes["drpo.kept"] = node.status == "kept"
        if node.rank is not None:
            attributes["drpo.rank"] = node.rank
        event = node.created
        if event is not None:
            if event.parent_id:
                attributes["drpo.parent_node_id"] = event.parent_id
            attributes.update(
                {
                    "drpo.reward": event.reward,
                    "drpo.score": event.score,
                    "drpo.path_rewards": tuple(float(r) for r in event.path_rewards),
                    "drpo.skipped": event.skipped,
                    "drpo.judge_failed": event.critique.failed,
                    "drpo.aspects": tuple(event.critique.scores),
                    "drpo.aspect_scores": tuple(
                        float(s.score) for s in event.critique.scores.values()
                    ),
                }
            )
            if self.content:
                attributes["drpo.system_prompt"] = event.system_prompt
                attributes["drpo.query"] = event.query
                attributes["drpo.answer"] = event.answer
        assert node.start is not None
        return SpanRecord(
            self.trace_id,
            node.span_id,
            parent,
            f"drpo.node {node.node_id}",
            "internal",
            _ns(node.start),
            _ns(node.end or node.start),
            attributes,
        )

    def _agent_span(
        self,
        attempt: _Attempt,
        call: _AgentCall,
        parent: int,
        end: float,
        reply: Envelope | None,
    ) -> SpanRecord:
        request = call.envelope.payload
        agent = call.service.agent
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent,
            **_model_attributes(getattr(request, "model", None)),
            **self._base(attempt),
            "drpo.role": agent,
            "drpo.request": request.kind,
        }
        node_id = call.envelope.node_id
        if node_id is not None:
            attributes["drpo.node_id"] = node_id
            level = search_level(node_id) if self._is_search() else None
            if level is not None:
                attributes["drpo.level"] = level
        error = None
        answer = reply.payload if reply is not None else None
        if answer is None:
            attributes["drpo.outcome"] = "unfinished"
        elif isinstance(answer, Failure):
            attributes["error.type"] = answer.error_type
            error = answer.message
        else:
            attributes.update(_outcome(answer))
        if self.content:
            attributes.update(_agent_content(request, answer))
        return SpanRecord(
            self.trace_id,
            call.span_id,
            parent,
            f"invoke_agent {agent}",
            "internal",
            _ns(call.envelope.timestamp),
            _ns(end),
            attributes,
            error,
        )

    def _call_attributes(self, attempt: _Attempt, row: CallRecord) -> dict[str, AttributeValue]:
        request = _json(row.request) or {}
        chat = request.get("messages") is not None
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat" if chat else "text_completion",
            "gen_ai.provider.name": PROVIDERS.get(row.backend, row.backend),
            "gen_ai.request.model": row.model,
        }
        for key, name in (
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ):
            if isinstance(request.get(key), int | float):
                attributes[name] = float(request[key])
        if isinstance(request.get("max_tokens"), int):
            attributes["gen_ai.request.max_tokens"] = request["max_tokens"]
        if isinstance(request.get("seed"), int):
            attributes["gen_ai.request.seed"] = request["seed"]
        if isinstance(request.get("n"), int) and request["n"] != 1:
            attributes["gen_ai.request.choice.count"] = request["n"]
        if request.get("stop"):
            attributes["gen_ai.request.stop_sequences"] = tuple(str(s) for s in request["stop"])
        attributes.update(_server(row))
        attributes.update(
            {
                **self._base(attempt),
                "drpo.role": row.role,
                "drpo.journal_key": row.key,
                "drpo.sample_index": row.sample_index,
            }
        )
        if row.node_id is not None:
            attributes["drpo.place"] = row.node_id
        return attributes

    def _model_span(
        self, attempt: _Attempt, row: CallRecord, parent: int, not_before: float
    ) -> SpanRecord:
        attributes = self._call_attributes(attempt, row)
        response = _json(row.response) if row.response else None
        if isinstance(response, dict):
            if isinstance(response.get("model"), str):
                attributes["gen_ai.response.model"] = response["model"]
            choices = response.get("choices") or []
            attributes["gen_ai.response.finish_reasons"] = tuple(
                str(choice.get("finish_reason") or "") for choice in choices
            )
        attributes.update(
            {
                "gen_ai.usage.input_tokens": row.prompt_tokens,
                "gen_ai.usage.output_tokens": row.completion_tokens,
                "drpo.replayed": False,
                "drpo.attempts": row.attempts,
                "drpo.tries": row.tries,
                "drpo.cost_usd": row.cost_usd,
            }
        )
        if row.cached_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = row.cached_tokens
        error = None
        if row.status == "error":
            kind, _, message = (row.error or "").partition(": ")
            attributes["error.type"] = kind or "_OTHER"
            error = message or row.error or "the call failed"
        if self.content:
            attributes.update(_call_content(row.request, response))
        end = row.updated_at
        start = min(end, max(not_before, end - row.latency_s))
        span_id = span_id_of(self.run.run_id, "call", row.key, row.tries)
        return self._call_span(row, span_id, parent, (start, end), attributes, error)

    def _call_span(
        self,
        row: CallRecord,
        span_id: int,
        parent: int,
        window: tuple[float, float],
        attributes: dict[str, AttributeValue],
        error: str | None = None,
        links: tuple[int, ...] = (),
    ) -> SpanRecord:
        """A model call's span: named ``{operation} {model}``, a client span unless the model
        runs in this process."""
        return SpanRecord(
            self.trace_id,
            span_id,
            parent,
            f"{attributes['gen_ai.operation.name']} {row.model}",
            "internal" if row.backend == "local" else "client",
            _ns(window[0]),
            _ns(window[1]),
            attributes,
            error,
            links,
        )

    def _replay_span(
        self, attempt: _Attempt, row: CallRecord, parent: int, at: float
    ) -> SpanRecord:
        attributes = self._call_attributes(attempt, row)
        attributes["drpo.replayed"] = True
        response = _json(row.response) if row.response else None
        if self.content:
            attributes.update(_call_content(row.request, response))
        made = self._made_span.get(row.id or -1)
        span_id = span_id_of(self.run.run_id, "replay", row.key, attempt.index)
        links = (made,) if made is not None else ()
        return self._call_span(row, span_id, parent, (at, at), attributes, links=links)


# ------------------------------------------------------------------------------------ helpers


def _with_replays(call: CallRecord, replayed: int) -> CallRecord:
    from dataclasses import replace

    return replace(call, replayed=replayed)


def _places(service: Service, envelope: Envelope) -> list[tuple[str, str | None]]:
    """Where in the journal an agent call's model calls sit: its role at its node, and for a
    selection (or a verdict that selects its query's aspects itself) the selection's place."""
    request = envelope.payload
    role = service.agent
    if isinstance(request, SelectAspects):
        return [(role, selection_place(request.query, request.mode, request.variant))]
    places: list[tuple[str, str | None]] = [(role, envelope.node_id)]
    if isinstance(request, Judge) and request.selection is None:
        places.append((role, selection_place(request.query, request.mode, request.variant)))
    return places


def _model_attributes(spec: str | None) -> dict[str, AttributeValue]:
    if not spec:
        return {}
    try:
        parsed = parse_model_spec(spec)
    except ModelSpecError:
        return {"gen_ai.request.model": spec}
    return {
        "gen_ai.provider.name": PROVIDERS.get(parsed.kind, parsed.kind),
        "gen_ai.request.model": parsed.model,
        "drpo.model": spec,
    }


def _outcome(reply: Any) -> dict[str, AttributeValue]:
    if isinstance(reply, Judged):
        critique = reply.critique
        return {
            "drpo.reward": critique.effective_reward,
            "drpo.judge_failed": critique.failed,
            "drpo.aspects": tuple(critique.scores),
            "drpo.aspect_scores": tuple(float(s.score) for s in critique.scores.values()),
        }
    if isinstance(reply, AspectsSelected):
        return {"drpo.selected_aspects": tuple(reply.selection.aspects)}
    if isinstance(reply, PromptCandidates):
        return {"drpo.candidates": len(reply.prompts), "drpo.dropped": reply.dropped}
    if isinstance(reply, AnswerRewritten):
        return {"drpo.rewrite_failed": reply.answer is None}
    return {}


def _agent_content(request: Any, reply: Any) -> dict[str, AttributeValue]:
    """Prompt and answer text of an agent call (opt-in)."""
    attributes: dict[str, AttributeValue] = {}
    if isinstance(request, ProposeAnswer | EditPrompt):
        attributes["drpo.system_prompt"] = request.system_prompt
    if isinstance(request, ProposeAnswer | SelectAspects | Judge | EditPrompt | EditAnswer):
        attributes["drpo.query"] = request.query
    if isinstance(request, Judge | EditPrompt | EditAnswer):
        attributes["drpo.answer"] = request.answer
    if isinstance(reply, PromptCandidates):
        attributes["drpo.candidates_text"] = tuple(reply.prompts)
    elif isinstance(reply, AnswerRewritten) and reply.answer is not None:
        attributes["drpo.rewritten_answer"] = reply.answer
    elif isinstance(reply, Judged):
        attributes["drpo.rationales"] = tuple(s.rationale for s in reply.critique.scores.values())
    elif reply is not None and hasattr(reply, "text"):
        attributes["drpo.answer"] = reply.text
    return attributes


def _call_content(request_json: str, response: Any) -> dict[str, AttributeValue]:
    """``gen_ai.input.messages`` / ``gen_ai.output.messages`` (the conventions' JSON schemas,
    serialized to strings as they allow on spans)."""
    request = _json(request_json) or {}
    messages = request.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": request.get("prompt") or ""}]
    inputs = [
        {"role": m.get("role"), "parts": [{"type": "text", "content": m.get("content") or ""}]}
        for m in messages
    ]
    attributes: dict[str, AttributeValue] = {
        "gen_ai.input.messages": json.dumps(inputs, ensure_ascii=False)
    }
    if isinstance(response, dict):
        outputs = [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": choice.get("text") or ""}],
                "finish_reason": choice.get("finish_reason") or "",
            }
            for choice in response.get("choices") or []
        ]
        attributes["gen_ai.output.messages"] = json.dumps(outputs, ensure_ascii=False)
    return attributes


def _server(row: CallRecord) -> dict[str, AttributeValue]:
    """``server.address``/``server.port`` of an API endpoint (a local model has none)."""
    if row.backend == "local" or not row.endpoint:
        return {}
    try:
        url = URL(row.endpoint)
    except ValueError:
        return {}
    if not url.host:
        return {}
    attributes: dict[str, AttributeValue] = {"server.address": url.host}
    if url.port is not None:
        attributes["server.port"] = url.port
    return attributes


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def build_spans(
    run: RunRecord,
    messages: Sequence[StoredMessage],
    calls: Sequence[CallRecord],
    *,
    content: bool = False,
) -> list[SpanRecord]:
    """Every span of a run, from all of its messages and journal rows (an export)."""
    builder = TraceBuilder(run, content=content)
    builder.add_calls(calls)
    return builder.add_messages(messages) + builder.finish()
