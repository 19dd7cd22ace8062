"""The proposer's three layouts, its ICL header styles, the runaway cut, and the one-line error
that names the framing to set when an endpoint refuses the one in use (issue 9)."""

from __future__ import annotations

from typing import Any

import pytest
from fakeserver import OPENAI_CHAT, VLLM_BASE, ModelProfile, serve_fake_openai

from drpo.agents import proposer
from drpo.agents.proposer import LayoutError
from drpo.backends.base import (
    Choice,
    Completion,
    CompletionRequest,
    PermanentBackendError,
    TransientBackendError,
)
from drpo.backends.openai_api import OpenAIPermanentError
from drpo.domain.requests import ProposeAnswer
from drpo.domain.values import ICLExample

QUERY = "How do tides work?"
EXAMPLES = (
    ICLExample(query="What is 2+2?", answer="<START>\n4\n<END>"),
    ICLExample(query="Name a colour.", answer="Blue."),  # not wrapped: the proposer wraps it
    ICLExample(query="Say hi.", answer="<START>\nHi!\n<END>"),
)
FRAME = "# Query:\nHow do tides work?\n\n# Answer:\n<START>"


def paper_search_prompt(prompt: str, examples: tuple[ICLExample, ...], query: str) -> str:
    """The original's search prompt, built the way its world model builds it (spec §1.2):
    "# Query:" opens the block, "#Query:" separates later examples, "#Answer:" heads answers."""
    block = "# Query:\n"
    for i, e in enumerate(examples):
        block += e.query + "\n\n#Answer:\n" + proposer.wrap_answer(e.answer)
        if i < len(examples) - 1:
            block += "\n\n#Query:\n"
    system = f"# instructions\n\n{prompt}\n\n{block}\n\n"
    return system + f"# Query:\n{query}\n\n# Answer:\n<START>"


def paper_inference_system(prompt: str, examples: tuple[ICLExample, ...]) -> str:
    """The original's inference system message (spec §1.3)."""
    for e in examples:
        prompt += "\n\n#Query:\n" + e.query + "\n\n#Answer:\n" + proposer.wrap_answer(e.answer)
    return prompt


# --------------------------------------------------------------------------------------------
# layouts


def test_raw_uniform_is_todays_search_prompt() -> None:
    request = proposer.build_answer_request("Be helpful.", EXAMPLES[:2], QUERY)
    assert request.prompt == (
        "# instructions\n\nBe helpful.\n\n"
        "# Query:\nWhat is 2+2?\n\n# Answer:\n<START>\n4\n<END>\n\n"
        "# Query:\nName a colour.\n\n# Answer:\n<START>\nBlue.\n<END>\n\n" + FRAME
    )
    assert request.messages is None and request.stop == ("<END>", "<END", "<|eot_id|>")


def test_raw_paper_headers_are_the_originals() -> None:
    request = proposer.build_answer_request(
        "Be helpful.", EXAMPLES, QUERY, framing="raw", icl_headers="paper"
    )
    assert request.prompt == (
        "# instructions\n\nBe helpful.\n\n"
        "# Query:\nWhat is 2+2?\n\n#Answer:\n<START>\n4\n<END>\n\n"
        "#Query:\nName a colour.\n\n#Answer:\n<START>\nBlue.\n<END>\n\n"
        "#Query:\nSay hi.\n\n#Answer:\n<START>\nHi!\n<END>\n\n" + FRAME
    )
    for k in (1, 2, 3):
        built = proposer.build_answer_request("P.", EXAMPLES[:k], QUERY, icl_headers="paper")
        assert built.prompt == paper_search_prompt("P.", EXAMPLES[:k], QUERY)


def test_chat_is_the_is_gpt_layout_and_splits_the_raw_prompt_before_the_query() -> None:
    for headers in ("uniform", "paper"):
        request = proposer.build_answer_request(
            "Be helpful.", EXAMPLES[:2], QUERY, framing="chat", icl_headers=headers
        )
        raw = proposer.build_answer_request("Be helpful.", EXAMPLES[:2], QUERY, icl_headers=headers)
        system, user = request.messages
        assert (system.role, user.role) == ("system", "user")
        assert system.content.startswith("# instructions\n\nBe helpful.\n\n# Query:\nWhat is 2+2?")
        assert system.content.endswith("<END>\n\n")
        assert user.content == FRAME
        assert system.content + user.content == raw.prompt
        assert request.prompt is None and request.stop == proposer.STOP_STRINGS
    paper = proposer.build_answer_request(
        "Be helpful.", EXAMPLES[:2], QUERY, framing="chat", icl_headers="paper"
    )
    assert paper.messages[0].content == (
        "# instructions\n\nBe helpful.\n\n"
        "# Query:\nWhat is 2+2?\n\n#Answer:\n<START>\n4\n<END>\n\n"
        "#Query:\nName a colour.\n\n#Answer:\n<START>\nBlue.\n<END>\n\n"
    )


