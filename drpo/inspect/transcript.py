"""A run's messages, in order, readable (``drpo runs log``), also while the run is being written.

Each message becomes one :class:`LogEntry`: where it sits (``seq``), when, who sent it to which
topic, its kind and node, and a one-line *gist* of what it says (query and answer excerpts,
scores, how many candidates...). ``--follow`` polls for messages after the last one shown until
the run reaches a terminal status and its closing ``RunFinished`` has been read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.text import Text

from drpo.agents.client import SERVICE_AGENTS
from drpo.bus.bus import FAILURES_TOPIC, REPLIES_TOPIC
from drpo.bus.envelope import Envelope, Failure
from drpo.domain.events import LevelCompleted, NodeCreated, Note, RunFinished, RunStarted
from drpo.domain.requests import (
    Answer,
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
from drpo.domain.values import Critique
from drpo.inspect.common import JSON_FORMAT, clock, excerpt, open_readonly, print_json_line
from drpo.runs.schema import TERMINAL_STATUSES
from drpo.runs.store import RunStore

#: How long ``--follow`` keeps reading after the run turned terminal without its RunFinished
#: showing up (a run killed hard, or a kind of run that publishes none).
FINISH_GRACE_S = 5.0


@dataclass(frozen=True)
class LogEntry:
    seq: int
    timestamp: float
    run_id: str | None
    sender: str
    topic: str
    kind: str
    node_id: str | None
    message_id: str
    correlation_id: str | None
    causation_id: str | None
    gist: str
    payload: dict[str, Any]

    @classmethod
    def of(cls, seq: int, envelope: Envelope) -> LogEntry:
        return cls(
            seq=seq,
            timestamp=envelope.timestamp,
            run_id=envelope.run_id,
            sender=envelope.sender,
            topic=envelope.topic,
            kind=envelope.payload.kind,
            node_id=envelope.node_id,
            message_id=envelope.message_id,
            correlation_id=envelope.correlation_id,
            causation_id=envelope.causation_id,
            gist=gist(envelope),
            payload=envelope.payload.model_dump(mode="json"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": JSON_FORMAT,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "run_id": self.run_id,
            "sender": self.sender,
            "topic": self.topic,
            "kind": self.kind,
            "node_id": self.node_id,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "gist": self.gist,
            "payload": self.payload,
        }


# ------------------------------------------------------------------------------------ gists


def _scores(critique: Critique) -> str:
    if critique.failed:
        return f"judgement failed: {excerpt(critique.error, 60)}"
    parts = ", ".join(f"{name} {s.score:g}" for name, s in critique.scores.items())
    return f"reward {critique.reward:.2f} ({parts})"


def gist(envelope: Envelope) -> str:
    """What a message says, in one line."""
    p = envelope.payload
    match p:
        case SelectAspects():
            return f"select aspects ({p.variant}) for query {excerpt(p.query, 60)!r}"
        case AspectsSelected():
            return f"aspects {', '.join(p.selection.aspects)}: {excerpt(p.selection.reasoning, 60)}"
        case ProposeAnswer():
            icl = f", {len(p.icl_examples)} ICL" if p.icl_examples else ""
            return (
                f"answer {excerpt(p.query, 50)!r} under prompt {excerpt(p.system_prompt, 50)!r}"
                f" ({p.model}{icl})"
            )
        case Answer():
            return f"{len(p.text)} chars: {excerpt(p.text, 90)!r}"
        case Judge():
            return (
                f"judge on {', '.join(p.selection.aspects) if p.selection else 'its aspects'}: "
                f"answer {excerpt(p.answer, 50)!r}"
                f" ({p.model}, {p.mode})"
            )
        case Judged():
            return _scores(p.critique)
        case EditPrompt():
            return (
                f"rewrite into {p.n} candidate(s) after {_scores(p.critique)}; "
                f"prompt {excerpt(p.system_prompt, 40)!r}"
            )
        case PromptCandidates():
            dropped = f", {p.dropped} unparsable dropped" if p.dropped else ""
            first = f": {excerpt(p.prompts[0], 50)!r}" if p.prompts else ""
            return f"{len(p.prompts)} candidate(s){dropped}{first}"
        case EditAnswer():
            return f"rewrite answer {excerpt(p.answer, 50)!r} after {_scores(p.critique)}"
        case AnswerRewritten():
            if p.answer is None:
                return f"no rewrite: {excerpt(p.error, 60)}"
            return f"rewritten answer {excerpt(p.answer, 80)!r}"
        case RunStarted():
            search = p.config.get("search", {}) if isinstance(p.config, dict) else {}
            shape = ", ".join(
                f"{key} {search[key]}"
                for key in ("beam_size", "n_actions", "depth")
                if key in search
            )
            return f"run started: {len(p.queries)} queries" + (f"; {shape}" if shape else "")
        case NodeCreated():
            flags = (" skipped" if p.skipped else "") + (
                " judge-failed" if p.critique.failed else ""
            )
            return (
                f"node {p.node_id} (level {p.level}, parent {p.parent_id or '-'}) "
                f"reward {p.reward:.2f} path {p.score:.2f}{flags}; prompt "
                f"{excerpt(p.system_prompt, 40)!r}"
            )
        case LevelCompleted():
            return (
                f"level {p.level} done: kept {', '.join(p.kept)}; pruned {len(p.pruned)}; "
                f"best {p.best_score:.3f}, mean {p.mean_score:.3f}; depth limit {p.depth_limit}"
            )
        case RunFinished():
            best = f", best {p.best_node_id} {p.best_score:.3f}" if p.best_score is not None else ""
            error = f": {excerpt(p.error, 80)}" if p.error else ""
            return f"run {p.status}{best}{error}"
        case Failure():
            return f"FAILED {p.error_type}: {excerpt(p.message, 100)}"
        case Note():
            return excerpt(p.text, 100)
    return p.kind  # a kind added later: still shown


def matches_agent(envelope: Envelope, agent: str) -> bool:
    """Messages an agent sent, and requests addressed to one of its services."""
    return envelope.sender == agent or SERVICE_AGENTS.get(envelope.topic) == agent


# ------------------------------------------------------------------------------------ reading


async def read_log(
    store: RunStore,
    run_id: str,
    *,
    node_id: str | None = None,
    agent: str | None = None,
    kinds: Sequence[str] | None = None,
    after_seq: int | None = None,
) -> AsyncIterator[LogEntry]:
    """The run's messages committed so far (after ``after_seq``), filtered, in order."""
    async for message in store.iter_messages(
        run_id, node_id=node_id, after_seq=after_seq, kinds=kinds or None
    ):
        if agent is not None and not matches_agent(message.envelope, agent):
            continue
        yield LogEntry.of(message.seq, message.envelope)


