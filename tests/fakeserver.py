"""A strict, programmable test double of an OpenAI-compatible server (loopback only).

A small Starlette app run by uvicorn on 127.0.0.1, on a free port, in a background thread.
Tests import it as ``fakeserver`` (pytest puts tests/ on ``sys.path``); benchmarks put the
repository root on ``sys.path`` and import ``tests.fakeserver``::

    from fakeserver import OPENAI_CHAT, VLLM_INSTRUCT, Fault, serve_fake_openai

    def plan(info):  # fail the first try of every request, then answer it
        return Fault("503") if info.seen_before == 0 else None

    models = {"gpt-4o-mini": OPENAI_CHAT, "fake-model": VLLM_INSTRUCT}
    with serve_fake_openai(models=models, responder=lambda body: "hi", faults=plan) as server:
        backend = OpenAIBackend("fake-model", base_url=server.base_url)
        ...
        assert server.total == 2 and server.ok_answers() == 1

Our rule: a test double copies the real service's documented behaviour, refusals and error
bodies included, and is configurable to each real server's quirks. So the server is strict:

* it serves the models it is given, each with a :class:`ModelProfile` that says which endpoints
  the model serves, which request parameters it honours (``n``, logprobs, ``seed``), whether a
  stop string stays in the text, its context window, and whose server it copies (OpenAI, vLLM
  or ``transformers serve``): their refusals, error bodies, reply shapes and headers. Ready-made
  profiles: :data:`OPENAI_CHAT`, :data:`OPENAI_COMPLETIONS`, :data:`VLLM_INSTRUCT`,
  :data:`VLLM_BASE`, :data:`TRANSFORMERS_SERVE`;
* an unknown model is refused as that server refuses it (OpenAI: 404 ``model_not_found``);
* requests are validated as the server validates them (OpenAI: unknown parameters, wrong types,
  out-of-range values, a missing bearer key, prompt + ``max_tokens`` over the context window;
  vLLM and ``transformers serve``: their own, smaller sets of checks) and refused with the real
  status and body. Every refusal is also recorded in ``server.refusals``.

On top of that it is programmable:

* ``responder(body) -> str | list[str]`` writes the reply text (one text for every choice, or one
  per choice); stop strings and ``max_tokens`` (whitespace tokens) are applied to it, and usage
  and logprobs are made up consistently;
* a *fault plan* decides per request what goes wrong: a callable ``plan(info) -> Fault | str |
  None`` (``info`` is a ``RequestInfo``: arrival index, path, body, body hash, and how many times
  this exact body arrived before) or an iterable of faults used in arrival order;
* an optional server-side request limit (``rpm_limit`` per ``rpm_window_s``) answers 429 with
  ``Retry-After`` and can send ``x-ratelimit-*`` headers;
* it counts everything under a lock: total, per path, every arrival with its time
  (``time.monotonic``, the clock the client uses too), per body hash the arrivals and the 200
  answers, and the most requests it ever had in progress at once.

Fault kinds: ``ok``, ``429`` (with ``retry_after_s`` / ``retry_after_ms`` /
``retry_after_date``), ``quota`` (429 insufficient_quota), ``context_length`` (400
context_length_exceeded), ``400``, ``401`` (its message echoes the key that was sent, to test
redaction), ``403``, ``404``, ``408``, ``409``, ``422``, ``500``, ``502``, ``503``, ``hang`` (no
answer until the client gives up), ``drop`` (the connection closes mid-reply), ``malformed``
(truncated JSON with status 200), ``empty`` (a valid reply with no choices). Injected faults have
OpenAI's error bodies whatever the profile: they stand for conditions of the service (overload,
quota), not for one server's validation.

Sources of the copied behaviour are cited where it is implemented. In short: OpenAI's bodies come
from replies quoted in public issue threads (each cited below); vLLM's from its source
(``vllm/entrypoints/openai/engine/serving.py``, ``vllm/sampling_params.py``,
``vllm/renderers/hf.py``, ``vllm/exceptions.py``); ``transformers serve``'s from the installed
transformers 5.24 (``transformers/cli/serving/``), which ``tests/test_transformers_serve.py``
also runs for real.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Literal

import anyio
import anyio.lowlevel
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

FaultKind = Literal[
    "ok",
    "429",
    "quota",
    "context_length",
    "400",
    "401",
    "403",
    "404",
    "408",
    "409",
    "422",
    "500",
    "502",
    "503",
    "hang",
    "drop",
    "malformed",
    "empty",
]
#: The two generation endpoints: ``/v1/chat/completions`` and ``/v1/completions``.
Endpoint = Literal["chat", "completions"]
#: Whose behaviour a profile copies.
ServerKind = Literal["openai", "vllm", "transformers"]

CHAT_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
_DROP_MESSAGE = "ASGI callable returned without completing response."


@dataclass(frozen=True)
class Fault:
    """What to do with one request. ``latency_s`` overrides the server's latency for it."""

    kind: FaultKind = "ok"
    retry_after_s: float | None = None
    retry_after_ms: float | None = None
    #: Send ``Retry-After`` as an HTTP date ``retry_after_s`` from now instead of seconds.
    retry_after_date: bool = False
    latency_s: float | None = None
    #: A hang gives up (answers 504) after this long even if the client is still waiting.
    hang_s: float = 30.0
    #: The error message of a plain status fault (``400``, ``500``, ...) instead of the default.
    message: str | None = None


OK = Fault()


# --------------------------------------------------------------------------------------------
# Model profiles


@dataclass(frozen=True)
class ModelProfile:
    """How one served model behaves, copied from a real server.

    ``server`` picks whose refusals, error bodies, reply shapes and headers the model has; the
    other fields are that model's quirks. Profiles are frozen: derive variants with
    ``dataclasses.replace(VLLM_INSTRUCT, context_window=2048)``.
    """

    #: Whose behaviour this is: error bodies, validation, reply shape, headers.
    server: ServerKind = "vllm"
    #: The endpoints the model serves; the other one is refused as ``server`` refuses it.
    endpoints: frozenset[Endpoint] = frozenset({"chat", "completions"})
    #: One request with ``n > 1`` returns n choices (else one choice, whatever ``n`` says).
    honours_n: bool = True
    #: ``logprobs`` / ``top_logprobs`` are answered (else ``logprobs`` is null or absent).
    honours_logprobs: bool = True
    #: ``seed`` reaches the responder (else the responder sees the body without it).
    honours_seed: bool = True
    #: A stop string that ends generation stays at the end of the text (OpenAI and vLLM cut it).
    keeps_stop: bool = False
    #: Prompt tokens + ``max_tokens`` may not exceed this (None: not checked, as
    #: ``transformers serve`` does not check it).
    context_window: int | None = 32_768
    #: The most completion tokens one request may ask for (OpenAI models have such a cap).
    max_output_tokens: int | None = None
    #: The model name replies carry (OpenAI answers with the dated snapshot); None: as asked.
    reply_model: str | None = None
    #: (requests, tokens) per minute, reported in ``x-ratelimit-*`` headers and enforced with
    #: OpenAI's 429 body; None: no such limits (vLLM and ``transformers serve`` have none).
    rate_limits: tuple[int, int] | None = None
    #: OpenAI's ``system_fingerprint``; vLLM sends null and ``transformers serve`` nothing.
    system_fingerprint: str | None = None
    #: vLLM's ``--max-logprobs`` (default 20): more top logprobs than this are refused.
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        if not self.endpoints or not set(self.endpoints) <= {"chat", "completions"}:
            raise ValueError(
                f"endpoints must be a non-empty subset of chat/completions, got "
                f"{sorted(self.endpoints)}"
            )
        if self.server in ("vllm", "transformers") and "completions" not in self.endpoints:
            # vLLM and transformers serve answer /v1/completions for every generative model;
            # only chat depends on the model (it needs a chat template).
            raise ValueError(f"a {self.server} model always serves /v1/completions")


