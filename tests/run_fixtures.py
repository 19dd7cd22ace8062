"""Realistic recorded runs for the inspect tests, without a model.

A run is made the way ``drpo optimize`` makes one: the real :class:`~drpo.agents.search.BeamSearch`
publishes its requests on a real :class:`~drpo.bus.Bus`, the real :class:`~drpo.runs.Recorder`
persists every envelope into a real :class:`~drpo.runs.RunStore`, and scripted agents (proposer,
critic, editor) answer with deterministic, plausible text and write a journal entry for every
"model call" with :meth:`RunStore.record_call`, as the journaled caller would. So node ids, message
kinds, senders, topics and the call journal all have their real shapes.

Options make the runs the views must handle: a big run (``big_run_options()``: ~500 nodes and
~3,000 calls), a run that fails and is resumed (nodes published twice, replayed calls, a retried
call), a slow run for readers to follow while it is written, and hostile text (HTML, ``</script>``,
rich markup) in prompts, answers and rationales.

Also a script, so that another *process* can write a run while a test reads it::

    python tests/run_fixtures.py --db runs.db --run-id live1 --delay 0.01
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from drpo.agents import client
from drpo.agents.search import BeamSearch
from drpo.backends.base import ChatMessage, Choice, Completion, CompletionRequest, Usage
from drpo.bus import Bus, Envelope
from drpo.domain.events import RunFinished, RunStarted
from drpo.domain.requests import (
    Answer,
    AspectsSelected,
    EditPrompt,
    Judge,
    Judged,
    PromptCandidates,
    ProposeAnswer,
    SelectAspects,
)
from drpo.domain.values import AspectScore, AspectSelection, Critique
from drpo.jobs.config import build_config
from drpo.jobs.optimize import search_plan
from drpo.runs.recorder import Recorder
from drpo.runs.store import CallRecord, RunStore

ASPECTS = (
    "Helpfulness",
    "Clarity",
    "Factuality",
    "Depth",
    "Engagement",
    "Conciseness",
    "Safety",
    "Compliance",
    "Limitations",
    "Critical-Thinking",
    "Creativity",
    "Empathy",
)

GUIDELINES = (
    "State your assumptions before you answer, and say when a question is ambiguous.",
    "Refuse clearly and briefly when a request could cause harm, then offer a safe alternative.",
    "Prefer concrete examples over abstract advice.",
    "Keep answers as short as the question allows; use lists for steps.",
    "When you are not sure of a fact, say so instead of guessing.",
    "Cite the kind of source a claim comes from when it matters.",
    "Acknowledge the user's feelings when the topic is personal.",
    "End with a one-line summary when the answer is longer than a paragraph.",
    "Explain technical terms the first time you use them.",
    "Do not repeat the question back to the user.",
    "Check arithmetic step by step before giving a number.",
    "Point out limitations of your knowledge, such as your training cut-off.",
    "Ask one clarifying question when the request cannot be answered well without it.",
    "Structure long answers with short headings.",
)

HOSTILE = (
    "</script><script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    "[bold red]rich markup[/] & <b>html</b> \u2028 line-separator",
    '<!-- comment --><svg onload="window.__pwned = 3"></svg>',
)

TOPICS = (
    "how to make a sourdough starter",
    "the causes of the French Revolution",
    "how vaccines train the immune system",
    "writing a polite complaint to a landlord",
    "picking a lock without the key",
    "the difference between TCP and UDP",
    "how to budget on a small salary",
    "why the sky is blue",
    "how to comfort a friend after a loss",
    "the plot of Hamlet in three sentences",
    "building a birdhouse from scrap wood",
    "what a Fourier transform does",
    "synthesising a dangerous chemical at home",
    "how compound interest works",
    "learning a language as an adult",
)

CRITIC_MODEL = "openai:gpt-4o-mini"
BASE_MODEL = "local:smollm2"


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_queries(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    styles = ("Explain {}.", "Can you tell me about {}?", "I need help with {}.", "Teach me {}.")
    return [f"{rng.choice(styles).format(rng.choice(TOPICS))} (#{index})" for index in range(count)]


@dataclass
class FixtureRun:
    """What a fixture run holds, for the tests' expectations."""

    db: Path
    run_id: str
    status: str
    node_ids: list[str] = field(default_factory=list)
    calls: int = 0
    calls_by_role: dict[str, int] = field(default_factory=dict)
    error_calls: int = 0
    replayed: int = 0
    failed_once: bool = False
    #: Role of the call that failed the first pass (None when none did).
    failed_role: str | None = None
    seconds: float = 0.0