async def follow_log(
    store: RunStore,
    run_id: str,
    on_entry: Callable[[LogEntry], None],
    *,
    node_id: str | None = None,
    agent: str | None = None,
    kinds: Sequence[str] | None = None,
    interval: float = 0.5,
    grace: float = FINISH_GRACE_S,
) -> int:
    """Hand every message to ``on_entry`` as it is committed, until the run is over.

    "Over" means: the run's status is terminal *and* a ``RunFinished`` published after the
    run's last ``RunStarted`` has been read (the status is committed apart from the messages, so
    it may turn terminal a moment before the last messages land). A run that stays terminal
    for ``grace`` seconds without one is over too. Returns the number of entries handed over.
    """
    last = 0
    marker_seq = 0  # last run_started / run_finished read (unfiltered)
    started_seq = finished_seq = 0
    finished_status: str | None = None
    terminal_since: float | None = None
    shown = 0

    async def drain() -> None:
        nonlocal last, shown
        async for entry in read_log(
            store, run_id, node_id=node_id, agent=agent, kinds=kinds, after_seq=last
        ):
            last = entry.seq
            shown += 1
            on_entry(entry)

    while True:
        status = (await store.get_run(run_id)).status  # read *before* the messages
        await drain()
        async for message in store.iter_messages(
            run_id, after_seq=marker_seq, kinds=("run_started", "run_finished")
        ):
            marker_seq = message.seq
            payload = message.envelope.payload
            if isinstance(payload, RunStarted):
                started_seq = message.seq
            elif isinstance(payload, RunFinished):
                finished_seq, finished_status = message.seq, payload.status
        if status in TERMINAL_STATUSES:
            now = anyio.current_time()
            terminal_since = terminal_since if terminal_since is not None else now
            closed = finished_seq > started_seq and finished_status == status
            if closed or now - terminal_since >= grace:
                await drain()  # what was committed with (or just before) the RunFinished
                return shown
        else:
            terminal_since = None
        await anyio.sleep(interval)