def test_inference_layout_has_no_header_and_paper_heads_every_example_alike() -> None:
    uniform = proposer.build_answer_request("Be helpful.", EXAMPLES[:2], QUERY, framing="inference")
    assert uniform.messages[0].content == (
        "Be helpful.\n\n# Query:\nWhat is 2+2?\n\n# Answer:\n<START>\n4\n<END>\n\n"
        "# Query:\nName a colour.\n\n# Answer:\n<START>\nBlue.\n<END>"
    )
    paper = proposer.build_answer_request(
        "Be helpful.", EXAMPLES[:2], QUERY, framing="inference", icl_headers="paper"
    )
    system, user = paper.messages
    assert system.content == (
        "Be helpful.\n\n#Query:\nWhat is 2+2?\n\n#Answer:\n<START>\n4\n<END>\n\n"
        "#Query:\nName a colour.\n\n#Answer:\n<START>\nBlue.\n<END>"
    )
    assert system.content == paper_inference_system("Be helpful.", EXAMPLES[:2])
    assert user.content == FRAME and "# instructions" not in system.content


def test_every_layout_without_examples() -> None:
    raw = proposer.build_answer_request("Be helpful.", (), QUERY, icl_headers="paper")
    assert raw.prompt == "# instructions\n\nBe helpful.\n\n" + FRAME
    chat = proposer.build_answer_request("Be helpful.", (), QUERY, framing="chat")
    assert [m.content for m in chat.messages] == ["# instructions\n\nBe helpful.\n\n", FRAME]
    inference = proposer.build_answer_request("Be helpful.", (), QUERY, framing="inference")
    assert [m.content for m in inference.messages] == ["Be helpful.", FRAME]


