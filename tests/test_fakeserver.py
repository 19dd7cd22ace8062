"""The test double itself, through the official ``openai`` SDK: does each profile refuse what
the real server refuses, with its status and body, and answer in the real server's shape?

Every expected body here is the real server's (the sources are cited in tests/fakeserver.py);
a change in the double that drifts from them fails here before it can mislead a test of drpo.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import openai
import pytest
from fakeserver import (
    CHAT_PATH,
    DEFAULT_MODELS,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    TEXT_PATH,
    TRANSFORMERS_SERVE,
    VLLM_BASE,
    VLLM_INSTRUCT,
    VLLM_NO_CHAT_TEMPLATE,
    FakeOpenAIServer,
    Fault,
    ModelProfile,
    masked_key,
    serve_fake_openai,
)

pytestmark = pytest.mark.network

USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def make_server() -> Iterator[Any]:
    """Start servers for a test; every one is stopped at its end."""
    started: list[FakeOpenAIServer] = []

    def start(**settings: Any) -> FakeOpenAIServer:
        server = FakeOpenAIServer(**settings)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def client_for(server: FakeOpenAIServer, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=10)


@dataclass(frozen=True)
class RawReply:
    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def raw_post(server: FakeOpenAIServer, path: str, body: Mapping[str, Any], **headers: str) -> Any:
    """POST without the SDK, for what the SDK will not send (no model, no Authorization)."""
    url = server.base_url.removesuffix("/v1") + path
    request = urllib.request.Request(
        url,
        data=json.dumps(dict(body)).encode(),
        headers={"content-type": "application/json", **headers},
        method="POST",
    )
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(request, timeout=10) as reply:
            return RawReply(reply.status, reply.read())
    except urllib.error.HTTPError as refusal:
        return RawReply(refusal.code, refusal.read())


def openai_error(
    message: str, *, param: str | None = None, code: str | None = None, kind: str = ""
) -> dict[str, Any]:
    """What the SDK exposes as ``err.body`` for an OpenAI error: the inner object."""
    return {"message": message, "type": kind or "invalid_request_error", "param": param,
            "code": code}  # fmt: skip


def vllm_error(message: str, status: int, *, param: str | None = None, kind: str = "") -> dict:
    return {"message": message, "type": kind or "BadRequestError", "param": param, "code": status}


# --------------------------------------------------------------------------------------------
# Profiles


def test_profiles_are_frozen_and_checked() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        VLLM_INSTRUCT.honours_n = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="always serves /v1/completions"):
        ModelProfile(server="vllm", endpoints=frozenset({"chat"}))
    with pytest.raises(ValueError, match="always serves /v1/completions"):
        replace(TRANSFORMERS_SERVE, endpoints=frozenset({"chat"}))
    assert OPENAI_CHAT.endpoints == {"chat"} and OPENAI_COMPLETIONS.endpoints == {"completions"}
    assert VLLM_BASE.endpoints == {"completions"}
    assert VLLM_INSTRUCT.endpoints == TRANSFORMERS_SERVE.endpoints == {"chat", "completions"}
    assert not TRANSFORMERS_SERVE.honours_n and not TRANSFORMERS_SERVE.honours_logprobs
    assert TRANSFORMERS_SERVE.keeps_stop and TRANSFORMERS_SERVE.context_window is None


def test_a_server_copies_one_server_unless_told_which() -> None:
    with pytest.raises(ValueError, match="different servers"):
        FakeOpenAIServer(models={"a": OPENAI_CHAT, "b": VLLM_INSTRUCT})
    assert FakeOpenAIServer(models={"a": OPENAI_CHAT, "b": VLLM_INSTRUCT}, server="openai").kind
    assert FakeOpenAIServer().profiles == DEFAULT_MODELS
    assert FakeOpenAIServer(models=("x", "y")).profiles == {"x": VLLM_INSTRUCT, "y": VLLM_INSTRUCT}
    with pytest.raises(ValueError, match="no API key option"):
        FakeOpenAIServer(models={"m": TRANSFORMERS_SERVE}, api_key="k")


# --------------------------------------------------------------------------------------------
# OpenAI


def test_openai_chat_reply_has_openais_shape_and_headers(make_server: Any) -> None:
    snapshot = replace(OPENAI_CHAT, reply_model="gpt-4o-mini-2024-07-18")
    server = make_server(
        models={"gpt-4o-mini": snapshot}, responder=lambda body: "one two three", cached_tokens=3
    )
    raw = client_for(server).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER, max_tokens=100, n=2, temperature=0.5
    )
    body = json.loads(raw.text)
    assert set(body) == {
        "id", "object", "created", "model", "choices", "usage", "service_tier",
        "system_fingerprint",
    }  # fmt: skip
    assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{29}", body["id"])
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini-2024-07-18"
    assert body["system_fingerprint"] == OPENAI_CHAT.system_fingerprint
    assert body["service_tier"] == "default"
    assert body["choices"] == [
        {
            "index": i,
            "message": {"role": "assistant", "content": "one two three", "refusal": None,
                        "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(2)
    ]  # fmt: skip
    prompt_tokens = 4  # "Say something." is 14 characters: 4 tokens at 4 characters a token
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
        "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }  # fmt: skip
    headers = raw.headers
    assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])
    assert int(headers["openai-processing-ms"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "10000"
    assert headers["x-ratelimit-remaining-requests"] == "9999"
    assert headers["x-ratelimit-limit-tokens"] == "30000000"
    # OpenAI counts the prompt plus max_tokens for each of the n samples.
    assert headers["x-ratelimit-remaining-tokens"] == str(30_000_000 - prompt_tokens - 200)
    assert headers["x-ratelimit-reset-requests"] == "6ms"  # one request back every 6 ms
    parsed = raw.parse()  # and the SDK reads it as a ChatCompletion
    assert parsed.choices[1].message.content == "one two three"
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 3


def test_openai_text_completion_has_openais_shape(make_server: Any) -> None:
    server = make_server(
        models={"gpt-3.5-turbo-instruct": OPENAI_COMPLETIONS}, responder=lambda b: "a b c d e"
    )
    reply = client_for(server).completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Count:", max_tokens=3, logprobs=2
    )
    body = reply.model_dump()
    assert reply.object == "text_completion" and re.fullmatch(r"cmpl-\w{29}", reply.id)
    assert reply.system_fingerprint == OPENAI_COMPLETIONS.system_fingerprint
    [choice] = reply.choices
    assert (choice.text, choice.finish_reason, choice.index) == ("a b c", "length", 0)
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["a", " b", " c"]
    assert choice.logprobs.text_offset == [0, 1, 3]
    assert choice.logprobs.top_logprobs is not None
    assert [len(top) for top in choice.logprobs.top_logprobs] == [2, 2, 2]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                             "prompt_tokens_details": None, "completion_tokens_details": None}  # fmt: skip


def test_openai_completions_default_to_16_tokens(make_server: Any) -> None:
    server = make_server(models={"i": OPENAI_COMPLETIONS}, responder=lambda b: "w " * 40)
    reply = client_for(server).completions.create(model="i", prompt="go")
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    assert reply.choices[0].finish_reason == "length"


def test_an_openai_chat_model_refuses_the_completions_endpoint(make_server: Any) -> None:
    server = make_server(models={"gpt-4o-mini": OPENAI_CHAT})
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(server).completions.create(model="gpt-4o-mini", prompt="Once", max_tokens=5)
    err = caught.value
    assert err.status_code == 404
    assert err.body == openai_error(
        "This is a chat model and not supported in the v1/completions endpoint. Did you mean "
        "to use v1/chat/completions?",
        param="model",
    )
    assert err.message.endswith("Did you mean to use v1/chat/completions?")
    assert server.ok_answers() == 0
    [refusal] = server.refusals
    assert (refusal.path, refusal.status, refusal.model) == (TEXT_PATH, 404, "gpt-4o-mini")


def test_an_openai_completions_model_refuses_chat(make_server: Any) -> None:
    server = make_server(models={"gpt-3.5-turbo-instruct": OPENAI_COMPLETIONS})
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(server).chat.completions.create(model="gpt-3.5-turbo-instruct", messages=USER)
    assert caught.value.body == openai_error(
        "This is not a chat model and thus not supported in the v1/chat/completions endpoint. "
        "Did you mean to use v1/completions?",
        param="model",
    )


def test_openai_refuses_an_unknown_model(make_server: Any) -> None:
    server = make_server(models={"gpt-4o": OPENAI_CHAT})
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(server).chat.completions.create(model="gpt-5o", messages=USER)
    assert caught.value.body == openai_error(
        "The model `gpt-5o` does not exist or you do not have access to it.",
        code="model_not_found",
    )
    assert caught.value.code == "model_not_found"


def test_openai_needs_a_model(make_server: Any) -> None:
    server = make_server(models={"gpt-4o": OPENAI_CHAT})
    reply = raw_post(server, CHAT_PATH, {"messages": USER}, authorization="Bearer sk-x")
    assert reply.status_code == 400
    assert reply.json() == {"error": openai_error("you must provide a model parameter")}


#: (what the request adds or changes, the endpoint, OpenAI's refusal: message, param, code)
OPENAI_INVALID = [
    pytest.param(
        {"extra_body": {"frequency": 1}}, "chat",
        ("Unrecognized request argument supplied: frequency", None, None), id="unknown-chat",
    ),
    pytest.param(
        {"extra_body": {"top_logprobs": 2}}, "completions",
        ("Unrecognized request argument supplied: top_logprobs", None, None),
        id="unknown-completions",
    ),
    pytest.param(
        {"temperature": 3}, "chat",
        ("Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 "
         "instead.", "temperature", "decimal_above_max_value"),
        id="temperature-high",
    ),
    pytest.param(
        {"temperature": -0.5}, "completions",
        ("Invalid 'temperature': decimal below minimum value. Expected a value >= 0, but got "
         "-0.5 instead.", "temperature", "decimal_below_min_value"),
        id="temperature-low",
    ),
    pytest.param(
        {"top_p": 1.5}, "chat",
        ("Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 1.5 "
         "instead.", "top_p", "decimal_above_max_value"),
        id="top-p",
    ),
    pytest.param(
        {"n": 0}, "chat",
        ("Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
         "n", "integer_below_min_value"),
        id="n-zero",
    ),
    pytest.param(
        {"n": 130}, "chat",
        ("Invalid 'n': integer above maximum value. Expected a value <= 128, but got 130 "
         "instead.", "n", "integer_above_max_value"),
        id="n-high",
    ),
    pytest.param(
        {"max_tokens": 0}, "chat",
        ("Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 "
         "instead.", "max_tokens", "integer_below_min_value"),
        id="max-tokens-zero",
    ),
    pytest.param(
        {"extra_body": {"max_tokens": "100"}}, "chat",
        ("Invalid type for 'max_tokens': expected an integer, but got a string instead.",
         "max_tokens", "invalid_type"),
        id="max-tokens-type",
    ),
    pytest.param(
        {"extra_body": {"temperature": "hot"}}, "completions",
        ("Invalid type for 'temperature': expected a decimal, but got a string instead.",
         "temperature", "invalid_type"),
        id="temperature-type",
    ),
    pytest.param(
        {"logprobs": True, "top_logprobs": 21}, "chat",
        ("Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got "
         "21 instead.", "top_logprobs", "integer_above_max_value"),
        id="top-logprobs-high",
    ),
    pytest.param(
        {"top_logprobs": 3}, "chat",
        ("The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
         "top_logprobs", None),
        id="top-logprobs-alone",
    ),
    pytest.param(
        {"extra_body": {"logprobs": 1}}, "chat",
        ("Invalid type for 'logprobs': expected a boolean, but got an integer instead.",
         "logprobs", "invalid_type"),
        id="chat-logprobs-int",
    ),
    pytest.param(
        {"logprobs": 6}, "completions",
        ("Invalid 'logprobs': integer above maximum value. Expected a value <= 5, but got 6 "
         "instead.", "logprobs", "integer_above_max_value"),
        id="completions-logprobs-high",
    ),
    pytest.param(
        {"stop": ["a", "b", "c", "d", "e"]}, "chat",
        ("Invalid 'stop': array too long. Expected an array with maximum length 4, but got an "
         "array with length 5 instead.", "stop", "array_above_max_length"),
        id="five-stops",
    ),
    pytest.param(
        {"messages": []}, "chat",
        ("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
         "empty array instead.", "messages", "empty_array"),
        id="no-messages",
    ),
    pytest.param(
        {"messages": [{"role": "bot", "content": "hi"}]}, "chat",
        ("Invalid value: \"bot\". Supported values are: 'system', 'assistant', 'user', "
         "'function', 'tool', and 'developer'.", "messages[0].role", "invalid_value"),
        id="bad-role",
    ),
    pytest.param(
        {"messages": [{"role": "system", "content": "s"}, {"role": "user"}]}, "chat",
        ("Missing required parameter: 'messages[1].content'.", "messages[1].content",
         "missing_required_parameter"),
        id="no-content",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("change", "endpoint", "refusal"), OPENAI_INVALID)
def test_openai_refuses_invalid_requests_with_its_400(
    make_server: Any,
    change: dict[str, Any],
    endpoint: str,
    refusal: tuple[str, str | None, str | None],
) -> None:
    server = make_server(models={"chat": OPENAI_CHAT, "text": OPENAI_COMPLETIONS}, server="openai")
    client = client_for(server)
    message, param, code = refusal
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "chat":
            client.chat.completions.create(**{"model": "chat", "messages": USER, **change})
        else:
            client.completions.create(**{"model": "text", "prompt": "p", **change})
    err = caught.value
    assert err.status_code == 400
    assert err.body == openai_error(message, param=param, code=code)
    assert (err.param, err.code, err.type) == (param, code, "invalid_request_error")
    assert server.ok_answers() == 0
    assert [r.message for r in server.refusals] == [message]


def test_openai_refuses_a_request_over_the_context_window(make_server: Any) -> None:
    server = make_server(models={"m": replace(OPENAI_CHAT, context_window=100)})
    client = client_for(server)
    long = [{"role": "user", "content": "x" * 400}]  # 100 tokens
    assert client.chat.completions.create(model="m", messages=long).choices  # no max_tokens: fits
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=long, max_tokens=7)
    assert caught.value.body == openai_error(
        "This model's maximum context length is 100 tokens. However, you requested 107 tokens "
        "(100 in the messages, 7 in the completion). Please reduce the length of the messages "
        "or completion.",
        param="messages",
        code="context_length_exceeded",
    )
    too_long = [{"role": "user", "content": "x" * 404}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=too_long)
    assert caught.value.body == openai_error(
        "This model's maximum context length is 100 tokens. However, your messages resulted in "
        "101 tokens. Please reduce the length of the messages.",
        param="messages",
        code="context_length_exceeded",
    )


def test_openai_refuses_more_output_tokens_than_the_model_writes(make_server: Any) -> None:
    server = make_server(models={"gpt-4o": OPENAI_CHAT})
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).chat.completions.create(model="gpt-4o", messages=USER, max_tokens=20000)
    assert caught.value.body == openai_error(
        "max_tokens is too large: 20000. This model supports at most 16384 completion tokens, "
        "whereas you provided 20000.",
        param="max_tokens",
        code="invalid_value",
    )


def test_openai_keys_wrong_missing_and_right(make_server: Any) -> None:
    server = make_server(models={"gpt-4o": OPENAI_CHAT}, api_key="sk-right-key")
    wrong = "sk-test-DoNotLeak-0123456789abcdef"
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, wrong).chat.completions.create(model="gpt-4o", messages=USER)
    err = caught.value
    assert err.status_code == 401 and err.code == "invalid_api_key"
    assert err.body == openai_error(
        "Incorrect API key provided: sk-test-**********************cdef. You can find your API "
        "key at https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )
    assert "DoNotLeak" not in str(err.body)  # OpenAI masks all but 12 characters
    reply = raw_post(server, CHAT_PATH, {"model": "gpt-4o", "messages": USER})
    assert reply.status_code == 401
    assert reply.json()["error"]["message"].startswith("You didn't provide an API key.")
    assert reply.json()["error"]["code"] is None
    ok = client_for(server, "sk-right-key").chat.completions.create(model="gpt-4o", messages=USER)
    assert ok.choices[0].message.content == "reply to: Say something."
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "sk-nope").models.list()
    assert [m.id for m in client_for(server, "sk-right-key").models.list()] == ["gpt-4o"]


def test_a_careless_server_echoes_the_whole_key(make_server: Any) -> None:
    server = make_server(models={"m": OPENAI_CHAT}, api_key="sk-right", echo_key_in_401=True)
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, "sk-secret-0123456789").chat.completions.create(model="m", messages=USER)
    assert "sk-secret-0123456789" in caught.value.message


def test_masked_key_keeps_eight_and_four_characters() -> None:
    assert masked_key("sk-4sJHr" + "x" * 39 + "w8ZP") == "sk-4sJHr" + "*" * 39 + "w8ZP"
    assert masked_key("API_KEY") == "API_KEY"


def test_openai_enforces_its_request_and_token_limits(make_server: Any) -> None:
    limited = replace(OPENAI_CHAT, rate_limits=(2, 1_000))
    server = make_server(models={"m": limited})
    client = client_for(server)
    for _ in range(2):
        client.chat.completions.create(model="m", messages=USER, max_tokens=10)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=USER, max_tokens=10)
    err = caught.value
    assert (err.status_code, err.code, err.type, err.param) == (
        429, "rate_limit_exceeded", "requests", None,
    )  # fmt: skip
    assert re.fullmatch(
        r"Rate limit reached for m in organization org-fake on requests per min \(RPM\): Limit 2, "
        r"Used 2, Requested 1\. Please try again in (29\.\d|30)s\. Visit "
        r"https://platform\.openai\.com/account/rate-limits to learn more\.",
        err.message.removeprefix("Error code: 429 - "),
    )
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.response.headers["x-ratelimit-limit-requests"] == "2"

    tokens = make_server(models={"m": replace(OPENAI_CHAT, rate_limits=(100, 100))})
    client = client_for(tokens)
    client.chat.completions.create(model="m", messages=USER, max_tokens=60)  # 4 + 60 tokens
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=USER, max_tokens=60)
    assert caught.value.type == "tokens"
    # Used: what the first request took, less what refilled since (100 tokens a minute).
    assert re.search(
        r"on tokens per min \(TPM\): Limit 100, Used 6\d, Requested 64\.", caught.value.message
    )
    with pytest.raises(openai.RateLimitError) as caught:  # more than a whole minute's budget
        client.chat.completions.create(model="m", messages=USER, max_tokens=200)
    assert caught.value.body == openai_error(
        "Request too large for m in organization org-fake on tokens per min (TPM): Limit 100, "
        "Requested 204. The input or output tokens must be reduced in order to run "
        "successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
        code="rate_limit_exceeded",
        kind="tokens",
    )


def test_injected_faults_still_come_first_class(make_server: Any) -> None:
    """Fault plans work on every profile, with OpenAI's bodies."""
    server = make_server(
        models={"m": OPENAI_CHAT}, faults=[Fault("503"), "quota", "empty", Fault("404")]
    )
    client = client_for(server)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="m", messages=USER)
    assert caught.value.body == openai_error("injected HTTP 503", kind="server_error")
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=USER)
    assert caught.value.code == "insufficient_quota"
    assert client.chat.completions.create(model="m", messages=USER).choices == []
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="m", messages=USER)
    assert client.chat.completions.create(model="m", messages=USER).choices  # the plan is spent
    assert server.by_fault == {"503": 1, "quota": 1, "empty": 1, "404": 1, "ok": 1}
    assert server.refusals == []  # faults are the plan's, not the server's own refusals


