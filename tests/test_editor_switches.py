"""The editor's switches (issue 9): n candidates in one request, the retry of unreadable
candidates, the history limit, and the ICL answer editor's retry and text format. Each test fails
if its switch is ignored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from scripted_calls import Scripted

from drpo.agents import editor, prompts
from drpo.agents.parsing import ParseError
from drpo.backends.base import Choice, Completion, CompletionRequest
from drpo.domain.requests import EditAnswer, EditPrompt
from drpo.domain.values import AspectScore, Critique

QUERY = "How do tides work?"
CRITIQUE = Critique.from_scores(
    {"Clarity": AspectScore(score=3, rationale="rambling"), "Depth": AspectScore(score=5)}
)


def candidate(text: str) -> str:
    return json.dumps({"analysis": "a", "thought": "t", "new_system_prompt": text})


def edit(**fields: Any) -> EditPrompt:
    base: dict[str, Any] = {
        "model": "m", "system_prompt": "Current prompt.", "query": QUERY, "answer": "The moon.",
        "critique": CRITIQUE, "n": 3,
    }  # fmt: skip
    return EditPrompt(**{**base, **fields})


# --------------------------------------------------------------------------------------------
# the prompt editor


@pytest.mark.anyio
async def test_n_candidates_are_asked_for_in_one_request() -> None:
    call = Scripted([candidate("A."), candidate("B."), candidate("C."), candidate("extra")])
    prompts_, dropped = await editor.rewrite_prompt(call, edit())
    assert prompts_ == ["A.", "B.", "C."] and dropped == 0  # an extra choice is ignored
    (request,) = call.requests
    assert (request.n, request.seed) == (3, 0)


@pytest.mark.anyio
async def test_switch_retry_unreadable_for_prompts() -> None:
    first = [candidate("Good."), "no JSON here", "{broken"]
    retried = Scripted(first, candidate("Fixed."), candidate("Also fixed."))
    kept, dropped = await editor.rewrite_prompt(retried, edit(retry_unreadable=True))
    assert sorted(kept) == ["Also fixed.", "Fixed.", "Good."] and dropped == 0
    assert len(retried.requests) == 3
    assert all(len(r.messages) == 3 for r in retried.requests[1:])  # reply + reminder

    dropped_only = Scripted(first)  # a second request would be an unexpected extra call
    kept, dropped = await editor.rewrite_prompt(dropped_only, edit(retry_unreadable=False))
    assert kept == ["Good."] and dropped == 2


@pytest.mark.anyio
async def test_missing_choices_count_as_unreadable() -> None:
    """Whatever the runtime's fan-out could not complete is retried like an unreadable one (a
    bare request, since there is no reply to remind about), or dropped."""
    short = Scripted([candidate("Only.")], candidate("Second."), candidate("Third."))
    kept, dropped = await editor.rewrite_prompt(short, edit())
    assert kept == ["Only.", "Second.", "Third."] and dropped == 0
    assert [len(r.messages) for r in short.requests[1:]] == [1, 1]
    assert sorted(r.seed for r in short.requests[1:]) == [4, 5]

    kept, dropped = await editor.rewrite_prompt(
        Scripted([candidate("Only.")]), edit(retry_unreadable=False)
    )
    assert kept == ["Only."] and dropped == 2


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [2, 5, 8])
async def test_switch_history_limit(limit: int) -> None:
    history = tuple(f"Old {i}." for i in range(1, 11))  # ten earlier prompts
    call = Scripted([candidate("New.")])
    await editor.rewrite_prompt(call, edit(n=1, history=history, history_limit=limit))
    prompt = call.requests[0].messages[0].content
    shown = [f"Old {i}." for i in range(1, 11) if f"\nOld {i}.\n" in prompt]
    assert shown == [f"Old {i}." for i in range(12 - limit, 11)]  # the last limit-1, in order
    assert f"---Version {limit - 1}---\nOld 10." in prompt
    assert f"---Version {limit}---" not in prompt
    assert prompt.count("---Current Version---\nCurrent prompt.") == 1


def test_the_default_history_limit_is_the_papers_five() -> None:
    assert edit().history_limit == prompts.HISTORY_LIMIT == 5
    history = tuple(f"Old {i}." for i in range(1, 8))
    assert prompts.optimizer_prompt("P.", QUERY, "a", CRITIQUE, history) == (
        prompts.optimizer_prompt("P.", QUERY, "a", CRITIQUE, history, history_limit=5)
    )


# --------------------------------------------------------------------------------------------
# the ICL stage's answer editor

EDIT_ANSWER = EditAnswer(
    model="m", query=QUERY, answer="<START>\nThe moon.\n<END>", critique=CRITIQUE
)
GOOD = json.dumps({"analysis": "a", "thought": "t", "new_response": "<START>\nBetter.\n<END>"})


@pytest.mark.anyio
async def test_switch_retry_unreadable_for_answers() -> None:
    reminded = Scripted("not JSON", GOOD)
    answer = await editor.rewrite_answer(reminded, EDIT_ANSWER)
    assert answer == "<START>\nBetter.\n<END>"
    first, retry = reminded.requests
    assert [m.role for m in retry.messages] == ["user", "assistant", "user"]
    assert retry.messages[1].content == "not JSON" and "new_response" in retry.messages[2].content

    bare = Scripted("not JSON", GOOD)
    msg = EDIT_ANSWER.model_copy(update={"retry_unreadable": False})
    assert await editor.rewrite_answer(bare, msg) == "<START>\nBetter.\n<END>"
    first, retry = bare.requests
    assert retry == first  # the paper: the same call once more
    assert await editor.rewrite_answer(Scripted("no", "still no"), msg) is None


CONTINUATION = (
    "Tides come from the moon's gravity pulling on the oceans. Tides come from the moon's "
    "gravity pulling on the oceans.\n\n"
    "1. **The moon pulls.** Water on the near side bulges towards it.\n"
    "2. **The earth turns.** Each coast passes through two bulges a day.\n"
    "3. **The moon pulls.** Water on the near side bulges towards it.\n"
    "4. **The sun helps.** Spring tides come when sun and moon line up.\n\n"
    "Question: How do waves work?\n\nAnswer:\n<START>\nWind."
)


def test_read_text_answer_keeps_the_answer_and_drops_the_loops() -> None:
    assert editor.read_text_answer(CONTINUATION) == (
        "<START>\n"
        "Tides come from the moon's gravity pulling on the oceans.\n\n"
        "1. **The moon pulls.** Water on the near side bulges towards it.\n"
        "2. **The earth turns.** Each coast passes through two bulges a day.\n"
        "3. **The sun helps.** Spring tides come when sun and moon line up.\n"
        "<END>"
    )
    with pytest.raises(ParseError, match="under 40 characters"):
        editor.read_text_answer("Tides.\n\nQuestion: Why?")
    with pytest.raises(ParseError):
        editor.read_text_answer("<START>\n<END>")


@pytest.mark.anyio
async def test_switch_answer_format_text() -> None:
    call = Scripted(CONTINUATION)
    msg = EDIT_ANSWER.model_copy(update={"format": "text", "max_tokens": 400})
    answer = await editor.rewrite_answer(call, msg)
    assert answer is not None and answer.startswith("<START>\nTides come from")
    (request,) = call.requests
    assert request.messages is None and request.prompt is not None  # a plain continuation
    assert request.prompt.endswith(f"Question: {QUERY}\n\nAnswer:\n<START>\n")
    assert "<START>\nThe moon.\n<END>" in request.prompt  # the current answer, wrapped once
    assert "Clarity 3/5; Depth 5/5" in request.prompt
    assert "It most needs better Clarity." in request.prompt
    assert (request.temperature, request.max_tokens) == (0.0, 400)
    assert request.stop == prompts.TEXT_ANSWER_STOPS

    json_call = Scripted(CONTINUATION, CONTINUATION)  # the JSON format cannot read it
    assert await editor.rewrite_answer(json_call, EDIT_ANSWER) is None
    assert json_call.requests[0].messages is not None


@pytest.mark.anyio
async def test_an_unreadable_text_answer_is_not_retried() -> None:
    for retry in (True, False):
        msg = EDIT_ANSWER.model_copy(update={"format": "text", "retry_unreadable": retry})
        call = Scripted("Hm.")  # a second request would be an unexpected extra call
        assert await editor.rewrite_answer(call, msg) is None


def test_an_echo_of_the_reply_template_is_not_an_answer() -> None:
    """SmolLM2-135M, asked for the JSON reply, copied its template's placeholder (issue 9)."""
    for echo in ("The complete new answer...", "<START>\n...the complete new answer...\n<END>"):
        reply = json.dumps({"analysis": "a", "thought": "t", "new_response": echo})
        with pytest.raises(ParseError, match="placeholder"):
            editor.read_answer_rewrite(reply)