def test_unknown_framing_or_header_style_is_an_error() -> None:
    with pytest.raises(ValueError, match="raw, chat, inference"):
        proposer.build_answer_request("p", (), QUERY, framing="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="icl_headers"):
        proposer.build_answer_request("p", EXAMPLES, QUERY, icl_headers="x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# propose: every field of the message reaches the request, the runaway cut is a switch


class Recorder:
    """A model call that records its requests and answers with a fixed text, or raises."""

    def __init__(self, reply: str | BaseException = "The moon.") -> None:
        self.reply = reply
        self.requests: list[CompletionRequest] = []

    async def __call__(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return Completion(choices=(Choice(text=self.reply),), model="fake")


def message(**fields: Any) -> ProposeAnswer:
    base: dict[str, Any] = {
        "model": "m", "system_prompt": "Be helpful.", "icl_examples": EXAMPLES[:2], "query": QUERY,
    }  # fmt: skip
    return ProposeAnswer(**{**base, **fields})


@pytest.mark.anyio
async def test_propose_passes_the_framing_headers_and_sampling() -> None:
    for framing in ("raw", "chat", "inference"):
        for headers in ("paper", "uniform"):
            call = Recorder()
            msg = message(framing=framing, icl_headers=headers, top_p=0.9, temperature=0.7)
            await proposer.propose(call, msg)
            expected = proposer.build_answer_request(
                "Be helpful.", EXAMPLES[:2], QUERY, framing=framing, icl_headers=headers,
                max_tokens=512, temperature=0.7, top_p=0.9,
            )  # fmt: skip
            assert call.requests == [expected]
    call = Recorder()
    await proposer.propose(call, message(icl_headers="paper"))
    assert "\n\n#Query:\nName a colour.\n\n#Answer:\n" in call.requests[0].prompt
    assert call.requests[0].top_p == 1.0  # the paper's search setting by default


RUNAWAY = "The moon pulls the sea.\n\n# Query:\nWhat else?\n\n# Answer:\nMore"


@pytest.mark.anyio
async def test_switch_cut_runaway() -> None:
    assert await proposer.propose(Recorder(RUNAWAY), message()) == "The moon pulls the sea."
    kept = await proposer.propose(Recorder(RUNAWAY), message(cut_runaway=False))
    assert kept == RUNAWAY  # the paper: .strip() only
    paper_spelling = "The moon.\n#Query:\nAnd?\n<END>"
    assert await proposer.propose(Recorder(paper_spelling), message()) == "The moon."
    assert (
        await proposer.propose(Recorder(paper_spelling), message(cut_runaway=False))
        == "The moon.\n#Query:\nAnd?"
    )


@pytest.mark.parametrize("cut", [True, False])
@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("  The moon.\n<END>", "The moon."),  # OpenAI drops the stop, transformers serve keeps it
        ("The moon.\n<END", "The moon."),
        ("<START>\nThe moon.", "The moon."),
    ],
)
def test_the_frame_markers_go_whatever_the_runaway_switch(text: str, clean: str, cut: bool) -> None:
    assert proposer.clean_answer(text, cut_runaway=cut) == clean


# --------------------------------------------------------------------------------------------
# an endpoint that refuses the framing: realistic errors, one line that names the setting

#: What the OpenAI backend raises for OpenAI's reply to a raw prompt for a chat model (the
#: server's text is quoted verbatim after "Server said:").
OPENAI_CHAT_MODEL_404 = OpenAIPermanentError(
    "unknown model 'gpt-4o-mini' or wrong base URL 'https://api.openai.com/v1' (HTTP 404): check "
    "the model name and that the base URL ends in /v1. Server said: This is a chat model and not "
    "supported in the v1/completions endpoint. Did you mean to use v1/chat/completions?",
    status_code=404,
)
#: vLLM serving a base model without a chat template, asked for a chat completion.
VLLM_NO_TEMPLATE_400 = OpenAIPermanentError(
    "'base' at http://127.0.0.1:8000/v1 rejected the request as invalid (HTTP 400): As of "
    "transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
    "template if the tokenizer does not define one.",
    status_code=400,
)
#: TGI without a chat template: 422 {"error": "Template error: template not found"}.
TGI_NO_TEMPLATE_422 = OpenAIPermanentError(
    "'tgi' at http://127.0.0.1:8080/v1 rejected the request as invalid (HTTP 422): Template "
    "error: template not found",
    status_code=422,
)
#: OpenAI's reply to a chat request for a completions-only model (davinci-002).
OPENAI_NOT_CHAT_404 = OpenAIPermanentError(
    "unknown model 'davinci-002' or wrong base URL 'https://api.openai.com/v1' (HTTP 404): check "
    "the model name and that the base URL ends in /v1. Server said: This is not a chat model and "
    "thus not supported in the v1/chat/completions endpoint. Did you mean to use v1/completions?",
    status_code=404,
)
#: A Gemma template served by vLLM refuses a system message.
GEMMA_NO_SYSTEM_400 = OpenAIPermanentError(
    "'gemma' at http://127.0.0.1:8000/v1 rejected the request as invalid (HTTP 400): System role "
    "not supported",
    status_code=400,
)
#: What drpo's local backend raises (drpo/backends/local_model.py).
LOCAL_NO_TEMPLATE = PermanentBackendError(
    "local model /models/base has no chat template: send a raw `prompt` instead"
)
LOCAL_TEMPLATE_REJECTS = PermanentBackendError(
    "the chat template of /models/mistral rejected these messages: Conversation roles must "
    "alternate user/assistant/user/assistant/..."
)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "framing", "suggested", "why"),
    [
        (OPENAI_CHAT_MODEL_404, "raw", "chat", "is a chat-only model"),
        (VLLM_NO_TEMPLATE_400, "chat", "raw", "has no chat template"),
        (VLLM_NO_TEMPLATE_400, "inference", "raw", "has no chat template"),
        (TGI_NO_TEMPLATE_422, "inference", "raw", "has no chat template"),
        (OPENAI_NOT_CHAT_404, "chat", "raw", "has no chat template"),
        (LOCAL_NO_TEMPLATE, "inference", "raw", "has no chat template"),
        (GEMMA_NO_SYSTEM_400, "inference", "raw", "refuses a system message"),
        (LOCAL_TEMPLATE_REJECTS, "chat", "raw", "refuses a system message"),
    ],
)
async def test_a_refused_framing_is_one_line_that_names_the_setting(
    error: PermanentBackendError, framing: str, suggested: str, why: str
) -> None:
    with pytest.raises(LayoutError) as caught:
        await proposer.propose(Recorder(error), message(model="the-model", framing=framing))
    text = str(caught.value)
    assert "\n" not in text
    assert f'proposer.framing = "{suggested}"' in text and f"--framing {suggested}" in text
    assert why in text and "'the-model'" in text
    assert caught.value.suggested == suggested and caught.value.framing == framing
    assert caught.value.__cause__ is error
    assert caught.value.status_code == getattr(error, "status_code", None)
    assert isinstance(caught.value, PermanentBackendError)  # still never retried