def _aspects_for(query: str) -> tuple[str, ...]:
    """The scripted critic's aspects for a query: a pure function of the query."""
    rng = _rng("aspects", query)
    chosen = tuple(rng.sample(ASPECTS, rng.randint(3, 5)))
    if "dangerous" in query or "lock" in query:
        chosen = ("Safety", *[a for a in chosen if a != "Safety"])[:5]
    return chosen


class ScriptedAgents:
    """Proposer, critic and editor answering from deterministic scripts, journaling each call."""

    def __init__(
        self,
        store: RunStore,
        run_id: str,
        *,
        delay: float = 0.0,
        hostile: bool = False,
        judge_per_aspect: bool = False,
        editor_fan_out: bool = False,
        fail_at_call: int | None = None,
        failed_judgement_rate: float = 0.03,
        reward_gain: float = 0.08,
    ) -> None:
        self.store = store
        self.reward_gain = reward_gain
        self.run_id = run_id
        self.delay = delay
        self.hostile = hostile
        self.judge_per_aspect = judge_per_aspect
        self.editor_fan_out = editor_fan_out
        self.fail_at_call = fail_at_call
        self.failed_judgement_rate = failed_judgement_rate
        self.calls = 0
        self.error_calls = 0
        self.replayed = 0
        self.calls_by_role: dict[str, int] = {}
        self.failed_role: str | None = None
        self._started = 0
        self._known: set[str] | None = None
        self._asked: dict[str, int] = {}

    # ------------------------------------------------------------ the "model calls"

    async def _call(
        self,
        role: str,
        model: str,
        node_id: str | None,
        messages: Sequence[tuple[str, str]],
        reply: str,
        *,
        temperature: float = 0.0,
    ) -> None:
        """One journaled model call: replayed when the journal has it, else "made" and written."""
        if self._known is None:
            self._known = await self.store.ok_call_keys(self.run_id)
        request = CompletionRequest(
            messages=tuple(ChatMessage(role=r, content=c) for r, c in messages),  # type: ignore[arg-type]
            temperature=temperature,
            max_tokens=1024,
        )
        backend, _, name = model.partition(":")
        identity = f"{backend}|{name}|{request.model_dump_json()}"
        index = self._asked.get(identity, 0)
        self._asked[identity] = index + 1
        key = hashlib.sha256(f"{identity}#{index}".encode()).hexdigest()
        if key in self._known:
            self.replayed += 1
            await self.store.mark_replayed(self.run_id, key)
            return
        if self.delay:
            await anyio.sleep(self.delay)
        rng = _rng(key)
        prompt_tokens = sum(len(c) for _, c in messages) // 4 + 12
        completion_tokens = len(reply) // 4 + 1
        cached = prompt_tokens // 2 if rng.random() < 0.3 else 0
        priced = backend == "openai"
        cost = (prompt_tokens * 0.15 + completion_tokens * 0.6) / 1e6 if priced else 0.0
        base = {
            "run_id": self.run_id,
            "key": key,
            "role": role,
            "node_id": node_id,
            "backend": backend,
            "endpoint": "https://api.openai.com/v1" if priced else "/models/smollm2.gguf",
            "model": name,
            "sample_index": index,
            "request": request.model_dump_json(),
        }
        self._started += 1
        if self.fail_at_call is not None and self._started == self.fail_at_call:
            with anyio.CancelScope(shield=True):  # as the journal does: a paid call is written
                await self.store.record_call(
                    CallRecord(
                        **base,
                        status="error",
                        error="TransientBackendError: 503 Service Unavailable after 4 attempts",
                        latency_s=12.5,
                        attempts=4,
                    )
                )
            self._count(role)
            self.error_calls += 1
            self.failed_role = role
            raise RuntimeError("TransientBackendError: 503 Service Unavailable after 4 attempts")
        completion = Completion(
            choices=(Choice(text=reply, finish_reason="stop"),),
            model=name,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached,
            ),
            latency_s=round(rng.uniform(0.2, 3.0), 3),
            attempts=1 if rng.random() < 0.9 else rng.randint(2, 3),
            cost_usd=cost,
        )
        with anyio.CancelScope(shield=True):
            await self.store.record_call(
                CallRecord(
                    **base,
                    status="ok",
                    response=completion.model_dump_json(),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cached_tokens=cached,
                    latency_s=completion.latency_s,
                    attempts=completion.attempts,
                    cost_usd=cost,
                )
            )
        self._count(role)

    def _count(self, role: str) -> None:
        """Count a call once its journal entry is committed (so counts match the journal)."""
        self.calls += 1
        self.calls_by_role[role] = self.calls_by_role.get(role, 0) + 1

    # ------------------------------------------------------------ the agents

    async def propose(self, msg: ProposeAnswer, env: Envelope) -> Answer:
        rng = _rng("answer", msg.system_prompt, msg.query)
        topic = msg.query.split("(#")[0].strip()
        sentences = [
            f"Here is what matters about this: {topic.lower()}",
            "First, it helps to separate the main idea from the details.",
            "A common mistake is to skip the basics and jump to the advanced part.",
            "For example, try a small version first and check what happens.",
            "If anything is unclear, ask and I will expand on that part.",
            "In short: start simple, check each step, and build from there.",
        ]
        text = " ".join(sentences[: rng.randint(3, 6)])
        if self.hostile and rng.random() < 0.5:
            text += " " + rng.choice(HOSTILE)
        await self._call(
            "proposer",
            BASE_MODEL,
            env.node_id,
            [("system", msg.system_prompt), ("user", msg.query)],
            text,
        )
        return Answer(text=text)

    async def select(self, msg: SelectAspects, env: Envelope) -> AspectsSelected:
        query = msg.query
        chosen = _aspects_for(query)
        reasoning = f"The query asks about {query[:40]!r}; these aspects matter most."
        selection = AspectSelection(
            query=query,
            aspects=chosen,
            reasoning=reasoning,
            analysis={a: f"{a} matters because the user needs it here." for a in chosen},
        )
        await self._call(
            "critic",
            CRITIC_MODEL,
            env.node_id,
            [("user", f"Select the aspects for: {query}")],
            json.dumps({"aspects": list(chosen), "reasoning": reasoning}),
        )
        return AspectsSelected(selection=selection)

    async def judge(self, msg: Judge, env: Envelope) -> Judged:
        rng = _rng("judge", msg.query, msg.answer, env.node_id)
        aspects = msg.selection.aspects if msg.selection else _aspects_for(msg.query)
        level = int(env.node_id[1:].split(".")[0]) if env.node_id else 0
        if rng.random() < self.failed_judgement_rate:
            critique = Critique(failed=True, error="the judge's reply had no parsable scores")
        else:
            scores = {}
            for aspect in aspects:
                base = 2.3 + min(level, 20) * self.reward_gain + rng.random() * 2.0
                score = float(max(1, min(5, round(base))))
                rationale = f"{aspect}: the answer is {'good' if score >= 4 else 'weak'} here."
                if self.hostile and rng.random() < 0.3:
                    rationale += " " + rng.choice(HOSTILE)
                scores[aspect] = AspectScore(score=score, rationale=rationale)
            critique = Critique.from_scores(scores)
        replies = (
            [(a, json.dumps({"aspect": a})) for a in aspects]
            if self.judge_per_aspect
            else [("all", critique.model_dump_json())]
        )
        for aspect, reply in replies:
            await self._call(
                "critic",
                CRITIC_MODEL,
                env.node_id,
                [("user", f"Judge {aspect} of: {msg.answer[:200]}\nfor query {msg.query}")],
                reply,
            )
        return Judged(critique=critique)

    async def edit(self, msg: EditPrompt, env: Envelope) -> PromptCandidates:
        prompts = []
        for index in range(msg.n):
            rng = _rng("edit", msg.system_prompt, msg.query, index)
            lines = msg.system_prompt.split("\n")
            unused = [g for g in GUIDELINES if g not in lines]
            if unused:
                lines.insert(rng.randint(1, len(lines)), rng.choice(unused))
            if len(lines) > 8 or (len(lines) > 3 and rng.random() < 0.25):
                del lines[rng.randint(1, len(lines) - 1)]
            if rng.random() < 0.3:
                lines[0] = rng.choice(
                    (
                        "You are a helpful, honest and careful assistant.",
                        "You are a knowledgeable assistant who explains things plainly.",
                        "You are a helpful assistant.",
                        "You are a friendly expert assistant.",
                    )
                )
            if self.hostile and index == 0:
                lines.append(HOSTILE[rng.randrange(len(HOSTILE))])
            prompts.append("\n".join(lines))
        request = [
            ("system", "You improve system prompts."),
            ("user", f"Prompt:\n{msg.system_prompt}\nQuery: {msg.query}\nAnswer: {msg.answer}"),
        ]
        if self.editor_fan_out:
            for index, prompt in enumerate(prompts):
                await self._call(
                    "editor",
                    CRITIC_MODEL,
                    env.node_id,
                    [*request, ("user", f"candidate {index}")],
                    prompt,
                    temperature=msg.temperature,
                )
        else:
            await self._call(
                "editor",
                CRITIC_MODEL,
                env.node_id,
                request,
                json.dumps(prompts),
                temperature=msg.temperature,
            )
        return PromptCandidates(prompts=tuple(prompts))

    async def serve(self, bus: Bus, tg: anyio.abc.TaskGroup) -> None:
        await client.serve(bus, client.PROPOSE, self.propose, tg)
        await client.serve(bus, client.SELECT_ASPECTS, self.select, tg)
        await client.serve(bus, client.JUDGE, self.judge, tg)
        await client.serve(bus, client.EDIT_PROMPT, self.edit, tg)


