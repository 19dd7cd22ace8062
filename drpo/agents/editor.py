"""The editor (optimizer): rewrites the system prompt from feedback, and in the ICL stage an answer.

The prompt rewrite follows spec §2.5: the optimizer sees the current prompt and the earlier ones
up to ``history_limit`` versions (the original: 5), the query, the answer and the judge's
verdict, and returns ``{analysis, thought, new_system_prompt}`` at the original settings (T from
the search config, top_p 0.95, 2048 tokens), all ``n`` candidates in ONE request as the original
asked for them. A server that returns fewer choices than asked for is completed by the runtime's
call binding; whatever is still missing counts as unreadable. The original crashed on any
unparsable candidate; here it is asked for once more with a format reminder
(``retry_unreadable``) or dropped, and counted, so the search carries on with the candidates it
has.

The ICL stage's answer editor (spec §4) is greedy and returns ``{analysis, thought,
new_response}``; the original retried an unreadable reply once by repeating the same call. The
``text`` formats of both editors are plain continuations for models too small to write JSON.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import anyio

from drpo.agents.parsing import ParseError, parse_text_field
from drpo.agents.prompts import (
    TEXT_ANSWER_STOPS,
    TEXT_EDIT_OPENING,
    answer_editor_prompt,
    answer_editor_reminder,
    optimizer_prompt,
    optimizer_reminder,
    text_answer_editor_prompt,
    text_optimizer_prompt,
)
from drpo.agents.proposer import clean_answer, wrap_answer
from drpo.backends.base import Call, ChatMessage, CompletionRequest
from drpo.domain.requests import EditAnswer, EditPrompt

#: The optimizer's settings besides temperature and n (spec §1.1).
OPTIMIZER_SETTINGS = {"top_p": 0.95}
#: The ICL-stage answer editor is greedy (spec §4).
ANSWER_EDITOR_SETTINGS = {"temperature": 0.0, "top_p": 1.0, "seed": 0}

#: Placeholder values of the reply templates in :mod:`drpo.agents.prompts`.
TEMPLATE_PLACEHOLDERS = frozenset({"the complete new system prompt"})
#: How the answer editor's reply template (and its reminder) describe the new answer; a small
#: model copies it instead of writing one.
ANSWER_PLACEHOLDER = "the complete new answer"

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
    body = clean_answer(answer)
    if not body:
        raise ParseError("the new_response field is empty inside its markers", text)
    if body.lstrip(". ").casefold().startswith(ANSWER_PLACEHOLDER):
        raise ParseError("new_response repeats the template's placeholder", text)
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
    """The text editor format: one raw completion request with n samples; unusable or missing
    samples are dropped (no retry: a format reminder does not help a model that cannot follow
    the format)."""
    prompt = text_optimizer_prompt(msg.system_prompt, msg.query, msg.critique)
    completion = await call(
        CompletionRequest(
            prompt=prompt,
            n=msg.n,
            seed=0,
            temperature=msg.temperature,
            max_tokens=msg.max_tokens,
            stop=("\n\n\n",),
            **OPTIMIZER_SETTINGS,
        )
    )
    candidates: list[str] = []
    for choice in completion.choices[: msg.n]:
        try:
            candidate = read_text_candidate(choice.text)
        except ParseError:
            continue
        if candidate not in candidates:
            candidates.append(candidate)
    return candidates, msg.n - len(candidates)


async def rewrite_prompt(call: Call, msg: EditPrompt) -> tuple[list[str], int]:
    """``msg.n`` rewritten system prompts, in sample order, and how many had to be dropped.

    One request asks for all ``msg.n`` samples (seed 0), as the original did. A sample that
    cannot be read, or that the server did not return, is asked for again once, concurrently,
    with a format reminder when ``msg.retry_unreadable`` (each retry with a seed no first
    request used); otherwise it is dropped. ``msg.format == "text"`` uses the plain-text format
    for small models instead.
    """
    if msg.format == "text":
        return await _rewrite_prompt_as_text(call, msg)
    base = (
        _user(
            optimizer_prompt(
                msg.system_prompt,
                msg.query,
                msg.answer,
                msg.critique,
                msg.history,
                history_limit=msg.history_limit,
            )
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

    completion = await call(request(base, n=msg.n, seed=0))
    replies: list[str | None] = [choice.text for choice in completion.choices[: msg.n]]
    replies += [None] * (msg.n - len(replies))

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
        # A seed no first request used, so a retry never repeats a first-round request.
        reply = (await call(request(messages, n=1, seed=msg.n + i))).text
        try:
            candidates[i] = read_prompt_candidate(reply)
        except ParseError:
            candidates[i] = None

    if msg.retry_unreadable:
        async with anyio.create_task_group() as group:
            for i in errors:
                group.start_soon(retry, i)
    kept = [c for c in candidates if c is not None]
    return kept, msg.n - len(kept)


# --------------------------------------------------------------------------------------------
# Rewriting an ICL example answer

#: Shorter text-format rewrites are fragments, not answers.
MIN_ANSWER_CHARS = 40
#: Where a small model's continuation stops being the answer: a new section of the document it
#: imitates, a heading, a code fence, or a marker of its own.
_TEXT_ANSWER_END = re.compile(
    r"\n\s*(?:#|```|<START>|Question:|Query:|Answer:|A reviewer|Reviewer|Scores?:"
    r"|Below is|Improved answer|Better answer|Original answer)",
    re.IGNORECASE,
)
#: A list marker at the start of a line ("1.", "2)", "-", "*", "•").
_LIST_MARKER = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")
#: A list item's bold title ("**Title.**") and the text after it.
_TITLED_ITEM = re.compile(r"^(\*\*[^*]+\*\*)\s*(.*)$")
#: How a complete line ends (a sentence's end, perhaps inside quotes or bold, or the colon of
#: a line that introduces a list); a line cut off by the token limit usually does not.
_LINE_END = re.compile(r"""[.!?)]["'`*]*$|:$""")
#: A sentence said again straight after itself ("X. X. X.").
_REPEATED_SENTENCE = re.compile(r"(\S.{15,}?[.!?])(?:\s+\1)+")


