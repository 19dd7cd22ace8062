"""What drpo makes of an OpenAI-compatible endpoint's failures, all in one place.

A poster (``drpo.backends.openai_http``) hands back a reply of any status, or raises
``HttpTransportError`` when no reply came; :func:`classify_status` and
:func:`classify_transport` turn either into an outcome, read from the status and the error body
alone (never from a client library's exception classes or chains), so every HTTP client is
classified alike:

=====================================================  ======================================
What came back                                         drpo's outcome
=====================================================  ======================================
no reply: cannot connect, disconnected, unreadable     retried (``Retry``); after the last
reply, or none within ``timeout_s``                    attempt ``OpenAITransientError``
a 2xx whose body is not a completion                   retried, as above (the backend's parser)
408, 409, 429, any 5xx                                 retried, waiting what ``retry-after-ms``
                                                       or ``Retry-After`` asks however long;
                                                       a 429 that says so pauses the limiter
``insufficient_quota`` (code or type), any status      ``OpenAIPermanentError``: add credit
``context_length_exceeded``, or 400/413/422 saying     ``OpenAIPermanentError``: shorten the
"context length"                                       prompt or lower max_tokens
401                                                    ``OpenAIPermanentError``: the key
403                                                    ``OpenAIPermanentError``: no access
404                                                    ``OpenAIPermanentError``: model or URL
413; 400 or 422; any other status                      ``OpenAIPermanentError``: the request
=====================================================  ======================================

``OpenAIPermanentError`` is a ``PermanentBackendError`` (a run stops at once and says what to
change) with the HTTP ``status_code``; ``OpenAITransientError`` is a ``TransientBackendError``
with the ``last_cause``. The error body is read as OpenAI, vLLM, SGLang, TGI and ``transformers
serve`` write it: ``{"error": {"message", "type", "code"}}``, ``{"error": "text"}``,
``{"detail": ...}``, ``{"message": ...}`` or plain text. Server text quoted in a message has the
API key removed and is cut to 300 characters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from drpo.backends.base import PermanentBackendError, TransientBackendError
from drpo.backends.openai_http import HttpResponse, HttpTransportError

#: Statuses worth another try besides 5xx: timeout, conflict, rate limited.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
#: Server text quoted in our errors is cut here; it is for humans, not for parsing.
MAX_QUOTED_CHARS = 300
_CONTEXT_WORDS = ("context length", "context_length", "context window", "maximum context")


class OpenAIPermanentError(PermanentBackendError):
    """A call the endpoint will never accept; ``status_code`` is None when no HTTP reply came."""

    def __init__(self, message: str, *, status_code: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.status_code = status_code
        self.attempts = attempts


class OpenAITransientError(TransientBackendError):
    """Every allowed attempt failed with a retryable error; ``last_cause`` says the last one."""

    def __init__(self, message: str, *, last_cause: str, attempts: int):
        super().__init__(message)
        self.last_cause = last_cause
        self.attempts = attempts


@dataclass(frozen=True)
class Retry:
    """An attempt failed in a way another attempt may fix; ``cause`` is safe to show."""

    cause: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class ErrorBody:
    """The ``code``, ``type`` and ``message`` of an error reply, whatever shape it has."""

    code: str = ""
    type: str = ""
    message: str = ""

    @classmethod
    def parse(cls, content: bytes) -> ErrorBody:
        text = content.decode("utf-8", errors="replace").strip()
        try:
            body: Any = json.loads(text)
        except ValueError:
            return cls(message=text)
        if isinstance(body, Mapping) and "error" in body:
            body = body["error"]  # OpenAI's envelope; vLLM and SGLang write the same
        if isinstance(body, Mapping):
            message = body.get("message") or body.get("detail") or body.get("error") or ""
            return cls(
                code=str(body.get("code") or ""),
                type=str(body.get("type") or ""),
                message=message if isinstance(message, str) else str(message),
            )
        if isinstance(body, str):
            return cls(message=body)
        return cls(message=text)


@dataclass(frozen=True)
class Endpoint:
    """What a message about a failure names: the model, the URL, the key's variable."""

    model: str
    url: str
    api_key_env: str
    #: The key is the placeholder sent to a loopback server that needs none.
    placeholder_key: bool
    #: Removes the key from server text.
    redact: Callable[[str], str]

    def quote(self, message: str) -> str:
        """Server text made safe to show: the key removed, and cut to a readable length."""
        text = self.redact(message.strip()) or "(no message)"
        if len(text) > MAX_QUOTED_CHARS:
            text = text[:MAX_QUOTED_CHARS] + "..."
        return text


def classify_transport(error: HttpTransportError, timeout_s: float) -> Retry:
    """No reply came: always worth another attempt."""
    if error.timed_out:
        return Retry(f"no reply within {timeout_s:g} s")
    return Retry(f"connection error ({error.cause})")


def classify_status(
    reply: HttpResponse, endpoint: Endpoint, wall_now: float
) -> Retry | OpenAIPermanentError:
    """The outcome of a reply that is not a 2xx (see the module's table)."""
    status = reply.status
    body = ErrorBody.parse(reply.content)
    said = endpoint.quote(body.message)
    where = f"{endpoint.model!r} at {endpoint.url}"

    def permanent(text: str) -> OpenAIPermanentError:
        return OpenAIPermanentError(text, status_code=status)

    if "insufficient_quota" in (body.code, body.type):
        return permanent(
            f"the API key's quota is exhausted (HTTP {status} insufficient_quota) for "
            f"{where}: add credit or raise the spending limit; retrying will not help. "
            f"Server said: {said}"
        )
    if body.code == "context_length_exceeded" or (
        status in (400, 413, 422) and any(w in body.message.lower() for w in _CONTEXT_WORDS)
    ):
        return permanent(
            f"the request is larger than the context limit of {where} (HTTP {status} "
            f"context_length_exceeded): shorten the prompt or lower max_tokens. "
            f"Server said: {said}"
        )
    if status in RETRYABLE_STATUSES or status >= 500:
        return Retry(f"HTTP {status}: {said}", parse_retry_after(reply.headers, wall_now))
    if status == 401:
        hint = (
            f"the server needs a key: set {endpoint.api_key_env}"
            if endpoint.placeholder_key
            else f"check the key in {endpoint.api_key_env}"
        )
        return permanent(
            f"{endpoint.url} rejected the API key (HTTP 401): {hint}. Server said: {said}"
        )
    if status == 403:
        return permanent(
            f"permission denied for {where} (HTTP 403): the key has no access to this model "
            f"or project. Server said: {said}"
        )
    if status == 404:
        return permanent(
            f"unknown model {endpoint.model!r} or wrong base URL {endpoint.url!r} (HTTP 404): "
            f"check the model name and that the base URL ends in /v1. Server said: {said}"
        )
    if status == 413:
        return permanent(f"the request is too large for {where} (HTTP 413). Server said: {said}")
    if status in (400, 422):
        return permanent(f"{where} rejected the request as invalid (HTTP {status}): {said}")
    return permanent(f"{where} refused the request (HTTP {status}): {said}")


def parse_retry_after(headers: Mapping[str, str], wall_now: float) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``Retry-After`` (seconds or
    an HTTP date). None when neither header is there or readable; never negative."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    text = headers.get("retry-after")
    if text is None:
        return None
    try:
        value = float(text)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT, even when it fails to say so
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - wall_now)


__all__ = [
    "RETRYABLE_STATUSES",
    "Endpoint",
    "ErrorBody",
    "OpenAIPermanentError",
    "OpenAITransientError",
    "Retry",
    "classify_status",
    "classify_transport",
    "parse_retry_after",
]
