"""The OpenAI-compatible backend against the fault-injecting fake server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import random
import re
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import aiohttp
import anyio
import pytest
from fakeserver import (
    CHAT_PATH,
    MODELS_PATH,
    OPENAI_CHAT,
    TEXT_PATH,
    TRANSFORMERS_SERVE,
    VLLM_BASE,
    VLLM_INSTRUCT,
    Fault,
    RecordingClock,
    RequestInfo,
    VirtualClock,
    serve_fake_openai,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from drpo.agents.critic import DIGIT_SETTINGS
from drpo.agents.prompts import STOP_STRINGS
from drpo.backends.base import (
    Backend,
    ChatMessage,
    Completion,
    CompletionRequest,
    PermanentBackendError,
    TransientBackendError,
    Usage,
)
from drpo.backends.openai_api import (
    DEFAULT_BASE_URL,
    OpenAIBackend,
    estimate_tokens,
    full_jitter_delay,
    request_body,
)
from drpo.backends.openai_errors import parse_retry_after
from drpo.backends.pricing import DEFAULT_PRICES, ModelPrice, PriceTable
from drpo.backends.ratelimit import RateLimits

KEY_ENV = "DRPO_TEST_OPENAI_KEY"


def chat(text: str, **settings: object) -> CompletionRequest:
    return CompletionRequest(messages=(ChatMessage(role="user", content=text),), **settings)


def backend_for(server_url: str, model: str = "fake-model", **settings: object) -> OpenAIBackend:
    """A backend with test-sized timeouts and backoff (no real waits of seconds)."""
    options: dict[str, object] = {
        "api_key_env": KEY_ENV,
        "timeout_s": 5.0,
        "backoff_base_s": 0.005,
        "backoff_max_s": 0.05,
    }
    options.update(settings)
    return OpenAIBackend(model, base_url=server_url, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Requests and their mapping


_BODIES: list[dict] = []


@pytest.fixture(autouse=True)
def _forget_bodies() -> None:
    _BODIES.clear()


def recording(reply: str | list[str]) -> Callable[[dict], str | list[str]]:
    """A responder that keeps every request body it answers in ``_BODIES``."""

    def responder(body: dict) -> str | list[str]:
        _BODIES.append(dict(body))
        return reply

    return responder


@pytest.mark.network
@pytest.mark.anyio
async def test_chat_request_maps_text_usage_and_cost() -> None:
    # OpenAI answers for "gpt-4o-mini" with the dated snapshot's name; the price is the alias's.
    mini = replace(OPENAI_CHAT, reply_model="gpt-4o-mini-2024-07-18")
    models = {"gpt-4o-mini": mini}
    with serve_fake_openai(
        models=models, responder=recording("four words of reply"), cached_tokens=2
    ) as srv:
        async with backend_for(srv.base_url, "gpt-4o-mini") as backend:  # a default price
            request = chat("what is two plus two, said at some length", top_p=0.9, seed=3)
            completion = await backend.complete(request)
    assert completion.text == "four words of reply"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].logprobs is None
    assert completion.attempts == 1
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.usage.completion_tokens == 4
    assert completion.usage.cached_tokens == 2
    assert completion.usage.prompt_tokens > 2
    price = DEFAULT_PRICES["gpt-4o-mini"]
    expected = (
        (completion.usage.prompt_tokens - 2) * price.input_per_m
        + 2 * price.cached_input_per_m
        + 4 * price.output_per_m
    ) / 1e6
    assert completion.cost_usd == pytest.approx(expected)
    assert completion.cost_usd > 0
    assert srv.by_path == Counter({CHAT_PATH: 1})
    body = _BODIES[-1]
    assert body["temperature"] == 0.0 and body["top_p"] == 0.9 and body["seed"] == 3
    assert body["max_tokens"] == 512 and body["n"] == 1
    assert "stop" not in body and "logprobs" not in body


@pytest.mark.network
@pytest.mark.anyio
async def test_request_settings_reach_the_server() -> None:
    with serve_fake_openai(responder=recording("ok")) as srv:
        async with backend_for(srv.base_url) as backend:
            await backend.complete(chat("q", temperature=0.3, max_tokens=7, n=2, seed=11))
    body = _BODIES[-1]
    assert body["model"] == "fake-model"
    assert body["messages"] == [{"role": "user", "content": "q"}]
    assert (body["temperature"], body["max_tokens"], body["n"], body["seed"]) == (0.3, 7, 2, 11)


@pytest.mark.network
@pytest.mark.anyio
async def test_raw_prompt_uses_the_completions_endpoint() -> None:
    with serve_fake_openai(responder=recording("a raw continuation")) as srv:
        async with backend_for(srv.base_url) as backend:
            completion = await backend.complete(CompletionRequest(prompt="Once upon", seed=0))
    assert completion.text == "a raw continuation"
    assert srv.by_path == Counter({TEXT_PATH: 1})
    assert _BODIES[-1]["prompt"] == "Once upon" and "messages" not in _BODIES[-1]


@pytest.mark.network
@pytest.mark.anyio
async def test_n_choices_come_back_in_order() -> None:
    with serve_fake_openai(responder=recording(["first", "second", "third"])) as srv:
        async with backend_for(srv.base_url) as backend:
            completion = await backend.complete(chat("q", n=3, temperature=1.0))
    assert [c.text for c in completion.choices] == ["first", "second", "third"]
    assert _BODIES[-1]["n"] == 3
    assert srv.total == 1  # one request, not n


@pytest.mark.network
@pytest.mark.anyio
async def test_stop_strings_are_sent_and_honoured() -> None:
    with serve_fake_openai(responder=recording("keep this<END> drop this")) as srv:
        async with backend_for(srv.base_url) as backend:
            completion = await backend.complete(chat("q", stop=("<END>", "<|eot_id|>")))
            raw = await backend.complete(CompletionRequest(prompt="p", stop=("<END>",)))
    assert _BODIES[0]["stop"] == ["<END>", "<|eot_id|>"]
    assert _BODIES[1]["stop"] == ["<END>"]
    assert completion.text == "keep this" and completion.choices[0].finish_reason == "stop"
    assert raw.text == "keep this"


@pytest.mark.network
@pytest.mark.anyio
async def test_max_tokens_cut_reports_length() -> None:
    with serve_fake_openai(responder=lambda body: "one two three four five") as srv:
        async with backend_for(srv.base_url) as backend:
            completion = await backend.complete(chat("q", max_tokens=2))
    assert completion.text == "one two"
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.network
@pytest.mark.anyio
async def test_chat_logprobs_map_to_token_logprobs_with_alternatives() -> None:
    with serve_fake_openai(responder=recording("red green")) as srv:
        async with backend_for(srv.base_url) as backend:
            completion = await backend.complete(chat("q", top_logprobs=3))
    assert _BODIES[-1]["logprobs"] is True and _BODIES[-1]["top_logprobs"] == 3
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert [t.token for t in logprobs] == ["red", " green"]
    assert [t.logprob for t in logprobs] == [-0.1, -0.2]
    assert [a.token for a in logprobs[1].top] == [" green", "alt1", "alt2"]
    assert [a.logprob for a in logprobs[1].top] == pytest.approx([-0.2, -1.2, -2.2])


@pytest.mark.network
@pytest.mark.anyio
async def test_raw_logprobs_map_to_token_logprobs_sorted_by_likelihood() -> None:
    with serve_fake_openai(responder=recording("red green")) as srv:
        async with backend_for(srv.base_url) as backend:
            completion = await backend.complete(CompletionRequest(prompt="p", top_logprobs=2))
    assert _BODIES[-1]["logprobs"] == 2
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert [t.token for t in logprobs] == ["red", " green"]
    assert logprobs[0].logprob == -0.1
    assert [(a.token, a.logprob) for a in logprobs[0].top] == [("red", -0.1), ("alt1", -1.1)]


def test_token_estimate_is_prompt_chars_over_four_plus_max_tokens_times_n() -> None:
    assert estimate_tokens(chat("x" * 40, max_tokens=10, n=3)) == 10 + 30
    assert estimate_tokens(CompletionRequest(prompt="x" * 41, max_tokens=5)) == 11 + 5


def test_backend_satisfies_the_protocol_and_names_its_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unit")
    backend = OpenAIBackend("gpt-4o")
    assert isinstance(backend, Backend)
    assert backend.endpoint == DEFAULT_BASE_URL
    assert backend.name == "openai"
    local = OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1/")
    assert local.endpoint == "http://127.0.0.1:8000/v1"


@pytest.mark.network
@pytest.mark.anyio
async def test_models_endpoint_lists_the_served_models() -> None:
    with serve_fake_openai(models=("a", "b")) as srv:
        async with aiohttp.ClientSession() as client:
            async with client.get(srv.base_url + "/models") as reply:
                listed = await reply.json()
    assert [m["id"] for m in listed["data"]] == ["a", "b"]
    assert srv.by_path == Counter({MODELS_PATH: 1})


# --------------------------------------------------------------------------------------------
# Retries


def first_try_fails(fault: Fault | str) -> Callable[[RequestInfo], Fault | str | None]:
    return lambda info: fault if info.seen_before == 0 else None


TRANSIENT_FAULTS = [
    Fault("429", retry_after_ms=5),
    Fault("429"),
    "500",
    "502",
    Fault("503", retry_after_s=0.01),
    "408",
    "409",
    "hang",
    "drop",
    "malformed",
    "empty",
]


@pytest.mark.network
@pytest.mark.anyio
@pytest.mark.parametrize("fault", TRANSIENT_FAULTS, ids=str)
async def test_transient_fault_is_retried_once_and_answered_once(fault: Fault | str) -> None:
    with serve_fake_openai(faults=first_try_fails(fault)) as srv:
        async with backend_for(srv.base_url, timeout_s=1.0) as backend:
            completion = await backend.complete(chat("retry me"))
    assert completion.attempts == 2
    assert completion.text == "reply to: retry me"
    assert srv.total == 2
    assert srv.ok_answers() == 1


PERMANENT_FAULTS = {
    "400": "invalid",
    "401": "rejected the API key",
    "403": "permission denied",
    "404": "unknown model 'fake-model' or wrong base URL",
    "422": "invalid",
    "quota": "quota is exhausted",
    "context_length": "larger than the context limit",
}


@pytest.mark.network
@pytest.mark.anyio
@pytest.mark.parametrize(("fault", "says"), PERMANENT_FAULTS.items())
async def test_permanent_fault_fails_at_once_with_a_clear_message(fault: str, says: str) -> None:
    with serve_fake_openai(faults=lambda info: fault) as srv:
        async with backend_for(srv.base_url) as backend:
            with pytest.raises(PermanentBackendError, match=re.escape(says)) as caught:
                await backend.complete(chat("never works"))
    assert srv.total == 1
    assert caught.value.attempts == 1  # type: ignore[attr-defined]
    if fault == "404":
        assert srv.base_url in str(caught.value)


@pytest.mark.network
@pytest.mark.anyio
async def test_a_400_that_mentions_the_context_length_is_permanent() -> None:
    too_long = Fault("400", message="This model's maximum context length is 4096 tokens.")
    with serve_fake_openai(faults=lambda info: too_long) as srv:
        async with backend_for(srv.base_url) as backend:
            with pytest.raises(PermanentBackendError, match="larger than the context limit"):
                await backend.complete(chat("far too long"))
    assert srv.total == 1


@pytest.mark.network
@pytest.mark.anyio
async def test_unknown_model_is_a_permanent_404() -> None:
    with serve_fake_openai(models=("real-model",), unknown_model_404=True) as srv:
        async with backend_for(srv.base_url) as backend:
            with pytest.raises(PermanentBackendError, match="unknown model 'fake-model'"):
                await backend.complete(chat("q"))
    assert srv.total == 1


# --------------------------------------------------------------------------------------------
# Strict servers: the real refusals, and what the backend makes of them


@pytest.mark.network
@pytest.mark.anyio
async def test_the_bodies_drpo_builds_pass_openais_validation() -> None:
    """Every chat body shape drpo sends (plain, n samples with a seed, stop strings, the
    critic's one-digit verdict with 20 top logprobs) is one OpenAI accepts as it is."""
    requests = [
        chat("q", top_p=0.9, seed=3),
        chat("q", n=3, seed=0, temperature=0.2, top_p=0.95, max_tokens=2048),
        chat("q", stop=STOP_STRINGS, max_tokens=2048),
        chat("q", **DIGIT_SETTINGS),  # type: ignore[arg-type]
    ]
    with serve_fake_openai(models={"gpt-4o": OPENAI_CHAT}) as srv:
        async with backend_for(srv.base_url, "gpt-4o") as backend:
            for request in requests:
                completion = await backend.complete(request)
                assert len(completion.choices) == request.n
    assert srv.refusals == []
    assert srv.ok_answers() == len(requests)


@pytest.mark.network
@pytest.mark.anyio
async def test_a_raw_prompt_to_an_openai_chat_model_fails_at_once_quoting_openai() -> None:
    """OpenAI serves its chat models on /v1/chat/completions only; drpo's raw prompts (the
    paper preset's proposer, the small preset's text editor) get its 404 there."""
    with serve_fake_openai(models={"gpt-4o-mini": OPENAI_CHAT}) as srv:
        async with backend_for(srv.base_url, "gpt-4o-mini") as backend:
            with pytest.raises(PermanentBackendError, match="This is a chat model") as caught:
                await backend.complete(CompletionRequest(prompt="Once upon", max_tokens=8))
    assert caught.value.attempts == 1  # type: ignore[attr-defined]
    assert caught.value.status_code == 404  # type: ignore[attr-defined]
    assert [r.status for r in srv.refusals] == [404]


@pytest.mark.network
@pytest.mark.anyio
async def test_chat_to_a_vllm_base_model_fails_at_once_and_raw_prompts_work() -> None:
    with serve_fake_openai(models={"base": VLLM_BASE}, responder=lambda body: "upon a time") as srv:
        async with backend_for(srv.base_url, "base") as backend:
            with pytest.raises(PermanentBackendError, match="no longer allowed") as caught:
                await backend.complete(chat("hi", max_tokens=8))
            raw = await backend.complete(CompletionRequest(prompt="Once", max_tokens=8))
    assert caught.value.status_code == 400  # type: ignore[attr-defined]
    assert raw.text == "upon a time"
    assert srv.total == 2


@pytest.mark.network
@pytest.mark.anyio
@pytest.mark.parametrize("served", [OPENAI_CHAT, VLLM_INSTRUCT], ids=["openai", "vllm"])
async def test_a_request_over_the_context_window_is_permanent(served: object) -> None:
    small = replace(served, context_window=100)  # type: ignore[type-var]
    with serve_fake_openai(models={"m": small}) as srv:
        async with backend_for(srv.base_url, "m") as backend:
            fits = await backend.complete(chat("x" * 200, max_tokens=40))  # 50 + 40 tokens
            with pytest.raises(PermanentBackendError, match="larger than the context limit"):
                await backend.complete(chat("x" * 200, max_tokens=60))  # 50 + 60 tokens
    assert fits.attempts == 1
    assert srv.total == 2 and len(srv.refusals) == 1


@pytest.mark.network
@pytest.mark.anyio
async def test_transformers_serve_gives_one_choice_no_logprobs_and_keeps_the_stop() -> None:
    """What tests/test_transformers_serve.py pins down on the real server, through the double."""
    with serve_fake_openai(
        models={"smol": TRANSFORMERS_SERVE}, responder=lambda body: ["a b<END> c", "d", "e"]
    ) as srv:
        async with backend_for(srv.base_url, "smol") as backend:
            completion = await backend.complete(
                chat("q", n=3, temperature=1.0, top_logprobs=3, stop=("<END>",))
            )
    assert len(completion.choices) == 1
    assert completion.choices[0].logprobs is None
    assert completion.text == "a b<END>"
    assert completion.model == "smol@main"
    assert srv.refusals == []


@pytest.mark.network
@pytest.mark.anyio
async def test_chat_to_transformers_serve_without_a_chat_template_is_retried_as_a_500() -> None:
    """transformers serve has no handler for a missing chat template: a bare 500, which the
    backend cannot tell from a passing server fault, so it is retried until attempts run out."""
    no_template = replace(TRANSFORMERS_SERVE, endpoints=frozenset({"completions"}))
    with serve_fake_openai(models={"base": no_template}) as srv:
        async with backend_for(srv.base_url, "base", max_attempts=2) as backend:
            with pytest.raises(TransientBackendError, match="HTTP 500: Internal Server Error"):
                await backend.complete(chat("hi"))
    assert srv.total == 2
    assert [r.status for r in srv.refusals] == [500, 500]


@pytest.mark.network
@pytest.mark.anyio
async def test_exhausted_attempts_raise_transient_with_the_last_cause() -> None:
    with serve_fake_openai(faults=lambda info: "503") as srv:
        async with backend_for(srv.base_url, max_attempts=4) as backend:
            with pytest.raises(TransientBackendError, match="failed after 4 attempts") as caught:
                await backend.complete(chat("q"))
    assert srv.total == 4
    assert "HTTP 503" in str(caught.value)
    assert caught.value.attempts == 4  # type: ignore[attr-defined]
    assert not isinstance(caught.value, PermanentBackendError)


@pytest.mark.network
@pytest.mark.anyio
async def test_timeouts_are_retried_until_attempts_run_out() -> None:
    with serve_fake_openai(faults=lambda info: Fault("hang", hang_s=5)) as srv:
        async with backend_for(srv.base_url, timeout_s=0.2, max_attempts=2) as backend:
            with pytest.raises(TransientBackendError, match=r"no reply within 0\.2 s"):
                await backend.complete(chat("q"))
    assert srv.total == 2


# --------------------------------------------------------------------------------------------
# Waiting: Retry-After and backoff


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "wait"),
    [
        (Fault("429", retry_after_ms=150), 0.15),
        (Fault("429", retry_after_s=0.2), 0.2),
        (Fault("503", retry_after_s=0.1), 0.1),
    ],
    ids=["retry-after-ms", "retry-after-seconds", "503-retry-after"],
)
@pytest.mark.network
async def test_retry_after_is_honoured(fault: Fault, wait: float) -> None:
    clock = RecordingClock()
    with serve_fake_openai(faults=first_try_fails(fault)) as srv:
        async with backend_for(srv.base_url, clock=clock, backoff_base_s=10.0) as backend:
            completion = await backend.complete(chat("q"))
    assert completion.attempts == 2
    # The wait asked of the clock is the server's, not the (much longer) jittered backoff.
    assert max(clock.sleeps) == pytest.approx(wait)