def _line_keys(line: str) -> list[str]:
    """What makes a line a repeat: its text without a list marker, and for a titled item
    ("**Title.** text") its title and its text each, since a looping model reuses either."""
    body = _LIST_MARKER.sub("", line).casefold()
    titled = _TITLED_ITEM.match(body)
    if titled is None:
        return [body]
    return [body, *(part for part in titled.groups() if part)]


def read_text_answer(continuation: str, *, truncated: bool = False) -> str:
    """A rewritten answer from a raw continuation of the text-format answer-editor prompt,
    wrapped in ``<START>``/``<END>``.

    Small models run on into a new section of the document and loop, repeating a sentence, a
    list item, or an item's title or text under another title, so: stop where the text turns
    into another section, collapse a sentence repeated in a row, drop a line that repeats an
    earlier one in any of those ways, drop an unfinished last line when the token limit cut
    the text (``truncated``), number each list's remaining items again from 1, and refuse
    anything under :data:`MIN_ANSWER_CHARS` characters.
    """
    text = _TEXT_ANSWER_END.split(clean_answer(continuation), maxsplit=1)[0]
    raw_lines = text.splitlines()
    if truncated and raw_lines and not _LINE_END.search(raw_lines[-1].strip()):
        raw_lines.pop()
    lines: list[str] = []
    seen: set[str] = set()
    number = 0
    for raw_line in raw_lines:
        line = _REPEATED_SENTENCE.sub(r"\1", raw_line.strip())
        if not line:
            if lines and lines[-1]:
                lines.append("")
            continue
        keys = _line_keys(line)
        if seen.intersection(keys):
            continue
        seen.update(keys)
        marker = re.match(r"\d+([.)])\s+", line)
        if marker:
            number += 1
            line = f"{number}{marker.group(1)} {line[marker.end() :]}"
        elif not _LIST_MARKER.match(line):
            number = 0  # prose between lists: the next list counts from 1 again
        lines.append(line)
    answer = "\n".join(lines).strip()
    if len(answer) < MIN_ANSWER_CHARS:
        raise ParseError(f"the rewritten answer is under {MIN_ANSWER_CHARS} characters", text)
    return wrap_answer(answer)


async def _rewrite_answer_as_text(call: Call, msg: EditAnswer) -> str | None:
    """The text format: one raw completion, no retry (a reminder cannot steer a plain
    continuation, and the same greedy request would only return the same text)."""
    completion = await call(
        CompletionRequest(
            prompt=text_answer_editor_prompt(msg.query, clean_answer(msg.answer), msg.critique),
            max_tokens=msg.max_tokens,
            stop=TEXT_ANSWER_STOPS,
            **ANSWER_EDITOR_SETTINGS,
        )
    )
    choice = completion.choices[0]
    try:
        return read_text_answer(choice.text, truncated=choice.finish_reason == "length")
    except ParseError:
        return None


async def rewrite_answer(call: Call, msg: EditAnswer) -> str | None:
    """The ICL stage's rewrite of an example answer, wrapped in ``<START>``/``<END>``; None when
    the editor's reply cannot be read even after one retry.

    The retry is the same conversation with the unusable reply and a format reminder added when
    ``msg.retry_unreadable``, else the original's: the identical request once more (at T=0 often
    the same reply; the journal records it as a second sample of that request).
    ``msg.format == "text"`` uses the plain-text format for small models instead.
    """
    if msg.format == "text":
        return await _rewrite_answer_as_text(call, msg)
    base = (_user(answer_editor_prompt(msg.query, msg.answer, msg.critique)),)

    def request(messages: Sequence[ChatMessage]) -> CompletionRequest:
        return CompletionRequest(
            messages=tuple(messages), max_tokens=msg.max_tokens, **ANSWER_EDITOR_SETTINGS
        )

    reply = (await call(request(base))).text
    try:
        return read_answer_rewrite(reply)
    except ParseError as error:
        if msg.retry_unreadable:
            messages = _with_reminder(base, reply, answer_editor_reminder(error.reason))
        else:
            messages = base
    reply = (await call(request(messages))).text
    try:
        return read_answer_rewrite(reply)
    except ParseError:
        return None
