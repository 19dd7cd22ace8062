"""A programmable OpenAI-compatible server for tests and benchmarks (loopback only).

A small Starlette app run by uvicorn on 127.0.0.1, on a free port, in a background thread.
Tests import it as ``fakeserver`` (pytest puts tests/ on ``sys.path``); benchmarks put the
repository root on ``sys.path`` and import ``tests.fakeserver``::

    from fakeserver import Fault, serve_fake_openai

    def plan(info):  # fail the first try of every request, then answer it
        return Fault("503") if info.seen_before == 0 else None

    with serve_fake_openai(responder=lambda body: "hi", faults=plan, latency_s=0.01) as server:
        backend = OpenAIBackend("fake-model", base_url=server.base_url)
        ...
        assert server.total == 2 and server.ok_answers() == 1

It serves ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``, and:

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
(truncated JSON with status 200), ``empty`` (a valid reply with no choices).
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
from starlette.responses import JSONResponse, Response
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
# Replies


def _shape_text(text: str, stop: Sequence[str], max_tokens: int | None) -> tuple[list[str], str]:
    """Apply stop strings, then max_tokens; return the tokens and the finish reason."""
    finish = "stop"
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    tokens = _tokens(text)
    trailing = text[len("".join(tokens)) :]
    if trailing:
        tokens.append(trailing)  # whitespace after the last word is part of the text too
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens = tokens[:max_tokens]
        finish = "length"
    return tokens, finish


def _logprob(position: int) -> float:
    return -round(0.1 * (1 + position % 5), 3)


def _alternatives(token: str, position: int, k: int) -> list[tuple[str, float]]:
    """The token itself first, then made-up alternatives, each less likely than the last."""
    first = _logprob(position)
    return [(token, first)] + [(f"alt{j}", first - j) for j in range(1, k)]


def _chat_choice(index: int, tokens: list[str], finish: str, top_k: int | None) -> dict[str, Any]:
    logprobs = None
    if top_k is not None:
        logprobs = {
            "content": [
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
            ],
            "refusal": None,
        }
    return {
        "index": index,
        "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
        "finish_reason": finish,
        "logprobs": logprobs,
    }


def _text_choice(index: int, tokens: list[str], finish: str, top_k: int | None) -> dict[str, Any]:
    logprobs = None
    if top_k is not None:
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        logprobs = {
            "tokens": tokens,
            "token_logprobs": [_logprob(i) for i in range(len(tokens))],
            "top_logprobs": [
                dict(_alternatives(token, i, top_k)[:top_k]) for i, token in enumerate(tokens)
            ],
            "text_offset": offsets,
        }
    return {"index": index, "text": "".join(tokens), "finish_reason": finish, "logprobs": logprobs}


def _error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


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


class FakeOpenAIServer:
    """The server's behaviour and counters; ``start``/``stop`` run it (or use the helper).

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
        models: Sequence[str] = ("fake-model",),
        unknown_model_404: bool = False,
        api_key: str | None = None,
        cached_tokens: int = 0,
    ) -> None:
        self.responder: Responder = responder or default_responder
        self.latency_s: Latency = latency_s
        self.rpm_limit = rpm_limit
        self.rpm_window_s = rpm_window_s
        self.ratelimit_headers = ratelimit_headers
        self.extra_headers = extra_headers
        self.models = list(models)
        self.unknown_model_404 = unknown_model_404
        self.api_key = api_key
        self.cached_tokens = cached_tokens
        self._lock = threading.RLock()
        self._counters = _Counters()
        self._accepted: deque[float] = deque()  # for rpm_limit: times of requests let through
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

    def _headers_for(self, info: RequestInfo) -> dict[str, str]:
        headers = {"x-request-id": f"req_{info.index}"}
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
            return JSONResponse(_error_body("body is not JSON", "invalid_request_error"), 400)
        if not isinstance(body, dict):
            return JSONResponse(_error_body("body is not an object", "invalid_request_error"), 400)
        info, fault, limited_for = self._arrive(path, body, dict(request.headers))
        try:
            return await self._respond(request, info, fault, limited_for)
        finally:
            with self._lock:
                self._counters.in_progress -= 1

    async def _respond(
        self, request: Request, info: RequestInfo, fault: Fault, limited_for: float | None
    ) -> Response:
        latency = fault.latency_s
        if latency is None:
            latency = self.latency_s(info) if callable(self.latency_s) else self.latency_s
        if latency > 0:
            await anyio.sleep(latency)
        headers = self._headers_for(info)
        sent_key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if self.api_key is not None and sent_key != self.api_key:
            return self._error(401, headers, self._bad_key_message(sent_key), "invalid_api_key")
        model = info.body.get("model")
        if self.unknown_model_404 and model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return self._error(404, headers, message, "model_not_found")
        if limited_for is not None:
            headers["retry-after"] = f"{max(0.0, limited_for):.3f}"
            return self._error(
                429, headers, "Rate limit reached for requests", "rate_limit_exceeded"
            )
        return await self._fault_reply(request, info, fault, headers, sent_key)

    @staticmethod
    def _bad_key_message(sent_key: str) -> str:
        # Like a careless server, echo the whole key: the client must redact it.
        return f"Incorrect API key provided: {sent_key}. You can find your API key in settings."

    @staticmethod
    def _error(
        status: int, headers: dict[str, str], message: str, code: str | None, kind: str = ""
    ) -> Response:
        kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
        return JSONResponse(_error_body(message, kind, code), status, headers=headers)

    async def _fault_reply(
        self,
        request: Request,
        info: RequestInfo,
        fault: Fault,
        headers: dict[str, str],
        sent_key: str,
    ) -> Response:
        kind = fault.kind
        if kind == "ok":
            return self._ok(info, headers)
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
            return self._error(401, headers, self._bad_key_message(sent_key), "invalid_api_key")
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
            reply = self._reply_body(info, [])
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

    def _ok(self, info: RequestInfo, headers: dict[str, str]) -> Response:
        body = info.body
        n = int(body.get("n") or 1)
        replies = self.responder(body)
        texts = [replies] * n if isinstance(replies, str) else list(replies)
        if len(texts) != n:
            texts = [texts[i % len(texts)] for i in range(n)] if texts else [""] * n
        reply = self._reply_body(info, texts)
        with self._lock:
            self._counters.ok_counts[info.body_hash] += 1
        return JSONResponse(reply, 200, headers=headers)

    def _reply_body(self, info: RequestInfo, texts: list[str]) -> dict[str, Any]:
        body = info.body
        chat = info.path == CHAT_PATH
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if chat:
            top_k = body.get("top_logprobs", 0) if body.get("logprobs") else None
        else:
            top_k = body.get("logprobs")
        choices, completion_tokens = [], 0
        for index, text in enumerate(texts):
            tokens, finish = _shape_text(text, stop, max_tokens)
            completion_tokens += len(tokens)
            make = _chat_choice if chat else _text_choice
            choices.append(make(index, tokens, finish, top_k))
        prompt_tokens = max(1, math.ceil(len(info.text) / 4))
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{info.index}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt_tokens)},
            },
        }

    async def _list_models(self, request: Request) -> Response:
        with self._lock:
            self._counters.total += 1
            self._counters.by_path[MODELS_PATH] += 1
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
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