#: An OpenAI chat model (gpt-4o, gpt-4o-mini): ``/v1/chat/completions`` only, everything
#: honoured, 128k context, 16384 output tokens, OpenAI's reply shape and headers, tier-5-sized
#: rate limits reported in ``x-ratelimit-*`` (large enough that tests are not slowed by them).
OPENAI_CHAT = ModelProfile(
    server="openai",
    endpoints=frozenset({"chat"}),
    context_window=128_000,
    max_output_tokens=16_384,
    rate_limits=(10_000, 30_000_000),
    system_fingerprint="fp_7f4a8d2c1e",
)
#: An OpenAI completions model (gpt-3.5-turbo-instruct): ``/v1/completions`` only, 4096 tokens.
OPENAI_COMPLETIONS = ModelProfile(
    server="openai",
    endpoints=frozenset({"completions"}),
    context_window=4_096,
    rate_limits=(3_500, 90_000),
    system_fingerprint="fp_3b956da36b",
)
#: An instruct model served by vLLM (it has a chat template): both endpoints, everything
#: honoured (``n``, logprobs up to ``--max-logprobs`` 20, ``seed``), stop strings cut.
VLLM_INSTRUCT = ModelProfile(server="vllm", context_window=32_768)
#: A base model served by vLLM: no chat template, so chat requests get vLLM's 400.
VLLM_BASE = ModelProfile(server="vllm", endpoints=frozenset({"completions"}), context_window=4_096)
#: ``transformers serve`` (5.24) with a chat model: both endpoints, ``n`` and logprobs ignored
#: (one choice, no logprobs), the stop string kept at the end of the text, no context check.
#: Pinned down against the real server in tests/test_transformers_serve.py.
TRANSFORMERS_SERVE = ModelProfile(
    server="transformers",
    honours_n=False,
    honours_logprobs=False,
    keeps_stop=True,
    context_window=None,
)

#: The ready-made profiles by name (``sim_server_main.py --profile NAME``).
PROFILES: dict[str, ModelProfile] = {
    "openai-chat": OPENAI_CHAT,
    "openai-completions": OPENAI_COMPLETIONS,
    "vllm-instruct": VLLM_INSTRUCT,
    "vllm-base": VLLM_BASE,
    "transformers-serve": TRANSFORMERS_SERVE,
}

#: What a server given no ``models`` serves: the names the tests and benchmarks use
#: (``benchmarks/api_rate.py`` sends "fake-model", ``benchmarks/search.py`` "sim"), each as a
#: vLLM-served instruct model. Any other name is refused.
DEFAULT_MODELS: dict[str, ModelProfile] = {"fake-model": VLLM_INSTRUCT, "sim": VLLM_INSTRUCT}


# --------------------------------------------------------------------------------------------
# Requests as the server saw them


@dataclass(frozen=True)
class RequestInfo:
    """What a fault plan and a latency function see about one arriving request."""

    index: int
    path: str
    body: Mapping[str, Any]
    body_hash: str
    seen_before: int
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        """The prompt, or every message's content joined: where tests embed request ids."""
        return request_text(self.body)


@dataclass(frozen=True)
class Arrival:
    """One request as the server saw it arrive."""

    t: float
    index: int
    path: str
    body_hash: str
    text: str
    fault: str


@dataclass(frozen=True)
class Refusal:
    """A request the server refused on its own (not by the fault plan): why, as it said it."""

    index: int
    path: str
    model: object
    status: int
    #: The error code of the body (OpenAI: a string such as ``model_not_found``; vLLM: the
    #: status), or None.
    code: object
    message: str


def request_text(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def body_hash(body: Mapping[str, Any]) -> str:
    """Identical requests (a call and its retries) share a hash."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def prompt_tokens_of(body: Mapping[str, Any]) -> int:
    """The prompt's tokens as this server counts them: characters / 4, at least 1."""
    return max(1, math.ceil(len(request_text(body)) / 4))


Responder = Callable[[Mapping[str, Any]], "str | Sequence[str]"]
FaultPlan = Callable[[RequestInfo], "Fault | str | None"] | Iterable["Fault | str"]
Latency = float | Callable[[RequestInfo], float]


def default_responder(body: Mapping[str, Any]) -> str:
    """Echo the last user turn (or the prompt), so every request gets a distinct answer."""
    return f"reply to: {request_text(body).splitlines()[-1] if request_text(body) else ''}"


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """The most events in any half-open window ``[t, t + window_s)``."""
    ordered = sorted(times)
    best = 0
    left = 0
    for right, t in enumerate(ordered):
        while ordered[left] <= t - window_s:
            left += 1
        best = max(best, right - left + 1)
    return best


def format_reset(seconds: float) -> str:
    """OpenAI's duration style for ``x-ratelimit-reset-*``: ``"1s"``, ``"6m0s"``, ``"250ms"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


_TOKEN = re.compile(r"\s*\S+")


def _tokens(text: str) -> list[str]:
    """Whitespace tokens with their leading space, so ''.join(tokens) gives the text back."""
    return _TOKEN.findall(text)


# --------------------------------------------------------------------------------------------
# Refusals: the real servers' statuses and bodies


class _Refused(Exception):
    """A request the server refuses; ``response`` is what the real server sends."""

    def __init__(
        self,
        status: int,
        body: Mapping[str, Any] | str,
        *,
        message: str,
        code: object = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.message = message
        self.code = code

    def response(self, headers: Mapping[str, str]) -> Response:
        if isinstance(self.body, str):
            return PlainTextResponse(self.body, self.status, headers=dict(headers))
        return JSONResponse(dict(self.body), self.status, headers=dict(headers))


def _error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_refusal(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
) -> _Refused:
    """An OpenAI error reply: ``{"error": {"message", "type", "param", "code"}}``."""
    return _Refused(status, _error_body(message, kind, code, param), message=message, code=code)


def vllm_refusal(
    message: str,
    *,
    status: int = 400,
    kind: str = "BadRequestError",
    param: str | None = None,
    value: object = None,
    validation_error: bool = True,
) -> _Refused:
    """A vLLM error reply. vLLM's ``ErrorResponse`` is ``{"error": {"message", "type", "param",
    "code"}}`` with ``code`` the HTTP status (an int), built by ``create_error_response`` in
    vllm/entrypoints/openai/engine/serving.py. A ``VLLMValidationError`` is rendered with
    ``str(exc)``, which appends ``(parameter=..., value=...)`` (vllm/exceptions.py); a plain
    message (``validation_error=False``) is sent as it is."""
    extras = []
    if param is not None and validation_error:
        extras.append(f"parameter={param}")
    if value is not None and validation_error:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    body = {"error": {"message": text, "type": kind, "param": param, "code": status}}
    return _Refused(status, body, message=text, code=status)


def transformers_refusal(status: int, detail: str) -> _Refused:
    """A ``transformers serve`` refusal: FastAPI's ``HTTPException`` body ``{"detail": ...}``."""
    return _Refused(status, {"detail": detail}, message=detail)


