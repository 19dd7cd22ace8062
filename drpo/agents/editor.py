"""The editor (optimizer): rewrites the system prompt from feedback, and in the ICL stage an answer.

The prompt rewrite follows spec §2.5: the optimizer sees the current prompt and up to four earlier
ones, the query, the answer and the judge's verdict, and returns ``{analysis, thought,
new_system_prompt}`` at the original settings (T from the search config, top_p 0.95, 2048 tokens).
The original asked for all n candidates in one request and crashed on any unparsable one; here
backends that cannot return n samples get n concurrent requests with distinct seeds, and a
candidate that cannot be read is asked for once more with a format reminder, then dropped and
counted, so the search carries on with the candidates it has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import anyio

from drpo.agents.parsing import ParseError, parse_text_field
from drpo.agents.prompts import (
    TEXT_EDIT_OPENING,
    answer_editor_prompt,
    answer_editor_reminder,
    optimizer_prompt,
    optimizer_reminder,
    text_optimizer_prompt,
)
from drpo.agents.proposer import Call, clean_answer, wrap_answer
from drpo.backends.base import ChatMessage, CompletionRequest
from drpo.bus.messages import EditAnswer, EditPrompt

#: The optimizer's settings besides temperature and n (spec §1.1).
OPTIMIZER_SETTINGS = {"top_p": 0.95}
#: The ICL-stage answer editor is greedy (spec §4).
ANSWER_EDITOR_SETTINGS = {"temperature": 0.0, "top_p": 1.0, "seed": 0}

#: Placeholder values of the reply templates in :mod:`drpo.agents.prompts`.
TEMPLATE_PLACEHOLDERS = frozenset({"the complete new system prompt"})

PROMPT_FIELDS = ("new_system_prompt", "system_prompt", "new_prompt")
ANSWER_FIELDS = ("new_response", "response", "new_answer")


def _user(content: str) -> ChatMessage:
    return ChatMessage(role="user", content=content)


def _with_reminder(
    base: Sequence[ChatMessage], reply: str | None, reminder: str
) -> tuple[ChatMessage, ...]:
    """The retry conversation: the unusable reply (when there was one) and a format reminder."""
    if reply is None:
        return tuple(base)
    return (*base, ChatMessage(role="assistant", content=reply), _user(reminder))


#: In the text format, shorter "prompts" are fragments, not system prompts.
MIN_PROMPT_CHARS = 40


def read_prompt_candidate(text: str) -> str:
    """The new system prompt in an optimizer reply; ParseError when there is none, or when the
    model only echoed the reply template's placeholder."""
    candidate = parse_text_field(text, *PROMPT_FIELDS)
    if candidate.lower().rstrip(".") in TEMPLATE_PLACEHOLDERS:
        raise ParseError("new_system_prompt repeats the template's placeholder", text)
    return candidate


def read_answer_rewrite(text: str) -> str:
    """The rewritten answer in an answer-editor reply, wrapped in ``<START>``/``<END>``;
    ParseError when there is none or it is empty inside its markers."""
    answer = parse_text_field(text, *ANSWER_FIELDS)
    if not clean_answer(answer):
        raise ParseError("the new_response field is empty inside its markers", text)
    return wrap_answer(answer)


#: Most lines a text-format candidate keeps: an opening line and at most 8 bullets (spec §2.5).
MAX_TEXT_PROMPT_LINES = 9


def read_text_candidate(continuation: str) -> str:
    """A system prompt from a raw continuation of the text-format editor prompt.

    Small models repeat themselves and run on into made-up dialogue, so: stop at a heading or a
    code fence, drop repeated lines, keep at most :data:`MAX_TEXT_PROMPT_LINES` lines.
    """
    text = TEXT_EDIT_OPENING + continuation
    text = re.split(
        r"\n\s*(?:#|```|Current system prompt|Question|Feedback:|Q:|A:|Answer|The answer)", text
    )[0]
    lines: list[str] = []
    for line in (part.strip() for part in text.splitlines()):
        if line and line not in lines:
            lines.append(line)
    candidate = "\n".join(lines[:MAX_TEXT_PROMPT_LINES]).strip()
    if len(candidate) < MIN_PROMPT_CHARS:
        raise ParseError(f"the rewritten prompt is under {MIN_PROMPT_CHARS} characters", text)
    return candidate