def test_a_loop_under_new_titles_and_a_line_cut_by_the_token_limit_are_dropped() -> None:
    looping = (
        "Lists can change; tuples cannot.\n\n"
        "1. **Mutability.** You can append to a list.\n"
        "2. **Syntax.** Lists use brackets, tuples parentheses.\n"
        "3. **Performance.** Lists use brackets, tuples parentheses.\n"  # same text, new title
        "4. **Syntax.** Tuples are hashable.\n"  # same title, new text
        "5. **Intent.** Use a tuple for a fixed record.\n"
        '6. **Clarity.** A tuple can be a key, for example `{(0, 0): "'
    )
    expected_items = (
        "1. **Mutability.** You can append to a list.\n"
        "2. **Syntax.** Lists use brackets, tuples parentheses.\n"
        "3. **Intent.** Use a tuple for a fixed record.\n"
    )
    assert editor.read_text_answer(looping, truncated=True) == (
        "<START>\nLists can change; tuples cannot.\n\n" + expected_items + "<END>"
    )
    kept = editor.read_text_answer(looping, truncated=False)  # a finished line is kept
    assert kept.endswith('3. **Intent.** Use a tuple for a fixed record.\n4. **Clarity.** A '
                         'tuple can be a key, for example `{(0, 0): "\n<END>')  # fmt: skip
    intro = "Here are the options, each explained in turn below:\n1. First option."
    assert editor.read_text_answer(intro, truncated=True).endswith("1. First option.\n<END>")