# --------------------------------------------------------------------------------------------
# vLLM


def test_vllm_instruct_reply_has_vllms_shape_and_honours_everything(make_server: Any) -> None:
    seen: list[Mapping[str, Any]] = []

    def responder(body: Mapping[str, Any]) -> list[str]:
        seen.append(body)
        return ["red green<END> blue", "one", "two"]

    server = make_server(models={"qwen": VLLM_INSTRUCT}, responder=responder)
    raw = client_for(server).chat.completions.with_raw_response.create(
        model="qwen", messages=USER, n=3, temperature=0.7, logprobs=True, top_logprobs=2,
        stop=["<END>"], seed=5,
    )  # fmt: skip
    body = json.loads(raw.text)
    assert "x-request-id" not in raw.headers  # only with --enable-request-id-headers
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"]) and body["model"] == "qwen"
    assert body["system_fingerprint"] is None and body["usage"]["prompt_tokens_details"] is None
    assert {"prompt_logprobs", "kv_transfer_params"} <= set(body)
    first = body["choices"][0]
    assert first["message"]["content"] == "red green"  # the stop string is cut ...
    assert first["stop_reason"] == "<END>"  # ... and named
    assert first["finish_reason"] == "stop"
    assert "refusal" not in first["logprobs"]  # vLLM's logprobs object has content only
    assert [len(t["top_logprobs"]) for t in first["logprobs"]["content"]] == [2, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["red green", "one", "two"]
    assert [c["stop_reason"] for c in body["choices"]] == ["<END>", None, None]
    assert seen[0]["seed"] == 5


def test_vllm_ignores_unknown_fields_and_defaults_the_model(make_server: Any) -> None:
    server = make_server(models={"qwen": VLLM_INSTRUCT}, responder=lambda b: "w " * 40)
    reply = client_for(server).chat.completions.create(
        model="qwen", messages=USER, extra_body={"top_k": 5, "whatever": True}
    )
    assert reply.choices
    raw = raw_post(server, TEXT_PATH, {"prompt": "Once"})  # no model: the served one
    assert raw.status_code == 200 and raw.json()["model"] == "qwen"
    assert raw.json()["usage"]["completion_tokens"] <= 16


def test_a_vllm_base_model_refuses_chat_with_vllms_400(make_server: Any) -> None:
    server = make_server(models={"llama-base": VLLM_BASE}, responder=lambda b: "upon a time")
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llama-base", messages=USER)
    err = caught.value
    assert err.body == vllm_error(VLLM_NO_CHAT_TEMPLATE, 400)
    assert (err.code, err.type) == ("400", "BadRequestError")  # the SDK makes the int a str
    reply = client.completions.create(model="llama-base", prompt="Once", max_tokens=5)
    assert reply.choices[0].text == "upon a time"


def test_vllm_refuses_an_unknown_model_with_its_404(make_server: Any) -> None:
    server = make_server()  # DEFAULT_MODELS: fake-model and sim, as vLLM instruct models
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(server).chat.completions.create(model="gpt-4o", messages=USER)
    assert caught.value.body == vllm_error(
        "The model `gpt-4o` does not exist.", 404, param="model", kind="NotFoundError"
    )
    assert client_for(server).chat.completions.create(model="sim", messages=USER).choices


VLLM_INVALID = [
    pytest.param(
        {"temperature": 0, "n": 2},
        ("n must be 1 when using greedy sampling, got 2.", None),
        id="greedy-n",
    ),
    pytest.param(
        {"temperature": 2.5},
        ("temperature must be in [0, 2], got 2.5. (parameter=temperature, value=2.5)",
         "temperature"),
        id="temperature",
    ),
    pytest.param(
        {"top_p": 0},
        ("top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p"),
        id="top-p-zero",
    ),
    pytest.param(
        {"max_tokens": 0},
        ("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens"),
        id="max-tokens",
    ),
    pytest.param(
        {"logprobs": True, "top_logprobs": 21},
        ("Requested sample logprobs of 21, which is greater than max allowed: 20 "
         "(parameter=logprobs, value=21)", "logprobs"),
        id="logprobs-cap",
    ),
    pytest.param(
        {"top_logprobs": 3},
        ("when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)",
         "top_logprobs"),
        id="top-logprobs-alone",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("change", "refusal"), VLLM_INVALID)
def test_vllm_refuses_invalid_sampling_with_its_400(
    make_server: Any, change: dict[str, Any], refusal: tuple[str, str | None]
) -> None:
    server = make_server(models={"qwen": VLLM_INSTRUCT})
    message, param = refusal
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).chat.completions.create(model="qwen", messages=USER, **change)
    assert caught.value.body == vllm_error(message, 400, param=param)


def test_vllm_refuses_a_request_over_the_context_window(make_server: Any) -> None:
    server = make_server(models={"m": replace(VLLM_INSTRUCT, context_window=100)})
    prompt = "x" * 200  # 50 tokens
    assert client_for(server).completions.create(model="m", prompt=prompt, max_tokens=50).choices
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).completions.create(model="m", prompt=prompt, max_tokens=60)
    assert caught.value.body == vllm_error(
        "'max_tokens' or 'max_completion_tokens' is too large: 60. This model's maximum context "
        "length is 100 tokens and your request has 50 input tokens (60 > 100 - 50). "
        "(parameter=max_tokens, value=60)",
        400,
        param="max_tokens",
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).completions.create(model="m", prompt="x" * 400, max_tokens=1)
    assert "However, your request has 100 input tokens" in caught.value.message