async def _rewrite_prompt_as_text(call: Call, msg: EditPrompt) -> tuple[list[str], int]:
    """The text editor format: one raw completion request with n samples (fanned out by seed
    when the backend has no n); unusable samples are dropped (no retry: a format reminder
    does not help a model that cannot follow the format)."""
    prompt = text_optimizer_prompt(msg.system_prompt, msg.query, msg.critique)

    def request(n: int, seed: int) -> CompletionRequest:
        return CompletionRequest(
            prompt=prompt,
            n=n,
            seed=seed,
            temperature=msg.temperature,
            max_tokens=msg.max_tokens,
            stop=("\n\n\n",),
            **OPTIMIZER_SETTINGS,
        )

    completion = await call(request(msg.n, 0))
    texts = [choice.text for choice in completion.choices[: msg.n]]
    candidates = []
    for text in texts:
        try:
            candidate = read_text_candidate(text)
        except ParseError:
            continue
        if candidate not in candidates:
            candidates.append(candidate)
    return candidates, msg.n - len(candidates)


async def rewrite_prompt(call: Call, msg: EditPrompt, *, supports_n: bool) -> tuple[list[str], int]:
    """``msg.n`` rewritten system prompts, in sample order, and how many had to be dropped.

    With ``supports_n`` one request returns all samples (seed 0, as in the original); otherwise
    sample i is its own request with seed i, so the samples differ and the requests have distinct
    journal keys. Every unreadable or missing sample is retried once, concurrently.
    ``msg.format == "text"`` uses the plain-text format for small models instead.
    """
    if msg.format == "text":
        return await _rewrite_prompt_as_text(call, msg)
    base = (
        _user(
            optimizer_prompt(msg.system_prompt, msg.query, msg.answer, msg.critique, msg.history)
        ),
    )

    def request(messages: Sequence[ChatMessage], *, n: int, seed: int) -> CompletionRequest:
        return CompletionRequest(
            messages=tuple(messages),
            n=n,
            seed=seed,
            temperature=msg.temperature,
            max_tokens=msg.max_tokens,
            **OPTIMIZER_SETTINGS,
        )

    replies: list[str | None] = [None] * msg.n
    if supports_n:
        completion = await call(request(base, n=msg.n, seed=0))
        for i, choice in enumerate(completion.choices[: msg.n]):
            replies[i] = choice.text
    else:

        async def sample(i: int) -> None:
            replies[i] = (await call(request(base, n=1, seed=i))).text

        async with anyio.create_task_group() as group:
            for i in range(msg.n):
                group.start_soon(sample, i)

    candidates: list[str | None] = [None] * msg.n
    errors: dict[int, str] = {}
    for i, reply in enumerate(replies):
        if reply is None:
            errors[i] = "the backend returned fewer samples than requested"
            continue
        try:
            candidates[i] = read_prompt_candidate(reply)
        except ParseError as error:
            errors[i] = error.reason

    async def retry(i: int) -> None:
        messages = _with_reminder(base, replies[i], optimizer_reminder(errors[i]))
        # A seed no first-round request used, so a retry never repeats a first-round request.
        reply = (await call(request(messages, n=1, seed=msg.n + i))).text
        try:
            candidates[i] = read_prompt_candidate(reply)
        except ParseError:
            candidates[i] = None

    async with anyio.create_task_group() as group:
        for i in errors:
            group.start_soon(retry, i)
    kept = [c for c in candidates if c is not None]
    return kept, msg.n - len(kept)


async def rewrite_answer(call: Call, msg: EditAnswer) -> str | None:
    """The ICL stage's rewrite of an example answer, wrapped in ``<START>``/``<END>``; None when
    the editor's reply cannot be read even after one retry with a format reminder."""
    base = (_user(answer_editor_prompt(msg.query, msg.answer, msg.critique)),)
    reply = (
        await call(
            CompletionRequest(messages=base, max_tokens=msg.max_tokens, **ANSWER_EDITOR_SETTINGS)
        )
    ).text
    try:
        return read_answer_rewrite(reply)
    except ParseError as error:
        messages = _with_reminder(base, reply, answer_editor_reminder(error.reason))
    reply = (
        await call(
            CompletionRequest(
                messages=messages, max_tokens=msg.max_tokens, **ANSWER_EDITOR_SETTINGS
            )
        )
    ).text
    try:
        return read_answer_rewrite(reply)
    except ParseError:
        return None