def _json_kind(value: object) -> str:
    """How OpenAI names a JSON value's type in its messages ("a string", "an integer", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _shown(value: object) -> str:
    """A value as OpenAI quotes it in a range error (its JSON text)."""
    return json.dumps(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


# ---- OpenAI ---------------------------------------------------------------------------------

#: Every body parameter OpenAI's chat completions endpoint knows (its API reference); anything
#: else is refused with "Unrecognized request argument supplied: X" (openai/openai-python#433).
OPENAI_CHAT_PARAMS = frozenset(
    {
        "model", "messages", "audio", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
        "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty",
        "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
        "service_tier", "stop", "store", "stream", "stream_options", "temperature",
        "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
        "web_search_options",
    }
)  # fmt: skip
#: Every body parameter OpenAI's (legacy) completions endpoint knows.
OPENAI_COMPLETION_PARAMS = frozenset(
    {
        "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
        "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
        "suffix", "temperature", "top_p", "user",
    }
)  # fmt: skip
_OPENAI_ROLES = ("system", "assistant", "user", "function", "tool", "developer")


def _openai_type_error(param: str, expected: str, value: object) -> _Refused:
    # "Invalid type for 'max_tokens': expected an integer, but got a string instead."
    # (diffbot/code-gpt-docs#273; code invalid_type: IBM/unitxt#1193)
    return openai_refusal(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {_json_kind(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _openai_range(
    param: str, value: float, *, integer: bool, low: float | None = None, high: float | None = None
) -> None:
    """OpenAI's range check: "Invalid 'n': integer above maximum value. Expected a value <=
    128, but got 130 instead." with code ``integer_above_max_value`` (thisisartium/
    continuous-alignment-testing#25, OpenBMB/ChatDev#446); decimal parameters say ``decimal``
    (the ``decimal_above_max_value`` code is listed as OpenAI's by SambaNova's API error docs)."""
    what = "integer" if integer else "decimal"
    for bound, broken, word, relation in (
        (low, "below", "minimum", ">="),
        (high, "above", "maximum", "<="),
    ):
        if bound is None or (value >= bound if broken == "below" else value <= bound):
            continue
        shown_bound = _shown(int(bound) if float(bound).is_integer() else bound)
        raise openai_refusal(
            400,
            f"Invalid '{param}': {what} {broken} {word} value. Expected a value {relation} "
            f"{shown_bound}, but got {_shown(value)} instead.",
            param=param,
            code=f"{what}_{broken}_{'min' if broken == 'below' else 'max'}_value",
        )


def _openai_number(
    body: Mapping[str, Any], param: str, *, integer: bool, low: float | None, high: float | None
) -> None:
    value = body.get(param)
    if value is None:  # absent or null: the default
        return
    if integer and not _is_int(value):
        raise _openai_type_error(param, "an integer", value)
    if not integer and not _is_number(value):
        raise _openai_type_error(param, "a decimal", value)
    _openai_range(param, value, integer=integer, low=low, high=high)


def _openai_stop(body: Mapping[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _openai_type_error("stop", "one of a string or array of strings", stop)
    if len(stop) > 4:
        # OpenAI takes "up to 4 sequences" (API reference); refused like other array limits.
        raise openai_refusal(
            400,
            "Invalid 'stop': array too long. Expected an array with maximum length 4, but got "
            f"an array with length {len(stop)} instead.",
            param="stop",
            code="array_above_max_length",
        )


def _openai_messages(body: Mapping[str, Any]) -> None:
    if "messages" not in body or body["messages"] is None:
        # {"code": "missing_required_parameter", "message": "Missing required parameter:
        # 'messages'.", "param": "messages"} (SilasMarvin/lsp-ai#108)
        raise openai_refusal(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _openai_type_error("messages", "an array of objects", messages)
    if not messages:
        raise openai_refusal(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _openai_type_error(where, "an object", message)
        if "role" not in message:
            raise openai_refusal(
                400,
                f"Missing required parameter: '{where}.role'.",
                param=f"{where}.role",
                code="missing_required_parameter",
            )
        role = message["role"]
        if role not in _OPENAI_ROLES:
            supported = ", ".join(f"'{r}'" for r in _OPENAI_ROLES[:-1])
            raise openai_refusal(
                400,
                f"Invalid value: {_shown(role)}. Supported values are: {supported}, and "
                f"'{_OPENAI_ROLES[-1]}'.",
                param=f"{where}.role",
                code="invalid_value",
            )
        # "Missing required parameter: 'messages[2].content[0].type'." (neuron-core/
        # neuron-ai#292): the same message for a missing content.
        if "content" not in message and role in ("system", "user", "developer"):
            raise openai_refusal(
                400,
                f"Missing required parameter: '{where}.content'.",
                param=f"{where}.content",
                code="missing_required_parameter",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _openai_type_error(
                f"{where}.content", "one of a string or array of objects", content
            )


def validate_openai(endpoint: Endpoint, body: Mapping[str, Any]) -> None:
    """OpenAI's request validation of one body; raises the refusal OpenAI sends."""
    known = OPENAI_CHAT_PARAMS if endpoint == "chat" else OPENAI_COMPLETION_PARAMS
    for name in body:
        if name not in known:
            # "Unrecognized request argument supplied: logprobs" (openai/openai-python#433)
            raise openai_refusal(400, f"Unrecognized request argument supplied: {name}")
    model = body.get("model")
    if model is None:
        # {"message": "you must provide a model parameter", "type": "invalid_request_error",
        # "param": null, "code": null} (transitive-bullshit/agentic#530)
        raise openai_refusal(400, "you must provide a model parameter")
    if not isinstance(model, str):
        raise _openai_type_error("model", "a string", model)
    if endpoint == "chat":
        _openai_messages(body)
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise openai_refusal(
                400,
                "Missing required parameter: 'prompt'.",
                param="prompt",
                code="missing_required_parameter",
            )
        if not isinstance(prompt, str | list):
            raise _openai_type_error("prompt", "one of a string or array of strings", prompt)
    _openai_number(body, "temperature", integer=False, low=0, high=2)
    _openai_number(body, "top_p", integer=False, low=0, high=1)
    _openai_number(body, "n", integer=True, low=1, high=128)
    _openai_number(body, "max_tokens", integer=True, low=1, high=None)
    _openai_number(body, "max_completion_tokens", integer=True, low=1, high=None)
    _openai_number(body, "seed", integer=True, low=None, high=None)
    _openai_stop(body)
    if endpoint == "chat":
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _openai_type_error("logprobs", "a boolean", logprobs)
        _openai_number(body, "top_logprobs", integer=True, low=0, high=20)
        if body.get("top_logprobs") is not None and not logprobs:
            # {"message": "The 'top_logprobs' parameter is only allowed when 'logprobs' is
            # enabled.", "param": "top_logprobs", "code": null} (IBM/unitxt#1193)
            raise openai_refusal(
                400,
                "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
                param="top_logprobs",
            )
    else:
        _openai_number(body, "logprobs", integer=True, low=0, high=5)