@pytest.mark.network
@pytest.mark.anyio
@pytest.mark.parametrize("as_date", [False, True], ids=["seconds", "http-date"])
async def test_a_long_retry_after_makes_the_call_wait_not_fail(as_date: bool) -> None:
    clock = VirtualClock()
    fault = Fault("429", retry_after_s=150, retry_after_date=as_date)
    with serve_fake_openai(faults=first_try_fails(fault)) as srv:
        async with backend_for(srv.base_url, clock=clock, max_attempts=2) as backend:
            completion = await backend.complete(chat("q"))
    assert completion.attempts == 2
    assert srv.total == 2
    assert sum(clock.sleeps) >= 148  # an HTTP date has one-second resolution
    assert completion.latency_s >= 148  # in virtual seconds


@pytest.mark.network
@pytest.mark.anyio
async def test_a_429_retry_after_holds_every_caller_of_the_endpoint() -> None:
    clock = VirtualClock()
    with serve_fake_openai(faults=[Fault("429", retry_after_s=30)]) as srv:
        async with backend_for(srv.base_url, clock=clock, max_attempts=1) as backend:
            with pytest.raises(TransientBackendError):
                await backend.complete(chat("q"))
            held_until = backend.limiter.reserve().start_s
    assert clock.sleeps == []  # this call gave up at once (one attempt allowed) ...
    assert held_until >= clock.now() + 30  # ... but the next caller waits out the 429