def big_run_options() -> dict[str, Any]:
    """About 500 nodes and 3,000 calls: beam 5, 5 rewrites, 21 levels, a per-aspect judge and
    an editor that makes one call per candidate."""
    return {
        "beam": 5,
        "actions": 5,
        "depth": 22,
        "depth_extension": 0,
        "judge_per_aspect": True,
        "editor_fan_out": True,
        "failed_judgement_rate": 0.0,
        "reward_gain": 0.01,
    }


async def _one_pass(
    store: RunStore,
    run_id: str,
    config: Any,
    queries: list[str],
    agents: ScriptedAgents,
) -> tuple[str, Any]:
    """One process's worth of a run: bus, recorder, agents, search; records how it ended."""
    bus = Bus()
    bus.declare(client.EVENTS)
    recorder = Recorder(bus, store)

    async def no_examples(query: str) -> list:
        return []

    status, result, error = "failed", None, None
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        await agents.serve(bus, tg)
        await store.set_run_status(run_id, "running")
        await bus.emit(
            client.EVENTS,
            RunStarted(config=config.model_dump(mode="json"), queries=tuple(queries)),
            sender="search",
            run_id=run_id,
        )
        try:
            result = await BeamSearch(bus, run_id, search_plan(config), queries, no_examples).run()
            status = "finished"
        except BaseException as exc:  # a failed call fails the search, as in drpo optimize
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            error = f"{type(exc).__name__}: {exc}"
        await bus.emit(
            client.EVENTS,
            RunFinished(
                status=status,  # type: ignore[arg-type]
                best_node_id=result.best.node_id if result else None,
                best_prompt=result.best.system_prompt if result else None,
                best_score=result.best_score if result else None,
                error=error,
            ),
            sender="search",
            run_id=run_id,
        )
        await recorder.drain()
        summary = None
        if result is not None:
            summary = {
                "best_prompt": result.best.system_prompt,
                "best_score": result.best_score,
                "best_node_id": result.best.node_id,
                "levels": result.levels,
            }
        await store.set_run_status(run_id, status, result=summary, error=error)
        tg.cancel_scope.cancel()
    return status, result