def _requested_max_tokens(endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens") if endpoint == "chat" else None
    if value is None:
        value = body.get("max_tokens")
    return value if _is_int(value) else None


def check_openai_limits(
    profile: ModelProfile, endpoint: Endpoint, body: Mapping[str, Any], prompt_tokens: int
) -> None:
    """The model's output cap and context window, with OpenAI's messages."""
    max_tokens = _requested_max_tokens(endpoint, body)
    cap = profile.max_output_tokens
    if cap is not None and max_tokens is not None and max_tokens > cap:
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise openai_refusal(
            400,
            f"{param} is too large: {max_tokens}. This model supports at most {cap} completion "
            f"tokens, whereas you provided {max_tokens}.",
            param=param,
            code="invalid_value",
        )
    window = profile.context_window
    if window is None:
        return
    if endpoint == "completions":
        # The legacy endpoint's wording (hwchase17/chat-your-data#10); a completion defaults
        # to 16 tokens there.
        wanted = 16 if max_tokens is None else max_tokens
        if prompt_tokens + wanted > window:
            raise openai_refusal(
                400,
                f"This model's maximum context length is {window} tokens, however you "
                f"requested {prompt_tokens + wanted} tokens ({prompt_tokens} in your prompt; "
                f"{wanted} for the completion). Please reduce your prompt; or completion length.",
                code="context_length_exceeded",
            )
        return
    if prompt_tokens > window:
        # {"message": "This model's maximum context length is 4097 tokens. However, your
        # messages resulted in 4294 tokens. Please reduce the length of the messages.",
        # "param": "messages", "code": "context_length_exceeded"} (chathub-dev/chathub#126)
        raise openai_refusal(
            400,
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > window:
        # "This model's maximum context length is 4097 tokens. However, you requested 4203
        # tokens (3703 in the messages, 500 in the completion). Please reduce the length of
        # the messages or completion." (The-Vibe-Company/quivr#505)
        raise openai_refusal(
            400,
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
            param="messages",
            code="context_length_exceeded",
        )


def openai_wrong_endpoint(endpoint: Endpoint) -> _Refused:
    """OpenAI's 404 for a model asked on the endpoint it does not serve."""
    if endpoint == "completions":
        # 404 {"message": "This is a chat model and not supported in the v1/completions
        # endpoint. Did you mean to use v1/chat/completions?", "type": "invalid_request_error",
        # "param": "model", "code": null} (RomanHotsiy/commitgpt#43, hegelai/prompttools#115)
        return openai_refusal(
            404,
            "This is a chat model and not supported in the v1/completions endpoint. Did you "
            "mean to use v1/chat/completions?",
            param="model",
        )
    # 404 "This is not a chat model and thus not supported in the v1/chat/completions
    # endpoint. Did you mean to use v1/completions?", param "model" (Chanzhaoyu/chatgpt-web#1428)
    return openai_refusal(
        404,
        "This is not a chat model and thus not supported in the v1/chat/completions endpoint. "
        "Did you mean to use v1/completions?",
        param="model",
    )


def masked_key(key: str) -> str:
    """How OpenAI shows a wrong key: ``sk-4sJHr****...****w8ZP`` (the first 8 and last 4
    characters; chatanywhere/GPT_API_free#427); a short one is shown whole ("Incorrect API key
    provided: API_KEY.", SevaSk/ecoute#163)."""
    if len(key) <= 12:
        return key
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


# ---- vLLM -----------------------------------------------------------------------------------

#: VLLM_MAX_N_SEQUENCES' default.
_VLLM_MAX_N = 16384


def _vllm_type_error(name: str, expected: str, value: object) -> _Refused:
    # vLLM parses the body with pydantic: a wrong type is a 400 BadRequestError. Only the
    # status and envelope are copied here; pydantic's exact wording varies with its version.
    return vllm_refusal(
        f"1 validation error for request\n{name}\n  Input should be {expected} "
        f"[input_value={value!r}, input_type={type(value).__name__}]"
    )


def validate_vllm_body(endpoint: Endpoint, body: Mapping[str, Any]) -> None:
    """What vLLM checks while parsing the body (before it looks at the model). Unknown fields
    are accepted (vLLM only logs "The following fields were present in the request but
    ignored")."""
    for name in ("temperature", "top_p"):
        if body.get(name) is not None and not _is_number(body[name]):
            raise _vllm_type_error(name, "a valid number", body[name])
    for name in ("n", "max_tokens", "max_completion_tokens", "seed"):
        if body.get(name) is not None and not _is_int(body[name]):
            raise _vllm_type_error(name, "a valid integer", body[name])
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _vllm_type_error("messages", "a valid list", messages)
        top = body.get("top_logprobs")
        if top is not None and not _is_number(top):
            # vllm/entrypoints/openai/chat_completion/protocol.py check_logprobs
            raise vllm_refusal(
                "`top_logprobs` must be an integer.", param="top_logprobs", value=top
            )
        if top is not None:
            if top < 0 and top != -1:
                raise vllm_refusal(
                    "`top_logprobs` must be a positive value or -1.",
                    param="top_logprobs",
                    value=top,
                )
            if (top == -1 or top > 0) and not body.get("logprobs"):
                raise vllm_refusal(
                    "when using `top_logprobs`, `logprobs` must be set to true.",
                    param="top_logprobs",
                )
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise _vllm_type_error("prompt", "a valid string", prompt)
        logprobs = body.get("logprobs")
        if logprobs is not None and not _is_int(logprobs):
            raise _vllm_type_error("logprobs", "a valid integer", logprobs)


def check_vllm_context(
    profile: ModelProfile, endpoint: Endpoint, body: Mapping[str, Any], prompt_tokens: int
) -> None:
    """vLLM's ``_validate_input`` (vllm/entrypoints/openai/engine/serving.py)."""
    window = profile.context_window
    if window is None:
        return
    if prompt_tokens >= window:
        raise vllm_refusal(
            f"This model's maximum context length is {window} tokens. However, your request "
            f"has {prompt_tokens} input tokens. Please reduce the length of the input messages.",
            param="input_tokens",
            value=prompt_tokens,
        )
    max_tokens = _requested_max_tokens(endpoint, body)
    if max_tokens is not None and prompt_tokens + max_tokens > window:
        raise vllm_refusal(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {window} tokens and your request has {prompt_tokens} "
            f"input tokens ({max_tokens} > {window} - {prompt_tokens}).",
            param="max_tokens",
            value=max_tokens,
        )


def check_vllm_sampling(profile: ModelProfile, endpoint: Endpoint, body: Mapping[str, Any]) -> None:
    """``SamplingParams._verify_args`` and the engine's logprobs cap (vllm/sampling_params.py,
    vllm/v1/engine/processor.py), in their order."""
    n = body.get("n")
    n = 1 if n is None else n
    if n < 1:
        raise vllm_refusal(f"n must be at least 1, got {n}.")
    if n > _VLLM_MAX_N:
        raise vllm_refusal(
            f"n must be at most {_VLLM_MAX_N}, got {n}. To increase this limit, set the "
            "VLLM_MAX_N_SEQUENCES environment variable."
        )
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else float(temperature)
    if temperature < 0.0:
        raise vllm_refusal(
            f"temperature must be non-negative, got {temperature}.",
            param="temperature",
            value=temperature,
        )
    if temperature > 2.0:
        raise vllm_refusal(
            f"temperature must be in [0, 2], got {temperature}.",
            param="temperature",
            value=temperature,
        )
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise vllm_refusal(f"top_p must be in (0, 1], got {top_p}.", param="top_p", value=top_p)
    max_tokens = _requested_max_tokens(endpoint, body)
    if max_tokens is not None and max_tokens < 1:
        raise vllm_refusal(
            f"max_tokens must be at least 1, got {max_tokens}.",
            param="max_tokens",
            value=max_tokens,
        )
    stop = body.get("stop")
    if isinstance(stop, list) and any(not s for s in stop):
        raise vllm_refusal("stop cannot contain an empty string.")
    if temperature < 1e-5 and n > 1:
        # Greedy sampling cannot give n different samples.
        raise vllm_refusal(f"n must be 1 when using greedy sampling, got {n}.")
    wanted = _requested_logprobs(endpoint, body)
    if wanted is not None and wanted > profile.max_logprobs:
        raise vllm_refusal(
            f"Requested sample logprobs of {wanted}, which is greater than max allowed: "
            f"{profile.max_logprobs}",
            param="logprobs",
            value=wanted,
        )


def _requested_logprobs(endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
    """How many top logprobs per token a body asks for (None: no logprobs)."""
    if endpoint == "chat":
        if not body.get("logprobs"):
            return None
        top = body.get("top_logprobs")
        return int(top) if _is_number(top) else 0
    value = body.get("logprobs")
    return value if _is_int(value) else None


#: vLLM's refusal of chat for a model without a chat template, raised by
#: ``safe_apply_chat_template`` (vllm/renderers/hf.py) as a ``ChatTemplateResolutionError``
#: (a ValueError: 400 BadRequestError). Seen as {'error': {'message': '... does not define one.
#: None', 'type': 'BadRequestError', 'param': None, 'code': 400}} from vLLM 0.9-0.11, which
#: appended the cause (QwenLM/Qwen3-Omni#105); current vLLM sends the message alone.
VLLM_NO_CHAT_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
    "a chat template if the tokenizer does not define one."
)


# ---- transformers serve ---------------------------------------------------------------------

#: The fields ``transformers serve`` accepts (transformers/cli/serving/chat_completion.py and
#: completion.py: OpenAI's create-params TypedDicts plus a few of its own); any other field is
#: a 422 "Unexpected fields in the request: {...}" (BaseHandler._validate_request, utils.py).
TRANSFORMERS_CHAT_FIELDS = OPENAI_CHAT_PARAMS | {"generation_config", "chat_template_kwargs"}
TRANSFORMERS_COMPLETION_FIELDS = OPENAI_COMPLETION_PARAMS | {"generation_config"}


def validate_transformers(endpoint: Endpoint, body: Mapping[str, Any]) -> None:
    known = TRANSFORMERS_CHAT_FIELDS if endpoint == "chat" else TRANSFORMERS_COMPLETION_FIELDS
    unexpected = set(body) - known
    if unexpected:
        raise transformers_refusal(422, f"Unexpected fields in the request: {unexpected}")
    if endpoint == "completions" and not isinstance(body.get("prompt", ""), str):
        raise transformers_refusal(400, "prompt must be a string.")


# --------------------------------------------------------------------------------------------
# Replies


def _shape_text(
    text: str, stop: Sequence[str], max_tokens: int | None, keep_stop: bool
) -> tuple[list[str], str, str | None]:
    """Apply stop strings, then max_tokens; return the tokens, the finish reason and the stop
    string that ended the text (None when none did)."""
    finish = "stop"
    hits = [(i, s) for s in stop if s for i in (text.find(s),) if i >= 0]
    matched = None
    if hits:
        cut, matched = min(hits)
        text = text[: cut + len(matched)] if keep_stop else text[:cut]
    tokens = _tokens(text)
    trailing = text[len("".join(tokens)) :]
    if trailing:
        tokens.append(trailing)  # whitespace after the last word is part of the text too
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens = tokens[:max_tokens]
        finish = "length"
        matched = None
    return tokens, finish, matched


def _logprob(position: int) -> float:
    return -round(0.1 * (1 + position % 5), 3)


def _alternatives(token: str, position: int, k: int) -> list[tuple[str, float]]:
    """The token itself first, then made-up alternatives, each less likely than the last."""
    first = _logprob(position)
    return [(token, first)] + [(f"alt{j}", first - j) for j in range(1, k)]


def _chat_logprobs(tokens: list[str], top_k: int, server: ServerKind) -> dict[str, Any]:
    content = [
        {
            "token": token,
            "logprob": _logprob(i),
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": alt, "logprob": lp, "bytes": list(alt.encode())}
                for alt, lp in _alternatives(token, i, top_k)
            ][:top_k],
        }
        for i, token in enumerate(tokens)
    ]
    # OpenAI's ChoiceLogprobs carries a refusal list too; vLLM's ChatCompletionLogProbs does not.
    return {"content": content, "refusal": None} if server == "openai" else {"content": content}


def _text_logprobs(tokens: list[str], top_k: int) -> dict[str, Any]:
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(i) for i in range(len(tokens))],
        "top_logprobs": [
            dict(_alternatives(token, i, top_k)[:top_k]) for i, token in enumerate(tokens)
        ],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class _Sample:
    tokens: list[str]
    finish: str
    stop_reason: str | None