@pytest.mark.anyio
async def test_the_text_format_drops_a_truncated_line_only_when_the_limit_was_hit() -> None:
    text = "Tides come from the moon's gravity pulling on the oceans.\nAnd the sun's gravity a"
    msg = EDIT_ANSWER.model_copy(update={"format": "text"})

    async def reply(finish_reason: str) -> str | None:
        async def call(request: CompletionRequest) -> Completion:
            choice = Choice(text=text, finish_reason=finish_reason)
            return Completion(choices=(choice,), model="fake")

        return await editor.rewrite_answer(call, msg)

    assert await reply("length") == (
        "<START>\nTides come from the moon's gravity pulling on the oceans.\n<END>"
    )
    assert (await reply("stop") or "").endswith("And the sun's gravity a\n<END>")


@pytest.mark.model
@pytest.mark.anyio
async def test_the_embedded_model_writes_a_usable_text_rewrite(local_backend: Any) -> None:
    """On SmolLM2-135M the JSON reply never came out usable (0 of 8 seed examples, issue 9);
    the text format gave an answer-shaped rewrite for each. One example keeps that honest, at
    96 tokens (300 before: 19.5 s against 6.4 s here; 390 characters against 1,102, past the 200
    asked), which the token limit cuts, so the reader's drop of a cut-off line is on the path."""
    from drpo.data.loaders import default_icl_examples

    example = next(e for e in default_icl_examples() if "fake ID" in e.query)
    msg = EditAnswer(
        model="local:smollm2", query=example.query, answer=example.answer, critique=CRITIQUE,
        format="text", max_tokens=96,
    )  # fmt: skip
    answer = await editor.rewrite_answer(local_backend.complete, msg)
    assert answer is not None and answer.startswith("<START>\n") and answer.endswith("\n<END>")
    assert len(answer) > 200
