"""The OpenAI-compatible API backend (OpenAI, vLLM, SGLang, TGI, ``transformers serve``, ...).

Built for thousands of concurrent calls, speaking the official ``openai`` SDK's protocol:

* one keep-alive connection pool per backend, on aiohttp (its pool and C-accelerated HTTP
  parser) or, chosen per endpoint, the official SDK's own client with its retries off: there
  is exactly ONE retry loop (ours) and every attempt passes through the shared rate limiter;
  how a request reaches the server is ``openai_http``'s concern (a plain status, headers and
  body back, one error when no reply came), and what a failure means is
  ``openai_errors``'s, the one place drpo's error types and their causes are written down;
* a request body we serialize ourselves and our own parsing of the reply into drpo's types:
  the SDK's per-call request transforms and response models cost more CPU than the HTTP
  exchange, and we need neither;
* transient failures (connection errors, timeouts, 408, 409, 429, 5xx, malformed or empty
  replies) are retried with full-jitter exponential backoff, and a server's ``retry-after-ms`` or
  ``Retry-After`` is obeyed however long it is: the call waits, it does not fail;
* failures no retry can fix (bad key, no access, unknown model, invalid request, exhausted quota,
  a request over the context limit) raise ``PermanentBackendError`` at once, with a message that
  says what to change;
* the API key is read once from the environment and never appears in an error message, a repr or
  a log line: server messages are redacted, and no client's exception (whose request objects
  carry the key in a header) is chained onto ours.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio

from drpo.backends.base import (
    CHARS_PER_TOKEN,
    Choice,
    Completion,
    CompletionRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from drpo.backends.openai_errors import (
    Endpoint,
    OpenAIPermanentError,
    OpenAITransientError,
    Retry,
    classify_status,
    classify_transport,
)
from drpo.backends.openai_http import (
    DEFAULT_HTTP_CLIENT,
    HttpClientKind,
    HttpResponse,
    HttpTransportError,
    make_poster,
)
from drpo.backends.pricing import PriceTable
from drpo.backends.ratelimit import (
    SYSTEM_CLOCK,
    Clock,
    RateLimiter,
    RateLimits,
    Reservation,
    shared_limiter,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Sent to loopback servers that need no key (vLLM, ``transformers serve``) when none is set.
PLACEHOLDER_KEY = "EMPTY"
_REDACTED = "[redacted]"


# --------------------------------------------------------------------------------------------
# Outcomes


@dataclass(frozen=True)
class _Success:
    choices: tuple[Choice, ...]
    usage: Usage
    model: str


class _MalformedResponse(Exception):
    """The reply parsed as HTTP 200 but is not a usable completion."""


# --------------------------------------------------------------------------------------------
# Small pure helpers


def is_loopback_url(base_url: str) -> bool:
    """True for servers on this machine, which may legitimately need no API key."""
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(env_var: str, base_url: str) -> str:
    """The key from ``env_var``; a loopback server may go without one, anything else may not."""
    key = os.environ.get(env_var, "").strip()
    if key:
        return key
    if is_loopback_url(base_url):
        return PLACEHOLDER_KEY
    raise OpenAIPermanentError(
        f"no API key for {base_url}: set the environment variable {env_var} "
        "(keys are read only from the environment, never from config files)"
    )


def estimate_tokens(request: CompletionRequest) -> int:
    """Tokens a request may use, known before the call: its prompt's chars at
    :data:`~drpo.backends.base.CHARS_PER_TOKEN`, plus ``max_tokens * n``."""
    if request.messages is not None:
        chars = sum(len(message.content) for message in request.messages)
    else:
        chars = len(request.prompt or "")
    return math.ceil(chars / CHARS_PER_TOKEN) + request.max_tokens * request.n


def full_jitter_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """AWS-style full jitter: uniform in [0, min(max, base * 2**(attempt-1))], so many callers
    that failed together do not retry together."""
    ceiling = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    return rng.uniform(0.0, ceiling)


# --------------------------------------------------------------------------------------------
# Requests and replies as JSON

#: Built once: ``json.dumps`` with any option set builds a new encoder on every call (~0.7 us
#: of the ~7 us a request body costs); the bytes are the same.
_BODY_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _sampling_params(model: str, request: CompletionRequest) -> dict[str, Any]:
    """The settings chat and text completions share."""
    params: dict[str, Any] = {
        "model": model,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "n": request.n,
    }
    if request.stop:
        params["stop"] = list(request.stop)
    if request.seed is not None:
        params["seed"] = request.seed
    return params


def _chat_params(model: str, request: CompletionRequest) -> dict[str, Any]:
    assert request.messages is not None
    params = _sampling_params(model, request)
    params["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    if request.top_logprobs is not None:
        params["logprobs"] = True
        params["top_logprobs"] = request.top_logprobs
    return params


def _text_params(model: str, request: CompletionRequest) -> dict[str, Any]:
    params = _sampling_params(model, request)
    params["prompt"] = request.prompt
    if request.top_logprobs is not None:
        params["logprobs"] = request.top_logprobs
    return params


def request_body(model: str, request: CompletionRequest) -> tuple[str, bytes]:
    """The endpoint path and the JSON body of ``request``, as sent (UTF-8, compact)."""
    if request.is_chat:
        path, params = "/chat/completions", _chat_params(model, request)
    else:
        path, params = "/completions", _text_params(model, request)
    return path, _BODY_ENCODER.encode(params).encode()


def _field(obj: Mapping[str, Any], name: str) -> Any:
    """``obj[name]`` of a JSON object, None when absent; a non-object is a malformed reply."""
    if not isinstance(obj, dict):
        raise _MalformedResponse(f"expected a JSON object, got {type(obj).__name__}")
    return obj.get(name)


def _sorted_choices(raw: Any) -> list[Any]:
    if not isinstance(raw, list):
        raise _MalformedResponse("no list of choices")
    return sorted(raw, key=lambda c: (c.get("index") if isinstance(c, dict) else None) or 0)


def _chat_logprobs(choice: Mapping[str, Any]) -> tuple[TokenLogprob, ...] | None:
    logprobs = _field(choice, "logprobs")
    content = _field(logprobs, "content") if logprobs is not None else None
    if content is None:
        return None
    return tuple(
        TokenLogprob(
            token=item["token"],
            logprob=item["logprob"],
            top=tuple(
                TopLogprob(token=alt["token"], logprob=alt["logprob"])
                for alt in (item.get("top_logprobs") or ())
            ),
        )
        for item in content
    )


def _text_logprobs(choice: Mapping[str, Any]) -> tuple[TokenLogprob, ...] | None:
    logprobs = _field(choice, "logprobs")
    tokens = _field(logprobs, "tokens") if logprobs is not None else None
    if tokens is None:
        return None
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return tuple(
        TokenLogprob(
            token=token,
            logprob=0.0 if value is None else float(value),
            top=tuple(
                TopLogprob(token=alt, logprob=float(alt_value))
                for alt, alt_value in sorted((top or {}).items(), key=lambda kv: -kv[1])
            ),
        )
        for token, value, top in zip(tokens, values, tops, strict=True)
    )


def _map_usage(raw: Any) -> Usage:
    if raw is None:
        return Usage()
    details = _field(raw, "prompt_tokens_details")
    cached = _field(details, "cached_tokens") if details is not None else None
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(cached or 0),
    )


def map_response(parsed: Any, *, chat: bool, fallback_model: str) -> _Success:
    """Turn a decoded chat or text completion reply (JSON) into our types, or raise
    ``_MalformedResponse``: nothing upstream validates it, so any missing field surfaces here."""
    if not isinstance(parsed, dict):
        raise _MalformedResponse("the body is not a JSON object")
    try:
        choices = []
        for choice in _sorted_choices(parsed.get("choices")):
            if chat:
                text = _field(_field(choice, "message"), "content") or ""
                logprobs = _chat_logprobs(choice)
            else:
                text = _field(choice, "text") or ""
                logprobs = _text_logprobs(choice)
            choices.append(
                Choice(text=text, finish_reason=choice.get("finish_reason"), logprobs=logprobs)
            )
        usage = _map_usage(parsed.get("usage"))
    except _MalformedResponse:
        raise
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise _MalformedResponse(f"unexpected shape ({type(exc).__name__})") from None
    if not choices:
        raise _MalformedResponse("empty choice list")
    model = parsed.get("model")
    return _Success(
        tuple(choices), usage, model if isinstance(model, str) and model else fallback_model
    )


# --------------------------------------------------------------------------------------------
# The backend


class OpenAIBackend:
    """An OpenAI-compatible ``/v1`` endpoint as a ``Backend``.

    ``limits`` are shared with every other backend of the same base URL, model and key (see
    ``drpo.backends.ratelimit``); explicit limits can only tighten a shared limiter. ``timeout_s``
    bounds each attempt; ``max_attempts`` counts the first try. ``prices`` defaults to the
    built-in table. ``clock`` is for tests: it injects virtual time into waits and backoff.

    ``http`` picks the HTTP client (see ``HttpClientKind``): the default, aiohttp, costs the
    least CPU per call and runs on asyncio only.

    ``Completion.latency_s`` is what the caller waited: rate-limit waits and retries included.
    Errors carry ``attempts`` (and permanent ones the HTTP ``status_code``).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        limits: RateLimits | None = None,
        prices: PriceTable | None = None,
        timeout_s: float = 600.0,
        max_attempts: int = 10,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        clock: Clock | None = None,
        http: HttpClientKind = DEFAULT_HTTP_CLIENT,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.model = model
        self._endpoint = (base_url or DEFAULT_BASE_URL).rstrip("/")
        key = read_api_key(api_key_env, self._endpoint)
        self._errors = Endpoint(
            model=model,
            url=self._endpoint,
            api_key_env=api_key_env,
            placeholder_key=key == PLACEHOLDER_KEY,
            redact=_redactor(key),
        )
        self._clock: Clock = clock or SYSTEM_CLOCK
        self._limiter: RateLimiter = shared_limiter(
            self._endpoint, model, key, limits, clock=self._clock
        )
        self._prices = prices or PriceTable.default()
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._rng = random.Random()
        self._poster = make_poster(
            http,
            api_key=key,
            base_url=self._endpoint,
            timeout_s=timeout_s,
            pool=self._limiter.limits.max_in_flight,
            trust_env=not is_loopback_url(self._endpoint),
        )

    # ---- Backend protocol ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def limiter(self) -> RateLimiter:
        """The limiter shared with every backend of this endpoint, model and key."""
        return self._limiter

    async def complete(self, request: CompletionRequest) -> Completion:
        """One completion, retried as needed; raises Permanent/TransientBackendError."""
        started = self._clock.now()
        estimate = estimate_tokens(request)
        last: Retry | None = None
        for attempt in range(1, self.max_attempts + 1):
            outcome = await self._attempt(request, estimate)
            if isinstance(outcome, _Success):
                return Completion(
                    choices=outcome.choices,
                    model=outcome.model,
                    usage=outcome.usage,
                    latency_s=max(0.0, self._clock.now() - started),
                    attempts=attempt,
                    cost_usd=self._prices.cost(self.model, outcome.usage),
                )
            if isinstance(outcome, OpenAIPermanentError):
                outcome.attempts = attempt
                raise outcome
            last = outcome
            if attempt < self.max_attempts:
                await self._wait_before_retry(attempt, outcome)
        assert last is not None
        raise OpenAITransientError(
            f"{self.model} at {self._endpoint} failed after {self.max_attempts} attempts; "
            f"last error: {last.cause}",
            last_cause=last.cause,
            attempts=self.max_attempts,
        )

    async def aclose(self) -> None:
        await self._poster.aclose()

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, endpoint={self._endpoint!r})"

    # ---- one attempt ----------------------------------------------------------------------

    async def _attempt(
        self, request: CompletionRequest, estimate: int
    ) -> _Success | Retry | OpenAIPermanentError:
        """Send once through the limiter and say what happened; never raises for API errors."""
        async with self._limiter.slot(estimate) as reservation:
            sent = self._clock.now()
            path, body = request_body(self.model, request)
            try:
                with anyio.fail_after(self.timeout_s):
                    reply = await self._poster.post(path, body)
            except HttpTransportError as err:
                return classify_transport(err, self.timeout_s)
            except TimeoutError:
                return Retry(f"no reply within {self.timeout_s:g} s")
            self._limiter.observe_headers(reply.headers)
            if not reply.ok:
                return self._after_refusal(reply)
            outcome = self._parse(reply, request.is_chat, reservation)
            if isinstance(outcome, _Success):  # the latency the in-flight cap follows
                self._limiter.observe_latency(self._clock.now() - sent)
            return outcome

    def _parse(self, raw: HttpResponse, chat: bool, reservation: Reservation) -> _Success | Retry:
        try:
            success = map_response(json.loads(raw.content), chat=chat, fallback_model=self.model)
        except _MalformedResponse as exc:
            return Retry(f"malformed response: {exc}")
        except (ValueError, TypeError) as exc:
            # JSON that does not decode (ValueError), or a body that is no text (TypeError).
            return Retry(f"malformed response ({type(exc).__name__})")
        reservation.reconcile(success.usage.total_tokens)
        return success

    def _after_refusal(self, reply: HttpResponse) -> Retry | OpenAIPermanentError:
        """Classify a reply that is not a 2xx; a rate-limit 429 with a wait also holds the
        limiter."""
        outcome = classify_status(reply, self._errors, self._clock.wall())
        if isinstance(outcome, Retry) and reply.status == 429 and outcome.retry_after_s:
            self._limiter.pause(outcome.retry_after_s)
        return outcome

    # ---- waiting ------------------------------------------------------------------------

    def backoff_delay(self, attempt: int, retry_after_s: float | None) -> float:
        """The server's wait if it gave one (however long), else full-jitter backoff."""
        if retry_after_s is not None:
            return retry_after_s
        return full_jitter_delay(attempt, self.backoff_base_s, self.backoff_max_s, self._rng)

    async def _wait_before_retry(self, attempt: int, outcome: Retry) -> None:
        delay = self.backoff_delay(attempt, outcome.retry_after_s)
        level = logging.WARNING if delay >= 30 else logging.DEBUG
        log.log(
            level,
            "retrying %s at %s in %.2f s (attempt %d of %d failed: %s)",
            self.model,
            self._endpoint,
            delay,
            attempt,
            self.max_attempts,
            outcome.cause,
        )
        if delay > 0:
            await self._clock.sleep(delay)


def _redactor(key: str) -> Callable[[str], str]:
    """A function that removes ``key`` from text (the placeholder key is not a secret)."""
    if not key or key == PLACEHOLDER_KEY:
        return lambda text: text
    return lambda text: text.replace(key, _REDACTED)