# ------------------------------------------------------------------------------------ console

_SENDER_STYLE = {
    "search": "bold blue",
    "proposer": "magenta",
    "critic": "cyan",
    "editor": "green",
    "icl": "bold blue",
}


def entry_text(entry: LogEntry) -> Text:
    """``time #seq sender -> topic kind [node] gist`` as rich Text (never parsed as markup)."""
    line = Text()
    line.append(clock(entry.timestamp), style="dim")
    line.append(f" #{entry.seq:<6}", style="dim")
    line.append(entry.sender, style=_SENDER_STYLE.get(entry.sender, "bold"))
    line.append(" -> ", style="dim")
    if entry.topic == REPLIES_TOPIC:
        line.append("reply", style="dim")
    else:
        line.append(entry.topic, style="bold red" if entry.topic == FAILURES_TOPIC else "")
    line.append(f" {entry.kind}", style="bold red" if entry.kind == "failure" else "bold")
    if entry.node_id:
        line.append(f" [{entry.node_id}]", style="yellow")
    line.append("  ")
    line.append(entry.gist)
    return line


_FULL_FIELDS = ("query", "system_prompt", "answer", "text", "prompts", "message", "error")


def entry_block(entry: LogEntry) -> Text:
    """The line of :func:`entry_text` and, indented below it, the message's long texts."""
    block = entry_text(entry)
    payload = entry.payload
    for name in _FULL_FIELDS:
        value = payload.get(name)
        if not value:
            continue
        values = value if isinstance(value, list) else [value]
        for index, item in enumerate(values):
            suffix = f"[{index}]" if isinstance(value, list) else ""
            block.append(f"\n    {name}{suffix}: ", style="dim")
            block.append(str(item).replace("\n", "\n      "))
    critique = payload.get("critique")
    if isinstance(critique, dict):
        for name, verdict in (critique.get("scores") or {}).items():
            block.append(f"\n    {name} {verdict.get('score')}: ", style="dim")
            block.append(str(verdict.get("rationale", "")))
    return block


async def log_view(
    db: Path,
    run: str,
    console: Console,
    *,
    node_id: str | None = None,
    agent: str | None = None,
    kinds: Iterable[str] | None = None,
    follow: bool = False,
    as_json: bool = False,
    full: bool = False,
    interval: float = 0.5,
) -> None:
    kind_list = list(kinds) if kinds else None

    def show(entry: LogEntry) -> None:
        if as_json:
            print_json_line(console, entry.to_json())
        else:
            console.print(entry_block(entry) if full else entry_text(entry), soft_wrap=not full)

    async with open_readonly(db) as store:
        record = await store.get_run(run)
        if not as_json:
            console.print(
                Text(
                    f"run {record.run_id} ({record.kind}, {record.status})"
                    + (f" node {node_id}" if node_id else "")
                    + (f" agent {agent}" if agent else "")
                    + (" - following; Ctrl-C to stop" if follow else ""),
                    style="bold",
                )
            )
        if follow:
            await follow_log(
                store,
                record.run_id,
                show,
                node_id=node_id,
                agent=agent,
                kinds=kind_list,
                interval=interval,
            )
            return
        async for entry in read_log(
            store, record.run_id, node_id=node_id, agent=agent, kinds=kind_list
        ):
            show(entry)