def test_vllm_key_is_refused_with_its_bare_401(make_server: Any) -> None:
    server = make_server(models={"qwen": VLLM_INSTRUCT}, api_key="token-abc123")
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, "wrong").chat.completions.create(model="qwen", messages=USER)
    assert caught.value.body == "Unauthorized"  # {"error": "Unauthorized"}, unwrapped by the SDK
    assert caught.value.code is None
    ok = client_for(server, "token-abc123").chat.completions.create(model="qwen", messages=USER)
    assert ok.choices


def test_a_profile_that_ignores_the_seed_hides_it_from_the_responder(make_server: Any) -> None:
    seen: list[Mapping[str, Any]] = []
    server = make_server(
        models={"m": replace(VLLM_INSTRUCT, honours_seed=False)},
        responder=lambda body: seen.append(body) or "ok",
    )
    client_for(server).chat.completions.create(model="m", messages=USER, seed=7)
    assert "seed" not in seen[0]


# --------------------------------------------------------------------------------------------
# transformers serve


def test_transformers_serve_ignores_n_and_logprobs_and_keeps_the_stop(make_server: Any) -> None:
    server = make_server(
        models={"smol": TRANSFORMERS_SERVE}, responder=lambda b: ["one two<END> three", "x"]
    )
    raw = client_for(server).chat.completions.with_raw_response.create(
        model="smol", messages=USER, n=2, temperature=0.9, logprobs=True, top_logprobs=3,
        stop=["<END>"],
    )  # fmt: skip
    body = json.loads(raw.text)
    # ChatCompletion(...).model_dump(exclude_none=True): nothing that is None is sent.
    assert body["choices"] == [
        {"finish_reason": "stop", "index": 0,
         "message": {"content": "one two<END>", "role": "assistant"}}
    ]  # fmt: skip
    assert set(body) == {"id", "choices", "created", "model", "object", "usage"}
    assert body["id"] == raw.headers["x-request-id"] and uuid.UUID(body["id"])
    assert body["model"] == "smol@main"
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    parsed = raw.parse()
    assert len(parsed.choices) == 1 and parsed.choices[0].logprobs is None

    text = client_for(server).completions.create(
        model="smol", prompt="p", n=3, logprobs=2, stop=["<END>"]
    )
    assert [c.text for c in text.choices] == ["one two<END>"]
    assert text.choices[0].logprobs is None