async def record_run(
    store: RunStore,
    *,
    run_id: str | None = None,
    name: str | None = "fixture",
    beam: int = 2,
    actions: int = 3,
    depth: int = 4,
    depth_extension: int = 1,
    seed: int = 0,
    delay: float = 0.0,
    hostile: bool = False,
    judge_per_aspect: bool = False,
    editor_fan_out: bool = False,
    failed_judgement_rate: float = 0.03,
    reward_gain: float = 0.08,
    fail_at_call: int | None = None,
    resume: bool = True,
) -> FixtureRun:
    """Record one optimize run into ``store`` (opened for writing); see the module docstring.

    ``fail_at_call``: that call fails, which fails the run (status ``failed``, a Failure reply
    in the log, an ``error`` journal entry); with ``resume`` the run is then resumed to the end,
    as ``drpo resume`` would: nodes are published again and recorded calls are replayed.
    """
    started = time.perf_counter()
    config = build_config(
        overrides={
            "preset": "paper",
            "name": name,
            "models": {"base": BASE_MODEL, "critic": CRITIC_MODEL, "editor": CRITIC_MODEL},
            "search": {
                "beam_size": beam,
                "n_actions": actions,
                "depth": depth,
                "depth_extension": depth_extension,
                "num_train_queries": depth + depth_extension + 1,
                "seed": seed,
            },
            "proposer": {"k": 0},
        }
    )
    queries = make_queries(depth + depth_extension + 1, seed)
    record = {"settings": config.model_dump(mode="json"), "queries": queries, "icl_examples": []}
    run_id = await store.create_run("optimize", record, name=name, run_id=run_id)
    options = {
        "delay": delay,
        "hostile": hostile,
        "judge_per_aspect": judge_per_aspect,
        "editor_fan_out": editor_fan_out,
        "failed_judgement_rate": failed_judgement_rate,
        "reward_gain": reward_gain,
    }
    agents = ScriptedAgents(store, run_id, fail_at_call=fail_at_call, **options)
    status, _ = await _one_pass(store, run_id, config, queries, agents)
    calls, errors, replayed = agents.calls, agents.error_calls, 0
    by_role = dict(agents.calls_by_role)
    failed_once = status == "failed"
    if failed_once and resume:
        again = ScriptedAgents(store, run_id, **options)  # a fresh process: a new journal view
        status, _ = await _one_pass(store, run_id, config, queries, again)
        calls += again.calls
        replayed = again.replayed
        for role, count in again.calls_by_role.items():
            by_role[role] = by_role.get(role, 0) + count
    node_ids = []
    async for message in store.iter_messages(run_id, kinds=["node_created"]):
        if message.envelope.payload.node_id not in node_ids:
            node_ids.append(message.envelope.payload.node_id)
    return FixtureRun(
        db=store.path,
        run_id=run_id,
        status=status,
        node_ids=node_ids,
        calls=calls,
        calls_by_role=by_role,
        error_calls=errors,
        replayed=replayed,
        failed_once=failed_once,
        failed_role=agents.failed_role,
        seconds=time.perf_counter() - started,
    )


async def build_db(path: Path, **options: Any) -> FixtureRun:
    """A database at ``path`` holding one fixture run (see :func:`record_run`)."""
    async with RunStore.open(path) as store:
        return await record_run(store, **options)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a fixture run into a drpo database.")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--run-id")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per model call")
    parser.add_argument("--big", action="store_true", help="~500 nodes and ~3,000 calls")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hostile", action="store_true")
    args = parser.parse_args(argv)
    options: dict[str, Any] = big_run_options() if args.big else {"depth": args.depth}
    run = anyio.run(
        lambda: build_db(
            args.db, run_id=args.run_id, delay=args.delay, hostile=args.hostile, **options
        )
    )
    print(
        json.dumps(
            {
                "run_id": run.run_id,
                "status": run.status,
                "nodes": len(run.node_ids),
                "calls": run.calls,
                "seconds": round(run.seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