def test_the_message_quotes_the_server_not_the_backends_advice() -> None:
    refusal = proposer.layout_refusal(OPENAI_CHAT_MODEL_404, model="gpt-4o-mini", framing="raw")
    assert refusal is not None
    assert str(refusal) == (
        "'gpt-4o-mini' is a chat-only model and refuses completion prompts (framing \"raw\"): "
        'set proposer.framing = "chat" (or --framing chat); the server (HTTP 404) said: This is '
        "a chat model and not supported in the v1/completions endpoint. Did you mean to use "
        "v1/chat/completions?"
    )
    local = proposer.layout_refusal(LOCAL_NO_TEMPLATE, model="local:/models/base", framing="chat")
    assert str(local).endswith(
        "; the backend said: local model /models/base has no chat template: send a raw `prompt` "
        "instead"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "framing"),
    [
        # the refusal of the other kind of request: not this framing's fault
        (OPENAI_CHAT_MODEL_404, "chat"),
        (VLLM_NO_TEMPLATE_400, "raw"),
        (LOCAL_NO_TEMPLATE, "raw"),
        # an unknown model, a bad key, an over-long prompt: nothing to do with the framing
        (
            OpenAIPermanentError(
                "unknown model 'gpt-5o' or wrong base URL 'https://api.openai.com/v1' (HTTP "
                "404): check the model name and that the base URL ends in /v1. Server said: The "
                "model `gpt-5o` does not exist or you do not have access to it.",
                status_code=404,
            ),
            "raw",
        ),
        (
            OpenAIPermanentError(
                "https://api.openai.com/v1 rejected the API key (HTTP 401): check the key in "
                "OPENAI_API_KEY. Server said: Incorrect API key provided (mentions chat template)",
                status_code=401,
            ),
            "chat",
        ),
        (TransientBackendError("HTTP 500: chat template crashed"), "chat"),
    ],
)
async def test_other_errors_pass_through_unchanged(error: Exception, framing: str) -> None:
    with pytest.raises(type(error)) as caught:
        await proposer.propose(Recorder(error), message(framing=framing))
    assert caught.value is error


# --------------------------------------------------------------------------------------------
# the same through the real OpenAI backend, against a server that answers like the real ones


@pytest.mark.network
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("profile", "status", "framing", "suggested", "refused_path"),
    [
        (OPENAI_CHAT, 404, "raw", "chat", "/v1/completions"),
        (VLLM_BASE, 400, "inference", "raw", "/v1/chat/completions"),
    ],
    ids=["openai-chat-model", "vllm-base-model"],
)
async def test_through_the_openai_backend(
    profile: ModelProfile, status: int, framing: str, suggested: str, refused_path: str
) -> None:
    """The strict double refuses the endpoint as the real server does (OpenAI's 404 for a chat
    model on completions, vLLM's 400 for a base model without a chat template)."""
    from drpo.backends.openai_api import OpenAIBackend

    with serve_fake_openai(models={"the-model": profile}) as server:
        backend = OpenAIBackend("the-model", base_url=server.base_url, max_attempts=1)
        try:
            with pytest.raises(LayoutError, match=f'proposer.framing = "{suggested}"') as caught:
                await proposer.propose(
                    backend.complete, message(model="the-model", framing=framing)
                )
        finally:
            await backend.aclose()
    assert caught.value.status_code == status and "\n" not in str(caught.value)
    assert [refusal.path for refusal in server.refusals] == [refused_path]