def test_transformers_serve_refuses_unexpected_fields_with_a_422(make_server: Any) -> None:
    server = make_server(models={"smol": TRANSFORMERS_SERVE})
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client_for(server).chat.completions.create(
            model="smol", messages=USER, extra_body={"top_k": 5}
        )
    assert caught.value.body == {"detail": "Unexpected fields in the request: {'top_k'}"}
    assert caught.value.message == "Error code: 422"  # no "message" field for the SDK to show
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).completions.create(model="smol", prompt=["a", "b"])
    assert caught.value.body == {"detail": "prompt must be a string."}


def test_transformers_serve_is_pinned_to_its_model(make_server: Any) -> None:
    server = make_server(models={"/models/smol": TRANSFORMERS_SERVE})
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).chat.completions.create(model="other", messages=USER)
    assert caught.value.body == {"detail": "Server is pinned to '/models/smol'; requested 'other'."}
    reply = client_for(server).chat.completions.create(model="/models/smol", messages=USER)
    assert reply.model == "/models/smol"  # a local path is named as it is


def test_transformers_serve_without_a_chat_template_fails_chat_with_a_bare_500(
    make_server: Any,
) -> None:
    base = replace(TRANSFORMERS_SERVE, endpoints=frozenset({"completions"}))
    server = make_server(models={"gpt2": base})
    with pytest.raises(openai.InternalServerError) as caught:
        client_for(server).chat.completions.create(model="gpt2", messages=USER)
    assert caught.value.status_code == 500
    assert caught.value.body == "Internal Server Error"
    assert client_for(server).completions.create(model="gpt2", prompt="p").choices


# --------------------------------------------------------------------------------------------
# The helper and the counters


def test_serve_fake_openai_counts_answers_and_refusals_apart() -> None:
    with serve_fake_openai(models={"m": OPENAI_CHAT}) as server:
        client = client_for(server)
        client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="m", prompt="p")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=USER, temperature=9)
    assert server.total == 3
    assert server.ok_answers() == 1
    assert [(r.status, r.path) for r in server.refusals] == [(404, TEXT_PATH), (400, CHAT_PATH)]
    assert server.by_path == {CHAT_PATH: 2, TEXT_PATH: 1}