def test_retry_after_parsing() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}, 0) == 0.25
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}, 0) == 0.25
    assert parse_retry_after({"retry-after": "2.5"}, 0) == 2.5
    assert parse_retry_after({"retry-after": "-3"}, 0) == 0.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 1445412470) == 10
    assert parse_retry_after({"retry-after": "soon"}, 0) is None
    assert parse_retry_after({}, 0) is None


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        delays = [full_jitter_delay(attempt, 0.5, 4.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.5 * ceiling  # spread over the range, not a fixed delay
        assert len(set(delays)) > 150


# --------------------------------------------------------------------------------------------
# Keys

SECRET = "sk-test-DoNotLeak-0123456789abcdef"


@pytest.mark.anyio
async def test_the_api_key_never_appears_in_errors_reprs_or_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    # The server wants another key and, like a careless server, echoes the one it got (OpenAI
    # itself masks all but 12 characters of it).
    models = {"fake-model": OPENAI_CHAT}
    with serve_fake_openai(models=models, api_key="sk-the-right-one", echo_key_in_401=True) as srv:
        async with backend_for(srv.base_url) as backend:
            seen += [repr(backend), repr(backend.limiter)]
            with pytest.raises(PermanentBackendError) as bad_key:
                await backend.complete(chat("q"))
            srv.api_key = None
            srv.faults = lambda info: "503"
            with pytest.raises(TransientBackendError) as exhausted:
                await backend.complete(chat("q"))
    assert KEY_ENV in str(bad_key.value)
    for error in (bad_key.value, exhausted.value):
        seen += [str(error), repr(error), "".join(traceback.format_exception(error))]
    seen.append(caplog.text)
    assert any("[redacted]" in text for text in seen)  # the echoed key was there to hide
    assert not any(SECRET in text for text in seen)
    assert not any(SECRET[8:20] in text for text in seen)


def test_a_missing_key_names_the_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(PermanentBackendError, match=KEY_ENV):
        OpenAIBackend("gpt-4o", api_key_env=KEY_ENV)
    with pytest.raises(PermanentBackendError, match=KEY_ENV):
        OpenAIBackend("m", base_url="https://api.example.com/v1", api_key_env=KEY_ENV)


@pytest.mark.network
@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_loopback_server_needs_no_key(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    auth: list[str] = []

    def record_auth(info: RequestInfo) -> None:
        auth.append(info.headers.get("authorization", ""))

    with serve_fake_openai(faults=record_auth) as srv:
        url = srv.base_url.replace("127.0.0.1", host)
        async with backend_for(url) as backend:
            completion = await backend.complete(chat("q"))
    assert completion.attempts == 1
    assert auth == ["Bearer EMPTY"]


@pytest.mark.anyio
async def test_a_loopback_server_that_wants_a_key_says_which_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with serve_fake_openai(api_key="needed") as srv:
        async with backend_for(srv.base_url) as backend:
            with pytest.raises(PermanentBackendError, match=f"needs a key: set {KEY_ENV}"):
                await backend.complete(chat("q"))


# --------------------------------------------------------------------------------------------
# Many calls, many faults

CALLS = 500
MAX_ATTEMPTS = 4
RPM = 400  # per 1 s window: the limiter sets the pace of this test
IN_FLIGHT = 32
#: Long enough that a loaded 2-core machine does not time out a healthy call (which would be
#: answered twice), short enough that the injected hangs cost little.
HANG_TIMEOUT_S = 2.0
PERMANENT_KINDS = {"context_length", "quota", "401", "404"}
#: (divisor, faults for attempts 0, 1, ...; then success). The first matching rule applies.
RULES: list[tuple[int, list[Fault | str]]] = [
    (29, ["503"] * MAX_ATTEMPTS),  # never succeeds: TransientBackendError
    (31, ["context_length"]),
    (37, ["quota"]),
    (7, [Fault("429", retry_after_s=0.02)]),
    (11, ["500", "500"]),
    (13, ["drop"]),
    (17, ["malformed"]),
    (19, ["hang"]),
    (23, ["empty"]),
    (5, ["408", Fault("429", retry_after_ms=10)]),
]


def planned_fault(call: int, attempt: int) -> Fault | str | None:
    for divisor, faults in RULES:
        if call % divisor == 0:
            return faults[attempt] if attempt < len(faults) else None
    return None


def expected_outcome(call: int) -> tuple[str, int]:
    """("ok" | "permanent" | "transient", attempts) implied by the plan."""
    for attempt in range(MAX_ATTEMPTS):
        fault = planned_fault(call, attempt)
        kind = fault.kind if isinstance(fault, Fault) else fault
        if kind is None:
            return "ok", attempt + 1
        if kind in PERMANENT_KINDS:
            return "permanent", attempt + 1
    return "transient", MAX_ATTEMPTS


CALL_ID = re.compile(r"call-(\d+)\b")


@pytest.mark.network
@pytest.mark.anyio
async def test_500_concurrent_calls_under_mixed_faults_lose_nothing_and_respect_limits() -> None:
    def plan(info: RequestInfo) -> Fault | str | None:
        match = CALL_ID.search(info.text)
        assert match, info.text
        return planned_fault(int(match.group(1)), info.seen_before)

    # A 1 s window makes 50 ms of arrival jitter matter; the headroom absorbs it (10 %: the
    # machine is small and shared), as 2 % does for a real 60 s window.
    limits = RateLimits(rpm=RPM, window_s=1.0, max_in_flight=IN_FLIGHT, headroom=0.1)
    results: dict[int, Completion | BaseException] = {}
    with serve_fake_openai(faults=plan) as srv:
        async with backend_for(
            srv.base_url, limits=limits, timeout_s=HANG_TIMEOUT_S, max_attempts=MAX_ATTEMPTS
        ) as backend:

            async def call(i: int) -> None:
                try:
                    results[i] = await backend.complete(chat(f"call-{i} please answer"))
                except (PermanentBackendError, TransientBackendError) as exc:
                    results[i] = exc

            async with anyio.create_task_group() as tg:
                for i in range(CALLS):
                    tg.start_soon(call, i)
        arrivals = srv.arrivals
        ok_counts = srv.ok_counts()
        max_window = srv.max_in_window(1.0)
        max_in_progress = srv.max_in_progress

    ids = [int(CALL_ID.search(a.text).group(1)) for a in arrivals]  # type: ignore[union-attr]
    per_call = Counter(ids)
    digests = {call: a.body_hash for call, a in zip(ids, arrivals, strict=True)}
    assert sorted(results) == list(range(CALLS))
    outcomes = Counter()
    for i in range(CALLS):
        kind, attempts = expected_outcome(i)
        outcomes[kind] += 1
        result = results[i]
        digest = digests[i]
        if kind == "ok":
            assert isinstance(result, Completion), (i, result)
            assert result.text == f"reply to: call-{i} please answer"
            assert ok_counts[digest] == 1, i  # answered exactly once
        elif kind == "permanent":
            assert isinstance(result, PermanentBackendError), (i, result)
            assert ok_counts[digest] == 0
        else:
            assert isinstance(result, TransientBackendError), (i, result)
            assert ok_counts[digest] == 0
        assert result.attempts == attempts, (i, result)  # type: ignore[union-attr]
        assert per_call[i] == attempts, i  # every attempt reached the server, none was lost
    assert len(arrivals) == sum(expected_outcome(i)[1] for i in range(CALLS))
    assert outcomes["ok"] > 400 and outcomes["permanent"] > 0 and outcomes["transient"] > 0
    assert max_window <= RPM
    assert max_in_progress <= IN_FLIGHT


# --------------------------------------------------------------------------------------------
# Shared limits


@pytest.mark.anyio
async def test_backends_of_one_endpoint_model_and_key_share_one_limiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-one")
    monkeypatch.setenv("DRPO_TEST_OTHER_KEY", "sk-two")
    limits = RateLimits(rpm=20, window_s=1.0, headroom=0.1)
    with serve_fake_openai() as srv:
        async with (
            backend_for(srv.base_url, limits=limits) as first,
            backend_for(srv.base_url, limits=limits) as second,
            backend_for(srv.base_url, api_key_env="DRPO_TEST_OTHER_KEY") as other_key,
        ):
            assert first.limiter is second.limiter
            assert other_key.limiter is not first.limiter
            async with anyio.create_task_group() as tg:
                for i in range(24):
                    tg.start_soon((first if i % 2 else second).complete, chat(f"q{i}"))
        window = srv.max_in_window(1.0)
    # Two separate limiters would have let ~36 through in a second, one lets 18 (rpm 20 less 10 %
    # headroom); the server sees arrival times, which a loaded machine bunches by a few requests
    # (CI saw 21), so the line sits between the two.
    assert srv.total == 24
    assert window < 28


# --------------------------------------------------------------------------------------------
# Prices


def test_price_table_defaults_overrides_and_unknown_models() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, cached_tokens=500_000)
    table = PriceTable.default()
    assert table.cost("gpt-4o", usage) == pytest.approx(1.25 + 0.625 + 10.0)
    assert table.cost("gpt-4o-2024-08-06", usage) == table.cost("gpt-4o", usage)
    assert table.cost("gpt-4o-mini-2024-07-18", usage) == table.cost("gpt-4o-mini", usage)
    assert table.cost("some-local-model", usage) == 0.0
    assert "gpt-4.1-mini" in table and "gpt-4-0125-preview" in table
    custom = PriceTable.from_dict(
        {"gpt-4o": {"input": 1.0, "output": 2.0}, "mine": [1.0, 0.5, 4.0]}
    )
    assert custom.price_for("gpt-4o") == ModelPrice(1.0, 1.0, 2.0)
    assert custom.cost("mine", Usage(prompt_tokens=2_000_000, cached_tokens=2_000_000)) == 1.0
    assert "gpt-4.1" in custom  # defaults stay unless left out
    assert "gpt-4.1" not in PriceTable.from_dict({"mine": [1, 1, 1]}, include_defaults=False)
    with pytest.raises(ValueError, match="'input' and 'output'"):
        PriceTable.from_dict({"bad": {"inptu": 1.0, "output": 1.0}})


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text(), min_size=1, max_size=3),
    prompt=st.booleans(),
    stop=st.lists(st.text(max_size=5), max_size=2),
    seed=st.none() | st.integers(min_value=-(2**40), max_value=2**40),
    top_logprobs=st.none() | st.integers(min_value=0, max_value=20),
    temperature=st.floats(min_value=0, max_value=2),
)
def test_request_body_bytes_are_those_json_dumps_writes(
    texts: list[str],
    prompt: bool,
    stop: list[str],
    seed: int | None,
    top_logprobs: int | None,
    temperature: float,
) -> None:
    """The body encoder is built once; its bytes must stay what ``json.dumps`` with the same
    options wrote before (issue 18), whatever the text (non-ASCII, control characters)."""
    settings_ = {
        "stop": tuple(stop),
        "seed": seed,
        "top_logprobs": top_logprobs,
        "temperature": temperature,
    }
    if prompt:
        request = CompletionRequest(prompt=texts[0], **settings_)
    else:
        messages = tuple(ChatMessage(role="user", content=text) for text in texts)
        request = CompletionRequest(messages=messages, **settings_)
    path, body = request_body("m\u00e9", request)
    assert path == ("/completions" if prompt else "/chat/completions")
    params = json.loads(body)
    old = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
    assert body == old