def _chat_choice(
    index: int, sample: _Sample, top_k: int | None, server: ServerKind
) -> dict[str, Any]:
    text = "".join(sample.tokens)
    logprobs = None if top_k is None else _chat_logprobs(sample.tokens, top_k, server)
    if server == "openai":
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": sample.finish,
        }
    if server == "vllm":
        # vLLM's ChatMessage (empty tool_calls are dropped by its serializer) and choice.
        message = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": sample.finish,
            "stop_reason": sample.stop_reason,
            "token_ids": None,
        }
    # transformers serve dumps the SDK's ChatCompletion with exclude_none=True: no logprobs key.
    return {
        "finish_reason": sample.finish,
        "index": index,
        "message": {"content": text, "role": "assistant"},
    }


def _text_choice(
    index: int, sample: _Sample, top_k: int | None, server: ServerKind
) -> dict[str, Any]:
    text = "".join(sample.tokens)
    logprobs = None if top_k is None else _text_logprobs(sample.tokens, top_k)
    if server == "openai":
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": sample.finish}
    if server == "vllm":
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": sample.finish,
            "stop_reason": sample.stop_reason,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
        }
    # transformers serve: CompletionChoice(logprobs=None) dumped with exclude_none=True.
    return {"finish_reason": sample.finish, "index": index, "text": text}


class _DroppedResponse(Response):
    """Promise a body, send part of it, then return: uvicorn closes the connection mid-reply."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": "cut-', "more_body": True})


class _QuietDrops(logging.Filter):
    """Drops are deliberate here; keep uvicorn from logging each one as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _DROP_MESSAGE


def _digest_id(index: int, length: int, alphabet: str = "0123456789abcdef") -> str:
    """A deterministic id of ``length`` characters for request ``index``."""
    number = int(hashlib.sha256(f"fake-{index}".encode()).hexdigest(), 16)
    chars = []
    for _ in range(length):
        number, rest = divmod(number, len(alphabet))
        chars.append(alphabet[rest])
    return "".join(chars)


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------------------------
# OpenAI's per-model rate limits


@dataclass
class _Bucket:
    """A continuously refilled budget per minute, as OpenAI's limits behave: ``remaining`` is
    what is left now, ``reset`` how long until it is full again."""

    capacity: float
    level: float
    t: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.capacity / 60.0)
        self.t = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)

    def reset_s(self) -> float:
        return (self.capacity - self.level) * 60.0 / self.capacity


# --------------------------------------------------------------------------------------------
# The server


@dataclass
class _Counters:
    total: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    by_fault: Counter[str] = field(default_factory=Counter)
    arrivals: list[Arrival] = field(default_factory=list)
    body_counts: Counter[str] = field(default_factory=Counter)
    ok_counts: Counter[str] = field(default_factory=Counter)
    in_progress: int = 0
    max_in_progress: int = 0
    rate_limited: int = 0
    refusals: list[Refusal] = field(default_factory=list)


def _profiles_of(
    models: Mapping[str, ModelProfile] | Sequence[str] | None, default: ModelProfile
) -> dict[str, ModelProfile]:
    if models is None:
        return dict(DEFAULT_MODELS)
    if isinstance(models, Mapping):
        return dict(models)
    if isinstance(models, str):
        return {models: default}
    return dict.fromkeys(models, default)


