"""The proposer: the model being aligned answers a query under an alignment prompt.

Three framings, one per kind of endpoint (spec §1.2, §1.3):

``raw``
    The search layout as one completion prompt: the ``# instructions`` header, the system prompt,
    the ICL examples and a ``# Query:`` / ``# Answer:`` / ``<START>`` frame. The original sent it
    as plain text to every model it served itself, instruct models included, so this is what
    base models behind vLLM, SGLang, TGI or the embedded backend get.
``chat``
    The same text for chat-only API models (the original's ``is_GPT``): everything before the
    live query is the system message, the framed query is the user message. Concatenated, the
    two messages are exactly the ``raw`` prompt.
``inference``
    The original's inference layout (``AutoModel.generate``): the system prompt followed by the
    retrieved examples as the system message, without the ``# instructions`` header, and the
    framed query as the user message. ``drpo generate`` uses it or the searched layout.

Every layout stops on ``<END>``: every example answer ends with it, so the model learns to close
its own answer with it. ``icl_headers`` chooses how the examples are headed: ``uniform`` like the
live query everywhere, or ``paper`` exactly as the original wrote them (see
:data:`~drpo.agents.prompts.PAPER_EXAMPLE_QUERY_HEADER`).

A server that refuses the endpoint a framing needs (OpenAI's chat models have no
``/v1/completions``, a model without a chat template cannot take messages) fails the call with a
:class:`LayoutError` whose one-line message names the framing to set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from drpo.agents.prompts import (
    ANSWER_HEADER,
    END,
    INSTRUCTIONS_HEADER,
    PAPER_EXAMPLE_ANSWER_HEADER,
    PAPER_EXAMPLE_QUERY_HEADER,
    QUERY_HEADER,
    START,
    STOP_STRINGS,
)
from drpo.backends.base import (
    Call,
    ChatMessage,
    CompletionRequest,
    PermanentBackendError,
)
from drpo.domain.requests import Framing, ICLHeaders, ProposeAnswer
from drpo.domain.values import ICLExample

FRAMINGS: tuple[Framing, ...] = ("raw", "chat", "inference")
ICL_HEADER_STYLES: tuple[ICLHeaders, ...] = ("paper", "uniform")


def wrap_answer(answer: str) -> str:
    """``<START>\\n...\\n<END>`` around an answer, unless it is already wrapped.

    Example answers must end with ``<END>`` or the model never learns where to stop; answers
    loaded from other sources (URIAL prompts, user files) often are not wrapped.
    """
    body = clean_answer(answer)
    return f"{START}\n{body}\n{END}"


def format_example(
    example: ICLExample, *, query_header: str = QUERY_HEADER, answer_header: str = ANSWER_HEADER
) -> str:
    """One ICL example: its query and its wrapped answer under the given headers."""
    return f"{query_header}\n{example.query}\n\n{answer_header}\n{wrap_answer(example.answer)}"


def example_blocks(
    icl_examples: Sequence[ICLExample], icl_headers: ICLHeaders, *, first_spaced: bool
) -> list[str]:
    """The examples as text blocks, headed in the chosen style.

    ``paper`` reproduces the original's spelling, which differs by layout: its search prompt
    spelled the first example's query header ``# Query:`` and the later ones ``#Query:``
    (``first_spaced``), its inference prompt ``#Query:`` throughout; the answers were always
    headed ``#Answer:``.
    """
    if icl_headers == "uniform":
        return [format_example(e) for e in icl_examples]
    if icl_headers != "paper":
        raise ValueError(f"unknown icl_headers {icl_headers!r}: use 'paper' or 'uniform'")
    return [
        format_example(
            e,
            query_header=QUERY_HEADER if first_spaced and i == 0 else PAPER_EXAMPLE_QUERY_HEADER,
            answer_header=PAPER_EXAMPLE_ANSWER_HEADER,
        )
        for i, e in enumerate(icl_examples)
    ]


def query_frame(query: str) -> str:
    """The live query, framed like the examples, ending where the model starts its answer."""
    return f"{QUERY_HEADER}\n{query}\n\n{ANSWER_HEADER}\n{START}"


def instructions_block(
    system_prompt: str, icl_examples: Sequence[ICLExample], icl_headers: ICLHeaders = "uniform"
) -> str:
    """Everything of the search layout before the live query, ending in a blank line."""
    parts = [INSTRUCTIONS_HEADER, system_prompt.strip()]
    parts += example_blocks(icl_examples, icl_headers, first_spaced=True)
    return "\n\n".join(part for part in parts if part) + "\n\n"


def raw_prompt(
    system_prompt: str,
    icl_examples: Sequence[ICLExample],
    query: str,
    icl_headers: ICLHeaders = "uniform",
) -> str:
    """The search-time completion prompt (spec §1.2)."""
    return instructions_block(system_prompt, icl_examples, icl_headers) + query_frame(query)


def chat_messages(
    system_prompt: str,
    icl_examples: Sequence[ICLExample],
    query: str,
    icl_headers: ICLHeaders = "uniform",
) -> tuple[ChatMessage, ChatMessage]:
    """The search layout for chat-only models (the original's ``is_GPT``, spec §1.2): the
    ``raw`` prompt split before the live query, the instructions and examples as the system
    message, the framed query as the user message."""
    return (
        ChatMessage(
            role="system", content=instructions_block(system_prompt, icl_examples, icl_headers)
        ),
        ChatMessage(role="user", content=query_frame(query)),
    )


def inference_messages(
    system_prompt: str,
    icl_examples: Sequence[ICLExample],
    query: str,
    icl_headers: ICLHeaders = "uniform",
) -> tuple[ChatMessage, ChatMessage]:
    """The inference layout (spec §1.3): no header; the examples follow the system prompt."""
    parts = [system_prompt.strip(), *example_blocks(icl_examples, icl_headers, first_spaced=False)]
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
    framing: Framing = "raw",
    icl_headers: ICLHeaders = "uniform",
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> CompletionRequest:
    """The request that asks the aligned model for its answer to ``query``, in any framing."""
    common = {
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "stop": STOP_STRINGS,
    }
    if framing == "raw":
        prompt = raw_prompt(system_prompt, icl_examples, query, icl_headers)
        return CompletionRequest(prompt=prompt, **common)
    if framing == "chat":
        messages = chat_messages(system_prompt, icl_examples, query, icl_headers)
        return CompletionRequest(messages=messages, **common)
    if framing == "inference":
        messages = inference_messages(system_prompt, icl_examples, query, icl_headers)
        return CompletionRequest(messages=messages, **common)
    raise ValueError(f"unknown framing {framing!r}: use one of {', '.join(FRAMINGS)}")


_RUNAWAY_MARKERS = (
    f"\n{QUERY_HEADER}",
    f"\n{PAPER_EXAMPLE_QUERY_HEADER}",
    f"\n{INSTRUCTIONS_HEADER}",
)


def clean_answer(text: str, *, cut_runaway: bool = True) -> str:
    """The answer without its frame: surrounding space, a leading ``<START>`` and a trailing
    ``<END>`` (or the ``<END`` a split token leaves) removed.

    The markers go whatever the settings: they are the frame, not the answer, and whether the
    stop string comes back depends on the server (OpenAI drops it, ``transformers serve`` keeps
    it). ``cut_runaway`` also cuts the new ``# Query:`` block a base model sometimes invents
    after missing the stop string; without it the text is only stripped, as the original did.
    """
    answer = text.strip()
    if answer.startswith(START):
        answer = answer[len(START) :]
    if cut_runaway:
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


# --------------------------------------------------------------------------------------------
# An endpoint that refuses the framing


class LayoutError(PermanentBackendError):
    """The server refused the endpoint this framing needs; ``suggested`` is the framing to set.

    Its message is one line that names the setting, so the CLI's one-line error is the fix.
    """

    def __init__(
        self, message: str, *, suggested: Framing, framing: Framing, status_code: int | None
    ) -> None:
        super().__init__(message)
        self.suggested = suggested
        self.framing = framing
        self.status_code = status_code


#: A raw prompt refused because the model only has a chat endpoint (OpenAI's 404 for chat models
#: on /v1/completions: "This is a chat model and not supported in the v1/completions endpoint").
_CHAT_ONLY = re.compile(
    r"\bis a chat model\b|\bchat[- ]only\b|use\s+/?v1/chat/completions", re.IGNORECASE
)
#: Messages refused because the model has no chat template (vLLM's 400 "...you must provide a
#: chat template...", TGI's 422 "Template error: template not found", our local backend's "has
#: no chat template") or is not a chat model at all (OpenAI's 404 "This is not a chat model ...
#: Did you mean to use v1/completions?").
_NO_CHAT_TEMPLATE = re.compile(
    r"chat[ _]template|template not found|template_error|\bnot a chat model\b"
    r"|use\s+/?v1/completions\b",
    re.IGNORECASE,
)
#: Messages refused because the template has no place for a system message (Gemma's "System role
#: not supported", Mistral-Instruct-v0.1's and Llama-2's strict user/assistant alternation).
_NO_SYSTEM_ROLE = re.compile(
    r"system role not supported|roles must alternate|rejected these messages", re.IGNORECASE
)
#: HTTP statuses such refusals come with (None: a local backend, no HTTP).
_REFUSAL_STATUSES = frozenset({None, 400, 404, 422})


_SERVER_SAID = "Server said:"


def _server_text(error: BaseException, limit: int = 200) -> str:
    """What the server said, on one line: the part of a backend message after "Server said:"
    when it quotes the server (the OpenAI backend does), else the whole message, shortened."""
    text = str(error)
    if _SERVER_SAID in text:
        text = text.rsplit(_SERVER_SAID, 1)[1]
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def layout_refusal(error: BaseException, *, model: str, framing: Framing) -> LayoutError | None:
    """The :class:`LayoutError` that explains ``error``, or None when it is not a refusal of
    the framing's endpoint.

    Recognised by the backend error's ``status_code`` (when it has one) and its message, and
    only for the kind of request the framing sends: a raw prompt refused as a chat model's, or
    messages refused for want of a chat template.
    """
    if not isinstance(error, PermanentBackendError) or isinstance(error, LayoutError):
        return None
    status = getattr(error, "status_code", None)
    if status not in _REFUSAL_STATUSES:
        return None
    said = str(error)
    if framing == "raw" and _CHAT_ONLY.search(said):
        suggested: Framing = "chat"
        why = f'{model!r} is a chat-only model and refuses completion prompts (framing "raw")'
    elif framing != "raw" and _NO_SYSTEM_ROLE.search(said):
        suggested = "raw"
        why = f"the chat template of {model!r} refuses a system message (framing {framing!r})"
    elif framing != "raw" and _NO_CHAT_TEMPLATE.search(said):
        suggested = "raw"
        why = f"{model!r} has no chat template, so it refuses chat messages (framing {framing!r})"
    else:
        return None
    where = "the backend" if status is None else f"the server (HTTP {status})"
    message = (
        f'{why}: set proposer.framing = "{suggested}" (or --framing {suggested}); '
        f"{where} said: {_server_text(error)}"
    )
    return LayoutError(message, suggested=suggested, framing=framing, status_code=status)


async def propose(call: Call, msg: ProposeAnswer) -> str:
    """Ask the aligned model for its answer to ``msg.query`` and return it cleaned.

    Raises :class:`LayoutError` when the endpoint refuses the framing (see
    :func:`layout_refusal`); every other error propagates unchanged.
    """
    request = build_answer_request(
        msg.system_prompt,
        msg.icl_examples,
        msg.query,
        framing=msg.framing,
        icl_headers=msg.icl_headers,
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p,
    )
    try:
        completion = await call(request)
    except PermanentBackendError as error:
        refusal = layout_refusal(error, model=msg.model, framing=msg.framing)
        if refusal is None:
            raise
        raise refusal from error
    return clean_answer(completion.text, cut_runaway=msg.cut_runaway)
