"""The proposer: the model being aligned answers a query under an alignment prompt.

Two framings (spec §1.2, §1.3). ``raw`` is what the search uses: one completion prompt with the
``# instructions`` header, the ICL examples and a ``# Query:`` / ``# Answer:`` / ``<START>`` frame,
sent as plain text even to chat models, exactly as the original trained its prompts. ``chat`` is
the inference layout: the system prompt and the examples as a system message, the framed query as
the user message. Both stop on ``<END>``: every example answer ends with it, so the model learns
to close its own answer with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from drpo.agents.prompts import (
    ANSWER_HEADER,
    END,
    INSTRUCTIONS_HEADER,
    QUERY_HEADER,
    START,
    STOP_STRINGS,
)
from drpo.backends.base import ChatMessage, Completion, CompletionRequest
from drpo.bus.messages import ICLExample, ProposeAnswer

#: A model call already bound to a model, role, run and journal (the bus wrapper makes it).
Call = Callable[[CompletionRequest], Awaitable[Completion]]


def wrap_answer(answer: str) -> str:
    """``<START>\\n...\\n<END>`` around an answer, unless it is already wrapped.

    Example answers must end with ``<END>`` or the model never learns where to stop; answers
    loaded from other sources (URIAL prompts, user files) often are not wrapped.
    """
    body = clean_answer(answer)
    return f"{START}\n{body}\n{END}"


def format_example(example: ICLExample) -> str:
    return f"{QUERY_HEADER}\n{example.query}\n\n{ANSWER_HEADER}\n{wrap_answer(example.answer)}"


def query_frame(query: str) -> str:
    """The live query, framed like the examples, ending where the model starts its answer."""
    return f"{QUERY_HEADER}\n{query}\n\n{ANSWER_HEADER}\n{START}"


def raw_prompt(system_prompt: str, icl_examples: Sequence[ICLExample], query: str) -> str:
    """The search-time completion prompt (spec §1.2), with one spacing for every header."""
    parts = [INSTRUCTIONS_HEADER, system_prompt.strip()]
    parts += [format_example(e) for e in icl_examples]
    parts.append(query_frame(query))
    return "\n\n".join(part for part in parts if part)


def chat_messages(
    system_prompt: str, icl_examples: Sequence[ICLExample], query: str
) -> tuple[ChatMessage, ChatMessage]:
    """The inference layout (spec §1.3): no header; examples appended to the system message."""
    parts = [system_prompt.strip(), *(format_example(e) for e in icl_examples)]
    system = "\n\n".join(part for part in parts if part)
    return (
        ChatMessage(role="system", content=system),
        ChatMessage(role="user", content=query_frame(query)),
    )


def build_answer_request(
    system_prompt: str,
    icl_examples: Sequence[ICLExample],
    query: str,
    *,
    framing: Literal["raw", "chat"] = "raw",
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> CompletionRequest:
    """The request that asks the aligned model for its answer to ``query``."""
    common = {
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "stop": STOP_STRINGS,
    }
    if framing == "raw":
        return CompletionRequest(prompt=raw_prompt(system_prompt, icl_examples, query), **common)
    if framing == "chat":
        messages = chat_messages(system_prompt, icl_examples, query)
        return CompletionRequest(messages=messages, **common)
    raise ValueError(f"unknown framing {framing!r}: use 'raw' or 'chat'")


_RUNAWAY_MARKERS = (f"\n{QUERY_HEADER}", "\n#Query:", f"\n{INSTRUCTIONS_HEADER}")


def clean_answer(text: str) -> str:
    """The answer without its frame: surrounding space, a leading ``<START>`` and a trailing
    ``<END>`` (or the ``<END`` a split token leaves) removed.

    A base model that misses the stop string sometimes carries on with a new ``# Query:``
    block of its own; that invented continuation is cut off too.
    """
    answer = text.strip()
    if answer.startswith(START):
        answer = answer[len(START) :]
    for marker in _RUNAWAY_MARKERS:
        cut = answer.find(marker)
        if cut >= 0:
            answer = answer[:cut]
    answer = answer.rstrip()
    for stop in (END, "<END"):
        if answer.endswith(stop):
            answer = answer[: -len(stop)]
            break
    return answer.strip()


async def propose(call: Call, msg: ProposeAnswer) -> str:
    """Ask the aligned model for its answer to ``msg.query`` and return it cleaned."""
    request = build_answer_request(
        msg.system_prompt,
        msg.icl_examples,
        msg.query,
        framing=msg.framing,
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
    )
    completion = await call(request)
    return clean_answer(completion.text)