class FakeOpenAIServer:
    """The server's behaviour and counters; ``start``/``stop`` run it (or use the helper).

    ``models`` maps each served model name to its :class:`ModelProfile` (a sequence of names
    serves each with ``default_profile``; None serves :data:`DEFAULT_MODELS`). ``server`` is
    whose front door it is: who answers a bad key, a missing or unknown model, and how bodies
    are validated; by default the one server all profiles share. ``unknown_model_404=False``
    serves an unknown name with ``default_profile`` instead of refusing it (an escape hatch for
    ad-hoc experiments, never for tests of drpo). ``api_key`` makes every request need that
    bearer key; ``echo_key_in_401`` makes the 401 quote the whole key that was sent (a careless
    server, for redaction tests; OpenAI masks it).

    Settings are plain attributes and may be changed while it runs (e.g. ``server.faults = ...``).
    """

    def __init__(
        self,
        *,
        responder: Responder | None = None,
        faults: FaultPlan | None = None,
        latency_s: Latency = 0.0,
        rpm_limit: int | None = None,
        rpm_window_s: float = 60.0,
        ratelimit_headers: bool = False,
        extra_headers: Mapping[str, str] | Callable[[RequestInfo], Mapping[str, str]] | None = None,
        models: Mapping[str, ModelProfile] | Sequence[str] | None = None,
        default_profile: ModelProfile = VLLM_INSTRUCT,
        server: ServerKind | None = None,
        unknown_model_404: bool = True,
        api_key: str | None = None,
        echo_key_in_401: bool = False,
        cached_tokens: int = 0,
    ) -> None:
        self.responder: Responder = responder or default_responder
        self.latency_s: Latency = latency_s
        self.rpm_limit = rpm_limit
        self.rpm_window_s = rpm_window_s
        self.ratelimit_headers = ratelimit_headers
        self.extra_headers = extra_headers
        self.profiles: dict[str, ModelProfile] = _profiles_of(models, default_profile)
        if not self.profiles:
            raise ValueError("a server must serve at least one model")
        self.default_profile = default_profile
        kinds = {profile.server for profile in self.profiles.values()}
        if server is None:
            if len(kinds) > 1:
                raise ValueError(
                    f"the profiles copy different servers ({sorted(kinds)}): say which one "
                    "answers for the server with server=..."
                )
            server = next(iter(kinds))
        if server == "transformers" and api_key is not None:
            raise ValueError("transformers serve has no API key option")
        self.kind: ServerKind = server
        self.unknown_model_404 = unknown_model_404
        self.api_key = api_key
        self.echo_key_in_401 = echo_key_in_401
        self.cached_tokens = cached_tokens
        self._lock = threading.RLock()
        self._counters = _Counters()
        self._accepted: deque[float] = deque()  # for rpm_limit: times of requests let through
        self._buckets: dict[tuple[str, str], _Bucket] = {}  # OpenAI limits per (model, kind)
        self.faults = faults
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- the fault plan -----------------------------------------------------------------

    @property
    def faults(self) -> FaultPlan | None:
        return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan | None) -> None:
        """A callable is asked per request; an iterable is consumed in arrival order."""
        with self._lock:
            self._faults = plan
            self._fault_queue: deque[Fault | str] | None = (
                None if plan is None or callable(plan) else deque(plan)
            )

    def _decide(self, info: RequestInfo) -> Fault:
        plan = self._faults
        if plan is None:
            chosen: Fault | str | None = None
        elif callable(plan):
            chosen = plan(info)
        else:
            queue = self._fault_queue
            chosen = queue.popleft() if queue else None
        if chosen is None:
            return OK
        return Fault(chosen) if isinstance(chosen, str) else chosen  # type: ignore[arg-type]

    # ---- counters -----------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        """The served model names."""
        return list(self.profiles)

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the fake server is not running")
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def total(self) -> int:
        with self._lock:
            return self._counters.total

    @property
    def by_path(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counters.by_path)

    @property
    def by_fault(self) -> Counter[str]:
        """Requests per fault kind served (``rate_limited`` for the server's own 429s)."""
        with self._lock:
            return Counter(self._counters.by_fault)

    @property
    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._counters.arrivals)

    @property
    def refusals(self) -> list[Refusal]:
        """Requests the server refused by itself: bad key, unknown model, wrong endpoint,
        invalid parameters, over the context window or the model's rate limits."""
        with self._lock:
            return list(self._counters.refusals)

    @property
    def max_in_progress(self) -> int:
        """The most requests the server was working on at one moment."""
        with self._lock:
            return self._counters.max_in_progress

    @property
    def rate_limited(self) -> int:
        """429s sent by the server's own ``rpm_limit`` (not by the fault plan)."""
        with self._lock:
            return self._counters.rate_limited

    def arrivals_of(self, body_hash_: str) -> int:
        with self._lock:
            return self._counters.body_counts[body_hash_]

    def ok_answers(self, body_hash_: str | None = None) -> int:
        """200 replies with a completion sent, for one body hash or in all."""
        with self._lock:
            if body_hash_ is None:
                return sum(self._counters.ok_counts.values())
            return self._counters.ok_counts[body_hash_]

    def ok_counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counters.ok_counts)

    def max_in_window(self, window_s: float, path: str | None = None) -> int:
        """Most arrivals in any window of ``window_s`` (the rate-limit check)."""
        times = [a.t for a in self.arrivals if path is None or a.path == path]
        return max_in_window(times, window_s)

    def reset(self) -> None:
        """Forget all counts (the settings stay)."""
        with self._lock:
            self._counters = _Counters()
            self._accepted.clear()
            self._buckets.clear()

    # ---- request handling -----------------------------------------------------------------

    def _arrive(self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
        """Count the arrival and pick its fault, atomically."""
        digest = body_hash(body)
        with self._lock:
            c = self._counters
            info = RequestInfo(
                index=c.total,
                path=path,
                body=body,
                body_hash=digest,
                seen_before=c.body_counts[digest],
                headers=headers,
            )
            now = time.monotonic()
            c.total += 1
            c.by_path[path] += 1
            c.body_counts[digest] += 1
            c.in_progress += 1
            c.max_in_progress = max(c.max_in_progress, c.in_progress)
            fault = self._decide(info)
            limited_for = self._server_limit(now) if fault.kind == "ok" else None
            kind = "rate_limited" if limited_for is not None else fault.kind
            c.by_fault[kind] += 1
            if limited_for is not None:
                c.rate_limited += 1
            c.arrivals.append(Arrival(now, info.index, path, digest, info.text, kind))
            return info, fault, limited_for

    def _server_limit(self, now: float) -> float | None:
        """Seconds to wait if the server's own request limit is reached, else None (accepted)."""
        if self.rpm_limit is None:
            return None
        while self._accepted and self._accepted[0] <= now - self.rpm_window_s:
            self._accepted.popleft()
        if len(self._accepted) >= self.rpm_limit:
            return self._accepted[0] + self.rpm_window_s - now
        self._accepted.append(now)
        return None

    def _ratelimit_headers(self) -> dict[str, str]:
        if not self.ratelimit_headers or self.rpm_limit is None:
            return {}
        now = time.monotonic()
        with self._lock:
            live = [t for t in self._accepted if t > now - self.rpm_window_s]
        reset = (live[0] + self.rpm_window_s - now) if live else 0.0
        return {
            "x-ratelimit-limit-requests": str(self.rpm_limit),
            "x-ratelimit-remaining-requests": str(max(0, self.rpm_limit - len(live))),
            "x-ratelimit-reset-requests": format_reset(reset),
        }

    def _kind_headers(self, kind: ServerKind, index: int, elapsed_s: float) -> dict[str, str]:
        """The headers each real server sends with every reply."""
        if kind == "openai":
            return {
                "x-request-id": f"req_{_digest_id(index, 32)}",
                "openai-processing-ms": str(max(1, round(elapsed_s * 1000))),
                "openai-version": "2020-10-01",
            }
        if kind == "transformers":
            # request_id_middleware (transformers/cli/serving/server.py): a uuid4 per request.
            return {"x-request-id": str(uuid.UUID(_digest_id(index, 32)))}
        return {}  # vLLM sends x-request-id only with --enable-request-id-headers

    def _common_headers(
        self, info: RequestInfo, kind: ServerKind, elapsed_s: float
    ) -> dict[str, str]:
        headers = self._kind_headers(kind, info.index, elapsed_s)
        headers.update(self._ratelimit_headers())
        extra = self.extra_headers
        if callable(extra):
            headers.update(extra(info))
        elif extra:
            headers.update(extra)
        return headers

    async def _completion(self, request: Request) -> Response:
        path = request.url.path
        try:
            body = await request.json()
        except ValueError:
            return self._unparsable("We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return self._unparsable("The body of your request is not a JSON object.")
        info, fault, limited_for = self._arrive(path, body, dict(request.headers))
        try:
            return await self._respond(request, info, fault, limited_for)
        finally:
            with self._lock:
                self._counters.in_progress -= 1

    def _unparsable(self, message: str) -> Response:
        if self.kind == "openai":
            return JSONResponse(_error_body(message, "invalid_request_error"), 400)
        if self.kind == "vllm":
            body = {
                "error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}
            }
            return JSONResponse(body, 400)
        return JSONResponse({"detail": message}, 422)

    async def _respond(
        self, request: Request, info: RequestInfo, fault: Fault, limited_for: float | None
    ) -> Response:
        started = time.monotonic()
        latency = fault.latency_s
        if latency is None:
            latency = self.latency_s(info) if callable(self.latency_s) else self.latency_s
        if latency > 0:
            await anyio.sleep(latency)
        endpoint: Endpoint = "chat" if info.path == CHAT_PATH else "completions"
        sent_key = self._sent_key(request)
        profile: ModelProfile | None = None
        try:
            self._check_key(request, sent_key)
            name, profile = self._admit(endpoint, info.body)
            limits: dict[str, str] = {}
            if limited_for is None:
                limits = self._model_limits(name, profile, endpoint, info.body)
        except _Refused as refusal:
            self._record(info, refusal)
            kind = self.kind if profile is None else profile.server
            return refusal.response(self._common_headers(info, kind, time.monotonic() - started))
        headers = self._common_headers(info, profile.server, time.monotonic() - started)
        headers.update(limits)
        if limited_for is not None:
            headers["retry-after"] = f"{max(0.0, limited_for):.3f}"
            return self._error(
                429, headers, "Rate limit reached for requests", "rate_limit_exceeded"
            )
        return await self._fault_reply(request, info, fault, headers, sent_key, name, profile)

    def _record(self, info: RequestInfo, refusal: _Refused) -> None:
        entry = Refusal(
            index=info.index,
            path=info.path,
            model=info.body.get("model"),
            status=refusal.status,
            code=refusal.code,
            message=refusal.message,
        )
        with self._lock:
            self._counters.refusals.append(entry)

    # ---- admission: key, model, endpoint, parameters, limits --------------------------------

    @staticmethod
    def _sent_key(request: Request) -> str | None:
        auth = request.headers.get("authorization")
        if auth is None:
            return None
        return auth.removeprefix("Bearer ").strip()

    def _check_key(self, request: Request, sent_key: str | None) -> None:
        if self.api_key is None or sent_key == self.api_key:
            return
        if self.kind == "vllm":
            # vLLM's API-key middleware: 401 {"error": "Unauthorized"} for a missing or
            # wrong bearer key (vllm/entrypoints/openai/api_server.py, --api-key).
            raise _Refused(401, {"error": "Unauthorized"}, message="Unauthorized")
        if sent_key is None:
            # OpenAI's answer to a request without an Authorization header
            # (yihong0618/bilingual_book_maker#137; the key page moved to platform.openai.com).
            raise openai_refusal(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or as the password field (with blank username) if you're accessing the API "
                "from your browser and are prompted for a username and password. You can "
                "obtain an API key from https://platform.openai.com/account/api-keys.",
            )
        shown = sent_key if self.echo_key_in_401 else masked_key(sent_key)
        raise openai_refusal(401, self._bad_key_message(shown), code="invalid_api_key")

    def _admit(self, endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[str, ModelProfile]:
        """Everything the real server checks before it generates, in its order; raises the
        refusal it would send. Returns the model name and its profile."""
        kind = self.kind
        if kind == "openai":
            validate_openai(endpoint, body)
            name = body["model"]
            profile = self._lookup(name)
            if endpoint not in profile.endpoints:
                raise openai_wrong_endpoint(endpoint)
            check_openai_limits(profile, endpoint, body, prompt_tokens_of(body))
            return name, profile
        if kind == "vllm":
            validate_vllm_body(endpoint, body)
            name = self._model_or_first(body)
            profile = self._lookup(name)
            if endpoint not in profile.endpoints:
                raise vllm_refusal(VLLM_NO_CHAT_TEMPLATE)
            check_vllm_context(profile, endpoint, body, prompt_tokens_of(body))
            check_vllm_sampling(profile, endpoint, body)
            return name, profile
        validate_transformers(endpoint, body)
        name = self._model_or_first(body)
        profile = self._lookup(name)
        if endpoint not in profile.endpoints:
            # apply_chat_template raises ValueError("Cannot use chat template functions because
            # tokenizer.chat_template is not set ...") (transformers/tokenization_utils_base.py);
            # serve has no handler for it, so Starlette answers 500 "Internal Server Error".
            raise _Refused(500, "Internal Server Error", message="Internal Server Error")
        return name, profile

    def _model_or_first(self, body: Mapping[str, Any]) -> str:
        """vLLM and transformers serve take a missing model to mean the one they serve."""
        model = body.get("model")
        return next(iter(self.profiles)) if model is None else model

    def _lookup(self, name: object) -> ModelProfile:
        profile = self.profiles.get(name) if isinstance(name, str) else None
        if profile is not None:
            return profile
        if not self.unknown_model_404:
            return self.default_profile
        if self.kind == "openai":
            # 404 {"message": "The model `gpt-5o` does not exist or you do not have access to
            # it.", "type": "invalid_request_error", "param": null, "code": "model_not_found"}
            raise openai_refusal(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        if self.kind == "vllm":
            # OpenAIServing._check_model (vllm/entrypoints/openai/engine/serving.py)
            raise vllm_refusal(
                f"The model `{name}` does not exist.",
                status=404,
                kind="NotFoundError",
                param="model",
                validation_error=False,
            )
        # A server started for one model (``transformers serve MODEL``) is pinned to it
        # (BaseHandler._resolve_model, transformers/cli/serving/utils.py).
        pinned = next(iter(self.profiles))
        raise transformers_refusal(400, f"Server is pinned to '{pinned}'; requested '{name}'.")

    def _model_limits(
        self, name: str, profile: ModelProfile, endpoint: Endpoint, body: Mapping[str, Any]
    ) -> dict[str, str]:
        """OpenAI's per-model request and token limits: charge this request, refuse it with
        OpenAI's 429 when a budget is short, and return the ``x-ratelimit-*`` headers."""
        if profile.rate_limits is None:
            return {}
        rpm, tpm = profile.rate_limits
        n = body.get("n") if _is_int(body.get("n")) else 1
        max_tokens = _requested_max_tokens(endpoint, body) or 0
        wanted = prompt_tokens_of(body) + max_tokens * n
        now = time.monotonic()
        with self._lock:
            requests = self._buckets.setdefault((name, "requests"), _Bucket(rpm, rpm, now))
            tokens = self._buckets.setdefault((name, "tokens"), _Bucket(tpm, tpm, now))
            requests.refill(now)
            tokens.refill(now)
            short = None
            if wanted > tpm:
                short = ("too large", "tokens per min (TPM)", tpm, tokens, wanted)
            elif requests.level < 1:
                short = ("requests", "requests per min (RPM)", rpm, requests, 1)
            elif tokens.level < wanted:
                short = ("tokens", "tokens per min (TPM)", tpm, tokens, wanted)
            else:
                requests.level -= 1
                tokens.level -= wanted
            headers = {
                "x-ratelimit-limit-requests": str(rpm),
                "x-ratelimit-limit-tokens": str(tpm),
                "x-ratelimit-remaining-requests": str(max(0, math.floor(requests.level))),
                "x-ratelimit-remaining-tokens": str(max(0, math.floor(tokens.level))),
                "x-ratelimit-reset-requests": format_reset(requests.reset_s()),
                "x-ratelimit-reset-tokens": format_reset(tokens.reset_s()),
            }
        if short is not None and short[0] == "too large":
            # A request larger than the whole minute's budget can never run: 429 {"message":
            # "Request too large for gpt-4o in organization org-... on tokens per min (TPM):
            # Limit 30000, Requested 36278. The input or output tokens must be reduced in order
            # to run successfully. Visit https://platform.openai.com/account/rate-limits to
            # learn more.", "type": "tokens", "code": "rate_limit_exceeded"} (Aider-AI/aider#1880)
            refusal = openai_refusal(
                429,
                f"Request too large for {name} in organization org-fake on tokens per min (TPM): "
                f"Limit {tpm}, Requested {wanted}. The input or output tokens must be reduced in "
                "order to run successfully. Visit https://platform.openai.com/account/rate-limits "
                "to learn more.",
                code="rate_limit_exceeded",
                kind="tokens",
            )
            raise _RefusedWithHeaders(refusal, headers)
        if short is not None:
            kind, what, limit, bucket, asked = short
            used = limit - max(0, math.floor(bucket.level))
            # 429 {"message": "Rate limit reached for gpt-4o-mini in organization org-... on
            # requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.
            # Visit https://platform.openai.com/account/rate-limits to learn more.", "type":
            # "requests", "param": null, "code": "rate_limit_exceeded"}
            # (feder-cr/invisible_playwright_mcp#249; TPM: BuilderIO/micro-agent#86)
            refusal = openai_refusal(
                429,
                f"Rate limit reached for {name} in organization org-fake on {what}: Limit "
                f"{limit}, Used {used}, Requested {asked}. Please try again in "
                f"{format_reset(bucket.wait_for(asked))}. Visit "
                "https://platform.openai.com/account/rate-limits to learn more.",
                code="rate_limit_exceeded",
                kind=kind,
            )
            raise _RefusedWithHeaders(refusal, headers)
        return headers

    @staticmethod
    def _bad_key_message(shown_key: str) -> str:
        # "Incorrect API key provided: sk-4sJHr***...***w8ZP. You can find your API key at
        # https://platform.openai.com/account/api-keys." (chatanywhere/GPT_API_free#427)
        return (
            f"Incorrect API key provided: {shown_key}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )

    @staticmethod
    def _error(
        status: int, headers: dict[str, str], message: str, code: str | None, kind: str = ""
    ) -> Response:
        kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
        return JSONResponse(_error_body(message, kind, code), status, headers=headers)

    # ---- faults and answers ---------------------------------------------------------------

    async def _fault_reply(
        self,
        request: Request,
        info: RequestInfo,
        fault: Fault,
        headers: dict[str, str],
        sent_key: str | None,
        name: str,
        profile: ModelProfile,
    ) -> Response:
        kind = fault.kind
        if kind == "ok":
            return self._ok(info, headers, name, profile)
        if kind in ("429", "503") or fault.retry_after_s is not None:
            self._retry_after_headers(fault, headers)
        if kind == "429":
            return self._error(
                429, headers, "Rate limit reached for requests", "rate_limit_exceeded"
            )
        if kind == "quota":
            message = "You exceeded your current quota, please check your plan and billing details."
            return self._error(429, headers, message, "insufficient_quota", "insufficient_quota")
        if kind == "context_length":
            message = (
                "This model's maximum context length is 8192 tokens. However, your messages "
                "resulted in 9000 tokens. Please reduce the length of the messages."
            )
            return self._error(400, headers, message, "context_length_exceeded")
        if kind == "401":
            # A careless server: the whole key, for the client to redact.
            return self._error(
                401, headers, self._bad_key_message(sent_key or ""), "invalid_api_key"
            )
        if kind == "404":
            message = f"The model `{info.body.get('model')}` does not exist."
            return self._error(404, headers, message, "model_not_found")
        if kind in ("400", "403", "408", "409", "422", "500", "502", "503"):
            return self._error(int(kind), headers, fault.message or f"injected HTTP {kind}", None)
        if kind == "hang":
            return await self._hang(request, fault)
        if kind == "drop":
            return _DroppedResponse()
        if kind == "malformed":
            truncated = (
                b'{"id": "broken", "object": "chat.completion", "choices": [{"index": 0, "mes'
            )
            return Response(truncated, 200, headers=headers, media_type="application/json")
        if kind == "empty":
            reply = self._reply_body(info, [], name, profile)
            return JSONResponse(reply, 200, headers=headers)
        raise ValueError(f"unknown fault kind {kind!r}")

    @staticmethod
    def _retry_after_headers(fault: Fault, headers: dict[str, str]) -> None:
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = f"{fault.retry_after_ms:g}"
        if fault.retry_after_s is not None:
            if fault.retry_after_date:
                headers["retry-after"] = formatdate(time.time() + fault.retry_after_s, usegmt=True)
            else:
                headers["retry-after"] = f"{fault.retry_after_s:g}"

    @staticmethod
    async def _hang(request: Request, fault: Fault) -> Response:
        """Say nothing until the client hangs up (or ``hang_s`` passes)."""
        deadline = time.monotonic() + fault.hang_s
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                break
            await anyio.sleep(0.02)
        return JSONResponse(_error_body("gave up", "server_error"), 504)

    def _ok(
        self, info: RequestInfo, headers: dict[str, str], name: str, profile: ModelProfile
    ) -> Response:
        body = info.body
        asked = body.get("n") if _is_int(body.get("n")) else 1
        n = asked if profile.honours_n else 1
        seen = body if profile.honours_seed else {k: v for k, v in body.items() if k != "seed"}
        replies = self.responder(seen)
        texts = [replies] * n if isinstance(replies, str) else list(replies)
        if len(texts) != n:
            texts = [texts[i % len(texts)] for i in range(n)] if texts else [""] * n
        reply = self._reply_body(info, texts, name, profile)
        with self._lock:
            self._counters.ok_counts[info.body_hash] += 1
        return JSONResponse(reply, 200, headers=headers)

    def _reply_body(
        self, info: RequestInfo, texts: list[str], name: str, profile: ModelProfile
    ) -> dict[str, Any]:
        body = info.body
        chat = info.path == CHAT_PATH
        endpoint: Endpoint = "chat" if chat else "completions"
        server = profile.server
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        max_tokens = _requested_max_tokens(endpoint, body)
        if max_tokens is None and not chat and server != "transformers":
            max_tokens = 16  # the completions endpoint's documented default (OpenAI and vLLM)
        top_k = _requested_logprobs(endpoint, body) if profile.honours_logprobs else None
        choices, completion_tokens = [], 0
        for index, text in enumerate(texts):
            tokens, finish, matched = _shape_text(text, stop, max_tokens, profile.keeps_stop)
            completion_tokens += len(tokens)
            make = _chat_choice if chat else _text_choice
            choices.append(make(index, _Sample(tokens, finish, matched), top_k, server))
        prompt_tokens = prompt_tokens_of(body)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        cached = min(self.cached_tokens, prompt_tokens)
        created = int(time.time())
        if server == "openai":
            return self._openai_reply(info, chat, name, profile, choices, usage, cached, created)
        if server == "vllm":
            # vLLM reports cached tokens only with --enable-prompt-tokens-details.
            usage["prompt_tokens_details"] = {"cached_tokens": cached} if cached else None
            reply: dict[str, Any] = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{_digest_id(info.index, 32)}",
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": profile.reply_model or name,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "kv_transfer_params": None,
            }
            if not chat:
                del reply["prompt_logprobs"], reply["prompt_token_ids"]
            return reply
        # transformers serve: the id is the request id; the model is named as it is cached
        # (ModelManager.process_model_name: a Hub name gets "@main").
        served = profile.reply_model or (name if "@" in name or "/" in name else f"{name}@main")
        return {
            "id": str(uuid.UUID(_digest_id(info.index, 32))),
            "choices": choices,
            "created": created,
            "model": served,
            "object": "chat.completion" if chat else "text_completion",
            "usage": usage,
        }

    @staticmethod
    def _openai_reply(
        info: RequestInfo,
        chat: bool,
        name: str,
        profile: ModelProfile,
        choices: list[dict[str, Any]],
        usage: dict[str, Any],
        cached: int,
        created: int,
    ) -> dict[str, Any]:
        """OpenAI's chat.completion and text_completion objects (API reference examples)."""
        model = profile.reply_model or name
        if not chat:
            return {
                "id": f"cmpl-{_digest_id(info.index, 29, _BASE62)}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": profile.system_fingerprint,
                "choices": choices,
                "usage": usage,
            }
        usage["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
        return {
            "id": f"chatcmpl-{_digest_id(info.index, 29, _BASE62)}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": profile.system_fingerprint,
        }

    async def _list_models(self, request: Request) -> Response:
        with self._lock:
            self._counters.total += 1
            self._counters.by_path[MODELS_PATH] += 1
        try:
            self._check_key(request, self._sent_key(request))
        except _Refused as refusal:
            return refusal.response({})
        owner = {"openai": "system", "vllm": "vllm", "transformers": "transformers"}[self.kind]
        data = []
        for name, profile in self.profiles.items():
            entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": owner}
            if self.kind == "vllm":
                entry.update(root=name, parent=None, max_model_len=profile.context_window)
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(CHAT_PATH, self._completion, methods=["POST"]),
                Route(TEXT_PATH, self._completion, methods=["POST"]),
                Route(MODELS_PATH, self._list_models, methods=["GET"]),
            ]
        )

    # ---- running ------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind a free loopback port and serve from a daemon thread until ``stop``."""
        sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # asyncio sets TCP_NODELAY only then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        self._port = sock.getsockname()[1]
        uvicorn_error = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _QuietDrops) for f in uvicorn_error.filters):
            uvicorn_error.addFilter(_QuietDrops())
        config = uvicorn.Config(
            self.app(),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=120,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"fake-openai-{self._port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.005)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server = None
        self._thread = None


class _RefusedWithHeaders(_Refused):
    """A refusal that carries headers of its own (OpenAI's 429 keeps its x-ratelimit-*)."""

    def __init__(self, refusal: _Refused, headers: Mapping[str, str]) -> None:
        super().__init__(refusal.status, refusal.body, message=refusal.message, code=refusal.code)
        self.headers = dict(headers)

    def response(self, headers: Mapping[str, str]) -> Response:
        return super().response({**headers, **self.headers})


@contextmanager
def serve_fake_openai(**settings: Any) -> Iterator[FakeOpenAIServer]:
    """Run a ``FakeOpenAIServer(**settings)`` for the duration of the ``with`` block."""
    server = FakeOpenAIServer(**settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class VirtualClock:
    """A ``drpo.backends.ratelimit.Clock`` whose time moves only when someone sleeps.

    For tests of long waits (a 150 s ``Retry-After``) that must not take real time; every sleep
    is recorded in ``sleeps``. Meant for one caller at a time: concurrent sleepers each advance it.
    """

    def __init__(self, start_s: float = 1000.0) -> None:
        self._start_s = start_s
        self._t = start_s
        self._wall0 = time.time()
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._t

    def wall(self) -> float:
        return self._wall0 + (self._t - self._start_s)

    def advance(self, seconds: float) -> None:
        self._t += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._t += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


class RecordingClock:
    """The real clock, remembering every sleep it was asked for (what was requested, not timed)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await anyio.sleep(seconds)
